"""The ``branch`` strategy: the base stays frozen and bit-identical; each extension adds a branch.

A branch is a box head and a predictor of its own (background + that extension's classes) that
reads the base's RoI features of the base's proposals, plus an ``others`` output that learns
from the model's own detections what is not new. At inference the base's old-class detections
are computed exactly as the base computes them (the same layers, the same weights, the same
shapes), each branch detects its classes, and ``detgraft.arbitration`` merges the lists: where
an old and a new detection overlap with IoU >= ``merge_iou``, it decides by the branch's
calibrated score and by what the base's own features say the box looks like. That merge is the
only way an old-class detection can change, so "zero forgetting" means exactly: every old-class
box and label of the base is kept bit for bit, and its score too unless the arbitration gives
the object to a new class; with ``merge_iou=None`` the base's detections are all kept bit for bit.

The model stays a torchvision ``FasterRCNN``: its ``roi_heads`` becomes a ``BranchRoIHeads``
(a subclass of torchvision's ``RoIHeads``) in place, so ``model(images, targets)`` returns
torchvision's loss dict (the newest branch's ``loss_classifier`` / ``loss_box_reg``) and eval
mode returns torchvision's list of ``{boxes, labels, scores}``.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference

from .arbitration import arbitrate, base_features
from .teacher import add_teacher_boxes

__all__ = ["Branch", "BranchRoIHeads", "add_branch", "branch_layout"]

log = logging.getLogger(__name__)

ARBITRATION_STATE = ("prototypes", "alpha", "look_alike", "at_least", "calibrated")  # each branch's buffers


class Branch(nn.Module):
    """A box head and a predictor for labels ``first_label`` .. ``first_label + num_classes - 2``
    (``num_classes`` counts the branch's background, as torchvision's does). With ``others``, the
    predictor has one more output after them: "an object the model knew before", learned from the
    teacher's detections (see ``BranchRoIHeads``)."""

    def __init__(
        self, box_head: nn.Module, box_predictor: FastRCNNPredictor, first_label: int, others: bool = False
    ) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.first_label = first_label
        self.others = others
        # the arbitration's state (detgraft.arbitration.calibrate): saved with the weights
        width = box_predictor.cls_score.in_features
        self.register_buffer("prototypes", box_predictor.cls_score.weight.new_zeros(self.num_classes - 1, width))
        self.register_buffer("alpha", box_predictor.cls_score.weight.new_ones(self.num_classes - 1))
        self.register_buffer("look_alike", box_predictor.cls_score.weight.new_ones(()))
        self.register_buffer("at_least", box_predictor.cls_score.weight.new_ones(()))
        self.register_buffer("calibrated", torch.tensor(False, device=box_predictor.cls_score.weight.device))

    def set_arbitration(self, prototypes: Tensor, alpha: Tensor, look_alike: float, at_least: float) -> None:
        with torch.no_grad():
            self.prototypes.copy_(prototypes)
            self.alpha.copy_(alpha)
            self.look_alike.fill_(look_alike)
            self.at_least.fill_(at_least)
            self.calibrated.fill_(True)

    @property
    def num_classes(self) -> int:
        return self.box_predictor.cls_score.out_features - self.others

    def owns(self, labels: Tensor) -> Tensor:
        return (labels >= self.first_label) & (labels < self.first_label + self.num_classes - 1)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and box regression over background and the branch's classes: the
        ``others`` output joins the background (log-sum-exp of the two logits), so each class's
        probability is what the full softmax gives it."""
        logits, regression = self.box_predictor(self.box_head(pooled))
        if not self.others:
            return logits, regression
        background = torch.logsumexp(logits[:, [0, -1]], dim=1, keepdim=True)
        return torch.cat([background, logits[:, 1:-1]], dim=1), regression[:, :-4]


class BranchRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (the base's, untouched) plus ``branches``; see the module doc."""

    branches: nn.ModuleList
    base_width: int  # the base predictor's outputs, background included
    merge_iou: float | None
    keep: float  # teacher scores of the branches' ``others`` output: a label from keep,
    ignore: float  # left out of the loss from ignore
    teacher_proposals: int  # the teacher reads the top proposals, as many as the base reads at inference
    _warned = False

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("training a branch needs targets")
            branch = self.branches[-1]
            targets = [_branch_targets(t, branch) for t in targets]
            if branch.others:
                with torch.no_grad():
                    # the RPN sorts proposals by objectness: the top ones are those the base sees at inference
                    top = [p[: self.teacher_proposals] for p in proposals]
                    taught = self._teacher_detections(features, top, image_shapes, branch, self.ignore)
                others = branch.num_classes
                targets = [add_teacher_boxes(t, d, self.keep, self.ignore, others) for t, d in zip(targets, taught)]
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
            x = branch.box_head(self.box_roi_pool(features, proposals, image_shapes))
            class_logits, box_regression = branch.box_predictor(x)
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        pooled = self.box_roi_pool(features, proposals, image_shapes)
        per_source = self._per_source(pooled, proposals, image_shapes, self.branches)
        per_image = [[(s[0][i], s[1][i], s[2][i]) for s in per_source] for i in range(len(proposals))]
        features_at = [None] * len(proposals)
        if self.merge_iou is not None and all(bool(b.calibrated) for b in self.branches):
            boxes = [torch.cat([s[0] for s in sources]) for sources in per_image]
            features_at = base_features(self, features, boxes, image_shapes).split([len(b) for b in boxes])
        elif self.merge_iou is not None and not self._warned:
            log.warning("a branch was not calibrated: merging by score alone (call detgraft.calibrate after training)")
            self._warned = True
        result = []
        for i, sources in enumerate(per_image):
            boxes, scores, labels = arbitrate(sources, self.branches, self.merge_iou, features_at[i])
            result.append(
                {
                    "boxes": boxes[: self.detections_per_img],
                    "scores": scores[: self.detections_per_img],
                    "labels": labels[: self.detections_per_img],
                }
            )
        if self.has_mask():
            self._add_masks(features, result, image_shapes)
        return result, {}

    def _add_masks(self, features, result: list[dict[str, Tensor]], image_shapes) -> None:
        """A Mask R-CNN's masks for the merged detections, as torchvision infers them: the base's
        mask head, each detection reading its label's channel (a new class's channel is the one
        ``expand_predictor`` added: the mean old mask until a mask loss trains it)."""
        boxes = [r["boxes"] for r in result]
        x = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        probs = maskrcnn_inference(self.mask_predictor(x), [r["labels"] for r in result])
        for r, masks in zip(result, probs):
            r["masks"] = masks

    def _base_detections(self, pooled: Tensor, proposals, image_shapes):
        """The base's detections, computed as the base computes them: its predictor's first
        ``base_width`` rows are a Linear of the base's own shape."""
        x = self.box_head(pooled).flatten(start_dim=1)
        predictor, width = self.box_predictor, self.base_width
        logits = F.linear(x, predictor.cls_score.weight[:width], predictor.cls_score.bias[:width])
        regression = F.linear(x, predictor.bbox_pred.weight[: 4 * width], predictor.bbox_pred.bias[: 4 * width])
        return self.postprocess_detections(logits, regression, proposals, image_shapes)

    def _per_source(self, pooled: Tensor, proposals, image_shapes, branches) -> list:
        """(boxes, scores, labels), each a list over images, of the base and of each of ``branches``."""
        sources = [self._base_detections(pooled, proposals, image_shapes)]
        for branch in branches:
            boxes, scores, labels = self.postprocess_detections(*branch(pooled), proposals, image_shapes)
            sources.append((boxes, scores, [label + branch.first_label - 1 for label in labels]))
        return sources

    def _teacher_detections(
        self, features, proposals, image_shapes, branch: Branch, score: float
    ) -> list[dict[str, Tensor]]:
        """What the model detected before ``branch`` was added (the base and the earlier
        branches, unmerged) on ``proposals``, scoring above ``score``: the ``teacher`` of its
        ``others`` output. Postprocessed at that score, not the usual 0.05: the same detections
        above it, without the per-class NMS over thousands of boxes that nobody uses."""
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        usual, self.score_thresh = self.score_thresh, score
        try:
            earlier = [b for b in self.branches if b is not branch]
            sources = self._per_source(pooled, proposals, image_shapes, earlier)
        finally:
            self.score_thresh = usual
        return [
            {k: torch.cat([s[j][i] for s in sources]) for j, k in enumerate(("boxes", "scores", "labels"))}
            for i in range(len(proposals))
        ]


