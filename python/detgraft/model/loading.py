"""Loading the detector a user already has.

``load_model`` accepts, in this order:

1. a detgraft checkpoint (a folder holding ``detgraft.json``, or that file);
2. a torchvision builder name (``TORCHVISION_BUILDERS``) with ``weights`` ``DEFAULT``, ``COCO_V1``,
   torchvision's weights enum (``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``, or that text) or a
   state-dict file. Named weights come from torch's hub cache, downloaded there as torchvision
   does (progress bar, torchvision's hash check) when they are not there yet;
3. a Python builder ``file.py:function`` with ``weights`` a state-dict file (this is how a custom
   architecture, such as the EmojiCOCO base, is loaded);
4. a whole pickled model, only with ``trust_pickle=True``.

State dicts are read with safetensors or ``torch.load(weights_only=True)``: nothing executes code
from a weights file unless the user says they trust it.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from . import families
from .builders import import_builder, named_weights, pretrained, read_classes, read_state_dict, torchvision_builder
from .card import BACKGROUND, ModelCard, coco_names
from .checkpoint import load_checkpoint

__all__ = ["TORCHVISION_BUILDERS", "load_model"]

log = logging.getLogger(__name__)

TORCHVISION_BUILDERS = families.torchvision_builders()


def load_model(
    model: str | Path,
    weights: str | Path | None = None,
    classes: str | Path | Sequence[str] | None = None,
    *,
    trust_pickle: bool = False,
) -> nn.Module:
    """Loads a detector in eval mode on the CPU, with its card (``model.detgraft_card``).

    Args:
        model: a checkpoint folder, a builder name from ``TORCHVISION_BUILDERS``, ``"file.py:function"``,
            or a pickled model file.
        weights: for builders: ``"DEFAULT"`` / ``"COCO_V1"`` / a torchvision weights enum (torchvision
            builders: from torch's hub cache, downloaded as torchvision downloads) or a
            ``.safetensors`` / ``.pth`` state-dict file.
        classes: class names, index = label: a list, or a JSON file holding such a list, a
            ``{"categories": [...]}`` list of names, or COCO ``categories`` (``id``, ``name``).
        trust_pickle: allow unpickling a whole model (runs code from the file).
    """
    spec = str(model)
    path = Path(spec)
    if path.is_dir() or path.name == "detgraft.json":
        return load_checkpoint(path)
    if spec in TORCHVISION_BUILDERS:
        net, card = _load_torchvision(spec, weights, classes)
    elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        net, card = _load_python_builder(spec, weights, classes)
    elif path.is_file():
        if weights is not None:
            raise ValueError(f"weights={str(weights)!r} needs a builder: MODEL is a file, not a builder name")
        net, card = _load_pickled(path, classes, trust_pickle)
    else:
        raise ValueError(
            f"cannot load {spec!r}: give a detgraft checkpoint folder, a torchvision builder "
            f"({', '.join(TORCHVISION_BUILDERS)}) with weights, a Python builder 'file.py:function' "
            "with weights, or a pickled model file (with trust_pickle)"
        )
    net.detgraft_card = card
    return net.eval()


def _load_torchvision(name: str, weights, classes) -> tuple[nn.Module, ModelCard]:
    w = named_weights(name, weights)
    if w is not None:
        net = pretrained(name, w)
        names, source = list(w.meta["categories"]), str(w)
    else:
        state_dict = read_state_dict(weights)
        probe = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        num_classes = families.state_dict_classes(probe, state_dict, f"{str(weights)!r} ({name})")
        net = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
        _load_weights(net, state_dict, weights, name)
        names, source = None, str(Path(weights).resolve())
    return net, _card(net, classes, names, torchvision_builder(name), source)


def _load_python_builder(spec: str, weights, classes) -> tuple[nn.Module, ModelCard]:
    file, function = spec.rsplit(":", 1)
    path = Path(file).resolve()
    net = import_builder(path, function)()
    if weights is None:
        log.warning("no weights given: %s keeps the weights its builder made", spec)
        source = None
    else:
        _load_weights(net, read_state_dict(weights), weights, spec)
        source = str(Path(weights).resolve())
    builder = {"kind": "python", "file": str(path), "function": function, "kwargs": {}}
    return net, _card(net, classes, None, builder, source)


def _load_pickled(path: Path, classes, trust_pickle: bool) -> tuple[nn.Module, ModelCard]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ValueError(
                f"refusing to unpickle {str(path)!r}: it holds a whole pickled model, and loading it runs "
                "code from the file. If you trust the file, pass --trust-pickle (trust_pickle=True); better, "
                "save model.state_dict() and load it with its builder and --weights"
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
        raise ValueError(
            f"{str(path)!r} holds tensors, not a model: name the architecture that builds it, e.g. "
            f"'fasterrcnn_resnet50_fpn --weights {path}' or 'file.py:build --weights {path}'"
        )
    names = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        names = obj.get("categories")
        obj = obj["model"]
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch model")
    return obj, _card(obj, classes, names, None, str(path.resolve()))


def _card(net: nn.Module, classes, names: list[str] | None, builder, source) -> ModelCard:
    width = families.num_classes(net)
    if classes is not None:
        names = read_classes(classes)
    if names is None:
        names = coco_names() if width == 91 else [BACKGROUND] + [f"class_{i}" for i in range(1, width)]
    if len(names) != width:
        raise ValueError(f"the class names list {len(names)} labels but the model has {width} outputs")
    return ModelCard(classes=names, builder=builder, source=source)


def _load_weights(net: nn.Module, state_dict: Mapping[str, Tensor], weights, spec: str) -> None:
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"{str(weights)!r} does not fit the architecture {spec}: {err}") from None
