"""``detgraft.extend``: widen, prepare with a strategy, fine-tune, save, evaluate, in one call.

The loop is torchvision's (``loss = sum(model(images, targets).values())``) around
``detgraft.incremental``. Every field of ``ExtendSettings`` is a flag of ``detgraft extend``.
Runs are seeded: the same settings repeat exactly on the CPU, and ``resume`` continues a run
from its last checkpoint as if it had not stopped (batches, flips, samplers and optimizer state
are restored). Ctrl-C finishes the current step, writes the checkpoint and stops. Under torchrun it trains
data-parallel (``detgraft.distributed``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import nn

from . import distributed, families, ops
from .arbitration import MIRRORED_BELOW, calibrate
from .card import UNUSED, get_card, normalize_name
from .checkpoint import save_checkpoint
from .data_check import check_dataset
from .evaluate import Dataset
from .extras import need
from .image_files import image_size, load_image
from .incremental import STRATEGIES, check_strategy, incremental
from .progress import progress
from .surgery import INITS, expand_predictor
from .training_data import TrainingSet, training_batches

__all__ = ["ExtendSettings", "extend"]

log = logging.getLogger(__name__)

LAST, STATE = "last", "train_state.pt"
AUTO_EPOCHS, AUTO_MIN_STEPS, AUTO_MAX_STEPS = 8, 150, 500
# --lr auto: the rates of benchmarks/incremental.py. A strategy that trains the whole network
# diverges at the heads' 0.05 (naive: a NaN loss at step 31 with 10 images per class)
AUTO_LR = {"branch": 0.05, "head": 0.05, "naive": 0.01, "pseudo": 0.01, "distill": 0.01}
# a one-stage branch (a classification head on the frozen FPN, focal loss): 0.01, chosen on val from
# 0.01 / 0.02 / 0.05 with FCOS (benchmarks/RESULTS.md, section families)
AUTO_LR_ONE_STAGE = {"branch": 0.01}
EXISTING = ("error", "train", "ignore")
# --old-images: at most this many are read (300 EmojiCOCO images: ~1100 old objects, ~15 s on 2 CPU cores;
# 100 to 1000 of them did about as well on val: benchmarks/RESULTS.md, section arbitration)
OLD_IMAGES = 300
AMP = ("auto", "bf16", "fp16", "off")


def _flag(help: str, **kw: Any) -> Any:
    return field(metadata={"help": help}, **kw)


@dataclass
class ExtendSettings:
    """How ``extend`` trains; each field is the ``detgraft extend`` flag of the same name."""

    strategy: str = _flag(f"one of {', '.join(STRATEGIES)}", default="branch")
    steps: int | None = _flag(
        f"optimizer steps; auto: {AUTO_EPOCHS} passes over the training images, at least {AUTO_MIN_STEPS}, "
        f"at most {AUTO_MAX_STEPS} (the cap chosen on val within the 5-minute budget: benchmarks/RESULTS.md, "
        "section sizes)",
        default=None,
    )
    batch_size: int = _flag("images per step", default=8)
    lr: float | None = _flag(
        "peak learning rate (SGD); auto: 0.05 for branch and head, 0.01 for naive, pseudo and distill (they train "
        "the whole network); 0.01 for branch on RetinaNet and FCOS",
        default=None,
    )
    momentum: float = _flag("SGD momentum", default=0.9)
    weight_decay: float = _flag("SGD weight decay", default=1e-4)
    warmup: int = _flag("steps of linear warm-up before the cosine decay", default=50)
    init: str = _flag(f"how the new rows start: one of {', '.join(INITS)}", default="preserve")
    keep: float = _flag("pseudo/distill: teacher score that makes a label", default=0.7)
    ignore: float = _flag("pseudo/distill: teacher score from which a box is left out of the loss", default=0.3)
    existing: str = _flag(
        "a training category the model already has: error (say so), train (its boxes are more data for that class; "
        "branch: they teach the branch what is not new) or ignore (leave them out)",
        default="error",
    )
    merge_iou: float | None = _flag(
        "branch: overlap at which the stronger of an old and a new detection wins (none: keep both)", default=0.5
    )
    hflip: bool = _flag("flip half the images left-right", default=True)
    jitter: bool = _flag(
        "also photometric distortion, zoom out and IoU crops (torchvision.transforms.v2, seeded per example)",
        default=False,
    )
    workers: int = _flag("processes decoding the next batches while the model trains (0: in the loop)", default=1)
    seed: int = _flag("seed of batches, flips and samplers", default=0)
    checkpoint_every: int = _flag("write OUT/last every this many steps", default=100)
    device: str = _flag("auto (cuda when there is one), cpu, cuda or cuda:N", default="auto")
    amp: str = _flag(
        "mixed precision of the training step: auto (on CUDA bf16 where the GPU supports it, else fp16 with a "
        "gradient scaler; off on the CPU), bf16, fp16 or off",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.device == "auto":  # resolved here, so settings.json records the device it ran on
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.amp not in AMP:
            raise ValueError(f"amp {self.amp!r} is unknown: choose one of {', '.join(AMP)}")
        if self.amp == "auto":  # resolved here too: settings.json records the precision it trained in
            cuda = torch.device(self.device).type == "cuda"
            self.amp = "off" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is unknown: choose one of {', '.join(STRATEGIES)}")
        if self.existing not in EXISTING:
            raise ValueError(f"existing {self.existing!r} is unknown: choose one of {', '.join(EXISTING)}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is unknown: choose one of {', '.join(INITS)}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more; got {self.workers}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:  # None: auto_lr, once extend knows the model's family
            raise ValueError(f"lr must be positive; got {self.lr}")


def auto_lr(strategy: str, family: str) -> float:
    """``--lr auto``: the strategy's rate (``AUTO_LR``), a one-stage branch's its own."""
    if family in ("retinanet", "fcos"):
        return AUTO_LR_ONE_STAGE.get(strategy, AUTO_LR[strategy])
    return AUTO_LR[strategy]


def auto_steps(images: int, batch_size: int) -> int:
    """The budget when ``steps`` is not given: it follows the data (a few images must not get the
    steps that hundreds need, or the branch learns them by heart)."""
    return min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, math.ceil(AUTO_EPOCHS * images / batch_size)))


def class_mapping(data: Dataset, model: nn.Module, existing: str = "error") -> tuple[list[str], dict[int, int]]:
    """The classes to add (the training file's categories the model does not have, in id order)
    and each category id's label. A category the model already has (names matched by
    ``normalize_name``) is an error, or with ``existing`` "train" its boxes get the model's label,
    with "ignore" they are left out."""
    card = get_card(model)
    known = {normalize_name(n): i for i, n in enumerate(card.classes) if i > 0 and n != UNUSED}
    categories = sorted(data.coco["categories"], key=lambda c: c["id"])
    clash = [c for c in categories if normalize_name(c["name"]) in known]
    if clash and existing == "error":
        listed = ", ".join(f"{c['name']!r} (the model's label {known[normalize_name(c['name'])]})" for c in clash)
        raise ValueError(
            f"the training file's categories are the classes to add, but the model already has {listed}. "
            "Choose what their boxes do: --existing train (more data for the model's class; with the branch strategy "
            "they teach the new branch what is not new) or --existing ignore (left out)"
        )
    names = [c["name"] for c in categories if c not in clash]
    if not names:
        raise ValueError("the training file has no category the model lacks: its categories name the classes to add")
    first = card.num_classes
    by_id = {c["id"]: first + names.index(c["name"]) for c in categories if c not in clash}
    if existing == "train":
        by_id |= {c["id"]: known[normalize_name(c["name"])] for c in clash}
    if clash:
        log.info("categories the model has: %s (--existing %s)", ", ".join(c["name"] for c in clash), existing)
    return names, by_id


def extend(
    model: nn.Module,
    train: Dataset,
    settings: ExtendSettings | None = None,
    *,
    out: str | Path,
    val: Dataset | None = None,
    replay: Dataset | None = None,
    resume: bool = False,
    old_images: list[str | Path] | None = None,
    tensorboard: str | Path | None = None,
) -> nn.Module:
    """Adds ``train``'s categories to ``model`` and fine-tunes it with ``settings.strategy``.

    ``old_images`` (branch): image files that show old classes and none of the new ones (a few
    hundred COCO images for a COCO model; no labels): the arbitration's old memory learns from the
    model's detections there (``detgraft.calibrate``), at most ``OLD_IMAGES`` of them, evenly spaced.

    Writes to ``out``: the checkpoint (``model.safetensors``, ``detgraft.json``), ``settings.json``,
    ``mapping.json`` (category -> label), ``extend.log``, ``extend.json`` (time, peak memory,
    final losses) and, with ``val``, ``eval.json`` and ``report.html``. ``out/last`` holds the
    latest checkpoint while training. ``tensorboard``: a folder for TensorBoard events (each loss
    part per step, val AP per group; ``pip install tensorboard``). Returns the model in eval mode.
    """
    settings = settings or ExtendSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    joined = distributed.start(settings.device)
    logger = logging.getLogger("detgraft")
    handler = None
    if distributed.is_main():
        handler = logging.FileHandler(out / "extend.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    else:  # under torchrun rank 0 tells the story
        logger.setLevel(logging.WARNING)
    # detgraft's Rust NMS and RoIAlign on the CPU (the same results as torchvision's, faster:
    # benchmarks/ops.py); torchvision's CUDA kernels on GPUs
    fast_ops = ops.everywhere() if settings.device == "cpu" else contextlib.nullcontext()
    try:
        with fast_ops:
            return _extend(model, train, settings, out, val, replay, resume, old_images, tensorboard)
    except FloatingPointError as err:  # said in extend.log too, where the run's story is
        log.error("%s", err)
        raise
    finally:
        if joined:  # a process that exits inside torchrun's process group aborts
            distributed.stop()
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()


def _extend(model, train, settings, out, val, replay, resume, old_images, tensorboard):
    start = time.perf_counter()
    rank, processes = distributed.world()
    if settings.batch_size % processes:
        raise ValueError(f"--batch-size {settings.batch_size} must be a multiple of the {processes} processes")
    torch.manual_seed(settings.seed + rank)  # the models' samplers: each process its own draws
    train, val, replay = (_checked(d) for d in (train, val, replay))
    names, by_id = class_mapping(train, model, settings.existing)
    card = get_card(model)
    if card.builder is None:  # found out now, not after training, when the checkpoint is written
        raise ValueError(
            "extend writes a checkpoint, and detgraft does not know which builder makes this model: load it with "
            "detgraft.load_model, or set detgraft.get_card(model).builder = detgraft.loading.torchvision_builder(name)"
        )
    kind = check_strategy(model, settings.strategy)  # found out now, not after the model is widened
    if settings.lr is None:  # resolved here, so settings.json records the rate it ran with
        settings = replace(settings, lr=auto_lr(settings.strategy, kind))
    first = card.num_classes
    mapping = {name: first + k for k, name in enumerate(names)}
    log.info("new classes: %s", ", ".join(f"{n} -> label {label}" for n, label in mapping.items()))
    data = TrainingSet(train, by_id, masks=kind == "mask_rcnn")
    boxes_of = torch.bincount(torch.cat([labels for _, _, labels, _ in data.items]), minlength=first + len(names))
    empty = [n for n, label in mapping.items() if boxes_of[label] == 0]
    if empty:
        raise ValueError(
            f"the training file has no box of {', '.join(map(repr, empty))} (no annotation of positive width and "
            "height): the model would gain a class that learned nothing. Label some, or remove the category from "
            "the file"
        )
    if replay is not None:
        data = data + TrainingSet(replay, _replay_labels(replay, card), masks=kind == "mask_rcnn")
        log.info("replay: %d annotated old-class images mixed in", len(replay.coco["images"]))
    if settings.steps is None:
        settings = replace(settings, steps=auto_steps(len(data), settings.batch_size))
        log.info("%d training images: %d steps of %d (--steps auto)", len(data), settings.steps, settings.batch_size)
    saved = {
        "settings": asdict(settings),
        "train": train.source or str(train.images),
        "mapping": mapping,
        "replay": str(replay.images) if replay else None,
    }
    if old_images:
        if settings.strategy != "branch":
            raise ValueError(f"--old-images teaches the branch's arbitration; --strategy {settings.strategy} has none")
        old_images = _spaced(sorted(Path(p) for p in old_images), OLD_IMAGES)
        for path in old_images:  # found out now, not after training
            image_size(path)
        saved["old_images"] = {"files": len(old_images), "folder": str(old_images[0].parent)}
    if resume:
        _check_resume(out, saved)
    if rank == 0:
        (out / "settings.json").write_text(json.dumps(saved, indent=1))
        (out / "mapping.json").write_text(json.dumps(mapping, indent=1))

    before = None
    if rank == 0 and val is not None and _labels_old_classes(val, model):
        # the base on val, for the report's before/after (the model is widened in place below)
        from .evaluate import detect, evaluate

        base_detections = detect(model, val, device=settings.device)
        before = (evaluate(model, val, detections=base_detections), base_detections, list(card.classes))
        log.info("val old classes before: AP %.3f", before[0].groups.get("old", {}).get("ap", float("nan")))

    examples = None
    if settings.init == "imprint":
        new_items = [i for i, (_, _, labels, _) in enumerate(data.items) if (labels >= first).any()][:64]
        examples = [data.example(i) for i in new_items]
    expand_predictor(model, names, settings.init, examples=examples, seed=settings.seed)
    get_card(model).history[-1].update(data=str(train.images), strategy=settings.strategy)
    model.to(settings.device)
    incremental(model, settings.strategy, keep=settings.keep, ignore=settings.ignore, merge_iou=settings.merge_iou)
    optimizer, scheduler = optimizer_and_schedule(model, settings)
    step = 0
    scaler = _scaler(settings)
    if resume:
        step = _load_last(out, model, optimizer, scheduler, scaler)
        log.info("resuming at step %d of %d", step, settings.steps)

    writer = _tensorboard(tensorboard) if tensorboard and rank == 0 else None
    losses, curve = _train(model, data, settings, optimizer, scheduler, step, out, scaler, writer)
    model.eval()
    if rank > 0:  # rank 0 calibrates, saves and evaluates
        return model
    arbitration = None
    if settings.strategy == "branch":
        mirrored = settings.hflip and len(data) < MIRRORED_BELOW
        arbitration = calibrate(
            model,
            (data.example(i) for i in range(len(data))),
            mirrored=mirrored,
            old_images=(load_image(p).float().div(255) for p in old_images or ()),
        )
        classes = get_card(model).classes
        taken_for = ", ".join(f"{classes[int(label)]!r} {n}" for label, n in arbitration["false_alarm_labels"].items())
        log.info(
            "before this extension, the model took the labelled %s objects for: %s (score >= 0.5, counted over the "
            "images read; the false alarms the arbitration learns to lower)",
            "/".join(names),
            taken_for or "nothing",
        )
    save_checkpoint(model, out)
    seconds = time.perf_counter() - start
    peak = peak_memory_mb()
    (out / "extend.json").write_text(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "peak_rss_mb": None if peak is None else round(peak),
                "steps": settings.steps,
                "final_losses": losses,
                "loss_curve": {"from_step": step, "loss": curve},
                "processes": processes,
                "arbitration": arbitration,
            },
            indent=1,
        )
    )
    shown = "?" if peak is None else round(peak)
    log.info("trained in %.0f s (peak memory %s MB); checkpoint in %s", seconds, shown, out)
    if val is not None:
        result = _evaluate(model, val, out, settings.device, before, {"from_step": step, "loss": curve})
        for group, v in result.groups.items() if writer else ():
            writer.add_scalar(f"val/{group}_ap", v["ap"], settings.steps)
            writer.add_scalar(f"val/{group}_ap50", v["ap50"], settings.steps)
    if writer:
        writer.close()
    return model


def _tensorboard(folder: str | Path):
    need("tensorboard", "tensorboard", "--tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def peak_memory_mb() -> float | None:
    """This process's peak resident memory (Linux, macOS), or None where ``resource`` does not
    exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spaced(items: list, most: int) -> list:
    """At most ``most`` of ``items``, evenly spaced."""
    if len(items) <= most:
        return items
    return [items[round(k * (len(items) - 1) / (most - 1))] for k in range(most)]


