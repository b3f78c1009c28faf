"""Checkpoints anyone can load: ``model.safetensors`` + ``detgraft.json``.

``detgraft.json`` holds the builder and its arguments (with the current ``num_classes``), the class
names, where the base came from and the history of what was added. A checkpoint of a torchvision
architecture loads with torchvision alone::

    meta = json.load(open("ckpt/detgraft.json"))
    model = torchvision.models.get_model(meta["builder"]["name"], **meta["builder"]["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("ckpt/model.safetensors"))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..heads.merge import ARBITRATION_STATE, RETIRED_STATE
from .batchnorm import BatchNormFrozen
from .builders import build_architecture, torchvision_builder
from .card import ModelCard, get_card
from .families import family, num_classes

log = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "save_checkpoint", "sha256_file"]

FORMAT = "detgraft-checkpoint/1"
WEIGHTS, META = "model.safetensors", "detgraft.json"


def save_checkpoint(model: nn.Module, out_dir: str | Path, *, builder: str | dict[str, Any] | None = None) -> Path:
    """Writes ``out_dir/model.safetensors`` and ``out_dir/detgraft.json``; returns ``out_dir``.

    Each file is written to a temporary name and renamed, and ``detgraft.json`` (written last)
    holds the weights' SHA-256: an interrupted save never leaves a checkpoint that loads wrongly.
    ``builder`` names a torchvision builder (or gives a builder dict) for a model that
    ``load_model`` did not load.
    """
    card = get_card(model)
    if isinstance(builder, str):
        builder = torchvision_builder(builder)
    builder = builder or card.builder
    if builder is None:
        raise ValueError(
            "detgraft does not know which builder makes this model, so the checkpoint could not be rebuilt: "
            "load the model with detgraft.load_model, or pass builder='fasterrcnn_resnet50_fpn' (the torchvision "
            "builder it came from)"
        )
    width, kit = num_classes(model), family(model).branch
    if width != card.num_classes:
        raise ValueError(f"card names {card.num_classes} classes but the model has {width} outputs")
    builder = json.loads(json.dumps(builder))
    if builder["kind"] == "torchvision":
        builder["kwargs"]["num_classes"] = width

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; a checkpoint is a normal file
    digest = sha256_file(tmp)
    os.replace(tmp, out_dir / WEIGHTS)
    meta = {
        "format": FORMAT,
        "num_classes": width,
        **card.to_json(),
        "builder": builder,
        "weights_sha256": digest,
        # what a builder called without weights does not reproduce (torchvision freezes both
        # only when it loads pretrained weights)
        "branches": kit.layout(model) if kit is not None else None,
        # torchvision's FrozenBatchNorm2d, and detgraft's BatchNormFrozen (BatchNorm's arithmetic): each comes
        # back as it was (detgraft 0.1 named these lists "frozen_batchnorm" and "batchnorm_frozen")
        "torchvision_frozen_batchnorm": [n for n, m in model.named_modules() if type(m) is FrozenBatchNorm2d],
        "detgraft_frozen_batchnorm": [n for n, m in model.named_modules() if isinstance(m, BatchNormFrozen)],
        "frozen_parameters": [n for n, p in model.named_parameters() if not p.requires_grad],
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    tmp = out_dir / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / META)
    card.builder = builder
    return out_dir


def load_checkpoint(path: str | Path) -> nn.Module:
    """Loads a checkpoint folder (or its ``detgraft.json``) in eval mode on the CPU."""
    path = Path(path)
    folder = path.parent if path.name == META else path
    meta_path = folder / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a detgraft checkpoint: it has no {META}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(meta_path)!r} has format {meta.get('format')!r}; this detgraft reads {FORMAT}")
    weights = folder / WEIGHTS
    if not weights.is_file() or sha256_file(weights) != meta["weights_sha256"]:
        raise ValueError(
            f"{str(weights)!r} is missing or does not match {META} (an interrupted save or a copied file?)"
        )
    model = build_architecture(meta["builder"], meta["num_classes"])
    for name in meta.get("torchvision_frozen_batchnorm", meta.get("frozen_batchnorm", [])):
        _freeze_batchnorm(model, name, FrozenBatchNorm2d)
    for name in meta.get("detgraft_frozen_batchnorm", meta.get("batchnorm_frozen", [])):
        _freeze_batchnorm(model, name, BatchNormFrozen)
    if meta.get("branches"):
        family(model).branch.restore(model, meta["branches"])
    state = load_file(str(weights))
    retired = [k for k in state if k.rpartition(".")[2] in RETIRED_STATE]
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in retired}, strict=False)
    uncalibrated = [k for k in missing if k.rpartition(".")[2] in ARBITRATION_STATE]
    if unexpected or len(uncalibrated) < len(missing):
        raise RuntimeError(
            f"{str(weights)!r} does not fit the model {META} describes: "
            f"missing {sorted(set(missing) - set(uncalibrated))}, unexpected {sorted(unexpected)}"
        )
    if uncalibrated or retired:
        for key in {k.rpartition(".")[0] for k in uncalibrated + retired}:
            model.get_submodule(key).calibrated.fill_(False)
        log.warning(
            "%s was saved without this detgraft's arbitration state: calibrate it again with detgraft.calibrate(model, "
            "training examples) (until then old and new detections are merged by score alone)",
            folder,
        )
    for name in meta.get("frozen_parameters", []):
        model.get_parameter(name).requires_grad_(False)
    model.detgraft_card = ModelCard.from_json(meta)
    return model.eval()


def _freeze_batchnorm(model: nn.Module, name: str, kind: type[FrozenBatchNorm2d]) -> None:
    """Replaces the BatchNorm2d at ``name`` by a frozen one of ``kind``, as the saved model had."""
    module = model.get_submodule(name)
    if type(module) is kind:
        return
    if type(module) is not nn.BatchNorm2d:
        raise ValueError(f"checkpoint has a {kind.__name__} at {name!r}; the builder makes a {type(module).__name__}")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, kind(module.num_features, eps=module.eps))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
