"""The ``branch`` strategy for one-stage (dense) detectors: RetinaNet and FCOS.

Their classes are independent sigmoids, so there is no softmax to share with the old classes: a
branch is a classification head of its own (a copy of the base's convolution tower and a new
``cls_logits`` for the branch's classes, laid out anchor by anchor like the base's) that reads the
base's frozen FPN features. Boxes (and FCOS's centerness) come from the base's regression head.

At inference the base's class scores are computed exactly as the base computes them (its tower,
its ``cls_logits`` rows of the old classes, the same shapes), each branch scores its classes at
the same anchors, torchvision's own ``postprocess_detections`` turns each into detections, and
``detgraft.heads.merge.arbitrate`` merges them as for R-CNN branches (with ``merge_iou=None`` the
base's detections are all kept bit for bit). What the arbitration reads as "the base's features at
a box" is the base's classification tower (the features its class scores come from), RoI-aligned
at the box from the FPN level of its size and averaged; ``detgraft.calibrate`` learns the
prototypes and the memories from them, as for R-CNN. Uncalibrated, the stronger claim wins.

The model stays a torchvision ``RetinaNet`` / ``FCOS`` (its class and its head's class become
subclasses, as ``BranchRoIHeads`` does for R-CNNs): ``model(images, targets)`` returns
``{"classification": ...}``, the newest branch's focal loss, and eval mode torchvision's list of
``{boxes, labels, scores}``. The inference path is TorchScript (``detgraft export``); training is
Python only.

In training only the branch learns; what the frozen base computes for an example (the transform
and the backbone's FPN maps) can be computed once (``frozen_pass``) and the step's loss from it
(``kept_losses``): ``detgraft.kept``.
"""

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign, sigmoid_focal_loss

from .frozen import Kept, batched, frozen_batches, replay_transform_draws
from .merge import (
    ONE_STAGE_CLAIM_SCORE,
    Arbitrated,
    BranchState,
    add_arbitration_state,
    memory_lengths,
    merge,
    resize_memories,
)
from .rcnn import attach_branch

__all__ = [
    "BranchFCOS",
    "BranchFCOSHead",
    "BranchRetinaNet",
    "BranchRetinaNetHead",
    "DenseBranch",
    "add_dense_branch",
    "branches",
    "calibration_pass",
    "dense_branch_layout",
    "frozen_pass",
    "kept_losses",
    "restore_dense_branches",
]


class DenseBranch(Arbitrated, nn.Module):
    """A classification head (``num_new`` outputs per anchor, no background column) for the labels
    ``first_label`` .. ``first_label + num_new - 1``."""

    def __init__(self, head: nn.Module, first_label: int) -> None:
        super().__init__()
        self.head = head
        self.first_label = first_label
        # the arbitration's state (detgraft.strategies.calibrate): saved with the weights
        weight = head.cls_logits.weight
        add_arbitration_state(self, self.num_new, weight.flatten(1), width=head.cls_logits.in_channels)

    @property
    def num_new(self) -> int:
        return self.head.num_classes

    def owns(self, labels: Tensor) -> Tensor:
        return (labels >= self.first_label) & (labels < self.first_label + self.num_new)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.head(features)  # [N, sum of H*W*A, num_new]


