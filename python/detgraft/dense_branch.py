"""The ``branch`` strategy for one-stage (dense) detectors: RetinaNet and FCOS.

Their classes are independent sigmoids, so there is no softmax to share with the old classes: a
branch is a classification head of its own (a copy of the base's convolution tower and a new
``cls_logits`` for the branch's classes, laid out anchor by anchor like the base's) that reads the
base's frozen FPN features. Boxes (and FCOS's centerness) come from the base's regression head.

At inference the base's class scores are computed exactly as the base computes them (its tower,
its ``cls_logits`` rows of the old classes, the same shapes), each branch scores its classes at
the same anchors, torchvision's own ``postprocess_detections`` turns each into detections, and
``detgraft.arbitration.arbitrate`` merges them as for R-CNN branches (with ``merge_iou=None`` the
base's detections are all kept bit for bit). What the arbitration reads as "the base's features at
a box" is the base's classification tower (the features its class scores come from), RoI-aligned
at the box from the FPN level of its size and averaged; ``detgraft.calibrate`` learns the
prototypes and the memories from them, as for R-CNN. Uncalibrated, the stronger claim wins.

The model stays a torchvision ``RetinaNet`` / ``FCOS`` (its class and its head's class become
subclasses, as ``BranchRoIHeads`` does for R-CNNs): ``model(images, targets)`` returns
``{"classification": ...}``, the newest branch's focal loss, and eval mode torchvision's list of
``{boxes, labels, scores}``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign, sigmoid_focal_loss

from .arbitration import add_arbitration_state, arbitrate, chunks, memory_lengths, resize_memories, transformed
from .branch import attach_branch

__all__ = ["DenseBranch", "add_dense_branch", "is_dense_branch_model"]


class DenseBranch(nn.Module):
    """A classification head (``num_classes`` outputs per anchor, no background column) for labels
    ``first_label`` .. ``first_label + num_classes - 1``."""

    def __init__(self, head: nn.Module, first_label: int) -> None:
        super().__init__()
        self.head = head
        self.first_label = first_label
        # the arbitration's state (detgraft.arbitration.calibrate): saved with the weights
        weight = head.cls_logits.weight
        add_arbitration_state(self, self.num_classes, weight.flatten(1), width=head.cls_logits.in_channels)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def owns(self, labels: Tensor) -> Tensor:
        return (labels >= self.first_label) & (labels < self.first_label + self.num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.head(features)  # [N, sum of H*W*A, num_classes]


class _BranchHead:
    """The base's head plus ``branches``: the base's outputs for its ``base_classes`` columns (in
    eval mode), and ``new_cls_logits``, every branch's columns side by side (in training mode
    only the newest branch's, which is what learns). In eval mode the base's classification tower
    outputs of the last forward are kept in ``tower`` for the arbitration."""

    branches: nn.ModuleList
    base_classes: int

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        if self.training:
            return {"new_cls_logits": self.branches[-1](x)}
        outputs = self._regression(x)
        outputs["cls_logits"] = self._base_cls_logits(x)
        outputs["new_cls_logits"] = torch.cat([b(x) for b in self.branches], dim=2)
        return outputs

    def _base_cls_logits(self, x: list[Tensor]) -> Tensor:
        """The classification head's forward with only the old classes' rows: what the base computes."""
        head, k = self.classification_head, self.base_classes
        conv = head.cls_logits
        anchors = conv.out_channels // head.num_classes
        weight = conv.weight.view(anchors, head.num_classes, *conv.weight.shape[1:])[:, :k].flatten(0, 1)
        bias = conv.bias.view(anchors, head.num_classes)[:, :k].flatten()
        out, self.tower = [], []
        for features in x:
            self.tower.append(head.conv(features))
            logits = F.conv2d(self.tower[-1], weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            n, _, h, w = logits.shape
            out.append(logits.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
        return torch.cat(out, dim=1)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        """Sigmoid focal loss of the newest branch over the anchors matched to its boxes (labels
        0..n-1 here, see ``_BranchModel.compute_loss``) and the unmatched ones, summed and divided
        by the matched (FCOS's normalisation; anchors RetinaNet's matcher leaves between its
        thresholds are left out, as torchvision does)."""
        logits = head_outputs["new_cls_logits"]
        wanted = torch.zeros_like(logits)
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        for i, (target, matched) in enumerate(zip(targets, matched_idxs)):
            foreground = matched >= 0
            wanted[i, foreground, target["labels"][matched[foreground]]] = 1.0
            valid[i] = matched != -2  # torchvision's Matcher.BETWEEN_THRESHOLDS
        loss = sigmoid_focal_loss(logits[valid], wanted[valid], reduction="sum")
        return {"classification": loss / max(1, int(wanted.sum().item()))}


class BranchRetinaNetHead(_BranchHead, RetinaNetHead):
    def _regression(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {"bbox_regression": self.regression_head(x)}


class BranchFCOSHead(_BranchHead, FCOSHead):
    def _regression(self, x: list[Tensor]) -> dict[str, Tensor]:
        bbox_regression, bbox_ctrness = self.regression_head(x)
        return {"bbox_regression": bbox_regression, "bbox_ctrness": bbox_ctrness}


class _BranchModel:
    """A RetinaNet / FCOS whose head is a ``_BranchHead``: the newest branch learns from its own
    classes' boxes; detections are the base's and the branches', merged."""

    merge_iou: float | None

    def compute_loss(self, targets, head_outputs, *rest):
        branch = self.head.branches[-1]
        own = [branch.owns(t["labels"]) for t in targets]
        targets = [
            {**t, "boxes": t["boxes"][o], "labels": t["labels"][o] - branch.first_label} for t, o in zip(targets, own)
        ]
        return super().compute_loss(targets, head_outputs, *rest)

    def postprocess_detections(self, head_outputs, anchors, image_sizes):
        sources = self.sources(head_outputs, anchors, image_sizes)
        features = [None] * len(image_sizes)
        if self.merge_iou is not None and all(bool(b.calibrated) for b in self.head.branches):
            boxes = [torch.cat([s[i]["boxes"] for s in sources]) for i in range(len(image_sizes))]
            features = tower_features(self.head.tower, boxes, image_sizes).split([len(b) for b in boxes])
        detections = []
        for i, per_source in enumerate(zip(*sources)):
            merged = [(d["boxes"], d["scores"], d["labels"]) for d in per_source]
            boxes, scores, labels = arbitrate(merged, self.head.branches, self.merge_iou, features[i])
            n = self.detections_per_img
            detections.append({"boxes": boxes[:n], "scores": scores[:n], "labels": labels[:n]})
        return detections

    def sources(self, head_outputs, anchors, image_sizes) -> list[list[dict[str, Tensor]]]:
        """torchvision's detections (per image) of the base, then of each branch."""
        head_outputs = dict(head_outputs)
        new = head_outputs.pop("new_cls_logits")
        sources = [super().postprocess_detections(head_outputs, anchors, image_sizes)]
        start = 0
        for branch in self.head.branches:
            columns = {**head_outputs, "cls_logits": [x[..., start : start + branch.num_classes] for x in new]}
            found = super().postprocess_detections(columns, anchors, image_sizes)
            sources.append([{**d, "labels": d["labels"] + branch.first_label} for d in found])
            start += branch.num_classes
        return sources


