"""The training loop of ``detgraft extend``: torchvision's (``loss = sum(model(images,
targets).values())``), seeded, with mixed precision, torchrun data parallelism, Ctrl-C that stops
after the step, and ``out/last`` written as a whole so that ``--resume`` continues as if the run
had not stopped (batches, flips, samplers and optimizer state are restored).

``optimizer_and_schedule`` and ``train_loop`` are what a script of one's own can reuse
(``detgraft.demo`` does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import nn

from . import distributed
from .data.batches import training_batches
from .kept import KeptStep, keep_frozen
from .model.checkpoint import save_checkpoint, sha256_file
from .model.families import family
from .progress import progress
from .settings import ExtendSettings, auto_lr

__all__ = ["LAST", "check_resume", "load_last", "make_scaler", "optimizer_and_schedule", "peak_memory_mb", "train_loop"]

log = logging.getLogger(__name__)

LAST, STATE = "last", "train_state.pt"


def optimizer_and_schedule(model: nn.Module, settings: ExtendSettings):
    """SGD over the parameters that require grad (at ``auto_lr`` when ``settings.lr`` is None);
    linear warm-up, then cosine decay to 0 at ``steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = settings.lr if settings.lr is not None else auto_lr(settings.strategy, family(model))
    optimizer = torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    warm, total = settings.warmup, settings.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(warm, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
    )
    return optimizer, scheduler


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step; a second one interrupts."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to interrupt at once)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def make_scaler(settings: ExtendSettings) -> torch.amp.GradScaler:
    """fp16's gradient scaler (a no-op for the other precisions)."""
    return torch.amp.GradScaler(torch.device(settings.device).type, enabled=settings.amp == "fp16")


def train_loop(
    model, data, settings, optimizer, scheduler, step, out, scaler=None, writer=None, store="auto"
) -> tuple[dict[str, float], list[float]]:
    """Trains from ``step`` to ``settings.steps`` (forward and loss in ``settings.amp`` precision,
    the loss scaled by ``scaler`` for fp16); returns the last step's losses and every step's total
    loss (the mean over the processes under torchrun). ``writer``: a TensorBoard SummaryWriter.
    ``store``: what the frozen base computed for the run's examples (``detgraft.kept``; "auto":
    ``keep_frozen`` decides and computes it here; None: every step computes the whole model)."""
    model.train()
    scaler = scaler or make_scaler(settings)
    device_type = torch.device(settings.device).type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp)
    rank, processes = distributed.world()
    parts: dict[str, float] = {}
    curve: list[float] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
    )
    if store == "auto":
        store = keep_frozen(model, data, settings, step, part=(rank, processes))
    if store is not None:  # steps read what the frozen base computed once per example (detgraft.kept)
        args = (settings.batch_size, settings.seed, settings.hflip, settings.jitter, (rank, processes))
        batches = ((data.batch_keys(s, *args),) for s in range(step, settings.steps))
        trained = distributed.wrap(KeptStep(model, store))
    else:
        batches = iter(training_batches(data, step, settings.steps, settings, part=(rank, processes)))
        trained = distributed.wrap(model)
    tick = time.perf_counter()
    with progress(*columns, transient=False, disable=rank > 0) as bar, _StopRequest() as stop:
        task = bar.add_task(settings.strategy, total=settings.steps, completed=step, losses="", rate="")
        while step < settings.steps:
            inputs = next(batches)
            if store is None:
                images, targets = inputs
                images = [im.to(settings.device) for im in images]
                targets = [{k: v.to(settings.device) for k, v in t.items()} for t in targets]
                inputs = (images, targets)
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                loss_dict = trained(*inputs)
            loss = sum(v.float() for v in loss_dict.values())
            reported = distributed.mean(torch.stack([v.detach() for v in loss_dict.values()]))
            parts = dict(zip(loss_dict, reported.tolist()))
            value = float(reported.sum())
            curve.append(value)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss is {value} at step {step} ({_fmt(parts)}): training stopped. The last good "
                    f"checkpoint is {out / LAST}; lower --lr (now {settings.lr}) and start again, or --resume"
                )
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            bar.update(task, completed=step, losses=_fmt(parts), rate=f"{1 / max(now - tick, 1e-9):.1f} it/s")
            for name, v in (parts | {"total": value}).items() if writer else ():
                writer.add_scalar(f"loss/{name}", v, step)
            tick = now
            if step % 50 == 0:
                log.info("step %d/%d %s", step, settings.steps, _fmt(parts))
            stopping = distributed.any_process(stop.requested, settings.device)
            if rank == 0 and (step % settings.checkpoint_every == 0 or step == settings.steps or stopping):
                _save_last(out, model, optimizer, scheduler, step, scaler)
            if stopping and step < settings.steps:
                raise KeyboardInterrupt(f"stopped at step {step}; continue with --resume (checkpoint {out / LAST})")
    return parts, curve


def _fmt(parts: dict[str, float]) -> str:
    return " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in parts.items())


def _save_last(out: Path, model: nn.Module, optimizer, scheduler, step: int, scaler) -> None:
    """Writes ``out/last`` (checkpoint + optimizer, scheduler, RNG and step) as a whole: into a
    temporary folder first, then swapped in by renames."""
    was_training = model.training
    tmp, old = out / f".{LAST}.tmp", out / f".{LAST}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),  # empty unless fp16
        "rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / STATE)
    if (out / LAST).exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out / LAST, old)
    os.replace(tmp, out / LAST)
    shutil.rmtree(old, ignore_errors=True)
    model.train(was_training)


def check_resume(out: Path, saved: dict) -> None:
    path = out / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {str(out)!r}: it has no settings.json")
    before = json.loads(path.read_text())
    changed = [
        k
        for k in set(before["settings"]) | set(saved["settings"])
        if k not in ("steps", "workers") and before["settings"].get(k) != saved["settings"].get(k)
    ]
    changed += [k for k in ("train", "mapping", "replay") if before.get(k) != saved.get(k)]
    if changed:
        raise ValueError(
            f"--resume needs the settings of the run in {str(out)!r}; these differ: {', '.join(sorted(changed))} "
            "(only --steps may change)"
        )


def load_last(out: Path, model: nn.Module, optimizer, scheduler, scaler) -> int:
    folder = out / LAST if (out / LAST).exists() else out / f".{LAST}.old"
    if not (folder / STATE).is_file():
        raise FileNotFoundError(f"nothing to resume: {str(out / LAST)!r} holds no checkpoint")
    meta = json.loads((folder / "detgraft.json").read_text())
    if sha256_file(folder / "model.safetensors") != meta["weights_sha256"]:
        raise ValueError(f"{str(folder)!r} is damaged (weights do not match detgraft.json)")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = torch.load(folder / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def peak_memory_mb() -> float | None:
    """This process's peak resident memory (Linux, macOS), or None where ``resource`` does not
    exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
