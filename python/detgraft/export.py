"""``detgraft export``: a model for places where detgraft is not installed.

TorchScript through ``torch.jit.script``, as torchvision scripts its detectors: the model stays
torchvision's (``naive``, ``head``, ``pseudo`` and ``distill`` leave one widened predictor; a
Faster R-CNN ``branch`` model keeps its branches and the arbitration inside the scripted graph,
since ``BranchRoIHeads``' inference path and ``detgraft.arbitration.merge`` are TorchScript), so
the scripted file runs with plain ``torch.jit.load`` and returns torchvision's
``(losses, detections)`` tuple. Before writing, ``export`` runs the eager and the scripted model on
the same images and reports the largest box and score difference.

Not yet: ``branch`` models of Mask R-CNN (the masks of merged detections) and of RetinaNet / FCOS,
and ONNX. Those are refused with what to do instead.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

__all__ = ["FORMATS", "export"]

log = logging.getLogger(__name__)

FORMATS = ("torchscript",)


def export(model: nn.Module, out: str | Path, format: str = "torchscript", images: list | None = None) -> dict:
    """Writes ``model`` to ``out`` in ``format``; returns the parity check on ``images`` (default:
    two synthetic images of different sizes): the largest box and score difference between the
    eager and the exported model, and the number of detections compared."""
    from .branch import branch_layout
    from .dense_branch import dense_branch_layout

    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not supported: choose one of {', '.join(FORMATS)}")
    masks = branch_layout(model) and model.roi_heads.has_mask()
    if masks or dense_branch_layout(model):
        kind = "Mask R-CNN" if masks else type(model).__name__
        raise ValueError(
            f"a {kind} branch model cannot be exported yet (only Faster R-CNN branch models are). Use it with "
            "detgraft installed (detgraft.load_model), or extend with --strategy head, pseudo or distill for a "
            "single torchvision predictor that exports"
        )
    model = _without_hooks(model).eval()
    scripted = torch.jit.script(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(out))
    loaded = torch.jit.load(str(out))
    device = next(model.parameters()).device
    images = images if images is not None else _synthetic_images(device)
    with torch.no_grad():
        eager = model(images)
        _, exported = loaded(images)
    check = _compare(eager, exported)
    log.info("exported to %s; eager vs exported on %d images: %s", out, len(images), check)
    return check


def _without_hooks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without the hooks ``detgraft.incremental`` adds for training (TorchScript
    compiles no Python hooks), its old rows put back first (by its state-dict hook)."""
    model.state_dict()
    clean = copy.deepcopy(model)
    for module in clean.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        module._state_dict_pre_hooks.clear()
    return clean


def _synthetic_images(device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=g).to(device) for h, w in ((240, 320), (300, 200))]


def _compare(eager: list[dict], exported: list[dict]) -> dict:
    """The largest box and score difference over detections in the same order, and their count
    (a different number of detections or labels is an error)."""
    box, score, count = 0.0, 0.0, 0
    for a, b in zip(eager, exported):
        if len(a["boxes"]) != len(b["boxes"]) or not torch.equal(a["labels"], b["labels"]):
            raise RuntimeError("the exported model's detections differ from the model's (labels or count)")
        if len(a["boxes"]):
            box = max(box, (a["boxes"] - b["boxes"]).abs().max().item())
            score = max(score, (a["scores"] - b["scores"]).abs().max().item())
        count += len(a["boxes"])
    return {"max_box_difference": box, "max_score_difference": score, "detections": count}
