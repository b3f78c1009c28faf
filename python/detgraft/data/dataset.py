"""A detection dataset as detgraft passes it around: COCO json and the folder of its images.

Every reader (``detgraft.data.readers``: COCO, VOC, YOLO) returns a ``Dataset``; the checks,
training batches, writers and evaluation take one. Class names are matched with ``normalize_name``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import find_images

__all__ = ["Dataset", "load_dataset", "normalize_name"]


def normalize_name(name: str) -> str:
    """How class names are matched: case-, space-, '_' and '-'-insensitive ('Traffic light' = 'traffic_light')."""
    return "".join(ch for ch in str(name).lower() if ch not in " _-")


@dataclass
class Dataset:
    """A COCO-format detection set: the json and the folder its ``file_name``s are in (absolute
    file names, as ``detgraft.data.readers`` writes for VOC and YOLO, are taken as they are)."""

    coco: dict[str, Any]
    images: Path
    source: str = ""  # the file or folder the labels came from, for messages
    checked: bool = False  # by detgraft.data.check.check_dataset (what it returns)

    def path(self, image: dict[str, Any]) -> Path:
        return self.images / image["file_name"]

    @classmethod
    def from_folder(cls, images: str | Path) -> Dataset:
        """The image files of a folder, without labels (for ``drift``)."""
        files = find_images(images)
        if not files:
            raise FileNotFoundError(f"no image files in {str(images)!r}")
        coco = {
            "images": [{"id": i, "file_name": f.name} for i, f in enumerate(files, start=1)],
            "annotations": [],
            "categories": [],
        }
        return cls(coco, Path(images))


def load_dataset(annotations: str | Path, images: str | Path) -> Dataset:
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise FileNotFoundError(f"annotation file {str(annotations)!r} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {str(images)!r} does not exist")
    coco = json.loads(annotations.read_text())
    missing = {"images", "annotations", "categories"} - set(coco)
    if missing:
        raise ValueError(f"{str(annotations)!r} is not COCO detection json: it has no {sorted(missing)}")
    return Dataset(coco, images, source=str(annotations))
