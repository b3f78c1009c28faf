"""Detection ops from detgraft's Rust core, with the semantics of ``torchvision.ops``.

``nms``, ``batched_nms`` and ``roi_align`` (forward and backward) run a Rust kernel on CPU tensors
and libtorch tensor operations on other devices, so GPU tensors never leave the GPU.
``use_rust_ops(model)`` makes a torchvision detection model call them in its RPN, RoI heads and
postprocessing; ``restore(model)`` puts torchvision's back; ``rust_ops(model)`` does both around a
``with`` block; ``everywhere()`` swaps them into every torchvision detection model for a block
(``detgraft extend`` trains, calibrates and evaluates on the CPU inside it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torchvision.ops.boxes
import torchvision.ops.poolers
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops._utils import convert_boxes_to_roi_format

from . import _core

__all__ = ["nms", "batched_nms", "roi_align", "use_rust_ops", "restore", "rust_ops", "everywhere"]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices (Int64Tensor) of the boxes kept, by descending score, as ``torchvision.ops.nms``.

    Equal scores keep their input order: of two equal boxes with equal scores the lower index stays.

    Args:
        boxes (Tensor[N, 4]): in (x1, y1, x2, y2) format.
        scores (Tensor[N]): one per box, same dtype and device.
        iou_threshold (float): boxes with IoU > iou_threshold with a kept box are dropped.
    """
    if boxes.dtype != scores.dtype and torch.is_autocast_enabled(boxes.device.type):  # as torchvision's autocast
        boxes, scores = boxes.float(), scores.float()
    return _core.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently for each value of ``idxs`` (Int64Tensor[N]); indices by descending score."""
    if boxes.dtype != scores.dtype and torch.is_autocast_enabled(boxes.device.type):  # as torchvision's autocast
        boxes, scores = boxes.float(), scores.float()
    return _core.batched_nms(boxes, scores, idxs, float(iou_threshold))


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.params = (float(spatial_scale), *output_size, int(sampling_ratio), bool(aligned))
        ctx.input_size = list(input.shape)
        return _core.roi_align_forward(input, rois, *ctx.params)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (rois,) = ctx.saved_tensors
        grad = _core.roi_align_backward(grad_output.contiguous(), rois, *ctx.params, ctx.input_size)
        return grad, None, None, None, None, None


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign as ``torchvision.ops.roi_align``, differentiable with respect to ``input``.

    Args:
        input (Tensor[N, C, H, W]): feature maps.
        boxes (Tensor[K, 5] or list[Tensor[L, 4]]): rows (batch_index, x1, y1, x2, y2), or one
            (x1, y1, x2, y2) tensor per image.
        output_size (int or (int, int)): pooled (height, width).
        spatial_scale (float): box coordinates times this give feature-map coordinates.
        sampling_ratio (int): samples per bin side; <= 0 for ceil(size / output_size).
        aligned (bool): shift boxes by -0.5 pixel (Detectron2's alignment).

    Returns:
        Tensor[K, C, output_size[0], output_size[1]]
    """
    rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(list(boxes))
    params = (_pair(output_size), spatial_scale, sampling_ratio, aligned)
    if rois.dtype != input.dtype and torch.is_autocast_enabled(input.device.type):
        # as torchvision's autocast does: in float32, back in the input's dtype
        return _RoIAlign.apply(input.float(), rois.float(), *params).to(input.dtype)
    return _RoIAlign.apply(input, rois, *params)


# -- swapping them into a model -----------------------------------------------------------------

_PATCHES = (
    (torchvision.ops.boxes, "nms", nms),
    (torchvision.ops.boxes, "batched_nms", batched_nms),
    (torchvision.ops.poolers, "roi_align", roi_align),
)
_ORIGINALS = {(module.__name__, name): getattr(module, name) for module, name, _ in _PATCHES}
_lock = threading.RLock()
_depth = 0


def _enter(*_args, **_kwargs) -> None:
    # torchvision's detection modules look these functions up in their modules at call time
    global _depth
    _lock.acquire()
    if _depth == 0:
        for module, name, ours in _PATCHES:
            setattr(module, name, ours)
    _depth += 1


def _exit(*_args, **_kwargs) -> None:
    global _depth
    _depth -= 1
    if _depth == 0:
        for module, name, _ in _PATCHES:
            setattr(module, name, _ORIGINALS[(module.__name__, name)])
    _lock.release()


def use_rust_ops(model: nn.Module) -> nn.Module:
    """Makes ``model`` (a torchvision detection model) use detgraft's NMS and RoIAlign while it runs.

    Nothing else about the model changes: same modules, parameters, outputs and training loop. The
    swap is active only inside this model's ``forward`` (other models keep torchvision's ops).
    Returns the model.
    """
    if getattr(model, "_detgraft_ops_hooks", None):
        return model
    model._detgraft_ops_hooks = (
        model.register_forward_pre_hook(_enter),
        model.register_forward_hook(_exit, always_call=True),
    )
    return model


def restore(model: nn.Module) -> nn.Module:
    """Puts torchvision's ops back into ``model``; returns the model."""
    for handle in getattr(model, "_detgraft_ops_hooks", ()):
        handle.remove()
    model._detgraft_ops_hooks = ()
    return model


@contextlib.contextmanager
def rust_ops(model: nn.Module) -> Iterator[nn.Module]:
    """``with rust_ops(model): ...`` runs the block with detgraft's ops in ``model``."""
    was_on = bool(getattr(model, "_detgraft_ops_hooks", None))
    use_rust_ops(model)
    try:
        yield model
    finally:
        if not was_on:
            restore(model)


@contextlib.contextmanager
def everywhere() -> Iterator[None]:
    """``with everywhere(): ...`` runs the block with detgraft's ops in every torchvision detection
    model (copies and teachers made inside it included). Other threads that swap them wait for it."""
    _enter()
    try:
        yield
    finally:
        _exit()
