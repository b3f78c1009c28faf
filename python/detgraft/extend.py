"""``detgraft.extend``: widen, prepare with a strategy, fine-tune, save, evaluate, in one call.

Orchestration only: read and check the data, map its categories to new labels, widen the model
(``detgraft.model.surgery``), prepare it with a strategy (``detgraft.strategies``), train
(``detgraft.train``: torchvision's loop, seeded, resumable, Ctrl-C safe, data-parallel under
torchrun), calibrate the branch's arbitration, save, and evaluate on val. Every field of
``ExtendSettings`` (``detgraft.settings``) is a flag of ``detgraft extend``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from . import distributed, ops
from .data.batches import TrainingSet
from .data.check import check_dataset
from .data.dataset import Dataset, normalize_name
from .data.images import image_size, load_image
from .evaluation.metrics import compare, detect, evaluate, label_to_category
from .evaluation.report import write_evaluation
from .extras import need
from .kept import keep_frozen
from .model.card import UNUSED, get_card
from .model.checkpoint import save_checkpoint
from .model.surgery import expand_predictor
from .settings import ExtendSettings, auto_lr, auto_steps
from .strategies import check_strategy, incremental
from .strategies.calibrate import MIRRORED_BELOW, calibrate
from .train import check_resume, load_last, make_scaler, optimizer_and_schedule, peak_memory_mb, train_loop

__all__ = ["ExtendSettings", "class_mapping", "extend", "replay_labels"]

log = logging.getLogger(__name__)

# --old-images: at most this many are read (300 EmojiCOCO images: ~1100 old objects, ~15 s on 2 CPU cores;
# 100 to 1000 of them did about as well on val: benchmarks/RESULTS.md, section arbitration)
OLD_IMAGES = 300


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
            "detgraft.load_model, or set detgraft.get_card(model).builder = "
            "detgraft.model.builders.torchvision_builder(name)"
        )
    kind = check_strategy(model, settings.strategy)  # found out now, not after the model is widened
    if settings.lr is None:  # resolved here, so settings.json records the rate it ran with
        settings = replace(settings, lr=auto_lr(settings.strategy, kind))
    first = card.num_classes
    mapping = {name: first + k for k, name in enumerate(names)}
    log.info("new classes: %s", ", ".join(f"{n} -> label {label}" for n, label in mapping.items()))
    data = TrainingSet(train, by_id, masks=kind.masks)
    boxes_of = torch.bincount(torch.cat([labels for _, _, labels, _ in data.items]), minlength=first + len(names))
    empty = [n for n, label in mapping.items() if boxes_of[label] == 0]
    if empty:
        raise ValueError(
            f"the training file has no box of {', '.join(map(repr, empty))} (no annotation of positive width and "
            "height): the model would gain a class that learned nothing. Label some, or remove the category from "
            "the file"
        )
    if replay is not None:
        data = data + TrainingSet(replay, replay_labels(replay, card), masks=kind.masks)
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
        check_resume(out, saved)
    if rank == 0:
        (out / "settings.json").write_text(json.dumps(saved, indent=1))
        (out / "mapping.json").write_text(json.dumps(mapping, indent=1))

    before = None
    if rank == 0 and val is not None and _labels_old_classes(val, model):
        # the base on val, for the report's before/after (the model is widened in place below)
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
    incremental(
        model,
        settings.strategy,
        keep=settings.keep,
        ignore=settings.ignore,
        merge_iou=settings.merge_iou,
        branch_rank=settings.branch_rank,
    )
    optimizer, scheduler = optimizer_and_schedule(model, settings)
    step = 0
    scaler = make_scaler(settings)
    if resume:
        step = load_last(out, model, optimizer, scheduler, scaler)
        log.info("resuming at step %d of %d", step, settings.steps)

    writer = _tensorboard(tensorboard) if tensorboard and rank == 0 else None
    # what the frozen base computes for each training example, computed once (detgraft.kept; None: in every step)
    began = {"frozen_pass": time.perf_counter()}  # when each phase began (extend.json: their seconds)
    store = keep_frozen(model, data, settings, step, part=(rank, processes))
    began["steps"] = time.perf_counter()
    losses, curve = train_loop(model, data, settings, optimizer, scheduler, step, out, scaler, writer, store)
    began["calibrate"] = time.perf_counter()
    model.eval()
    if rank > 0:  # rank 0 calibrates, saves and evaluates
        return model
    arbitration = None
    if settings.strategy == "branch":
        mirrored = settings.hflip and len(data) < MIRRORED_BELOW
        flips = (False, True) if mirrored else (False,)
        arbitration = calibrate(
            model,
            (data.example(i) for i in range(len(data))),
            mirrored=mirrored,
            old_images=(load_image(p).float().div(255) for p in old_images or ()),
            kept=[store.kept.get((i, f, None)) for i in range(len(data)) for f in flips] if store else (),
        )
        del store
        classes = get_card(model).classes
        taken_for = ", ".join(f"{classes[int(label)]!r} {n}" for label, n in arbitration["false_alarm_labels"].items())
        log.info(
            "before this extension, the model took the labelled %s objects for: %s (score >= 0.5, counted over the "
            "images read; the false alarms the arbitration learns to lower)",
            "/".join(names),
            taken_for or "nothing",
        )
    began["checkpoint"] = time.perf_counter()
    save_checkpoint(model, out)
    began["end"] = time.perf_counter()
    phases = {a: round(began[b] - began[a], 1) for a, b in zip(began, list(began)[1:])}
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
                "phases": phases,
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


def _spaced(items: list, most: int) -> list:
    """At most ``most`` of ``items``, evenly spaced."""
    if len(items) <= most:
        return items
    return [items[round(k * (len(items) - 1) / (most - 1))] for k in range(most)]


def _checked(data: Dataset | None) -> Dataset | None:
    """``data`` after ``detgraft.data.check`` (a problem to fix raises here, before the model is touched)."""
    if data is None or data.checked:
        return data
    return check_dataset(data)[0]


def replay_labels(replay: Dataset, card) -> dict[int, int]:
    """Each ``replay`` category id's label in the model, names matched as ``class_mapping`` matches them
    (``normalize_name``: 'traffic_light' is 'traffic light'); a category the model lacks is left out."""
    known = {normalize_name(n): i for i, n in enumerate(card.classes) if i > 0 and n != UNUSED}
    unknown = [c["name"] for c in replay.coco["categories"] if normalize_name(c["name"]) not in known]
    if unknown:
        log.warning("replay categories the model does not have (left out): %s", ", ".join(unknown))
    return {
        c["id"]: known[normalize_name(c["name"])]
        for c in replay.coco["categories"]
        if normalize_name(c["name"]) in known
    }


def _labels_old_classes(val: Dataset, model: nn.Module) -> bool:
    """Whether ``val`` has boxes of a class ``model`` has (matched by name, as evaluate does)."""
    return bool(set(label_to_category(model, val).values()) & {a["category_id"] for a in val.coco["annotations"]})


def _evaluate(model: nn.Module, val: Dataset, out: Path, device: str, before, loss: dict | None = None):
    """eval.json and report.html (with the ``loss`` curve) on val, against the base's results on val
    (``before``); returns the evaluation."""
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
