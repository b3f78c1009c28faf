"""``detgraft export``: a model for places where detgraft is not installed.

TorchScript through ``torch.jit.script``, as torchvision scripts its detectors: the model stays
torchvision's (``naive``, ``head``, ``pseudo`` and ``distill`` leave one widened predictor; a
``branch`` model keeps its branches and the arbitration inside the scripted graph, since the
branch models' inference paths and ``detgraft.heads.merge.merge`` are TorchScript), so
the scripted file runs with plain ``torch.jit.load`` and returns torchvision's
``(losses, detections)`` tuple. Before writing, ``export`` runs the eager and the scripted model on
the same images and reports the largest box and score difference.

ONNX (``format="onnx"``; ``pip install onnx onnxruntime``, the ``onnx`` extra) through torch's
TorchScript-based exporter, as torchvision's own ONNX tests export its detectors: one image
``[3, H, W]`` of any size in, ``boxes``, ``labels`` and ``scores`` out (N detections), and the file
checked with onnxruntime against the model. The merge has no Python branching on the data, so the
trace is the merge for every image.

``format="pt2"``: ``torch.export`` (torch marks ``torch.jit.script`` deprecated), loadable with
``torch.export.load`` after ``import detgraft`` (the program calls detgraft's operators): RetinaNet,
FCOS and SSD; R-CNNs stop in torchvision's code (``benchmarks/pt2.py``).

``format="torchvision"``: the state dict alone (safetensors) for ``torchvision.models.get_model(name,
num_classes=N)`` (the builder and N are in the checkpoint's ``detgraft.json``), for the strategies
that leave one torchvision predictor; a ``branch`` model is refused with what would change.

A Mask R-CNN (``branch`` included: old detections read the base's mask predictor, new ones their
branch's) also gives ``masks``, compared too. RetinaNet / FCOS ``branch`` models export the same
way, to TorchScript and to ONNX (their inference path is TorchScript too); their outputs are
named in torchvision's order for them, ``boxes, scores, labels``.
"""

from __future__ import annotations

import copy
import logging
import traceback
from pathlib import Path

import torch
from torch import nn

from . import ops
from .extras import need
from .model.builders import build_architecture
from .model.card import get_card
from .model.families import family

__all__ = ["FORMATS", "ExportBlocked", "ExportMismatch", "export", "stopped_at"]

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "torchvision", "pt2")
ONNX_OPSET = 17


def _has_branches(model: nn.Module) -> bool:
    kit = family(model).branch
    return kit is not None and kit.branches(model) is not None


def export(model: nn.Module, out: str | Path, format: str = "torchscript", images: list | None = None) -> dict:
    """Writes ``model`` to ``out`` in ``format``; returns the parity check on ``images`` (default:
    two synthetic images of different sizes): the largest box and score difference between the
    eager and the exported model, and the number of detections compared."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not supported: choose one of {', '.join(FORMATS)}")
    if format == "torchvision" and _has_branches(model):
        raise ValueError(BRANCH_IS_NOT_ONE_PREDICTOR)
    model = _without_hooks(model).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    images = images if images is not None else _synthetic_images(device)
    with torch.no_grad():  # one image at a time: in a batch, torchvision pads each image to the largest
        eager = [model([image])[0] for image in images]
    if format == "onnx":
        exported = _onnx(model, out, images, list(eager[0]))
    elif format == "torchvision":
        exported = _torchvision(model, out, images)
    elif format == "pt2":
        exported = _pt2(model, out, images)
    else:
        torch.jit.script(model).save(str(out))
        scripted = torch.jit.load(str(out))
        with torch.no_grad():
            exported = [scripted([image])[1][0] for image in images]
    check = _compare(eager, exported)
    log.info("exported to %s; eager vs exported on %d images: %s", out, len(images), check)
    return check


BRANCH_IS_NOT_ONE_PREDICTOR = (
    "a branch model is not one torchvision predictor: it is the frozen base plus a box head and predictor per "
    "extension, whose detections the arbitration merges. Folding it into one FasterRCNN would change what it "
    "detects: the new classes would need the base's box head (retraining it, which moves the old classes' "
    "scores), and old-class false alarms on new objects would come back (no arbitration). Export it with "
    "--format torchscript or onnx (the same detections), or extend with --strategy head, pseudo or distill"
)


def _torchvision(model: nn.Module, out: Path, images: list[torch.Tensor]) -> list[dict]:
    """Writes ``model``'s state dict (safetensors) for its own builder with ``num_classes`` outputs
    (a torchvision builder: ``torchvision.models.get_model(name, num_classes=N)``), loads it into a
    fresh model of that builder (strictly) and returns that model's detections on ``images``."""
    import safetensors.torch

    card = get_card(model)
    if card.builder is None:
        raise ValueError("--format torchvision needs the model's builder: load the model with detgraft.load_model")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    rebuilt = build_architecture(card.builder, card.num_classes)
    rebuilt.load_state_dict(safetensors.torch.load_file(str(out)))
    rebuilt.to(next(model.parameters()).device).eval()
    with torch.no_grad():
        return [rebuilt([image])[0] for image in images]