def _checked(data: Dataset | None) -> Dataset | None:
    """``data`` after ``detgraft.data_check`` (a problem to fix raises here, before the model is touched)."""
    if data is None or data.checked:
        return data
    return check_dataset(data)[0]


def optimizer_and_schedule(model: nn.Module, settings: ExtendSettings):
    """SGD over the parameters that require grad (at ``auto_lr`` when ``settings.lr`` is None);
    linear warm-up, then cosine decay to 0 at ``steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = settings.lr if settings.lr is not None else auto_lr(settings.strategy, families.family(model))
    optimizer = torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    warm, total = settings.warmup, settings.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(warm, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
    )
    return optimizer, scheduler


def _replay_labels(replay: Dataset, card) -> dict[int, int]:
    known = {n.lower(): i for i, n in enumerate(card.classes) if i > 0 and n != "N/A"}
    unknown = [c["name"] for c in replay.coco["categories"] if c["name"].lower() not in known]
    if unknown:
        log.warning("replay categories the model does not have (left out): %s", ", ".join(unknown))
    return {c["id"]: known[c["name"].lower()] for c in replay.coco["categories"] if c["name"].lower() in known}


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


def _scaler(settings: ExtendSettings) -> torch.amp.GradScaler:
    """fp16's gradient scaler (a no-op for the other precisions)."""
    return torch.amp.GradScaler(torch.device(settings.device).type, enabled=settings.amp == "fp16")