class _BranchHead:
    """The base's head plus ``branches`` (an ``nn.ModuleList``) and ``old_num_classes`` (the base's
    class count): in training mode only ``new_cls_logits``, the newest branch's outputs (what
    learns); in eval mode the base's outputs for its ``old_num_classes`` columns and every branch's
    columns side by side (``base_outputs``, which also returns the base's classification tower
    outputs for the arbitration)."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        if self.training:
            return {"new_cls_logits": self.branches[-1](x)}
        return self.base_outputs(x)[0]

    def base_outputs(self, x: list[Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """The head's eval outputs and the base's classification tower outputs (one per level)."""
        outputs = self._regression(x)
        outputs["cls_logits"], tower = self._base_cls_logits(x)
        outputs["new_cls_logits"] = torch.cat([b(x) for b in self.branches], dim=2)
        return outputs, tower

    def _base_cls_logits(self, x: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The classification head's forward with only the old classes' rows (what the base
        computes), and its tower's outputs."""
        head, k = self.classification_head, self.old_num_classes
        conv = head.cls_logits
        anchors = conv.weight.shape[0] // head.num_classes
        weight = conv.weight.view(anchors, head.num_classes, -1)[:, :k]
        weight = weight.reshape(anchors * k, conv.weight.shape[1], conv.weight.shape[2], conv.weight.shape[3])
        full_bias = conv.bias
        assert full_bias is not None  # torchvision's cls_logits has one
        bias = full_bias.view(anchors, head.num_classes)[:, :k].flatten()
        out: list[Tensor] = []
        tower: list[Tensor] = []
        for features in x:
            tower.append(self.classification_head.conv(features))
            logits = self.classification_head.cls_logits._conv_forward(tower[-1], weight, bias)
            n, _, h, w = logits.shape
            out.append(logits.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
        return torch.cat(out, dim=1), tower

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
    classes' boxes; detections are the base's and the branches', merged. Also set by
    ``add_dense_branch``: ``merge_iou`` (float or None) and ``tower_pool`` (what reads the base's
    tower at a box)."""

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        if self.training:
            return self._training_forward(images, targets)
        original_image_sizes: list[tuple[int, int]] = []
        for img in images:
            original_image_sizes.append((img.shape[-2], img.shape[-1]))
        image_list, _ = self.transform(images, None)
        head_outputs, anchors, tower = self.head_pass(image_list)
        detections = self.merged(head_outputs, anchors, image_list.image_sizes, tower)
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_image_sizes)
        losses: dict[str, Tensor] = {}
        if torch.jit.is_scripting():
            return losses, detections
        return self.eager_outputs(losses, detections)

    def head_pass(self, image_list: ImageList) -> tuple[dict[str, list[Tensor]], list[list[Tensor]], list[Tensor]]:
        """The backbone and the head in eval mode on transformed images: the head's outputs and the
        anchors split per FPN level (as torchvision's forward splits them), and the base's tower."""
        maps = self.backbone(image_list.tensors)
        features = [maps] if isinstance(maps, Tensor) else list(maps.values())  # as torchvision's forward
        return self.heads_on(image_list, features)

    def heads_on(
        self, image_list: ImageList, features: list[Tensor]
    ) -> tuple[dict[str, list[Tensor]], list[list[Tensor]], list[Tensor]]:
        """``head_pass`` on the backbone's FPN maps ``features`` of ``image_list``."""
        head_outputs, tower = self.head.base_outputs(features)
        anchors = self.anchor_generator(image_list, features)
        num_anchors_per_level = [x.size(2) * x.size(3) for x in features]
        per_location = head_outputs["cls_logits"].size(1) // sum(num_anchors_per_level)
        num_anchors_per_level = [n * per_location for n in num_anchors_per_level]
        split: dict[str, list[Tensor]] = {}
        for k in head_outputs:
            split[k] = list(head_outputs[k].split(num_anchors_per_level, dim=1))
        return split, [list(a.split(num_anchors_per_level)) for a in anchors], tower

    @torch.jit.unused
    def _training_forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        # torchvision's forward, with the branch's head and compute_loss (its eager output: the losses)
        return super().forward(images, targets)

    @torch.jit.unused
    def training_losses(
        self, image_list: ImageList, features: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """torchvision's training forward after the backbone: the newest branch's loss on the FPN
        maps ``features`` of the transformed ``image_list`` and its ``targets``."""
        head_outputs = self.head(features)
        anchors = self.anchor_generator(image_list, features)
        return self._losses(targets, head_outputs, anchors, features)

    def compute_loss(self, targets, head_outputs, *rest):
        branch = self.head.branches[-1]
        own = [branch.owns(t["labels"]) for t in targets]
        targets = [
            {**t, "boxes": t["boxes"][o], "labels": t["labels"][o] - branch.first_label} for t, o in zip(targets, own)
        ]
        return super().compute_loss(targets, head_outputs, *rest)

    def merged(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_sizes: list[tuple[int, int]],
        tower: list[Tensor],
        claim: float = ONE_STAGE_CLAIM_SCORE,
    ) -> list[dict[str, Tensor]]:
        """The base's and the branches' detections (``sources``), merged by the arbitration (a
        branch's detection claims an old one from the calibrated score ``claim``)."""
        sources = self.sources(head_outputs, anchors, image_sizes)
        states: list[BranchState] = []
        calibrated = True
        for branch in self.head.branches:
            states.append(branch.state())
            calibrated = calibrated and bool(branch.calibrated)
        merge_iou = self.merge_iou
        features: list[Tensor | None] = [None for _ in image_sizes]
        if merge_iou is not None and calibrated:
            boxes = [torch.cat([s[i]["boxes"] for s in sources]) for i in range(len(image_sizes))]
            at = self.tower_features(tower, boxes, image_sizes).split([b.shape[0] for b in boxes])
            features = []
            for f in at:
                features.append(f)
        detections: list[dict[str, Tensor]] = []
        for i in range(len(image_sizes)):
            merging = [(s[i]["boxes"], s[i]["scores"], s[i]["labels"]) for s in sources]
            boxes, scores, labels = merge(merging, states, merge_iou, features[i], claim)
            n = self.detections_per_img
            detections.append({"boxes": boxes[:n], "scores": scores[:n], "labels": labels[:n]})
        return detections

    def sources(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[list[dict[str, Tensor]]]:
        """torchvision's detections (per image) of the base, then of each branch."""
        base: dict[str, list[Tensor]] = {}
        for k in head_outputs:
            if k != "new_cls_logits":
                base[k] = head_outputs[k]
        new = head_outputs["new_cls_logits"]
        sources = [self.postprocess_detections(base, anchors, image_sizes)]
        start = 0
        for branch in self.head.branches:
            width = branch.head.num_classes
            columns = dict(base)
            columns["cls_logits"] = [x[:, :, start : start + width] for x in new]
            found = self.postprocess_detections(columns, anchors, image_sizes)
            for d in found:
                d["labels"] = d["labels"] + branch.first_label
            sources.append(found)
            start += width
        return sources

    def tower_features(self, tower: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """The base classification tower's features at ``boxes`` (a list per image): RoI-aligned 7x7
        from the FPN level of the box's size, averaged, L2-normalised."""
        if sum([b.shape[0] for b in boxes]) == 0:
            return tower[0].new_zeros(0, tower[0].shape[1])
        levels: dict[str, Tensor] = {}
        for k, t in enumerate(tower):
            levels[str(k)] = t
        pooled = self.tower_pool(levels, boxes, image_sizes)
        return F.normalize(pooled.mean(dim=(2, 3)), dim=1)


class BranchRetinaNet(_BranchModel, RetinaNet):
    @torch.jit.unused
    def _losses(self, targets, head_outputs, anchors, features) -> dict[str, Tensor]:
        return self.compute_loss(targets, head_outputs, anchors)  # as RetinaNet.forward calls it


class BranchFCOS(_BranchModel, FCOS):
    @torch.jit.unused
    def _losses(self, targets, head_outputs, anchors, features) -> dict[str, Tensor]:
        return self.compute_loss(
            targets, head_outputs, anchors, [x.size(2) * x.size(3) for x in features]
        )  # as FCOS.forward


def branches(model: nn.Module) -> nn.ModuleList | None:
    """The model's RetinaNet / FCOS branches (None before the first)."""
    return model.head.branches if isinstance(model, _BranchModel) else None


def add_dense_branch(
    model: nn.Module, labels: list[int], merge_iou: float | None = 0.5, *, classes: tuple[type, type]
) -> DenseBranch:
    """Adds a branch for ``labels`` (consecutive, the last classes ``expand_predictor`` added) to a
    RetinaNet or FCOS, in place; the first branch makes the model and its head the ``classes``
    (``BranchFCOS, BranchFCOSHead``: the family's description says which). Its tower starts as a
    copy of the base's; its ``cls_logits`` as the widened layer's rows of ``labels``
    (``expand_predictor``'s start: below the score threshold). Everything but the new branch is
    frozen."""
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
        model.__class__, head.__class__ = classes
        head.branches = nn.ModuleList()
        head.old_num_classes = labels[0]
        model.merge_iou = merge_iou
        levels = [str(k) for k in range(len(model.anchor_generator.sizes))]
        model.tower_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2)
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
    if branches(model) is None:
        return None
    return {
        "old_num_classes": model.head.old_num_classes,
        "merge_iou": model.merge_iou,
        "branches": [
            {"first_label": b.first_label, "num_new": b.num_new, "memory": memory_lengths(b)}
            for b in model.head.branches
        ],
    }


def restore_dense_branches(model: nn.Module, layout: dict, *, classes: tuple[type, type]) -> None:
    """Rebuilds the branches ``dense_branch_layout`` described (weights follow with load_state_dict).
    Reads the layout of detgraft 0.1 checkpoints too (``base_width``; ``num_classes``, no background)."""
    for b in layout["branches"]:
        labels = list(range(b["first_label"], b["first_label"] + b.get("num_new", b.get("num_classes"))))
        resize_memories(add_dense_branch(model, labels, layout["merge_iou"], classes=classes), b.get("memory", [0, 0]))
    model.head.old_num_classes = layout.get("old_num_classes", layout.get("base_width"))


@torch.no_grad()
def calibration_pass(
    model: nn.Module, image_list: ImageList, branch: DenseBranch, features: OrderedDict[str, Tensor] | None = None
):
    """What ``detgraft.calibrate`` reads of a RetinaNet / FCOS on transformed images: the model's
    detections before its newest branch (``branch``), and a function giving the base tower's
    features at boxes. ``features``: the backbone's FPN maps of those images when they were kept
    (``frozen_pass``)."""
    if features is None:
        outputs, anchors, tower = model.head_pass(image_list)
    else:
        outputs, anchors, tower = model.heads_on(image_list, list(features.values()))
    sources = model.sources(outputs, anchors, image_list.image_sizes)
    before = [
        {k: torch.cat([s[i][k] for s in sources[:-1]]) for k in ("boxes", "scores", "labels")}
        for i in range(len(image_list.image_sizes))
    ]
    return before, lambda boxes: model.tower_features(tower, boxes, image_list.image_sizes)


@torch.no_grad()
def frozen_pass(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Kept]:
    """What a training step of the newest branch computes with the frozen base, for each example
    (``image`` and ``target`` as the training loop gives them), computed as the step computes it
    (``frozen_batches``): the transform (training mode) and the backbone's FPN maps. The branch's
    tower, which learns, runs in each step."""
    return frozen_batches(model, images, targets, _frozen_batch)


def _frozen_batch(model: nn.Module, image_list: ImageList, targets: list[dict[str, Tensor]]) -> list[Kept]:
    maps = model.backbone(image_list.tensors)
    if isinstance(maps, Tensor):  # as torchvision's forward does for a single-map backbone
        maps = OrderedDict([("0", maps)])
    padded = tuple(image_list.tensors.shape[-2:])  # the anchors' strides are read from it
    return [
        Kept(
            OrderedDict((name, level[i]) for name, level in maps.items()),
            image_list.image_sizes[i],
            targets[i],
            {"padded": padded},
            next(iter(maps.values())).dtype,
        )
        for i in range(len(targets))
    ]


def kept_losses(model: nn.Module, kept: list[Kept]) -> dict[str, Tensor]:
    """The loss of a training step (``model(images, targets)`` in training mode) on examples whose
    FPN maps ``frozen_pass`` computed: the transform's size draws are replayed, then the branch runs
    on the kept maps, side by side as torchvision pads a batch."""
    replay_transform_draws(model.transform, len(kept))
    features = list(batched(kept).values())
    height, width = max(k.extra["padded"][0] for k in kept), max(k.extra["padded"][1] for k in kept)
    # the anchor generator reads the batch's shape, dtype and device, not its pixels
    images = ImageList(features[0].new_zeros(()).expand(len(kept), 3, height, width), [k.image_size for k in kept])
    return model.training_losses(images, features, [k.target for k in kept])
