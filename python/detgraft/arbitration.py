"""Arbitration between the base's detections and the branches': who owns an object both claim.

A branch trained on a few images is confidently wrong on old objects it never saw (it calls a
pizza "chicken" at 0.99), and the base is confidently wrong on new objects (it calls a chicken
"bird"). Scores alone cannot settle such a conflict, so the arbitration asks the one judge that
was not trained on the new images: the base's own box-head features. ``calibrate`` learns, from
the training images only:

- one prototype per new class: the mean (L2-normalised) base feature of its labelled boxes;
- ``look_alike``: a similarity that no old object the base detects in the training images away from
  labelled new objects (score >= ``KEEPER_SCORE``) reaches, and half the labelled new objects do
  (the larger of the keepers' largest and the new objects' median similarity);
- ``at_least``: the similarity that 95% of the labelled new objects reach (5th percentile).

At inference (``arbitrate``), with f the base feature at a detection's box and P the prototype of
a new detection's class:

1. a new-class score s becomes ``alpha * s + (1 - alpha) * max(cos(f, P), 0)`` (DeFRCN's prototype
   calibration), so the branch's score and its resemblance to what the user labelled agree. The
   branch's own score weighs more the more boxes of the class it learned from: alpha = n / (n +
   ``PRIOR_BOXES``) for n labelled boxes (0.7 for 16 boxes, 0.99 for 500);
2. where an older detection (the base's, or an earlier branch's) and a newer one overlap with
   IoU >= ``iou``, the older one is lowered (score times 1 - the newer one's score) only if its
   box looks like the newer one's class, cos >= ``at_least``, and the newer one either scores
   higher or its class is what the box looks like beyond any old object seen, cos >= ``look_alike``;
3. otherwise a newer detection that scores lower than an overlapping older one is lowered the same way.

The base's detections are otherwise untouched: no other score, box or label changes. A branch that
was never calibrated falls back to the plain soft merge (the stronger claim wins) and ``calibrate``
is logged as missing.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

__all__ = ["ARBITRATION_STATE", "KEEPER_SCORE", "PRIOR_BOXES", "arbitrate", "calibrate"]

log = logging.getLogger(__name__)

PRIOR_BOXES = 7  # alpha = n / (n + PRIOR_BOXES): 0.7 at 10 images per class (~16 boxes), as chosen on val
KEEPER_SCORE = 0.5  # a detection of the model before the branch this confident is an old object
NEW_QUANTILE = 0.05  # at_least: the share of labelled new objects allowed below it
ARBITRATION_STATE = ("prototypes", "alpha", "look_alike", "at_least", "calibrated")  # each branch's buffers


def add_arbitration_state(branch: nn.Module, num_new: int, like: Tensor, width: int | None = None) -> None:
    """The buffers ``calibrate`` fills, on ``branch`` (saved with its weights): one prototype of
    ``width`` features (default ``like``'s row length) per new class, alpha, and the thresholds."""
    width = like.shape[1] if width is None else width
    branch.register_buffer("prototypes", like.new_zeros(num_new, width))
    branch.register_buffer("alpha", like.new_ones(num_new))
    branch.register_buffer("look_alike", like.new_ones(()))
    branch.register_buffer("at_least", like.new_ones(()))
    branch.register_buffer("calibrated", torch.tensor(False, device=like.device))


def set_arbitration(branch: nn.Module, prototypes: Tensor, alpha: Tensor, look_alike: float, at_least: float) -> None:
    with torch.no_grad():
        branch.prototypes.copy_(prototypes)
        branch.alpha.copy_(alpha)
        branch.look_alike.fill_(look_alike)
        branch.at_least.fill_(at_least)
        branch.calibrated.fill_(True)


@torch.no_grad()
def calibrate(model: nn.Module, examples: Iterable[tuple[Tensor, dict[str, Tensor]]], batch: int = 8) -> dict:
    """Learns the newest branch's prototypes and thresholds from ``examples`` (``(image,
    target)`` pairs as a torchvision detection dataset yields them, labels in the model's label
    space: the training images). Call it after training, with the images the branch learned
    from; ``detgraft extend`` does. Returns what it learned (also logged)."""
    from .branch import BranchRoIHeads
    from .dense_branch import dense_calibration_pass, is_dense_branch_model

    heads = getattr(model, "roi_heads", None)
    if not isinstance(heads, BranchRoIHeads) and not is_dense_branch_model(model):
        raise ValueError("calibrate is for models prepared with detgraft.incremental(model, 'branch')")
    was_training = model.training
    model.eval()
    try:
        if is_dense_branch_model(model):
            branch = model.head.branches[-1]
            return _fit(branch, *dense_calibration_pass(model, examples, batch, KEEPER_SCORE))
        return _fit(heads.branches[-1], *_rcnn_pass(model, heads, heads.branches[-1], examples, batch))
    finally:
        model.train(was_training)


def _rcnn_pass(model: nn.Module, heads, branch, examples, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """The base features of the labelled new objects of ``examples``, their labels (0-based in the
    branch), and the base features of the old objects the model detects away from them."""
    device = next(model.parameters()).device
    new_feats: list[Tensor] = []
    new_labels: list[Tensor] = []
    keeper_feats: list[Tensor] = []
    for chunk in chunks(examples, batch):
        images = [im.to(device) for im, _ in chunk]
        targets = [
            {"boxes": t["boxes"].to(device).reshape(-1, 4).float(), "labels": t["labels"].to(device)} for _, t in chunk
        ]
        image_list, targets = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):  # as GeneralizedRCNN does for a single-map backbone
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(image_list, features)
        before = heads._teacher_detections(features, proposals, image_list.image_sizes, branch, KEEPER_SCORE)
        own_boxes, labels, keepers = training_objects(targets, before, branch)
        new_labels += labels
        new_feats.append(base_features(heads, features, own_boxes, image_list.image_sizes))
        keeper_feats.append(base_features(heads, features, keepers, image_list.image_sizes))
    if not new_feats:
        raise ValueError("calibrate needs the training examples; got none")
    return torch.cat(new_feats), torch.cat(new_labels), torch.cat(keeper_feats)


def training_objects(targets: list[dict], before: list[dict], branch) -> tuple[list, list, list]:
    """Per image: the labelled boxes of the branch's classes, their labels (0-based in the
    branch), and the old objects, the model's detections before the branch (``before``) that score
    >= ``KEEPER_SCORE`` away from those boxes (IoU < 0.3)."""
    own_boxes, labels, keepers = [], [], []
    for t, d in zip(targets, before):
        own = branch.owns(t["labels"])
        keep = d["scores"] >= KEEPER_SCORE
        if own.any() and keep.any():
            keep &= box_iou(d["boxes"], t["boxes"][own]).max(1).values < 0.3
        own_boxes.append(t["boxes"][own])
        labels.append(t["labels"][own] - branch.first_label)
        keepers.append(d["boxes"][keep])
    return own_boxes, labels, keepers


def _fit(branch: nn.Module, feats: Tensor, labels: Tensor, keepers: Tensor) -> dict:
    """Prototypes, alpha and thresholds from the new objects' features ``feats`` (class ``labels``,
    0-based) and the old objects' ``keepers``, set on ``branch``; returns them for the record."""
    num_new = len(branch.prototypes)
    missing = [branch.first_label + c for c in range(num_new) if not (labels == c).any()]
    if missing:
        raise ValueError(f"calibrate needs labelled boxes of every new class; none of label(s) {missing}")
    prototypes = F.normalize(torch.stack([feats[labels == c].mean(0) for c in range(num_new)]), dim=1)
    own_similarity = (feats * prototypes[labels]).sum(1)
    old_similarity = (keepers @ prototypes.T).max(1).values
    median_new = own_similarity.median().item()
    look_alike = max(old_similarity.max().item(), median_new) if len(keepers) else 1.0
    at_least = torch.quantile(own_similarity, NEW_QUANTILE).item()
    boxes = torch.bincount(labels, minlength=num_new).to(feats)
    alpha = boxes / (boxes + PRIOR_BOXES)
    set_arbitration(branch, prototypes, alpha, look_alike=look_alike, at_least=at_least)
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    learned = {
        "new_boxes": len(feats),
        "old_objects": len(keepers),
        "look_alike": round(look_alike, 4),
        "at_least": round(at_least, 4),
        "alpha": [round(a, 3) for a in alpha.tolist()],
        # how far apart the two are: similarity to the new prototypes at the quantiles 5/25/50/75/95/100%
        "new_similarity": [round(v, 3) for v in torch.quantile(own_similarity.cpu(), quantiles).tolist()],
        "old_similarity": [round(v, 3) for v in torch.quantile(old_similarity.cpu(), quantiles).tolist()]
        if len(keepers)
        else [],
    }
    log.info("arbitration calibrated on %d new and %d old objects: %s", len(feats), len(keepers), learned)
    return learned


def chunks(items: Iterable, size: int):
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def base_features(heads: nn.Module, features: dict[str, Tensor], boxes: list[Tensor], image_sizes) -> Tensor:
    """The base box head's L2-normalised features at ``boxes`` (one list entry per image)."""
    if sum(len(b) for b in boxes) == 0:
        return features[next(iter(features))].new_zeros(0, heads.box_predictor.cls_score.in_features)
    pooled = heads.box_roi_pool(features, boxes, image_sizes)
    return F.normalize(heads.box_head(pooled).flatten(start_dim=1), dim=1)


def arbitrate(sources: list[tuple[Tensor, Tensor, Tensor]], branches, iou: float | None, features: Tensor | None):
    """Merges one image's detections of the base (``sources[0]``) and of each branch
    (``sources[1:]``) into one list sorted by score (stable: the base's order is kept).
    ``features``: the base's normalised features at every box, in the order of the concatenated
    sources (None: plain soft merge)."""
    boxes = torch.cat([s[0] for s in sources])
    scores = torch.cat([s[1] for s in sources])
    labels = torch.cat([s[2] for s in sources])
    source = torch.cat([torch.full_like(s[2], k) for k, s in enumerate(sources)])
    if iou is not None and len(boxes):
        if features is None:
            lowers = _stronger(boxes, scores, source, iou)
        else:
            scores, lowers = _calibrated(boxes, scores, labels, source, branches, iou, features)
        doubt = torch.log1p(-scores.clamp(max=1 - 1e-6))[None, :].expand_as(lowers)
        scores = scores * torch.where(lowers, doubt, torch.zeros_like(doubt)).sum(1).exp()
    order = torch.sort(scores, descending=True, stable=True).indices
    return boxes[order], scores[order], labels[order]


def _overlap(boxes: Tensor, source: Tensor, iou: float) -> Tensor:
    """overlap[i, j]: i and j come from different sources and overlap with IoU >= ``iou``."""
    return (box_iou(boxes, boxes) >= iou) & (source[:, None] != source[None, :])


def _stronger(boxes: Tensor, scores: Tensor, source: Tensor, iou: float) -> Tensor:
    """lowers[i, j]: j, of another source, overlaps i and scores higher."""
    return _overlap(boxes, source, iou) & (scores[None, :] > scores[:, None])


def _calibrated(boxes, scores, labels, source, branches, iou, features):
    """Prototype-calibrated scores and lowers[i, j] as the module doc says."""
    n = len(boxes)
    claim_prototype = torch.zeros_like(features)  # the prototype of each new detection's class
    at_least = torch.ones(n, device=boxes.device)
    look_alike = torch.ones(n, device=boxes.device)
    scores = scores.clone()
    for k, branch in enumerate(branches, start=1):
        mine = source == k
        if not mine.any():
            continue
        index = labels[mine] - branch.first_label
        claim_prototype[mine] = branch.prototypes[index]
        at_least[mine], look_alike[mine] = branch.at_least, branch.look_alike
        similarity = (features[mine] * claim_prototype[mine]).sum(1).clamp(min=0)
        alpha = branch.alpha[index]
        scores[mine] = alpha * scores[mine] + (1 - alpha) * similarity
    overlap = _overlap(boxes, source, iou)
    older = source[:, None] < source[None, :]  # i is older than j
    resembles = features @ claim_prototype.T  # [i, j]: i's box against j's class
    stronger = scores[None, :] > scores[:, None]
    newer_wins = overlap & older & (resembles >= at_least[None, :]) & (stronger | (resembles >= look_alike[None, :]))
    older_wins = overlap & ~older & stronger & ~newer_wins.T
    return scores, newer_wins | older_wins
