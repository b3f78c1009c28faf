"""What a frozen base computes for one training example, kept so that training steps need not
compute it again (``detgraft.kept``, the ``branch`` strategy).

A ``Kept`` holds one transformed example's FPN feature maps (its own, padded as torchvision pads a
batch of one), its size after the transform, its target in those coordinates, and what the
family's training step reads besides (``extra``: an R-CNN's proposals, the teacher's detections
and how many anchors the RPN's sampler drew from). ``batched`` puts several side by side as
torchvision's transform would have batched their images: each level zero-padded to the largest.

``frozen_batches`` runs a family's frozen part on examples as the training step's transform gives
them, ``replay_transform_draws`` makes the transform's random draws of a step again, and
``size_draws`` says when a model's transform makes what was kept differ from what a step computes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

__all__ = ["Kept", "batched", "frozen_batches", "nbytes", "replay_transform_draws", "size_draws"]


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


def frozen_batches(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    compute: Callable[[nn.Module, ImageList, list[dict[str, Tensor]]], list[Kept]],
) -> list[Kept]:
    """``compute(model, image_list, targets)`` on examples (``images`` and ``targets`` as the training
    loop gives them) through the transform in training mode, each image alone (a batch of one:
    padded to its own size); images of one size after it run as one batch (nothing padded),
    otherwise each runs alone. The global RNG is left as it was: the family's ``kept_losses``
    replays the step's draws."""
    device = images[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        alone = [model.transform([image], [target]) for image, target in zip(images, targets)]
        sizes = [image_list.image_sizes[0] for image_list, _ in alone]
        if len(set(sizes)) == 1:  # one size: side by side they are the transform's batch of them
            together = ImageList(torch.cat([image_list.tensors for image_list, _ in alone]), sizes)
            return compute(model, together, [target for _, (target,) in alone])
        return [kept for image_list, target in alone for kept in compute(model, image_list, target)]


def replay_transform_draws(transform: nn.Module, count: int) -> None:
    """The draws torchvision's ``GeneralizedRCNNTransform`` makes on ``count`` images in training
    mode, made again: a size per image (``torch_choice``), unless it does not resize."""
    if not getattr(transform, "_skip_resize", False):
        for _ in range(count):
            transform.torch_choice(transform.min_size)


def size_draws(model: nn.Module) -> str | None:
    """Why what ``frozen_batches`` keeps cannot stand for a step on this model (None: it can): a
    transform that draws each image's size from several (multi-scale training) resizes an image
    differently in each step."""
    sizes = model.transform.min_size
    if len(sizes) > 1 and not getattr(model.transform, "_skip_resize", False):
        return f"the transform draws each image's size from {list(sizes)}"
    return None
