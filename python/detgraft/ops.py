"""Detection ops from detgraft's Rust core, registered as PyTorch operators with the semantics of
``torchvision.ops``.

``torch.ops.detgraft.nms``, ``batched_nms``, ``roi_align`` and ``_roi_align_backward`` are
operators like torchvision's own ``torch.ops.torchvision.*``: each has a fake (meta) kernel, so
they script (TorchScript), trace (FX) and compile (``torch.compile``, no graph break), and
autocast rules that compute as torchvision's do (float32 inside; ``roi_align`` returns the
input's dtype). The functions ``nms``, ``batched_nms`` and ``roi_align`` below are drop-ins for
torchvision's: the same arguments, list-of-tensors boxes, empty inputs, torchvision's exception
types (``RuntimeError`` for bad NMS input, ``AssertionError`` for a box tensor of the wrong
shape), and quantized tensors handed to torchvision's kernels. Their Rust kernels run on CPU
tensors; on other devices they are libtorch tensor operations on the device (NMS brings its packed
suppression matrix to the host once, as torchvision's CUDA kernel does; RoIAlign a few numbers per
call, none per RoI).

``use_rust_ops(model)`` makes a torchvision detection model call them while it runs;
``restore(model)`` puts torchvision's back; ``rust_ops(model)`` does both around a ``with`` block;
``everywhere()`` swaps them for every public name torchvision binds them to (``torchvision.ops.nms``,
``torchvision.ops.boxes.batched_nms``, the ``roi_align`` that ``RoIAlign`` and ``MultiScaleRoIAlign``
call, ...) for a block (``detgraft extend`` trains, calibrates and evaluates on the CPU inside it).
"""

import contextlib
import sys
import threading
from collections.abc import Iterator

import torch
import torchvision.ops
import torchvision.ops.boxes
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair
from torchvision.ops._utils import check_roi_boxes_shape, convert_boxes_to_roi_format

from . import _core

__all__ = ["nms", "batched_nms", "roi_align", "use_rust_ops", "restore", "rust_ops", "everywhere"]


# -- the operators: torch.ops.detgraft.* ---------------------------------------------------------


def _as_torchvision_reports(op: str, kernel, *args) -> Tensor:
    """``kernel(*args)``, a bad input raised as torchvision's kernels raise it (``RuntimeError``),
    with detgraft's message."""
    try:
        return kernel(*args)
    except ValueError as err:
        raise RuntimeError(f"{op}: {err}") from None


