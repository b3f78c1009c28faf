"""What a frozen base computes for one training example, kept so that training steps need not
compute it again (``detgraft.kept``, the ``branch`` strategy).

A ``Kept`` holds one transformed example's FPN feature maps (its own, padded as torchvision pads a
batch of one), its size after the transform, its target in those coordinates, and what the
family's training step reads besides (``extra``: an R-CNN's proposals, the teacher's detections
and how many anchors the RPN's sampler drew from). ``batched`` puts several side by side as
torchvision's transform would have batched their images: each level zero-padded to the largest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Kept", "batched", "nbytes"]


@dataclass
class Kept:
    features: OrderedDict[str, Tensor]  # name -> [C, H, W], as computed or stored in another dtype
    image_size: tuple[int, int]
    target: dict[str, Tensor]
    extra: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # what the base computed the feature maps in

    def stored(self, dtype: torch.dtype | None) -> Kept:
        """This example with its feature maps in ``dtype`` (None: as computed), each a tensor of
        its own (a view into a batch would keep the whole batch alive)."""
        features = OrderedDict((k, v.to(dtype or v.dtype, copy=True)) for k, v in self.features.items())
        return Kept(features, self.image_size, self.target, self.extra, self.dtype)


def nbytes(kept: Kept) -> int:
    """The bytes its feature maps take (the rest is small: boxes and labels)."""
    return sum(v.numel() * v.element_size() for v in kept.features.values())


def batched(kept: list[Kept]) -> OrderedDict[str, Tensor]:
    """The examples' feature maps as one batch per level, in the dtype the base computed them in:
    each zero-padded at the bottom and right to the largest in the batch."""
    dtype = kept[0].dtype
    out = OrderedDict()
    for name in kept[0].features:
        maps = [k.features[name] for k in kept]
        height, width = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
        out[name] = torch.stack([F.pad(m.to(dtype), (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps])
    return out
