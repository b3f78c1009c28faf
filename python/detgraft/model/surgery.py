"""Widening a torchvision detector's box predictor for new classes.

The tensor work happens in Rust (``detgraft._core.widen_predictor``) on the tensors' own device;
this module validates what the user asked for and swaps the results into the model.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from .. import _core
from . import families
from .card import BACKGROUND, UNUSED, get_card

__all__ = ["INITS", "expand_predictor", "expand_state_dict", "box_features"]

log = logging.getLogger(__name__)

#: The initialization strategies for new rows, and what each is for.
INITS = {
    "preserve": "new classes start below background: the widened model detects exactly what the base did",
    "mean": "new rows take the old rows' mean and spread (seeded): a new class like a typical old one",
    "background": "copy of the background row, bias lowered by ln(C): a share of background (MiB/MMA)",
    "imprint": "from the box-head features of the new classes' boxes in a few examples (Qi et al.)",
}

PREDICTOR_PREFIX = "roi_heads.box_predictor"
_KEYS = ("cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias")


def expand_predictor(
    model: nn.Module,
    names: Sequence[str],
    init: str = "preserve",
    *,
    examples: Iterable[tuple[Tensor, Mapping[str, Tensor]]] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Adds classes ``names`` to a torchvision detector, in place, and returns the model.

    For a ``FasterRCNN``, ``cls_score`` grows from C to C+n outputs and the class-specific
    ``bbox_pred`` from 4C to 4(C+n); a ``MaskRCNN``'s ``mask_fcn_logits`` and the classification
    convolutions of ``RetinaNet``, ``FCOS`` and ``SSD`` grow too, anchor by anchor (``families``).
    The new classes take labels C, C+1, ... and the old rows are kept exactly. The layers stay the
    same objects and get new ``Parameter``s on the same device and dtype, with the old
    ``requires_grad``: build the optimizer after this call.

    Args:
        model: a torchvision ``FasterRCNN`` (its ``roi_heads.box_predictor`` a ``FastRCNNPredictor``),
            ``MaskRCNN``, ``RetinaNet``, ``FCOS`` or ``SSD``; ``KeypointRCNN`` is refused.
        names: the new class names, e.g. ``["chicken", "frog"]``.
        init: one of ``INITS`` (R-CNN; one-stage families take ``preserve`` only); ``preserve``
            (default) leaves the detections unchanged.
        examples: for ``init="imprint"``: ``(image, target)`` pairs as torchvision's detection
            models take them (image Tensor[3, H, W] in 0..1, target ``boxes`` FloatTensor[N, 4] xyxy
            in pixels and ``labels`` Int64Tensor[N] holding the new labels C, C+1, ...).
        seed: for ``init="mean"``.
    """
    kind = families.family(model)
    old_num_classes = families.num_classes(model)
    card = get_card(model)
    names = _check_names(names, card.classes)
    if old_num_classes != card.num_classes:
        raise ValueError(
            f"the model's card names {card.num_classes} classes but the model has {old_num_classes} outputs; "
            "fix model.detgraft_card.classes"
        )
    if not kind.two_stage and init != "preserve":
        raise ValueError(
            f"a {kind.name} model's new classes start one way (init='preserve': below the score threshold, so it "
            f"detects exactly what it did); init={init!r} is for R-CNN box predictors"
        )
    features = feature_labels = None
    if init == "imprint":
        if examples is None:
            raise ValueError('init="imprint" needs examples=[(image, target), ...] with boxes of the new classes')
        features, labels = box_features(model, examples)
        feature_labels = labels - old_num_classes
    elif examples is not None:
        raise ValueError(f'examples are only used by init="imprint", not init={init!r}')

    families.widen_class_tensors(model, len(names))
    if kind.two_stage:
        _widen_in_place(model.roi_heads.box_predictor, len(names), init, seed, features, feature_labels)

    labels = list(range(old_num_classes, old_num_classes + len(names)))
    card.classes.extend(names)
    card.history.append(
        {
            "added": names,
            "labels": labels,
            "init": init,
            "data": None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    log.info("added %s", ", ".join(f"{label}={name}" for label, name in zip(labels, names)))
    return model


def expand_state_dict(
    state_dict: Mapping[str, Tensor],
    num_new: int,
    init: str = "preserve",
    *,
    prefix: str = PREDICTOR_PREFIX,
    seed: int = 0,
    features: Tensor | None = None,
    feature_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """A copy of ``state_dict`` whose ``{prefix}.cls_score`` / ``{prefix}.bbox_pred`` entries are
    widened by ``num_new`` classes, for scripts that never build the model. The input is not
    modified; the other entries are the same tensor objects.

    ``features`` [N, D] and ``feature_labels`` [N] (new-class index 0..num_new-1) feed ``imprint``.
    """
    keys = [f"{prefix}.{k}" for k in _KEYS]
    missing = [k for k in keys if k not in state_dict]
    if missing:
        near = sorted(k for k in state_dict if k.endswith(("cls_score.weight", "bbox_pred.weight")))
        raise KeyError(f"state dict has no {missing}; predictor weights found under: {near or 'none'}")
    widened = _core.widen_predictor(*(state_dict[k] for k in keys), num_new, init, seed, features, feature_labels)
    return {**state_dict, **dict(zip(keys, widened))}


@torch.no_grad()
def box_features(model: nn.Module, examples: Iterable[tuple[Tensor, Mapping[str, Tensor]]]) -> tuple[Tensor, Tensor]:
    """Box-head features of the ground-truth boxes in ``examples``.

    Returns (Tensor[N, D], Int64Tensor[N]): one feature row and its label per box, computed
    as the model's RoI heads see them (its transform, backbone, RoI pooling and box head, eval mode).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows, labels = [], []
    try:
        for image, target in examples:
            boxes = target["boxes"].to(device=device, dtype=torch.float32)
            if boxes.numel() == 0:
                continue
            images, targets = model.transform([image.to(device)], [{"boxes": boxes, "labels": target["labels"]}])
            feature_maps = model.backbone(images.tensors)
            if isinstance(feature_maps, Tensor):  # as GeneralizedRCNN does for single-map backbones
                feature_maps = OrderedDict([("0", feature_maps)])
            pooled = model.roi_heads.box_roi_pool(feature_maps, [targets[0]["boxes"]], images.image_sizes)
            rows.append(model.roi_heads.box_head(pooled))
            labels.append(target["labels"].to(device=device, dtype=torch.int64))
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("examples hold no boxes: imprint needs at least one box of every new class")
    return torch.cat(rows), torch.cat(labels)


def _check_names(names: Sequence[str], existing: list[str]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of class names, e.g. [{names!r}]; got {type(names).__name__}")
    names = list(names)
    if not names:
        raise ValueError("names is empty: give at least one new class name, e.g. ['frog']")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings; got {name!r}")
        if name in (BACKGROUND, UNUSED):
            raise ValueError(f"{name!r} is reserved by torchvision's label space; choose another name")
    seen = {n.lower() for n in existing if n != UNUSED}
    taken = [n for n in names if n.lower() in seen]
    if taken:
        labels = [next(i for i, e in enumerate(existing) if e.lower() == n.lower()) for n in taken]
        raise ValueError(
            f"class {taken[0]!r} already exists (label {labels[0]}); the model already detects it. "
            "Give only classes the model does not know."
        )
    duplicates = sorted({n for n in names if [m.lower() for m in names].count(n.lower()) > 1})
    if duplicates:
        raise ValueError(f"names lists {duplicates[0]!r} more than once; give each new class once")
    return names


def _swap(layer: nn.Linear, weight: Tensor, bias: Tensor) -> None:
    """Puts widened tensors into ``layer`` as new Parameters, keeping requires_grad."""
    assert weight.device == layer.weight.device and weight.dtype == layer.weight.dtype
    assert torch.equal(weight[: layer.out_features], layer.weight.detach())
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
    layer.out_features = weight.shape[0]


def resize_predictor(model: nn.Module, num_classes: int) -> None:
    """Widens the predictor's shape to ``num_classes`` outputs without touching the card; the new
    rows are placeholders about to be overwritten by ``load_state_dict``."""
    num_new = num_classes - families.num_classes(model)
    families.widen_class_tensors(model, num_new)
    if families.family(model).two_stage:
        _widen_in_place(model.roi_heads.box_predictor, num_new)


def _widen_in_place(
    predictor: FastRCNNPredictor,
    num_new: int,
    init: str = "preserve",
    seed: int = 0,
    features: Tensor | None = None,
    feature_labels: Tensor | None = None,
) -> None:
    cls_score, bbox_pred = predictor.cls_score, predictor.bbox_pred
    widened = _core.widen_predictor(
        cls_score.weight.detach(),
        cls_score.bias.detach(),
        bbox_pred.weight.detach(),
        bbox_pred.bias.detach(),
        num_new,
        init,
        seed,
        features,
        feature_labels,
    )
    _swap(cls_score, widened[0], widened[1])
    _swap(bbox_pred, widened[2], widened[3])