# the operators' kernels; an eager call with nothing for the dispatcher to add runs them directly
# (``_plain``), and TorchScript, which calls the operators, skips them
@torch.jit.unused
def _nms_kernel(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return _as_torchvision_reports("detgraft::nms", _core.nms, boxes, scores, float(iou_threshold))


@torch.jit.unused
def _batched_nms_kernel(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    args = (boxes, scores, idxs, float(iou_threshold))
    return _as_torchvision_reports("detgraft::batched_nms", _core.batched_nms, *args)


@torch.jit.unused
def _roi_align_kernel(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    args = (input.contiguous(), rois.contiguous(), float(spatial_scale), pooled_height, pooled_width)
    return _as_torchvision_reports("detgraft::roi_align", _core.roi_align_forward, *args, sampling_ratio, aligned)


_nms = torch.library.custom_op("detgraft::nms", _nms_kernel, mutates_args=())
_batched_nms = torch.library.custom_op("detgraft::batched_nms", _batched_nms_kernel, mutates_args=())
_roi_align = torch.library.custom_op("detgraft::roi_align", _roi_align_kernel, mutates_args=())


@_nms.register_fake
def _(boxes, scores, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@_batched_nms.register_fake
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@_roi_align.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("detgraft::_roi_align_backward", mutates_args=())
def _roi_align_backward(
    grad: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    size = [batch_size, channels, height, width]
    return _core.roi_align_backward(grad.contiguous(), rois.contiguous(), *params, size)


@_roi_align_backward.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, *rest):
    return grad.new_empty((batch_size, channels, height, width))


def _setup_roi_align(ctx, inputs, output) -> None:
    input, rois, *params = inputs
    ctx.save_for_backward(rois)
    ctx.params = params
    ctx.input_shape = input.shape


def _backward_roi_align(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    n, c, h, w = ctx.input_shape
    d_input = torch.ops.detgraft._roi_align_backward(
        grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w, sampling_ratio, aligned
    )
    return d_input, None, None, None, None, None, None


_roi_align.register_autograd(_backward_roi_align, setup_context=_setup_roi_align)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("double backwards on detgraft::roi_align not supported")  # as torchvision's


_roi_align_backward.register_autograd(_no_double_backward)

# torchvision's autocast rules: NMS and RoIAlign compute in float32 (float64 stays float64), with
# every autocast key off inside; RoIAlign's result is cast back to the input's dtype
_AUTOCAST_KEYS = ("AutocastCPU", "AutocastCUDA", "AutocastXPU")
_AUTOCAST_OFF = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
for _key in _AUTOCAST_KEYS[1:]:
    _AUTOCAST_OFF = _AUTOCAST_OFF | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key))


def _float32(tensor: Tensor) -> Tensor:
    """As ``at::autocast::cached_cast(at::kFloat, ...)``: floating tensors but float64 to float32."""
    return tensor.float() if tensor.is_floating_point() and tensor.dtype is not torch.float64 else tensor


def _autocast_nms(boxes, scores, iou_threshold):
    with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_OFF):
        return torch.ops.detgraft.nms(_float32(boxes), _float32(scores), iou_threshold)


def _autocast_batched_nms(boxes, scores, idxs, iou_threshold):
    with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_OFF):
        return torch.ops.detgraft.batched_nms(_float32(boxes), _float32(scores), idxs, iou_threshold)


def _autocast_roi_align(input, rois, *params):
    with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_OFF):
        return torch.ops.detgraft.roi_align(_float32(input), _float32(rois), *params).to(input.dtype)


_AUTOCAST = torch.library.Library("detgraft", "IMPL")
for _key in _AUTOCAST_KEYS:
    _AUTOCAST.impl("nms", _autocast_nms, _key)
    _AUTOCAST.impl("batched_nms", _autocast_batched_nms, _key)
    _AUTOCAST.impl("roi_align", _autocast_roi_align, _key)


# -- torchvision's functions, on detgraft's operators ------------------------------------------


