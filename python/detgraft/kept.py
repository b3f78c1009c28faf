"""The frozen base computed once per training example, not once per step (the ``branch`` strategy).

With ``branch`` the base (backbone, FPN, RPN and the teacher) is frozen and bit-identical, so what
it computes for an example in a training step depends on the example alone. ``keep_frozen``
computes it once for each example the run's steps read (each training image, and its mirror image
when flips are on: ``TrainingSet.batch_keys``), with a progress bar, before the first step;
``KeptStep`` computes a step's losses from what was kept. The family's ``frozen_pass`` and
``kept_losses`` (``detgraft.model.families``) say what is kept and replay the step's random draws,
so each step samples the same RoIs and computes the same losses as ``model(images, targets)``
would; the difference is that each image's base runs alone, not padded in a batch with others (the
same numbers up to float rounding when a batch's images are the same size; ``benchmarks/kept.py``
measures it).

What is kept lives in memory, up to ``settings.frozen_memory`` GB, in float16 when
``settings.frozen_dtype`` says so (``auto``: when the examples would not fit as computed); examples
beyond the budget are computed in their step as before. Nothing is kept (every step computes the
base, as torchvision's loop does) with ``--jitter`` (each step draws a new crop of an image), a
transform that draws each image's size from several, or a family without a ``frozen_pass``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .data.batches import TrainingSet
from .heads.frozen import Kept, nbytes
from .model.batchnorm import batchnorm_in_eval_mode
from .model.families import BranchKit, family
from .progress import track
from .settings import ExtendSettings
from .strategies.calibrate import chunks

__all__ = ["KeptStep", "KeptStore", "keep_frozen", "not_kept"]

log = logging.getLogger(__name__)

Key = tuple[int, bool, "int | None"]  # TrainingSet.example's arguments: index, flip, jitter seed


def not_kept(model: nn.Module, settings: ExtendSettings) -> str | None:
    """Why the frozen base is computed in every step of this run (None: it is kept)."""
    kind = family(model)
    kit = kind.branch
    if settings.strategy != "branch":
        return f"--strategy {settings.strategy} trains the base"
    if not settings.frozen_memory:
        return "--frozen-memory 0"
    if settings.jitter:
        return "--jitter draws a new crop of each image in each step"
    if kit is None or kit.frozen_pass is None:
        return f"not written for {kind.name} yet"
    return kit.kept_unfit(model) if kit.kept_unfit else None


class KeptStore:
    """What the frozen base computed for each example (``Kept``), by key, within a memory budget."""

    def __init__(self, model: nn.Module, kit: BranchKit, data: TrainingSet, settings: ExtendSettings) -> None:
        self.model, self.kit, self.data = model, kit, data
        self.device = torch.device(settings.device)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp)
        self.batch = settings.batch_size  # examples computed together (one batch where they are of one size)
        self.budget = int(settings.frozen_memory * 1e9)
        self.dtype_setting = settings.frozen_dtype
        self.dtype: torch.dtype | None = None  # None: as computed
        self.kept: dict[Key, Kept] = {}
        self.used = 0

    def compute(self, keys: list[Key]) -> list[Kept]:
        """The frozen base on examples, as the training step computes it (its precision too)."""
        examples = [self.data.example(*key) for key in keys]
        images = [image.to(self.device) for image, _ in examples]
        targets = [{k: v.to(self.device) for k, v in target.items()} for _, target in examples]
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.kit.frozen_pass(self.model, images, targets)

    def fill(self, keys: list[Key]) -> None:
        """Computes and keeps ``keys`` in order, ``batch`` at a time, until the budget is spent (the
        rest are computed in their steps); the first example's size decides ``auto``'s dtype."""
        was_training = self.model.training
        self.model.train()
        batchnorm_in_eval_mode(self.model)
        try:
            full = False
            for chunk in track(chunks(keys, self.batch), "frozen base, once per image"):
                for key, kept in zip(chunk, self.compute(chunk)):
                    if not self.kept:
                        self.dtype = self._choose_dtype(nbytes(kept) * len(keys))
                    kept = kept.stored(self.dtype)
                    full = self.used + nbytes(kept) > self.budget
                    if full:
                        break
                    self.kept[key] = kept
                    self.used += nbytes(kept)
                if full:
                    break
        finally:
            self.model.train(was_training)
        shown = "as computed" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        log.info(
            "frozen base kept for %d of %d training examples (%.2f GB, %s)%s",
            len(self.kept),
            len(keys),
            self.used / 1e9,
            shown,
            ""
            if len(self.kept) == len(keys)
            else f"; the other {len(keys) - len(self.kept)} are computed in each step "
            f"(raise --frozen-memory, now {self.budget / 1e9:g} GB, to keep them too)",
        )

    def _choose_dtype(self, total: int) -> torch.dtype | None:
        if self.dtype_setting == "float16" or (self.dtype_setting == "auto" and total > self.budget):
            return torch.float16
        return None

    def get(self, key: Key) -> Kept:
        kept = self.kept.get(key)
        return kept if kept is not None else self.compute([key])[0]


class KeptStep(nn.Module):
    """A training step on kept examples: ``forward(keys)`` returns the loss dict that
    ``model(images, targets)`` returns for those examples in training mode (a module, so that
    torchrun's DistributedDataParallel wraps it as it wraps the model)."""

    def __init__(self, model: nn.Module, store: KeptStore) -> None:
        super().__init__()
        self.model = model
        self.store = store

    def forward(self, keys: list[Key]) -> dict[str, torch.Tensor]:
        batchnorm_in_eval_mode(self.model)  # as the branch strategy's hook does before the model's forward
        return self.store.kit.kept_losses(self.model, [self.store.get(k) for k in keys])


def keep_frozen(
    model: nn.Module, data: TrainingSet, settings: ExtendSettings, start: int, part: tuple[int, int] = (0, 1)
) -> KeptStore | None:
    """The frozen base computed for every example that steps ``start`` .. ``settings.steps - 1``
    read (this process's ``part`` of each batch), or None when it cannot be kept (``not_kept``,
    logged): each step then computes it."""
    reason = not_kept(model, settings)
    if reason is not None:
        if settings.strategy == "branch":
            log.info("the frozen base is computed in every step: %s", reason)
        return None
    args = (settings.batch_size, settings.seed, settings.hflip, settings.jitter, part)
    keys = sorted({key for step in range(start, settings.steps) for key in data.batch_keys(step, *args)})
    store = KeptStore(model, family(model).branch, data, settings)
    store.fill(keys)
    return store
