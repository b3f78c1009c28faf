"""Training examples from a COCO-format file: images with boxes, labels and, for Mask R-CNN, masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from .evaluate import Dataset

__all__ = ["TrainingSet"]


class TrainingSet:
    """COCO-json training images with their labels in the model's label space.

    ``label_of`` maps category ids to model labels (other categories are left out). With
    ``masks``, an annotation's ``segmentation`` (polygons or RLE) becomes a mask: a target's boxes
    with a mask come first and ``masks`` holds theirs, so box ``k`` has a mask when ``k <
    len(masks)`` (``detgraft.masks`` computes the mask loss only there).
    """

    def __init__(self, data: Dataset, label_of: dict[int, int], masks: bool = False) -> None:
        kept: dict[int, list] = {im["id"]: [] for im in data.coco["images"]}
        for a in data.coco["annotations"]:
            if a.get("iscrowd", 0) or a["category_id"] not in label_of:
                continue
            x, y, w, h = a["bbox"]
            if w > 0 and h > 0:
                segmentation = a.get("segmentation") if masks else None
                kept[a["image_id"]].append(([x, y, x + w, y + h], label_of[a["category_id"]], segmentation or None))
        self.items = []
        for im in data.coco["images"]:
            rows = sorted(kept[im["id"]], key=lambda r: r[2] is None)  # the boxes with a mask first
            self.items.append(
                (
                    data.path(im),
                    torch.tensor([b for b, _, _ in rows], dtype=torch.float32).reshape(-1, 4),
                    torch.tensor([label for _, label, _ in rows], dtype=torch.int64),
                    [s for _, _, s in rows if s is not None] if masks else None,
                )
            )
        if not self.items:
            raise ValueError("the training file lists no images")

    def __len__(self) -> int:
        return len(self.items)

    def __add__(self, other: TrainingSet) -> TrainingSet:
        both = object.__new__(TrainingSet)
        both.items = self.items + other.items
        return both

    def example(self, index: int, flip: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        path, boxes, labels, segmentations = self.items[index]
        image = decode_image(str(path), mode=ImageReadMode.RGB).float() / 255
        target = {"boxes": boxes, "labels": labels}
        if segmentations is not None:
            target["masks"] = _masks(segmentations, *image.shape[-2:], path)
        if flip:
            image = image.flip(-1)
            target["boxes"] = boxes.clone()
            target["boxes"][:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def batch(self, step: int, size: int, seed: int, hflip: bool) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """The ``step``-th batch of a seeded run: epochs are permutations seeded by (seed, epoch)."""
        n = len(self.items)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        flips = (torch.rand(size, generator=g) < 0.5).tolist() if hflip else [False] * size
        picks = []
        for k, position in enumerate(range(step * size, (step + 1) * size)):
            epoch, index = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            picks.append(self.example(int(order[index]), flips[k]))
        return [p[0] for p in picks], [p[1] for p in picks]


def _masks(segmentations: list[Any], height: int, width: int, path: Path) -> Tensor:
    """COCO segmentations (polygons, RLE or uncompressed RLE) as uint8 masks [N, height, width]."""
    from pycocotools import mask as coco_mask

    out = torch.zeros(len(segmentations), height, width, dtype=torch.uint8)
    for k, s in enumerate(segmentations):
        if isinstance(s, list):  # polygons
            rle = coco_mask.merge(coco_mask.frPyObjects(s, height, width))
        elif isinstance(s, dict) and isinstance(s.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(s, height, width)
        elif isinstance(s, dict):
            rle = {"size": s["size"], "counts": s["counts"].encode() if isinstance(s["counts"], str) else s["counts"]}
        else:
            raise ValueError(f"{path}: a segmentation must be polygons or RLE; got {type(s).__name__}")
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"{path}: a segmentation is {rle['size']} but the image is {[height, width]}")
        out[k] = torch.from_numpy(np.ascontiguousarray(coco_mask.decode(rle)))
    return out
