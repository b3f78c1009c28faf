"""Mask R-CNN training when some boxes come with masks and some without.

A user adding classes often has boxes only, and the teacher boxes of ``pseudo`` / ``distill`` never
have masks; torchvision's ``RoIHeads`` then refuses the targets ("Every element of targets should
have a masks key"). ``PartialMaskRoIHeads`` (swapped in place by ``allow_boxes_without_masks``)
computes the box losses as torchvision does and the mask loss, torchvision's ``maskrcnn_loss``,
only over the sampled positives matched to a box that has a mask: box ``k`` of a target has one
when ``k < len(target["masks"])`` (teacher boxes are appended after the user's). Without any such
box in a batch, ``loss_mask`` is 0 (and still in the loss dict, which keeps its keys).
"""

from __future__ import annotations

import logging

import torch
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss

__all__ = ["PartialMaskRoIHeads", "allow_boxes_without_masks"]

log = logging.getLogger(__name__)


class PartialMaskRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with the mask loss only where masks are given; see the module doc."""

    _told = False

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or not self.has_mask() or targets is None:
            return super().forward(features, proposals, image_shapes, targets)
        if all("masks" in t and len(t["masks"]) == len(t["boxes"]) for t in targets):
            return super().forward(features, proposals, image_shapes, targets)
        if not self._told:
            log.info("some boxes have no mask: the mask loss is computed over the boxes that have one")
            PartialMaskRoIHeads._told = True
        pool = self.mask_roi_pool
        self.mask_roi_pool = None  # torchvision's box losses, without its mask checks
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            self.mask_roi_pool = pool
        proposals, matched_idxs, labels, _ = self._sampled
        del self._sampled
        boxes, with_mask = [], []  # per image the positives matched to a box with a mask; which images have any
        for k, (p, m, label, t) in enumerate(zip(proposals, matched_idxs, labels, targets)):
            has = len(t["masks"]) if "masks" in t else 0
            pos = torch.where((label > 0) & (m < has))[0]
            boxes.append(p[pos])
            if len(pos):
                with_mask.append((k, m[pos]))
        if not with_mask:
            losses["loss_mask"] = sum(p.sum() for p in self.mask_predictor.parameters()) * 0.0
            return result, losses
        # pooled per image (empty lists keep the image index); the loss over the images with positives
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        losses["loss_mask"] = maskrcnn_loss(
            logits,
            [boxes[k] for k, _ in with_mask],
            [targets[k]["masks"] for k, _ in with_mask],
            [targets[k]["labels"] for k, _ in with_mask],
            [m for _, m in with_mask],
        )
        return result, losses


def allow_boxes_without_masks(model) -> None:
    """Lets a Mask R-CNN's RoI heads train on targets whose boxes lack masks (in place)."""
    heads = model.roi_heads
    if type(heads) is RoIHeads:
        heads.__class__ = PartialMaskRoIHeads
