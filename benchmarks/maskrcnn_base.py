"""The EmojiCOCO base as a Mask R-CNN: the base's backbone, RPN and box head (same layout, same
weights) plus torchvision's mask head, which ``benchmarks/families.py`` trains on ``base_train``."""

from __future__ import annotations

import sys
from pathlib import Path

from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

BENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"


def build(num_classes: int = 91) -> MaskRCNN:
    sys.path.insert(0, str(BENCH))
    import base_model

    faster = base_model.build(num_classes)
    return MaskRCNN(
        faster.backbone,
        num_classes=None,
        rpn_anchor_generator=faster.rpn.anchor_generator,
        box_head=faster.roi_heads.box_head,
        box_predictor=faster.roi_heads.box_predictor,
        mask_predictor=MaskRCNNPredictor(256, 256, num_classes),
        min_size=256,
        max_size=256,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        box_batch_size_per_image=128,
    )
