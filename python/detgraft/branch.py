"""The ``branch`` strategy: the base stays frozen and bit-identical; each extension adds a branch.

A branch is a box head and a predictor of its own (background + that extension's classes) that
reads the base's RoI features of the base's proposals. At inference the base's old-class
detections are computed exactly as the base computes them (the same layers, the same weights,
the same shapes), each branch detects its classes, and the lists are merged: where detections
of different branches (the base counts as one) overlap with IoU >= ``merge_iou``, the one with
the higher score wins and the weaker one's score is multiplied by (1 - the stronger's score).
That merge is the only way an old-class detection can change, so "zero forgetting" means
exactly: every old-class box and label of the base is kept bit for bit, and its score too unless
a higher-scored new-class detection overlaps it; with ``merge_iou=None`` the base's detections
are all kept bit for bit.

The model stays a torchvision ``FasterRCNN``: its ``roi_heads`` becomes a ``BranchRoIHeads``
(a subclass of torchvision's ``RoIHeads``) in place, so ``model(images, targets)`` returns
torchvision's loss dict (the newest branch's ``loss_classifier`` / ``loss_box_reg``) and eval
mode returns torchvision's list of ``{boxes, labels, scores}``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import box_iou

__all__ = ["Branch", "BranchRoIHeads", "add_branch", "branch_layout"]


class Branch(nn.Module):
    """A box head and a predictor for labels ``first_label`` .. ``first_label + num_classes - 2``
    (``num_classes`` counts the branch's background, as torchvision's does)."""

    def __init__(self, box_head: nn.Module, box_predictor: FastRCNNPredictor, first_label: int) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.first_label = first_label

    @property
    def num_classes(self) -> int:
        return self.box_predictor.cls_score.out_features

    def owns(self, labels: Tensor) -> Tensor:
        return (labels >= self.first_label) & (labels < self.first_label + self.num_classes - 1)


class BranchRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (the base's, untouched) plus ``branches``; see the module doc."""

    branches: nn.ModuleList
    base_width: int  # the base predictor's outputs, background included
    merge_iou: float | None

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("training a branch needs targets")
            branch = self.branches[-1]
            targets = [_branch_targets(t, branch) for t in targets]
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
            x = branch.box_head(self.box_roi_pool(features, proposals, image_shapes))
            class_logits, box_regression = branch.box_predictor(x)
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        pooled = self.box_roi_pool(features, proposals, image_shapes)
        per_source = [self._base_detections(pooled, proposals, image_shapes)]
        for branch in self.branches:
            logits, regression = branch.box_predictor(branch.box_head(pooled))
            boxes, scores, labels = self.postprocess_detections(logits, regression, proposals, image_shapes)
            per_source.append((boxes, scores, [label + branch.first_label - 1 for label in labels]))
        result = []
        for i in range(len(proposals)):
            boxes, scores, labels = _merge([(s[0][i], s[1][i], s[2][i]) for s in per_source], self.merge_iou)
            result.append(
                {
                    "boxes": boxes[: self.detections_per_img],
                    "scores": scores[: self.detections_per_img],
                    "labels": labels[: self.detections_per_img],
                }
            )
        return result, {}

    def _base_detections(self, pooled: Tensor, proposals, image_shapes):
        """The base's detections, computed as the base computes them: its predictor's first
        ``base_width`` rows are a Linear of the base's own shape."""
        x = self.box_head(pooled).flatten(start_dim=1)
        predictor, width = self.box_predictor, self.base_width
        logits = F.linear(x, predictor.cls_score.weight[:width], predictor.cls_score.bias[:width])
        regression = F.linear(x, predictor.bbox_pred.weight[: 4 * width], predictor.bbox_pred.bias[: 4 * width])
        return self.postprocess_detections(logits, regression, proposals, image_shapes)


