"""One description per torchvision detector family: everything detgraft needs to know of it.

A ``Family`` says which torchvision class it is, where its class-dependent tensors are and how
new classes start in them, which strategies it takes, their automatic learning rates, the
torchvision builders that make it, and, for the ``branch`` strategy, its ``BranchKit`` (the
branch modules of ``detgraft.heads``: how a branch is added, found, saved, restored and
calibrated). ``family(model)`` returns the model's description; nothing else in detgraft tests a
family's name. ARCHITECTURE.md has the checklist for a new family.

Every family keeps its class scores in tensors whose first dimension is laid out as ``anchors x
classes x per_class`` (the Rust core's ``layout``): R-CNN predictors one row (``cls_score``,
``mask_fcn_logits``) or a block of 4 (``bbox_pred``) per class, RetinaNet / FCOS / SSD
classification convolutions anchor by anchor with the class fastest. A ``ClassTensor`` names one
such layer, its layout and how its new classes start so that the widened model detects exactly
what the model did:

| family         | class-dependent layers                          | new classes start as                        |
|----------------|-------------------------------------------------|---------------------------------------------|
| Faster R-CNN   | ``roi_heads.box_predictor`` (``surgery.INITS``) | the chosen init (``preserve``: below background) |
| Mask R-CNN     | + ``roi_heads.mask_predictor.mask_fcn_logits``  | the mean old mask (read only for new labels) |
| RetinaNet      | ``head.classification_head.cls_logits``         | zero weights, score a tenth of ``score_thresh`` |
| FCOS           | ``head.classification_head.cls_logits``         | zero weights, class score ``score_thresh``² / 10 |
| SSD, SSDlite   | ``head.classification_head.module_list[i]``     | the background channel, 16 below it (softmax) |

(An FCOS score is sqrt(class score x centerness), hence the square.) Keypoint R-CNN is refused:
its keypoint head predicts a person skeleton, which a new class has not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

from .. import _core
from ..heads import dense, frozen, rcnn

__all__ = [
    "FAMILIES",
    "BranchKit",
    "ClassTensor",
    "Family",
    "by_name",
    "class_layers",
    "class_tensors",
    "family",
    "new_rows",
    "num_classes",
    "state_dict_classes",
    "torchvision_builders",
    "widen_class_tensors",
]

STRATEGIES = ("naive", "head", "pseudo", "distill", "branch")
# ``--lr auto``: each strategy's rate, chosen on val (benchmarks/lr_grid.py; one-stage branches:
# benchmarks/families.py --claims)
RCNN_LR = {"naive": 0.01, "head": 0.05, "pseudo": 0.01, "distill": 0.01, "branch": 0.05}


@dataclass(frozen=True)
class ClassTensor:
    """A layer whose output channels (rows) depend on the classes, and how new classes start."""

    path: str  # the layer's name in the model, e.g. "head.classification_head.cls_logits"
    anchors: int
    per_class: int
    fill: str  # "copy", "mean" or "constant" (the Rust core's Fill)
    fill_class: int = 0
    bias_shift: float = 0.0


@dataclass(frozen=True)
class BranchKit:
    """A family's ``branch`` strategy (``detgraft.heads``): ``add(model, labels, merge_iou, others=,
    keep=, ignore=)`` adds a branch; ``branches(model)`` the model's branches (None before the
    first); ``layout`` / ``restore`` save and rebuild them with a checkpoint; ``calibration_pass(model,
    image_list, branch)`` is what ``detgraft.calibrate`` reads. ``frozen_pass(model, images, targets)``
    computes once what a training step computes with the frozen base, ``kept_losses(model, kept)``
    the step's losses from it, and ``kept_unfit(model)`` says why they cannot stand for the step
    (None: they can); without them (None) every step computes the base again. ``compress(model)``,
    when there is one, is what ``detgraft.calibrate`` does to the trained branch first (the R-CNN
    branch: its box head to low rank)."""

    add: Callable[..., nn.Module]
    branches: Callable[[nn.Module], nn.ModuleList | None]
    layout: Callable[[nn.Module], dict | None]
    restore: Callable[[nn.Module, dict], None]
    calibration_pass: Callable
    frozen_pass: Callable | None = None
    kept_losses: Callable | None = None
    kept_unfit: Callable[[nn.Module], str | None] | None = None
    compress: Callable[[nn.Module], None] | None = None


@dataclass(frozen=True)
class Family:
    """Everything detgraft knows of one detector family (see the module doc)."""

    name: str
    model_class: type[nn.Module]
    two_stage: bool  # an R-CNN: a box predictor (surgery's inits) and an RPN
    class_tensors: Callable[[nn.Module, int], list[ClassTensor]]  # (model, num_classes), beyond the box predictor
    num_classes: Callable[[nn.Module], int]  # background included (torchvision's num_classes)
    set_num_classes: Callable[[nn.Module, int], None]  # the head's class count after widening
    lr: dict[str, float]  # the strategies it takes, each with its ``--lr auto``
    builders: tuple[str, ...]  # torchvision's builders of this family
    branch: BranchKit | None = None
    masks: bool = False  # instance masks (training data gives them)

    @property
    def strategies(self) -> tuple[str, ...]:
        return tuple(self.lr)


def _predictor_classes(model: nn.Module) -> int:
    predictor = model.roi_heads.box_predictor
    if not isinstance(getattr(predictor, "cls_score", None), nn.Linear):
        raise NotImplementedError(
            f"box predictor not supported yet: {type(predictor).__qualname__}; detgraft widens "
            "torchvision's FastRCNNPredictor (model.roi_heads.box_predictor with cls_score and bbox_pred)"
        )
    return predictor.cls_score.out_features


def _no_count(model: nn.Module, classes: int) -> None:
    """R-CNN heads read their class count from the predictor's shape."""