def _train(
    model, data, settings, optimizer, scheduler, step, out, scaler=None, writer=None
) -> tuple[dict[str, float], list[float]]:
    """Trains from ``step`` to ``settings.steps`` (forward and loss in ``settings.amp`` precision,
    the loss scaled by ``scaler`` for fp16); returns the last step's losses and every step's total
    loss (the mean over the processes under torchrun). ``writer``: a TensorBoard SummaryWriter."""
    model.train()
    scaler = scaler or _scaler(settings)
    device_type = torch.device(settings.device).type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp)
    rank, processes = distributed.world()
    trained = distributed.wrap(model)
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
    tick = time.perf_counter()
    with progress(*columns, transient=False, disable=rank > 0) as bar, _StopRequest() as stop:
        task = bar.add_task(settings.strategy, total=settings.steps, completed=step, losses="", rate="")
        batches = iter(training_batches(data, step, settings.steps, settings, part=(rank, processes)))
        while step < settings.steps:
            images, targets = next(batches)
            images = [im.to(settings.device) for im in images]
            targets = [{k: v.to(settings.device) for k, v in t.items()} for t in targets]
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                loss_dict = trained(images, targets)
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


def _check_resume(out: Path, saved: dict) -> None:
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


def _load_last(out: Path, model: nn.Module, optimizer, scheduler, scaler) -> int:
    folder = out / LAST if (out / LAST).exists() else out / f".{LAST}.old"
    if not (folder / STATE).is_file():
        raise FileNotFoundError(f"nothing to resume: {str(out / LAST)!r} holds no checkpoint")
    from .checkpoint import _sha256

    meta = json.loads((folder / "detgraft.json").read_text())
    if _sha256(folder / "model.safetensors") != meta["weights_sha256"]:
        raise ValueError(f"{str(folder)!r} is damaged (weights do not match detgraft.json)")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = torch.load(folder / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _labels_old_classes(val: Dataset, model: nn.Module) -> bool:
    """Whether ``val`` has boxes of a class ``model`` has (matched by name, as evaluate does)."""
    from .evaluate import _label_to_category

    return bool(set(_label_to_category(model, val).values()) & {a["category_id"] for a in val.coco["annotations"]})


def _evaluate(model: nn.Module, val: Dataset, out: Path, device: str, before, loss: dict | None = None):
    """eval.json and report.html (with the ``loss`` curve) on val, against the base's results on val
    (``before``); returns the evaluation."""
    from .evaluate import compare, detect, evaluate
    from .report import write_evaluation

    detections = detect(model, val, device=device)
    result = evaluate(model, val, detections=detections)
    base, base_detections, base_classes = before or (None, None, None)
    for group, v in result.groups.items():
        log.info("val %s classes: AP %.3f, AP50 %.3f", group, v["ap"], v["ap50"])
    write_evaluation(
        out,
        f"detgraft extend: {out}",
        result,
        val,
        detections,
        get_card(model).classes,
        before=base,
        base_detections=base_detections,
        base_classes=base_classes,
        comparison=compare(result, base) if base else None,
        loss=loss,
    )
    return result
