"""Which torchvision detector family a model is, and where its class-dependent tensors are.

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

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

from . import _core

__all__ = ["ClassTensor", "class_layers", "class_tensors", "family", "num_classes", "widen_class_tensors"]

FAMILIES = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos", "ssd")


@dataclass(frozen=True)
class ClassTensor:
    """A layer whose output channels (rows) depend on the classes, and how new classes start."""

    path: str  # the layer's name in the model, e.g. "head.classification_head.cls_logits"
    anchors: int
    per_class: int
    fill: str  # "copy", "mean" or "constant" (the Rust core's Fill)
    fill_class: int = 0
    bias_shift: float = 0.0


def family(model: nn.Module) -> str:
    """One of ``FAMILIES``; a model detgraft cannot widen fails here, with the reason."""
    if isinstance(model, KeypointRCNN):
        raise NotImplementedError(
            "Keypoint R-CNN is not supported: its keypoint head predicts the 17 keypoints of a person skeleton, "
            "which a new class does not have. Add classes to a Faster R-CNN built from the same backbone "
            "(torchvision's fasterrcnn_resnet50_fpn) and keep the keypoint model for people"
        )
    if isinstance(model, MaskRCNN):
        return "mask_rcnn"
    if isinstance(model, FasterRCNN) or _has_box_predictor(model):
        return "faster_rcnn"
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, SSD):
        return "ssd"
    raise NotImplementedError(
        f"{type(model).__module__}.{type(model).__qualname__} is not a detector family detgraft knows: it "
        "widens torchvision's FasterRCNN, MaskRCNN, RetinaNet, FCOS and SSD models"
    )


def _has_box_predictor(model: nn.Module) -> bool:
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    return isinstance(getattr(predictor, "cls_score", None), nn.Linear)


def num_classes(model: nn.Module) -> int:
    """The model's outputs, background included (torchvision's ``num_classes``)."""
    kind = family(model)
    if kind in ("faster_rcnn", "mask_rcnn"):
        predictor = model.roi_heads.box_predictor
        if not isinstance(getattr(predictor, "cls_score", None), nn.Linear):
            raise NotImplementedError(
                f"box predictor not supported yet: {type(predictor).__qualname__}; detgraft widens "
                "torchvision's FastRCNNPredictor (model.roi_heads.box_predictor with cls_score and bbox_pred)"
            )
        return predictor.cls_score.out_features
    head = model.head.classification_head
    return head.num_columns if kind == "ssd" else head.num_classes


def class_tensors(model: nn.Module) -> list[ClassTensor]:
    """The class-dependent layers beyond an R-CNN's box predictor (which ``surgery`` widens with
    its inits), each with its layout and its function-preserving start."""
    kind, classes = family(model), num_classes(model)
    if kind == "faster_rcnn":
        return []
    if kind == "mask_rcnn":
        return [ClassTensor("roi_heads.mask_predictor.mask_fcn_logits", 1, 1, "mean", fill_class=1)]
    if kind in ("retinanet", "fcos"):
        head = model.head.classification_head
        threshold = model.score_thresh if kind == "retinanet" else model.score_thresh**2
        bias = _logit(threshold / 10)
        return [ClassTensor("head.classification_head.cls_logits", head.num_anchors, 1, "constant", bias_shift=bias)]
    tensors = []
    for i, module in enumerate(model.head.classification_head.module_list):
        path = f"head.classification_head.module_list.{i}"
        if isinstance(module, nn.Sequential):  # SSDlite: a depthwise block, then the 1x1 conv
            path += f".{len(module) - 1}"
        conv = model.get_submodule(path)
        tensors.append(ClassTensor(path, conv.out_channels // classes, 1, "copy", 0, -_core.PRESERVE_GAP))
    return tensors


def class_layers(model: nn.Module) -> list[ClassTensor]:
    """Every class-dependent layer: ``class_tensors`` plus an R-CNN's ``cls_score`` (a row per
    class) and ``bbox_pred`` (a block of 4 per class), whose starts ``surgery``'s inits choose."""
    layers = class_tensors(model)
    if family(model) in ("faster_rcnn", "mask_rcnn"):
        layers += [
            ClassTensor("roi_heads.box_predictor.cls_score", 1, 1, "copy"),
            ClassTensor("roi_heads.box_predictor.bbox_pred", 1, 4, "copy"),
        ]
    return layers


def state_dict_classes(probe: nn.Module, state_dict: dict, name: str) -> int:
    """How many classes ``state_dict`` (named ``name`` in errors) holds for ``probe``'s architecture."""
    kind = family(probe)
    if kind in ("faster_rcnn", "mask_rcnn"):
        key, rows_per_class = "roi_heads.box_predictor.cls_score.weight", 1
    else:
        spec = class_tensors(probe)[0]
        key, rows_per_class = f"{spec.path}.weight", spec.anchors * spec.per_class
    if key not in state_dict:
        raise ValueError(f"{name} is not a {kind} state dict: it has no {key}")
    return state_dict[key].shape[0] // rows_per_class


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def widen_class_tensors(model: nn.Module, num_new: int) -> None:
    """Widens every layer of ``class_tensors`` by ``num_new`` classes, in place (new Parameters
    on the same device and dtype, old channels copied exactly), and the heads' class counts. Call
    it before widening an R-CNN's box predictor, which says how many classes there are."""
    kind, classes = family(model), num_classes(model)
    for spec in class_tensors(model):
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
    if kind in ("retinanet", "fcos"):
        model.head.classification_head.num_classes = classes + num_new
    if kind == "ssd":
        model.head.classification_head.num_columns = classes + num_new


def new_rows(spec: ClassTensor, total: int, first_new: int, device: torch.device) -> torch.Tensor:
    """Which rows of a widened ``spec`` layer (``total`` classes) belong to labels >= ``first_new``."""
    rows = torch.arange(spec.anchors * total * spec.per_class, device=device)
    return (rows // spec.per_class) % total >= first_new