def add_branch(
    model: nn.Module,
    labels: list[int],
    merge_iou: float | None = 0.5,
    others: bool = True,
    keep: float = 0.7,
    ignore: float = 0.3,
) -> Branch:
    """Adds a branch for ``labels`` (consecutive, after everything the model has) to ``model``'s
    RoI heads, in place. Its box head starts as a copy of the base's; its predictor's rows start
    as the widened predictor's rows for the background and ``labels`` (set by ``expand_predictor``'s
    init). With ``others``, one more output learns "an object the model already knew" from the
    model's own detections on the training images (score >= ``keep`` a label; between ``ignore``
    and ``keep`` left out of the loss), on the proposals the model reads at inference; it starts
    as the mean of the old classes' rows. Everything but the new branch is frozen."""
    if not labels or list(labels) != list(range(labels[0], labels[0] + len(labels))):
        raise ValueError(f"a branch takes consecutive labels; got {labels}")
    if not 0 <= ignore <= keep <= 1:
        raise ValueError(f"need 0 <= ignore <= keep <= 1; got ignore={ignore}, keep={keep}")
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
    heads.keep, heads.ignore = keep, ignore
    heads.teacher_proposals = model.rpn._post_nms_top_n["testing"]
    rows = [0, *labels]
    new = FastRCNNPredictor(predictor.cls_score.in_features, len(rows) + others).to(predictor.cls_score.weight)
    blocks = torch.tensor([4 * r + k for r in rows for k in range(4)], device=predictor.bbox_pred.weight.device)
    with torch.no_grad():
        cls_weight, cls_bias = predictor.cls_score.weight, predictor.cls_score.bias
        box_weight, box_bias = predictor.bbox_pred.weight, predictor.bbox_pred.bias
        new.cls_score.weight[: len(rows)] = cls_weight[rows]
        new.cls_score.bias[: len(rows)] = cls_bias[rows]
        new.bbox_pred.weight[: 4 * len(rows)] = box_weight[blocks]
        new.bbox_pred.bias[: 4 * len(rows)] = box_bias[blocks]
        if others:  # a typical old class: the mean of the rows before this branch's labels
            new.cls_score.weight[-1] = cls_weight[1 : labels[0]].mean(0)
            new.cls_score.bias[-1] = cls_bias[1 : labels[0]].mean(0)
            new.bbox_pred.weight[-4:] = box_weight[4 : 4 * labels[0]].view(-1, 4, box_weight.shape[1]).mean(0)
            new.bbox_pred.bias[-4:] = box_bias[4 : 4 * labels[0]].view(-1, 4).mean(0)
    branch = Branch(copy.deepcopy(heads.box_head), new, labels[0], others)
    for p in model.parameters():
        p.requires_grad_(False)
    heads.branches.append(branch)
    for p in branch.parameters():
        p.requires_grad_(True)
    return branch


def branch_layout(model: nn.Module) -> dict | None:
    """What ``restore_branches`` needs to rebuild the branches before loading their weights."""
    heads = getattr(model, "roi_heads", None)
    if not isinstance(heads, BranchRoIHeads):
        return None
    return {
        "base_width": heads.base_width,
        "merge_iou": heads.merge_iou,
        "branches": [
            {"first_label": b.first_label, "num_classes": b.num_classes, "others": b.others} for b in heads.branches
        ],
    }


def restore_branches(model: nn.Module, layout: dict) -> None:
    """Rebuilds the branches ``branch_layout`` described (weights follow with load_state_dict)."""
    for b in layout["branches"]:
        labels = list(range(b["first_label"], b["first_label"] + b["num_classes"] - 1))
        add_branch(model, labels, layout["merge_iou"], others=b.get("others", False))
    model.roi_heads.base_width = layout["base_width"]


def _branch_targets(target: dict[str, Tensor], branch: Branch) -> dict[str, Tensor]:
    """The branch's view of a target: its own classes as 1..n; every other box is background to it."""
    own = branch.owns(target["labels"])
    return {**target, "boxes": target["boxes"][own], "labels": target["labels"][own] - branch.first_label + 1}
