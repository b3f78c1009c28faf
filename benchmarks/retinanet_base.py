"""The EmojiCOCO base as a RetinaNet: the base's backbone and FPN (same layout, same weights) plus
torchvision's RetinaNet head (9 anchors per place, 3 sizes x 3 aspect ratios on each of the FPN's
4 levels), which ``benchmarks/families.py`` trains on ``base_train``."""

from __future__ import annotations

import sys
from pathlib import Path

from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

BENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"


def build(num_classes: int = 91) -> RetinaNet:
    sys.path.insert(0, str(BENCH))
    import base_model

    backbone = base_model.build(num_classes).backbone
    sizes = tuple(tuple(round(s * 2 ** (k / 3)) for k in range(3)) for s in (16, 32, 64, 128))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
    return RetinaNet(
        backbone,
        num_classes,
        min_size=256,
        max_size=256,
        anchor_generator=anchors,
        head=head,
        detections_per_img=100,
    )