def add_branch(model: nn.Module, labels: list[int], merge_iou: float | None = 0.5) -> Branch:
    """Adds a branch for ``labels`` (consecutive, after everything the model has) to ``model``'s
    RoI heads, in place. Its box head starts as a copy of the base's; its predictor's rows start
    as the widened predictor's rows for the background and ``labels`` (set by ``expand_predictor``'s
    init). Everything but the new branch is frozen."""
    if not labels or list(labels) != list(range(labels[0], labels[0] + len(labels))):
        raise ValueError(f"a branch takes consecutive labels; got {labels}")
    heads = model.roi_heads
    predictor = heads.box_predictor
    if predictor.cls_score.out_features < labels[-1] + 1:
        raise ValueError(
            f"labels {labels} are beyond the predictor's {predictor.cls_score.out_features} outputs: "
            "call detgraft.expand_predictor first"
        )
    if not isinstance(heads, BranchRoIHeads):
        heads.__class__ = BranchRoIHeads
        heads.branches = nn.ModuleList()
        heads.base_width = labels[0]
        heads.merge_iou = merge_iou
    rows = [0, *labels]
    new = FastRCNNPredictor(predictor.cls_score.in_features, len(rows)).to(predictor.cls_score.weight)
    blocks = torch.tensor([4 * r + k for r in rows for k in range(4)], device=predictor.bbox_pred.weight.device)
    with torch.no_grad():
        new.cls_score.weight.copy_(predictor.cls_score.weight[rows])
        new.cls_score.bias.copy_(predictor.cls_score.bias[rows])
        new.bbox_pred.weight.copy_(predictor.bbox_pred.weight[blocks])
        new.bbox_pred.bias.copy_(predictor.bbox_pred.bias[blocks])
    branch = Branch(copy.deepcopy(heads.box_head), new, labels[0])
    for p in model.parameters():
        p.requires_grad_(False)
    heads.branches.append(branch)
    for p in branch.parameters():
        p.requires_grad_(True)
    return branch


def branch_layout(model: nn.Module) -> dict | None:
    """What ``restore_branches`` needs to rebuild the branches before loading their weights."""
    heads = model.roi_heads
    if not isinstance(heads, BranchRoIHeads):
        return None
    return {
        "base_width": heads.base_width,
        "merge_iou": heads.merge_iou,
        "branches": [{"first_label": b.first_label, "num_classes": b.num_classes} for b in heads.branches],
    }


def restore_branches(model: nn.Module, layout: dict) -> None:
    """Rebuilds the branches ``branch_layout`` described (weights follow with load_state_dict)."""
    for b in layout["branches"]:
        add_branch(model, list(range(b["first_label"], b["first_label"] + b["num_classes"] - 1)), layout["merge_iou"])
    model.roi_heads.base_width = layout["base_width"]


def _branch_targets(target: dict[str, Tensor], branch: Branch) -> dict[str, Tensor]:
    """The branch's view of a target: its own classes as 1..n; every other box is background to it."""
    own = branch.owns(target["labels"])
    return {**target, "boxes": target["boxes"][own], "labels": target["labels"][own] - branch.first_label + 1}


def _merge(sources: list[tuple[Tensor, Tensor, Tensor]], iou: float | None):
    """Concatenates per-source detections. Across sources, a detection overlapped (IoU >= ``iou``)
    by higher-scored ones keeps its score times the product of (1 - their scores): the stronger
    claim on an object wins, and the weaker stays in the list with a score that says how
    unlikely it is. Sorted by score (stable: the base's order is kept)."""
    boxes = torch.cat([s[0] for s in sources])
    scores = torch.cat([s[1] for s in sources])
    labels = torch.cat([s[2] for s in sources])
    source = torch.cat([torch.full_like(s[2], k) for k, s in enumerate(sources)])
    if iou is not None and len(boxes):
        stronger = (
            (box_iou(boxes, boxes) >= iou) & (source[:, None] != source[None, :]) & (scores[None, :] > scores[:, None])
        )
        doubt = torch.log1p(-scores.clamp(max=1 - 1e-6))[None, :].expand_as(stronger)
        scores = scores * torch.where(stronger, doubt, torch.zeros_like(doubt)).sum(1).exp()
    order = torch.sort(scores, descending=True, stable=True).indices
    return boxes[order], scores[order], labels[order]
