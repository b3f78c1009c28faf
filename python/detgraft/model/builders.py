"""How detgraft makes a model's architecture and reads its weights: torchvision's builders and
named weights, Python builder files, state-dict files and class-name lists.

``build_architecture`` turns a checkpoint's builder record into an untrained model of the saved
width; ``torchvision_builder`` makes that record for a torchvision builder. State dicts are read
with safetensors or ``torch.load(weights_only=True)``: nothing executes code from a weights file.
"""

from __future__ import annotations

import importlib.util
import json
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
from .card import BACKGROUND
from .surgery import resize_predictor

__all__ = [
    "build_architecture",
    "import_builder",
    "named_weights",
    "pretrained",
    "read_classes",
    "read_state_dict",
    "torchvision_builder",
    "weights_cache_path",
]


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
    if name not in families.torchvision_builders():
        raise ValueError(f"builder {name!r} is not one of {', '.join(families.torchvision_builders())}")
    return {"kind": "torchvision", "name": name, "kwargs": {"weights": None, "weights_backbone": None}}


def build_architecture(builder: Mapping[str, Any], num_classes: int) -> nn.Module:
    """An untrained model of the architecture ``builder`` describes, with ``num_classes`` outputs."""
    if builder["kind"] == "torchvision":
        return torchvision.models.get_model(builder["name"], **{**builder["kwargs"], "num_classes": num_classes})
    if builder["kind"] == "python":
        net = import_builder(builder["file"], builder["function"])(**builder.get("kwargs", {}))
        width = families.num_classes(net)
        if width > num_classes:
            raise ValueError(f"builder makes {width} outputs, more than the {num_classes} expected")
        if width < num_classes:
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


def read_classes(classes: str | Path | Sequence[str]) -> list[str]:
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


def import_builder(file: str | Path, function: str):
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