@torch.jit.unused
def _plain(t: Tensor, needs_grad: bool) -> bool:
    """Whether an eager call on ``t`` may run the operator's kernel directly: nothing the dispatcher
    would add is active (autocast, autograd, a compiler, tracer, fake tensors or a mode), so the
    result is the operator's. Saves the dispatcher's Python round trip on small inputs
    (``benchmarks/ops.py``)."""
    # the cheapest tests that say so (each well under a microsecond): autocast on any device, not
    # only t's, sends the call through the dispatcher, which is right there too
    return (
        type(t) is Tensor
        and not (needs_grad and torch.is_grad_enabled())
        and not torch._C._is_any_autocast_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._is_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


# quantized tensors go to torchvision's own functions (its int kernels, qnms and qroi_align)
_torchvision_nms = torchvision.ops.boxes.nms
_torchvision_batched_nms = torchvision.ops.boxes.batched_nms
_torchvision_roi_align = sys.modules["torchvision.ops.roi_align"].roi_align


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices (Int64Tensor) of the boxes kept, by descending score, as ``torchvision.ops.nms``.

    Equal scores keep their input order: of two equal boxes with equal scores the lower index stays.

    Args:
        boxes (Tensor[N, 4]): in (x1, y1, x2, y2) format.
        scores (Tensor[N]): one per box, same dtype and device.
        iou_threshold (float): boxes with IoU > iou_threshold with a kept box are dropped.
    """
    if boxes.is_quantized:
        return _torchvision_nms(boxes, scores, iou_threshold)
    if not torch.jit.is_scripting() and _plain(boxes, False):
        return _nms_kernel(boxes, scores, iou_threshold)
    return torch.ops.detgraft.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently for each value of ``idxs`` (Int64Tensor[N]); indices by descending score,
    as ``torchvision.ops.batched_nms`` (empty boxes: an empty result, whatever the other arguments)."""
    if not torch.jit.is_scripting() and scores is None and boxes.numel() == 0:
        # torchvision's helpers call it so on empty boxes; the operator itself takes empty boxes, with no
        # branch on the data here (torch.export: torchvision's own branch stops it, ``benchmarks/pt2.py``)
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.is_quantized:
        return _torchvision_batched_nms(boxes, scores, idxs, iou_threshold)
    if not torch.jit.is_scripting() and _plain(boxes, False):
        return _batched_nms_kernel(boxes, scores, idxs, iou_threshold)
    return torch.ops.detgraft.batched_nms(boxes, scores, idxs, iou_threshold)


@torch.fx.wrap
def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: BroadcastingList2[int],
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
    check_roi_boxes_shape(boxes)
    rois = boxes
    output_size = _pair(output_size)
    if not isinstance(rois, torch.Tensor):
        rois = convert_boxes_to_roi_format(rois)
    height, width = output_size[0], output_size[1]
    if input.is_quantized:
        return _torchvision_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    if not torch.jit.is_scripting() and _plain(input, needs_grad=input.requires_grad):
        return _roi_align_kernel(input, rois, spatial_scale, height, width, sampling_ratio, aligned)
    return torch.ops.detgraft.roi_align(input, rois, spatial_scale, height, width, sampling_ratio, aligned)


# -- swapping them in ----------------------------------------------------------------------------

OURS = {"nms": nms, "batched_nms": batched_nms, "roi_align": roi_align}
_TORCHVISION = {"nms": _torchvision_nms, "batched_nms": _torchvision_batched_nms, "roi_align": _torchvision_roi_align}
_lock = threading.RLock()
_depth = 0
_swapped: list[tuple[object, str]] = []
_loaded = [0]  # how many modules were loaded when the swap began
_found: dict[int, list[tuple[object, str]]] = {}  # torchvision's bindings, per number of loaded modules


def _scan(functions: dict) -> list[tuple[object, str]]:
    """Every (module, name) of torchvision's bound to one of ``functions`` (name -> function)."""
    found = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("torchvision") or module is None:
            continue
        for name, function in functions.items():
            if vars(module).get(name) is function:  # not getattr: a lazy module's __getattr__ would import
                found.append((module, name))
    return found


def _bindings() -> list[tuple[object, str]]:
    """Every (module, name) of torchvision's bound to one of its three functions now: the public
    ``torchvision.ops.nms``, ``torchvision.ops.boxes.batched_nms``, the ``roi_align`` of
    ``torchvision.ops.roi_align`` (``RoIAlign``'s) and of ``poolers`` (``MultiScaleRoIAlign``'s), and
    any other torchvision module that imported them (``roi_heads``). Found once per number of loaded
    modules, and checked."""
    found = _found.get(len(sys.modules))
    if found is None or any(vars(module).get(name) is not _TORCHVISION[name] for module, name in found):
        found = _scan(_TORCHVISION)
        _found.clear()
        _found[len(sys.modules)] = found
    return found


def _enter(*_args, **_kwargs) -> None:
    # torchvision's modules look these functions up in their own globals at call time
    global _depth
    _lock.acquire()
    if _depth == 0:
        _swapped[:] = _bindings()
        _loaded[0] = len(sys.modules)
        for module, name in _swapped:
            setattr(module, name, OURS[name])
    _depth += 1


def _exit(*_args, **_kwargs) -> None:
    global _depth
    _depth -= 1
    if _depth == 0:
        # a torchvision module imported inside the block bound detgraft's functions: it gets torchvision's too
        others = _scan(OURS) if len(sys.modules) != _loaded[0] else []
        for module, name in _swapped + others:
            setattr(module, name, _TORCHVISION[name])
        _swapped.clear()
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
    """``with everywhere(): ...`` runs the block with detgraft's ops in place of torchvision's under
    every public name (``torchvision.ops.nms``, ``torchvision.ops.roi_align``, ``RoIAlign``, every
    detection model, copies and teachers made inside it included); all are put back after it.
    Other threads that swap them wait for it."""
    _enter()
    try:
        yield
    finally:
        _exit()
