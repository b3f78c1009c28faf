"""The EmojiCOCO base as an FCOS: the base's backbone and FPN (same layout, same weights) plus
torchvision's FCOS head (one location per place on each of the FPN's 4 levels, strides 8 to 64,
its sizes those strides, as torchvision's FCOS sets them), which ``benchmarks/families.py`` trains
on ``base_train``."""

from __future__ import annotations

import sys
from pathlib import Path

from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator

BENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"


def build(num_classes: int = 91) -> FCOS:
    sys.path.insert(0, str(BENCH))
    import base_model

    backbone = base_model.build(num_classes).backbone
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4)
    return FCOS(backbone, num_classes, min_size=256, max_size=256, anchor_generator=anchors, detections_per_img=100)