def _pt2(model: nn.Module, out: Path, images: list[torch.Tensor]) -> list[dict]:
    """Writes ``model`` with ``torch.export`` (non-strict, traced on the first of ``images``) to a
    ``.pt2`` file for ``torch.export.load(out).module()``; returns the loaded program's detections on
    each of ``images`` of the first one's size. The program takes images of that size only:
    torchvision's transform computes the resized size in Python arithmetic, which torch.export
    specializes to the traced image. Traced with detgraft's operators
    (``ops.everywhere()``): torchvision's ``batched_nms`` branches in Python on the number of boxes,
    which torch.export cannot trace, and detgraft's does not, so RetinaNet, FCOS and SSD export; the
    program calls ``torch.ops.detgraft.*``, so ``import detgraft`` before loading it. An R-CNN stops
    in torchvision's own code (``benchmarks/pt2.py``): the error says where."""
    try:
        with torch.no_grad(), ops.everywhere():
            program = torch.export.export(model, ([images[0]],), strict=False)
    except Exception as err:  # torch.export's errors are long; say where it stopped and what works instead
        at = stopped_at(err)
        raise ExportBlocked(
            f"torch.export could not trace this {type(model).__name__}{f' at {at}' if at else ''}: "
            f"{str(err).strip().splitlines()[0][:200]}. The model branches in Python on a value computed from the "
            "image there, which torch.export cannot trace (torchvision's R-CNNs do; benchmarks/RESULTS.md, section "
            "pt2); export with --format torchscript or onnx, which run the same detections without detgraft",
            at,
        ) from None
    torch.export.save(program, str(out))
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        return [loaded([image])[0] if image.shape == images[0].shape else None for image in images]


def _onnx(model: nn.Module, out: Path, images: list[torch.Tensor], names: list[str]) -> list[dict]:
    """Writes ``model`` as ONNX (traced on the first of ``images``, image height and width and the
    number of detections dynamic), its outputs named ``names`` (the keys of the model's detections,
    in their order: ``boxes, labels, scores[, masks]`` for R-CNNs, ``boxes, scores, labels`` for
    RetinaNet and FCOS); returns onnxruntime's detections on each of ``images``."""
    need("onnx", "'detgraft[onnx]' (onnx and onnxruntime)", "--format onnx")
    onnxruntime = need("onnxruntime", "'detgraft[onnx]' (onnx and onnxruntime)", "--format onnx")
    import warnings

    cpu = copy.deepcopy(model).cpu()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's warnings on torchvision's shape arithmetic
        torch.onnx.export(
            cpu,
            ([images[0].cpu()],),
            str(out),
            dynamo=False,  # the TorchScript-based exporter, which torchvision's detectors are tested with
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=names,
            dynamic_axes={"image": [1, 2]} | {name: [0] for name in names},
        )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    detections = []
    for image in images:
        outputs = session.run(None, {"image": image.cpu().numpy()})
        detections.append({name: torch.from_numpy(x).to(image.device) for name, x in zip(names, outputs)})
    return detections


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
    """The largest box and score difference between each of the model's detections and the
    exported one paired with it (same label, nearest box and score: detections whose scores differ
    by float rounding may swap places), and their count. A different number of detections or
    labels is an error. An image the export does not take (``None``: pt2's other sizes) is skipped."""
    box, score, mask, count = 0.0, 0.0, 0.0, 0
    for image, (a, b) in enumerate(zip(eager, exported)):
        if b is None:
            continue
        if len(a["boxes"]) != len(b["boxes"]) or sorted(a["labels"].tolist()) != sorted(b["labels"].tolist()):
            raise ExportMismatch(
                f"image {image}: the exported model detects {len(b['boxes'])} objects, the model {len(a['boxes'])} "
                "(or other labels)"
            )
        free = torch.ones(len(b["boxes"]), dtype=torch.bool)
        for k in range(len(a["boxes"])):
            distance = (b["boxes"] - a["boxes"][k]).abs().amax(1) + (b["scores"] - a["scores"][k]).abs()
            distance[~free | (b["labels"] != a["labels"][k])] = float("inf")
            j = int(distance.argmin())
            free[j] = False
            box = max(box, (b["boxes"][j] - a["boxes"][k]).abs().max().item())
            score = max(score, abs(b["scores"][j] - a["scores"][k]).item())
            if "masks" in a:
                mask = max(mask, (b["masks"][j] - a["masks"][k]).abs().max().item())
        count += len(a["boxes"])
    check = {"max_box_difference": box, "max_score_difference": score, "detections": count}
    return check | ({"max_mask_difference": mask} if eager and "masks" in eager[0] else {})


class ExportMismatch(RuntimeError):
    """The exported model's detections are not the model's."""


class ExportBlocked(ValueError):
    """torch.export stopped in the model's code; ``at`` says where (``stopped_at``)."""

    def __init__(self, message: str, at: str | None) -> None:
        super().__init__(message)
        self.at = at


def stopped_at(err: BaseException) -> str | None:
    """Where a trace that raised ``err`` stopped, as ``file:line (code)``: the innermost line of
    detgraft's heads in its traceback, else of torchvision's (None when neither is in it)."""
    frames = traceback.extract_tb(err.__traceback__)
    for package in ("detgraft/heads/", "torchvision/"):  # the path from the package's folder on
        found = [f for f in frames if f"/{package}" in f.filename]
        if found:
            file = found[-1].filename
            return f"{file[file.rindex(package) :]}:{found[-1].lineno} ({found[-1].line})"
    return None
