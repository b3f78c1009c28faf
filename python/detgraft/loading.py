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

import importlib.util
import json
import logging
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from . import families
from .card import BACKGROUND, ModelCard, coco_names

__all__ = [
    "TORCHVISION_BUILDERS",
    "load_model",
    "read_state_dict",
    "build_architecture",
    "torchvision_builder",
    "weights_cache_path",
]

log = logging.getLogger(__name__)

TORCHVISION_BUILDERS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
    "keypointrcnn_resnet50_fpn",  # listed so that loading it says why it is refused (families.family)
)


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
        from .checkpoint import load_checkpoint

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


def weights_cache_path(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision looks for ``weights`` before downloading them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, without unpickling code.

    A torchvision-references checkpoint (``{"model": state_dict, ...}``) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to read {str(path)!r}: it holds pickled Python objects, not just tensors, and "
            "unpickling runs code from the file. Save model.state_dict() instead (safetensors or "
            "torch.save), or, for a whole pickled model you trust, pass it as MODEL with --trust-pickle "
            f"(trust_pickle=True). ({str(err).splitlines()[0]})"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} holds no state dict (a mapping of names to tensors)")
    return dict(obj)


def torchvision_builder(name: str) -> dict[str, Any]:
    """The builder record of torchvision's ``name``, called without any weights."""
    if name not in TORCHVISION_BUILDERS:
        raise ValueError(f"builder {name!r} is not one of {', '.join(TORCHVISION_BUILDERS)}")
    return {"kind": "torchvision", "name": name, "kwargs": {"weights": None, "weights_backbone": None}}


def build_architecture(builder: Mapping[str, Any], num_classes: int) -> nn.Module:
    """An untrained model of the architecture ``builder`` describes, with ``num_classes`` outputs."""
    if builder["kind"] == "torchvision":
        return torchvision.models.get_model(builder["name"], **{**builder["kwargs"], "num_classes": num_classes})
    if builder["kind"] == "python":
        net = _import_builder(builder["file"], builder["function"])(**builder.get("kwargs", {}))
        width = families.num_classes(net)
        if width > num_classes:
            raise ValueError(f"builder makes {width} outputs, more than the {num_classes} expected")
        if width < num_classes:
            from .surgery import resize_predictor

            resize_predictor(net, num_classes)
        return net
    raise ValueError(f"unknown builder kind {builder['kind']!r}; expected 'torchvision' or 'python'")


def named_weights(name: str, weights) -> torchvision.models.WeightsEnum | None:
    """torchvision's weights for builder ``name`` that ``weights`` names (None, ``"DEFAULT"``,
    ``"COCO_V1"``, ``"FasterRCNN_ResNet50_FPN_Weights.COCO_V1"`` or the enum member itself), or None
    when ``weights`` is a file. Weights of another builder are an error."""
    enum = torchvision.models.get_model_weights(name)
    if weights is None:
        return enum.DEFAULT
    if isinstance(weights, torchvision.models.WeightsEnum):
        if not isinstance(weights, enum):
            raise ValueError(f"{weights} are not weights of {name}: its weights are {enum.__name__}")
        return weights
    text = str(weights)
    if text.startswith(f"{enum.__name__}."):
        text = text.split(".", 1)[1]
    if text == "DEFAULT" or text in enum.__members__:
        return enum.DEFAULT if text == "DEFAULT" else enum[text]
    if "_Weights." in text and not Path(text).exists():
        raise ValueError(f"{text} are not weights of {name}: its weights are {', '.join(map(str, enum))}")
    return None


def pretrained(name: str, w: torchvision.models.WeightsEnum) -> nn.Module:
    """torchvision's ``name`` with weights ``w``, which torchvision itself reads from torch's hub
    cache or downloads there (progress bar, its hash check); offline or corrupt, a clear error."""
    cached = weights_cache_path(w)
    try:
        return torchvision.models.get_model(name, weights=w, progress=True)
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        raise ValueError(f"the download of {w.url} is not the file torchvision expects ({err}); nothing kept") from None
    except OSError as err:  # URLError, a refused or timed-out connection
        raise FileNotFoundError(
            f"{w} is not on this machine and cannot be downloaded ({err}): on a machine without network, put "
            f"{cached.name} (from {w.url}) into {cached.parent} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to "
            "move it), or pass a state-dict file as weights"
        ) from None


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
    net = _import_builder(path, function)()
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
        names = _read_classes(classes)
    if names is None:
        names = coco_names() if width == 91 else [BACKGROUND] + [f"class_{i}" for i in range(1, width)]
    if len(names) != width:
        raise ValueError(f"the class names list {len(names)} labels but the model has {width} outputs")
    return ModelCard(classes=names, builder=builder, source=source)


def _read_classes(classes: str | Path | Sequence[str]) -> list[str]:
    if not isinstance(classes, (str, Path)):
        return list(classes)
    data = json.loads(Path(classes).read_text())
    if isinstance(data, Mapping):
        data = data.get("categories")
    if isinstance(data, list) and all(isinstance(c, str) for c in data):
        return data
    if isinstance(data, list) and all(isinstance(c, Mapping) and {"id", "name"} <= set(c) for c in data):
        names = [BACKGROUND] + ["N/A"] * max(c["id"] for c in data)
        for c in data:
            names[c["id"]] = c["name"]
        return names
    raise ValueError(
        f"{str(classes)!r} holds no class names: expected a list of names, {{'categories': [names]}}, "
        "or COCO categories [{'id': ..., 'name': ...}]"
    )


def _load_weights(net: nn.Module, state_dict: Mapping[str, Tensor], weights, spec: str) -> None:
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"{str(weights)!r} does not fit the architecture {spec}: {err}") from None


def _import_builder(file: str | Path, function: str):
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"builder file {str(path)!r} does not exist")
    name = f"detgraft_builder_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets the builder's own classes pickle and dataclasses resolve
    spec.loader.exec_module(module)
    if not callable(getattr(module, function, None)):
        raise ValueError(f"{str(path)!r} has no function {function!r}")
    return getattr(module, function)
