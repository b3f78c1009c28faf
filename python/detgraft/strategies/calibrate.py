"""``calibrate``: what the arbitration (``detgraft.heads.merge``) knows about a branch, learned
from the training images after training.

The base is frozen, so what it does on the training images is what it does on any image:
``calibrate`` runs the model there (each family's ``calibration_pass``, ``detgraft.model.families``)
and keeps, for the newest branch, the base features of the labelled new objects and of the base's
false alarms on them (``new_memory``), of the old objects (``old_memory``), the false-alarm score,
one prototype per new class and alpha; ``detgraft.heads.merge`` says how the merge reads them.
"""

import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..heads.frozen import Kept, batched
from ..heads.merge import KEEPER_SCORE, nearest, set_arbitration
from ..model.families import family

__all__ = ["MIRRORED_BELOW", "PRIOR_BOXES", "calibrate", "chunks", "transformed"]

log = logging.getLogger(__name__)

PRIOR_BOXES = 7  # alpha = n / (n + PRIOR_BOXES): 0.7 at 10 images per class (~16 boxes), as chosen on val
# calibrate on mirrored copies too below this many training images: more old objects in the old
# memory where it is thin (chosen on val: it helped at 10-50 images per class; with 600 images it
# did not, and it would cost another pass over them)
MIRRORED_BELOW = 200
MEMORY = 4096  # at most this many features in each memory (evenly spaced over the training objects)
# what calibration collects from each training image (``training_objects``)
TRAINING_OBJECTS = ("new", "labels", "false_alarms", "false_alarm_scores", "false_alarm_labels", "old")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    examples: Iterable[tuple[Tensor, dict[str, Tensor]]],
    batch: int = 8,
    mirrored: bool = False,
    old_images: Iterable[Tensor] = (),
    kept: Sequence[Kept | None] = (),
) -> dict:
    """Learns the newest branch's prototypes, memories and false-alarm score from ``examples``
    (``(image, target)`` pairs as a torchvision detection dataset yields them, labels in the
    model's label space: the training images). Call it after training, with the images the branch
    learned from; ``detgraft extend`` does. With ``mirrored``, each example's left-right mirror
    image is read too (for training with flips on fewer than ``MIRRORED_BELOW`` images; alpha still
    counts each labelled box once). ``old_images``: images (float ``[3, H, W]`` in 0..1) that show
    old classes and none of the new ones, such as a few hundred COCO images for a COCO model; no
    labels needed: the model's confident detections there join the old memory, which a few
    training images leave thin (``detgraft extend --old-images``). ``kept``: for each example in
    order (each followed by its mirror image with ``mirrored``), what the frozen base computed for
    it in training (``detgraft.heads.frozen.Kept``) or None: where a batch has them all, computed
    in float32, its feature maps are read instead of computed again (the same transform resized the
    images). Returns what it learned (also logged). First, where the family has one (Faster and Mask
    R-CNN), the trained branch's box head is compressed to the rank ``incremental`` gave it
    (``branch_rank``; ``detgraft.heads.rcnn.compress_branch``), so that what is calibrated is what
    detects."""
    kit = family(model).branch
    branches = kit.branches(model) if kit is not None else None
    if not branches:
        raise ValueError("calibrate is for models prepared with detgraft.incremental(model, 'branch')")
    if kit.compress is not None:
        kit.compress(model)
    if mirrored:
        examples = _with_mirrors(examples)
    was_training = model.training
    model.eval()
    try:
        branch = branches[-1]
        passes = functools.partial(_passes, model, kit.calibration_pass, branch)
        seen = _seen(passes(examples, batch, kept), branch)
        if not seen["labels"].numel():
            raise ValueError("calibrate needs the training examples; got none")
        nothing = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # moved by ``transformed``
        unlabelled = ((image, nothing) for image in old_images)
        seen["old_images"] = _seen(passes(unlabelled, batch), branch)["old"]
        return _fit(branch, seen, copies=2 if mirrored else 1)
    finally:
        model.train(was_training)


