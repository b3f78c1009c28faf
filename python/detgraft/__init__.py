"""detgraft: add object classes to a pretrained torchvision detector without forgetting the old ones.

import torch, detgraft
model = detgraft.load_model("fasterrcnn_resnet50_fpn", weights="COCO_V1")
detgraft.expand_predictor(model, ["chicken", "frog"])     # labels 91, 92; detections unchanged
detgraft.save_checkpoint(model, "out/")                   # model.safetensors + detgraft.json
"""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the Rust extension)

from . import _check_torch, _core  # noqa: F401  (in this order: the torch version is checked before the extension loads)
from .extend import extend
from .model.card import ModelCard, get_card
from .model.checkpoint import load_checkpoint, save_checkpoint
from .model.loading import load_model
from .model.surgery import INITS, box_features, expand_predictor, expand_state_dict
from .settings import ExtendSettings
from .strategies import freeze_batchnorm, incremental
from .strategies.calibrate import calibrate

__all__ = [
    "INITS",
    "ExtendSettings",
    "ModelCard",
    "box_features",
    "calibrate",
    "expand_predictor",
    "expand_state_dict",
    "extend",
    "freeze_batchnorm",
    "get_card",
    "incremental",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
__version__ = "0.1.0"