def tower_features(tower: list[Tensor], boxes: list[Tensor], image_sizes) -> Tensor:
    """The base classification tower's features at ``boxes`` (a list per image): RoI-aligned 7x7
    from the FPN level of the box's size, averaged, L2-normalised."""
    if sum(len(b) for b in boxes) == 0:
        return tower[0].new_zeros(0, tower[0].shape[1])
    names = [str(k) for k in range(len(tower))]
    pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    pooled = pool(OrderedDict(zip(names, tower)), boxes, list(image_sizes))
    return F.normalize(pooled.mean(dim=(2, 3)), dim=1)


@torch.no_grad()
def dense_calibration_pass(model: nn.Module, examples, batch: int):
    """What ``detgraft.calibrate`` learns from for a RetinaNet / FCOS branch, per batch of
    ``examples``: the targets (in the transformed images), the model's detections before the newest
    branch, and a function giving the base tower's features at boxes."""
    for chunk in chunks(examples, batch):
        image_list, targets = transformed(model, chunk)
        features = list(model.backbone(image_list.tensors).values())
        outputs = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        hw = [x.size(2) * x.size(3) for x in features]
        per_anchor = outputs["cls_logits"].size(1) // sum(hw)
        sizes = [n * per_anchor for n in hw]
        split = {k: list(v.split(sizes, dim=1)) for k, v in outputs.items()}
        sources = model.sources(split, [list(a.split(sizes)) for a in anchors], image_list.image_sizes)
        before = [
            {k: torch.cat([s[i][k] for s in sources[:-1]]) for k in ("boxes", "scores", "labels")}
            for i in range(len(targets))
        ]
        tower = model.head.tower
        yield targets, before, lambda boxes: tower_features(tower, boxes, image_list.image_sizes)  # noqa: B023


