"""A dataset written in another labelling tool's format: Pascal VOC XML or YOLO txt.

The inverse of ``detgraft.data.readers`` for what those formats hold (boxes and class names; VOC
``difficult`` for ``iscrowd``): reading what these write gives back the same images, boxes and
names. ``benchmarks/formats.py`` and the tests use them; users moving between tools can too.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from .dataset import Dataset

__all__ = ["write_voc", "write_yolo"]


def _by_image(data: Dataset) -> dict:
    annotations = {im["id"]: [] for im in data.coco["images"]}
    for a in data.coco["annotations"]:
        annotations[a["image_id"]].append(a)
    return annotations


def write_voc(data: Dataset, out: str | Path) -> Path:
    """``out/Annotations/*.xml`` and ``out/JPEGImages/`` (copies), the VOC layout."""
    out = Path(out)
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in data.coco["categories"]}
    annotations = _by_image(data)
    for im in data.coco["images"]:
        source = data.path(im)
        file_name = Path(im["file_name"]).name
        shutil.copyfile(source, out / "JPEGImages" / file_name)
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = file_name
        size = ET.SubElement(root, "size")
        for key in ("width", "height"):
            ET.SubElement(size, key).text = str(im[key])
        ET.SubElement(size, "depth").text = "3"
        for a in annotations[im["id"]]:
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[a["category_id"]]
            ET.SubElement(obj, "difficult").text = str(int(a.get("iscrowd", 0)))
            box = ET.SubElement(obj, "bndbox")
            x, y, w, h = a["bbox"]
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x + 1, y + 1, x + w, y + h)):
                ET.SubElement(box, key).text = repr(value)
        ET.ElementTree(root).write(out / "Annotations" / f"{Path(file_name).stem}.xml")
    return out


def write_yolo(data: Dataset, out: str | Path, split: str = "train") -> Path:
    """``out/data.yaml`` (names in category id order; ``split: images/SPLIT`` added to what it
    already lists, so that train and val can be written one after the other with the same
    categories), ``out/images/SPLIT/`` (copies) and ``out/labels/SPLIT/*.txt`` (``class cx cy w h``,
    normalised)."""
    import yaml

    out = Path(out)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    categories = sorted(data.coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(categories)}
    names = {k: c["name"] for k, c in enumerate(categories)}
    spec = yaml.safe_load((out / "data.yaml").read_text()) if (out / "data.yaml").is_file() else {"path": "."}
    if spec.get("names", names) != names:
        raise ValueError(f"{out / 'data.yaml'} names other classes ({spec['names']}) than this data ({names})")
    spec |= {split: f"images/{split}", "names": names}
    (out / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    annotations = _by_image(data)
    for im in data.coco["images"]:
        file_name = Path(im["file_name"]).name
        shutil.copyfile(data.path(im), out / "images" / split / file_name)
        lines = []
        for a in annotations[im["id"]]:
            x, y, w, h = a["bbox"]
            W, H = im["width"], im["height"]  # noqa: N806
            lines.append(f"{index[a['category_id']]} {(x + w / 2) / W!r} {(y + h / 2) / H!r} {w / W!r} {h / H!r}\n")
        (out / "labels" / split / f"{Path(file_name).stem}.txt").write_text("".join(lines))
    return out
