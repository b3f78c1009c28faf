"""Training examples from a checked dataset: images with boxes, labels and, for Mask R-CNN, masks;
seeded batches with flips and, optionally, torchvision.transforms.v2 jitter, decoded in DataLoader
workers while the model trains.

A batch is a pure function of (seed, step): which images (epochs are seeded permutations), which
are flipped, and each example's jitter (a seed of its own, under ``torch.random.fork_rng``, so the
global RNG that the model's samplers use is untouched). So a worker process computes the very batch
the training loop would, and ``--resume`` continues with the same batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .dataset import Dataset
from .images import load_image

__all__ = ["TrainingSet", "jittered", "training_batches"]


class TrainingSet:
    """COCO-json training images with their labels in the model's label space.

    ``label_of`` maps category ids to model labels (other categories are left out). With
    ``masks``, an annotation's ``segmentation`` (polygons or RLE) becomes a mask: a target's boxes
    with a mask come first and ``masks`` holds theirs, so box ``k`` has a mask when ``k <
    len(masks)`` (``detgraft.heads.masks`` computes the mask loss only there).
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

    def example(self, index: int, flip: bool = False, jitter: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Image ``index`` and its target, flipped left-right with ``flip``, jittered with seed ``jitter``."""
        path, boxes, labels, segmentations = self.items[index]
        image = load_image(str(path)).float() / 255
        target = {"boxes": boxes, "labels": labels}
        if segmentations is not None:
            target["masks"] = _masks(segmentations, *image.shape[-2:], path)
        if flip:
            image = image.flip(-1)
            target["boxes"] = boxes.clone()
            target["boxes"][:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        if jitter is not None:
            image, target = jittered(image, target, jitter)
        return image, target

    def batch(
        self, step: int, size: int, seed: int, hflip: bool, jitter: bool = False, part: tuple[int, int] = (0, 1)
    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """The ``step``-th batch of a seeded run (``batch_keys``): images and targets."""
        picks = [self.example(*key) for key in self.batch_keys(step, size, seed, hflip, jitter, part)]
        return [p[0] for p in picks], [p[1] for p in picks]

    def batch_keys(
        self, step: int, size: int, seed: int, hflip: bool, jitter: bool = False, part: tuple[int, int] = (0, 1)
    ) -> list[tuple[int, bool, int | None]]:
        """The examples of the ``step``-th batch of a seeded run, as ``example``'s arguments
        (index, flip, jitter seed): epochs are permutations seeded by (seed, epoch). With ``part``
        (rank, processes): only the examples k of the batch with k mod processes == rank."""
        n = len(self.items)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        flips = (torch.rand(size, generator=g) < 0.5).tolist() if hflip else [False] * size
        keys = []
        for k, position in enumerate(range(step * size, (step + 1) * size)):
            if k % part[1] != part[0]:
                continue
            epoch, index = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            keys.append((int(order[index]), flips[k], seed * 1_000_003 + position if jitter else None))
        return keys


def jittered(image: Tensor, target: dict[str, Tensor], seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """torchvision.transforms.v2 on an example, seeded: photometric distortion (p 0.5), then, when
    there are boxes, zoom out by up to 1.5x (p 0.3) and an SSD-style IoU crop (p 0.5); boxes, labels
    and masks follow, and boxes that leave the picture are removed with their label and mask. Boxes
    with a mask stay first (``masks`` holds theirs)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    n, k = len(target["boxes"]), len(target.get("masks", ()))
    height, width = image.shape[-2:]
    sample = {
        "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width)),
        "labels": target["labels"],
        "order": torch.arange(n),
    }
    if "masks" in target:
        full = torch.zeros(n, height, width, dtype=torch.uint8)
        full[:k] = target["masks"]
        sample["masks"] = tv_tensors.Mask(full)
    steps = [v2.RandomPhotometricDistort(p=0.5)]
    if n:
        steps += [
            v2.RandomZoomOut(fill={tv_tensors.Image: 0.45, "others": 0}, side_range=(1.0, 1.5), p=0.3),
            v2.RandomApply([v2.RandomIoUCrop()], p=0.5),
            v2.SanitizeBoundingBoxes(labels_getter=lambda inputs: (inputs[1]["labels"], inputs[1]["order"])),
        ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image, sample = v2.Compose(steps)(tv_tensors.Image(image), sample)
    out = {"boxes": sample["boxes"].as_subclass(Tensor), "labels": sample["labels"]}
    if "masks" in sample:
        out["masks"] = sample["masks"].as_subclass(Tensor)[: int((sample["order"] < k).sum())]
    return image.as_subclass(Tensor).clamp(0, 1), out


class _Batches(torch.utils.data.Dataset):
    """The batches of steps ``start`` .. ``steps - 1`` of a run, one item each."""

    def __init__(
        self, data: TrainingSet, start: int, steps: int, size: int, seed: int, hflip: bool, jitter: bool, part
    ):
        self.data, self.start, self.steps = data, start, steps
        self.args = (size, seed, hflip, jitter, part)

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, i: int):
        return self.data.batch(self.start + i, *self.args)


def training_batches(
    data: TrainingSet, start: int, steps: int, settings, part: tuple[int, int] = (0, 1)
) -> torch.utils.data.DataLoader:
    """The run's batches from step ``start`` on (this process's ``part`` of each, see
    ``TrainingSet.batch``), ``settings.workers`` processes decoding ahead (0: in the training
    loop); pinned memory when training on CUDA."""
    workers = settings.workers
    return torch.utils.data.DataLoader(
        _Batches(data, start, steps, settings.batch_size, settings.seed, settings.hflip, settings.jitter, part),
        batch_size=None,
        num_workers=workers,
        pin_memory=str(settings.device).startswith("cuda"),
        worker_init_fn=_ignore_ctrl_c if workers else None,
        prefetch_factor=2 if workers else None,
        # a generator of its own: the iterator draws a seed from it, not from the global RNG that the
        # model's samplers use (which would move, and a resumed run would differ from a whole one)
        generator=torch.Generator(),
    )


def _ignore_ctrl_c(worker: int) -> None:
    """A worker leaves Ctrl-C to the training loop, which finishes its step and saves (extend)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