class BranchRetinaNet(_BranchModel, RetinaNet):
    pass


class BranchFCOS(_BranchModel, FCOS):
    pass


_SUBCLASSES = {RetinaNet: (BranchRetinaNet, BranchRetinaNetHead), FCOS: (BranchFCOS, BranchFCOSHead)}


def is_dense_branch_model(model: nn.Module) -> bool:
    return isinstance(model, _BranchModel)


def add_dense_branch(model: nn.Module, labels: list[int], merge_iou: float | None = 0.5) -> DenseBranch:
    """Adds a branch for ``labels`` (consecutive, the last classes ``expand_predictor`` added) to a
    RetinaNet or FCOS, in place. Its tower starts as a copy of the base's; its ``cls_logits`` as
    the widened layer's rows of ``labels`` (``expand_predictor``'s start: below the score
    threshold). Everything but the new branch is frozen."""
    head = model.head
    cls_head = head.classification_head
    if not labels or list(labels) != list(range(labels[0], labels[0] + len(labels))):
        raise ValueError(f"a branch takes consecutive labels; got {labels}")
    if cls_head.num_classes < labels[-1] + 1:
        raise ValueError(
            f"labels {labels} are beyond the head's {cls_head.num_classes} classes: "
            "call detgraft.expand_predictor first"
        )
    if not isinstance(model, _BranchModel):
        model_class, head_class = next(v for k, v in _SUBCLASSES.items() if isinstance(model, k))
        model.__class__, head.__class__ = model_class, head_class
        head.branches = nn.ModuleList()
        head.base_classes = labels[0]
        model.merge_iou = merge_iou
    conv = cls_head.cls_logits
    anchors = conv.out_channels // cls_head.num_classes
    own = slice(labels[0], labels[-1] + 1)
    branch_head = copy.deepcopy(cls_head)
    new = nn.Conv2d(conv.in_channels, anchors * len(labels), 3, padding=1).to(conv.weight)
    with torch.no_grad():
        new.weight.copy_(conv.weight.view(anchors, cls_head.num_classes, *conv.weight.shape[1:])[:, own].flatten(0, 1))
        new.bias.copy_(conv.bias.view(anchors, cls_head.num_classes)[:, own].flatten())
    branch_head.cls_logits = new
    branch_head.num_classes = len(labels)
    return attach_branch(model, head.branches, DenseBranch(branch_head, labels[0]))


def dense_branch_layout(model: nn.Module) -> dict | None:
    """What ``restore_dense_branches`` needs to rebuild the branches before loading their weights."""
    if not isinstance(model, _BranchModel):
        return None
    return {
        "kind": "dense",
        "base_width": model.head.base_classes,
        "merge_iou": model.merge_iou,
        "branches": [
            {"first_label": b.first_label, "num_classes": b.num_classes, "memory": memory_lengths(b)}
            for b in model.head.branches
        ],
    }


def restore_dense_branches(model: nn.Module, layout: dict) -> None:
    for b in layout["branches"]:
        labels = list(range(b["first_label"], b["first_label"] + b["num_classes"]))
        resize_memories(add_dense_branch(model, labels, layout["merge_iou"]), b.get("memory", [0, 0]))
    model.head.base_classes = layout["base_width"]
