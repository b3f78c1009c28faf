"""Teacher boxes in training targets: what a frozen model detects becomes labels the new data lacks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou


def add_teacher_boxes(
    target: dict[str, Tensor], detections: dict[str, Tensor], keep: float, ignore: float, label: int | None = None
) -> dict[str, Tensor]:
    """``target`` plus the teacher's ``detections`` that score >= ``ignore`` and do not overlap a
    labelled box (IoU >= 0.5: the user's label wins). Those scoring >= ``keep`` are labelled with
    the teacher's label (or ``label``), the others -1, which torchvision's RoI heads match and then
    leave out of the loss (its sampler skips label -1)."""
    boxes, labels = target["boxes"].to(detections["boxes"]).reshape(-1, 4), target["labels"]
    take = detections["scores"] >= ignore
    if len(boxes):
        take &= ~(box_iou(detections["boxes"], boxes) >= 0.5).any(1)
    taught = detections["labels"][take] if label is None else torch.full_like(detections["labels"][take], label)
    taught = torch.where(detections["scores"][take] >= keep, taught, torch.full_like(taught, -1))
    return {
        **target,
        "boxes": torch.cat([boxes, detections["boxes"][take]]),
        "labels": torch.cat([labels.to(taught), taught]),
    }
