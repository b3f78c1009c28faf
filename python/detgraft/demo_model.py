"""The demo's base detector. Standalone (torch and torchvision only), so that a checkpoint's
``file.py:function`` builder can import it by path."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

BASE_SHAPES = ("circle", "square", "triangle", "bar")
SIZE = 128


def build_base(num_classes: int = len(BASE_SHAPES) + 1) -> FasterRCNN:
    """A tiny FasterRCNN (4 conv layers, stride 8, 64 channels) for 128-pixel images."""

    def block(i, o):
        return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    body = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    body.out_channels = 64
    return FasterRCNN(
        body,
        num_classes=None,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 48),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(64 * 7 * 7, 128),
        box_predictor=FastRCNNPredictor(128, num_classes),
        min_size=SIZE,
        max_size=SIZE,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=150,
        rpn_pre_nms_top_n_test=150,
        rpn_post_nms_top_n_test=80,
        box_batch_size_per_image=64,
    )