def _set_head_classes(model: nn.Module, classes: int) -> None:
    model.head.classification_head.num_classes = classes


def _set_ssd_columns(model: nn.Module, classes: int) -> None:
    model.head.classification_head.num_columns = classes


def _mask_tensors(model: nn.Module, classes: int) -> list[ClassTensor]:
    return [ClassTensor("roi_heads.mask_predictor.mask_fcn_logits", 1, 1, "mean", fill_class=1)]


def _dense_tensors(threshold: Callable[[nn.Module], float]) -> Callable[[nn.Module, int], list[ClassTensor]]:
    """RetinaNet / FCOS: new classes start with zero weights and a score a tenth of ``threshold``."""

    def tensors(model: nn.Module, classes: int) -> list[ClassTensor]:
        bias = _logit(threshold(model) / 10)
        anchors = model.head.classification_head.num_anchors
        return [ClassTensor("head.classification_head.cls_logits", anchors, 1, "constant", bias_shift=bias)]

    return tensors


def _ssd_tensors(model: nn.Module, classes: int) -> list[ClassTensor]:
    tensors = []
    for i, module in enumerate(model.head.classification_head.module_list):
        path = f"head.classification_head.module_list.{i}"
        if isinstance(module, nn.Sequential):  # SSDlite: a depthwise block, then the 1x1 conv
            path += f".{len(module) - 1}"
        conv = model.get_submodule(path)
        tensors.append(ClassTensor(path, conv.out_channels // classes, 1, "copy", 0, -_core.PRESERVE_GAP))
    return tensors


RCNN_BRANCH = BranchKit(
    add=rcnn.add_branch,
    branches=rcnn.branches,
    layout=rcnn.branch_layout,
    restore=rcnn.restore_branches,
    calibration_pass=rcnn.calibration_pass,
    frozen_pass=rcnn.frozen_pass,
    kept_losses=rcnn.kept_losses,
    kept_unfit=frozen.size_draws,
    compress=rcnn.compress_branch,
)


def dense_branch(classes: tuple[type, type]) -> BranchKit:
    """The ``BranchKit`` of a one-stage family whose branch model and head are ``classes``."""

    def add(model, labels, merge_iou=0.5, **unused):  # a dense branch has no ``others`` output
        return dense.add_dense_branch(model, labels, merge_iou, classes=classes)

    return BranchKit(
        add=add,
        branches=dense.branches,
        layout=dense.dense_branch_layout,
        restore=functools.partial(dense.restore_dense_branches, classes=classes),
        calibration_pass=dense.calibration_pass,
        frozen_pass=dense.frozen_pass,
        kept_losses=dense.kept_losses,
        kept_unfit=frozen.size_draws,
    )


FASTER_RCNN = Family(
    name="faster_rcnn",
    model_class=FasterRCNN,
    two_stage=True,
    class_tensors=lambda model, classes: [],
    num_classes=_predictor_classes,
    set_num_classes=_no_count,
    lr=RCNN_LR,
    builders=(
        "fasterrcnn_resnet50_fpn",
        "fasterrcnn_resnet50_fpn_v2",
        "fasterrcnn_mobilenet_v3_large_fpn",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
    ),
    branch=RCNN_BRANCH,
)
MASK_RCNN = Family(
    name="mask_rcnn",
    model_class=MaskRCNN,
    two_stage=True,
    class_tensors=_mask_tensors,
    num_classes=_predictor_classes,
    set_num_classes=_no_count,
    lr=RCNN_LR,
    builders=("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"),
    branch=RCNN_BRANCH,
    masks=True,
)
# pseudo labels and distillation are not yet written for one-stage losses, nor a branch for SSD's softmax heads
RETINANET = Family(
    name="retinanet",
    model_class=RetinaNet,
    two_stage=False,
    class_tensors=_dense_tensors(lambda model: model.score_thresh),
    num_classes=lambda model: model.head.classification_head.num_classes,
    set_num_classes=_set_head_classes,
    lr={"naive": 0.01, "head": 0.05, "branch": 0.01},
    builders=("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"),
    branch=dense_branch((dense.BranchRetinaNet, dense.BranchRetinaNetHead)),
)
# (an FCOS score is sqrt(class score x centerness), hence the square)
FCOS_FAMILY = Family(
    name="fcos",
    model_class=FCOS,
    two_stage=False,
    class_tensors=_dense_tensors(lambda model: model.score_thresh**2),
    num_classes=lambda model: model.head.classification_head.num_classes,
    set_num_classes=_set_head_classes,
    lr={"naive": 0.01, "head": 0.05, "branch": 0.01},
    builders=("fcos_resnet50_fpn",),
    branch=dense_branch((dense.BranchFCOS, dense.BranchFCOSHead)),
)
SSD_FAMILY = Family(
    name="ssd",
    model_class=SSD,
    two_stage=False,
    class_tensors=_ssd_tensors,
    num_classes=lambda model: model.head.classification_head.num_columns,
    set_num_classes=_set_ssd_columns,
    lr={"naive": 0.01, "head": 0.05},
    builders=("ssd300_vgg16", "ssdlite320_mobilenet_v3_large"),
)
# in the order ``family`` tries them: MaskRCNN is a FasterRCNN
FAMILIES = (MASK_RCNN, FASTER_RCNN, RETINANET, FCOS_FAMILY, SSD_FAMILY)
REFUSED_BUILDERS = ("keypointrcnn_resnet50_fpn",)  # listed so that loading it says why it is refused


def by_name(name: str) -> Family:
    """The family called ``name`` (``"fcos"``)."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown family {name!r}: one of {', '.join(f.name for f in FAMILIES)}")


def torchvision_builders() -> tuple[str, ...]:
    """Every torchvision builder detgraft loads by name (Keypoint R-CNN's, to say why it is refused)."""
    return tuple(b for f in FAMILIES for b in f.builders) + REFUSED_BUILDERS


def family(model: nn.Module) -> Family:
    """The model's ``Family``; a model detgraft cannot widen fails here, with the reason."""
    if isinstance(model, KeypointRCNN):
        raise NotImplementedError(
            "Keypoint R-CNN is not supported: its keypoint head predicts the 17 keypoints of a person skeleton, "
            "which a new class does not have. Add classes to a Faster R-CNN built from the same backbone "
            "(torchvision's fasterrcnn_resnet50_fpn) and keep the keypoint model for people"
        )
    for f in FAMILIES:
        if isinstance(model, f.model_class):
            return f
    if _has_box_predictor(model):  # an architecture of the user's own with torchvision's RoI heads
        return FASTER_RCNN
    raise NotImplementedError(
        f"{type(model).__module__}.{type(model).__qualname__} is not a detector family detgraft knows: it "
        "widens torchvision's FasterRCNN, MaskRCNN, RetinaNet, FCOS and SSD models"
    )


def _has_box_predictor(model: nn.Module) -> bool:
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    return isinstance(getattr(predictor, "cls_score", None), nn.Linear)


def num_classes(model: nn.Module) -> int:
    """The model's outputs, background included (torchvision's ``num_classes``)."""
    return family(model).num_classes(model)


def class_tensors(model: nn.Module) -> list[ClassTensor]:
    """The class-dependent layers beyond an R-CNN's box predictor (which ``surgery`` widens with
    its inits), each with its layout and its function-preserving start."""
    return family(model).class_tensors(model, num_classes(model))


def class_layers(model: nn.Module) -> list[ClassTensor]:
    """Every class-dependent layer: ``class_tensors`` plus an R-CNN's ``cls_score`` (a row per
    class) and ``bbox_pred`` (a block of 4 per class), whose starts ``surgery``'s inits choose."""
    layers = class_tensors(model)
    if family(model).two_stage:
        layers += [
            ClassTensor("roi_heads.box_predictor.cls_score", 1, 1, "copy"),
            ClassTensor("roi_heads.box_predictor.bbox_pred", 1, 4, "copy"),
        ]
    return layers


def state_dict_classes(probe: nn.Module, state_dict: dict, name: str) -> int:
    """How many classes ``state_dict`` (named ``name`` in errors) holds for ``probe``'s architecture."""
    kind = family(probe)
    if kind.two_stage:
        key, rows_per_class = "roi_heads.box_predictor.cls_score.weight", 1
    else:
        spec = class_tensors(probe)[0]
        key, rows_per_class = f"{spec.path}.weight", spec.anchors * spec.per_class
    if key not in state_dict:
        raise ValueError(f"{name} is not a {kind.name} state dict: it has no {key}")
    return state_dict[key].shape[0] // rows_per_class


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def widen_class_tensors(model: nn.Module, num_new: int) -> None:
    """Widens every layer of ``class_tensors`` by ``num_new`` classes, in place (new Parameters
    on the same device and dtype, old channels copied exactly), and the heads' class counts. Call
    it before widening an R-CNN's box predictor, which says how many classes there are."""
    kind, classes = family(model), num_classes(model)
    for spec in kind.class_tensors(model, classes):
        layer = model.get_submodule(spec.path)
        bias = layer.bias.detach() if layer.bias is not None else None
        weight, bias = _core.widen_classes(
            layer.weight.detach(),
            bias,
            num_new,
            spec.anchors,
            spec.per_class,
            spec.fill,
            spec.fill_class,
            spec.bias_shift,
        )
        assert torch.equal(weight.view(spec.anchors, -1, *weight.shape[1:])[:, :classes].flatten(0, 1), layer.weight)
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
        layer.out_channels = weight.shape[0]
    kind.set_num_classes(model, classes + num_new)


def new_rows(spec: ClassTensor, total: int, first_new: int, device: torch.device) -> torch.Tensor:
    """Which rows of a widened ``spec`` layer (``total`` classes) belong to labels >= ``first_new``."""
    rows = torch.arange(spec.anchors * total * spec.per_class, device=device)
    return (rows // spec.per_class) % total >= first_new