def _with_mirrors(examples: Iterable[tuple[Tensor, dict[str, Tensor]]]):
    """Each (image, target) pair, then its left-right mirror image."""
    for image, target in examples:
        yield image, target
        boxes = target["boxes"].reshape(-1, 4)
        mirrored = boxes.clone()
        mirrored[:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
        yield image.flip(-1), {**target, "boxes": mirrored}


def _passes(model: nn.Module, calibration_pass: Callable, branch: nn.Module, examples, batch: int, kept: Sequence = ()):
    """Per batch of ``examples``: the targets (in the transformed images), the model's detections
    before ``branch`` scoring >= ``KEEPER_SCORE``, and a function giving the base features at boxes
    (the family's ``calibration_pass``, on the ``kept`` feature maps where a whole batch has them)."""
    for k, chunk in enumerate(chunks(examples, batch)):
        image_list, targets = transformed(model, chunk)
        saved = list(kept[k * batch : k * batch + len(chunk)])
        if len(saved) == len(chunk) and all(x is not None and x.dtype == torch.float32 for x in saved):
            device = image_list.tensors.device
            features = {name: f.to(device) for name, f in batched(saved).items()}
            before, features_at = calibration_pass(model, image_list, branch, features=features)
        else:
            before, features_at = calibration_pass(model, image_list, branch)
        yield targets, before, features_at


def transformed(model: nn.Module, chunk: list[tuple[Tensor, dict[str, Tensor]]]):
    """A chunk of (image, target) pairs on the model's device, through its transform: the
    ``ImageList`` and the targets (boxes and labels) in its coordinates."""
    device = next(model.parameters()).device
    images = [im.to(device) for im, _ in chunk]
    targets = [
        {"boxes": t["boxes"].to(device).reshape(-1, 4).float(), "labels": t["labels"].to(device)} for _, t in chunk
    ]
    return model.transform(images, targets)


def _seen(passes: Iterable[tuple[list, list, Callable]], branch: nn.Module) -> dict[str, Tensor]:
    """The base features of the training objects (``training_objects``) over all ``passes`` (empty
    when there were none)."""
    seen: dict[str, list[Tensor]] = {k: [] for k in TRAINING_OBJECTS}
    for targets, before, features_at in passes:
        objects = training_objects(targets, before, branch)
        for key in ("new", "false_alarms", "old"):
            seen[key].append(features_at(objects[key]))
        for key in ("labels", "false_alarm_scores", "false_alarm_labels"):
            seen[key] += objects[key]
    if not seen["new"]:  # no image at all
        return {k: torch.zeros(0) for k in TRAINING_OBJECTS}
    return {k: torch.cat(v) for k, v in seen.items()}


def training_objects(targets: list[dict], before: list[dict], branch: nn.Module) -> dict[str, list[Tensor]]:
    """Per image (each value a list over images): the labelled boxes of the branch's classes
    (``new``) and their labels, 0-based in the branch (``labels``); the model's detections before the
    branch (``before``) that score >= ``KEEPER_SCORE`` on those boxes, IoU >= 0.5 (``false_alarms``,
    with ``false_alarm_scores`` and ``false_alarm_labels``) and away from them, IoU < 0.3 (``old``)."""
    objects: dict[str, list[Tensor]] = {k: [] for k in TRAINING_OBJECTS}
    for t, d in zip(targets, before):
        own = branch.owns(t["labels"])
        confident = d["scores"] >= KEEPER_SCORE
        iou = d["scores"].new_zeros(len(d["scores"]))
        if own.any() and len(d["boxes"]):
            iou = box_iou(d["boxes"], t["boxes"][own]).max(1).values
        on_new = confident & (iou >= 0.5)
        objects["new"].append(t["boxes"][own])
        objects["labels"].append(t["labels"][own] - branch.first_label)
        objects["false_alarms"].append(d["boxes"][on_new])
        objects["false_alarm_scores"].append(d["scores"][on_new])
        objects["false_alarm_labels"].append(d["labels"][on_new])
        objects["old"].append(d["boxes"][confident & (iou < 0.3)])
    return objects


def _fit(branch: nn.Module, seen: dict[str, Tensor], copies: int = 1) -> dict:
    """Prototypes, alpha, memories and the false-alarm score from ``seen`` (``_seen``; each image
    read ``copies`` times), set on ``branch``; returns them for the record."""
    num_new = len(branch.prototypes)
    feats, labels = seen["new"], seen["labels"]
    missing = [branch.first_label + c for c in range(num_new) if not (labels == c).any()]
    if missing:
        raise ValueError(f"calibrate needs labelled boxes of every new class; none of label(s) {missing}")
    prototypes = F.normalize(torch.stack([feats[labels == c].mean(0) for c in range(num_new)]), dim=1)
    boxes = torch.bincount(labels, minlength=num_new).to(feats) / copies
    alpha = boxes / (boxes + PRIOR_BOXES)
    new_memory = _spread(torch.cat([feats, seen["false_alarms"]]))
    old_images = seen["old_images"]
    old_memory = _spread(torch.cat([seen["old"], old_images.to(seen["old"])]) if len(old_images) else seen["old"])
    scores = seen["false_alarm_scores"]
    false_alarm_score = scores.max().item() if len(scores) else 0.0
    set_arbitration(branch, prototypes, alpha, new_memory, old_memory, false_alarm_score)
    learned = {
        "new_boxes": len(feats) // copies,
        "mirrored": copies == 2,
        "false_alarms": len(seen["false_alarms"]),
        "old_objects": len(seen["old"]),
        "old_image_objects": len(old_images),  # the model's confident detections on ``old_images``
        "false_alarm_score": round(false_alarm_score, 4),
        # which older labels the model fired on the labelled new objects, most often first (each image
        # and, when mirrored, its mirror image counted): the classes it takes the new ones for
        "false_alarm_labels": _counts(seen["false_alarm_labels"]),
        "alpha": [round(a, 3) for a in alpha.tolist()],
        # how well the memories separate, each item judged by the others (leave-one-out): the share
        # of old objects nearer to new_memory, and of new_memory nearer to old_memory
        "old_like_new": _share_nearer(old_memory, new_memory),
        "new_like_old": _share_nearer(new_memory, old_memory),
    }
    log.info(
        "arbitration calibrated on %d new boxes%s, %d false alarms of the base on them and %d old objects%s: %s",
        learned["new_boxes"],
        " (and their mirror images)" if copies == 2 else "",
        len(seen["false_alarms"]),
        len(seen["old"]),
        f" (and {len(old_images)} on the old-class images)" if len(old_images) else "",
        learned,
    )
    return learned


def _counts(labels: Tensor) -> dict[str, int]:
    """``{label: how often}`` over ``labels``, most frequent first (string keys, for JSON)."""
    found, counts = labels.unique(return_counts=True)
    pairs = sorted(zip(found.tolist(), counts.tolist()), key=lambda pair: (-pair[1], pair[0]))
    return {str(label): count for label, count in pairs}


def _spread(features: Tensor) -> Tensor:
    """At most ``MEMORY`` rows of ``features``, evenly spaced."""
    if len(features) <= MEMORY:
        return features
    return features[torch.linspace(0, len(features) - 1, MEMORY, device=features.device).long()]


def _share_nearer(own: Tensor, other: Tensor) -> float | None:
    """The share of ``own``'s rows nearer to ``other`` than to the rest of ``own``."""
    if len(own) < 2:
        return None
    within = own @ own.T
    within.fill_diagonal_(-2.0)
    return round((nearest(own, other) > within.max(1).values).float().mean().item(), 3)


def chunks(items: Iterable, size: int):
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk
