"""A tiny torchvision FasterRCNN with live BatchNorm, built in milliseconds, for tests."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign


def build(num_classes: int = 6, seed: int = 0, **kwargs) -> FasterRCNN:
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
    )
    body.out_channels = 16
    for bn in (body[1], body[4]):  # live statistics that are not the identity
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    model = FasterRCNN(
        body,
        num_classes=None,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(16 * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, num_classes),
        min_size=64,
        max_size=64,
        **kwargs,
    )
    with torch.no_grad():  # spread the class logits so scores are well separated
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 1.0)
    return model.eval()


def images(n: int = 2, seed: int = 1, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]
