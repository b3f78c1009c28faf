"""The user's labels as labelling tools export them: COCO json, Pascal VOC XML, YOLO txt.

Every reader returns detgraft's one form, a ``Dataset``: a COCO-format dict (``images``,
``annotations`` with ``bbox`` as ``[x, y, width, height]`` in pixels, ``categories`` with names)
and the folder its file names are relative to. ``read_dataset`` tells the format from the path:

- a ``.json`` file: COCO (images in ``images=``, else the json's ``images/`` folder, else its own);
- a folder with ``Annotations/`` (the VOC layout) or ``*.xml`` files, or a VOC ``ImageSets/Main/*.txt``
  split: Pascal VOC (classes in name order; ``difficult`` objects become ``iscrowd``: left out of
  training and of scoring);
- a folder with ``data.yaml``, a ``data.yaml`` itself, or a YOLO images folder (``.../images/...``,
  labels in the matching ``.../labels/...``): YOLO, class names from ``data.yaml`` (or
  ``classes.txt``), normalised ``class cx cy w h`` (a polygon's box for segmentation lines) turned
  into pixels with the upright image's size. A ``data.yaml`` is read by split: the caller's
  ``split`` (``train`` to train on, ``val`` to score), or the one named after a colon,
  ``data.yaml:test``; a split the yaml does not have is an error, never another split's images.

VOC ``difficult`` objects become ``iscrowd`` 1: left out of training, and scored as COCOeval scores
crowd regions, neither hit nor miss. Two small differences from VOC's own devkit: a detection's
overlap with such an object is its intersection over the detection's area (COCO's crowd rule, where
VOC takes intersection over union), and a detection is matched to an object that is not difficult
first when it overlaps both.

``combine`` joins several into one; ``choose_categories`` keeps and renames some (``--categories``).
The readers only read: what is wrong inside (a string where a
number belongs, a box outside its image, an id that is not there) is for ``detgraft.data.check``,
which names the file and the line or id. A file that cannot be parsed at all raises ``ValueError``
naming it.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from .check import check_dataset
from .dataset import Dataset, normalize_name
from .images import ImageError, image_size

log = logging.getLogger(__name__)

__all__ = ["choose_categories", "combine", "read_checked", "read_coco", "read_dataset", "read_voc", "read_yolo"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_dataset(path: str | Path, images: str | Path | None = None, split: str = "train") -> Dataset:
    """The dataset at ``path``; ``split`` chooses a YOLO ``data.yaml``'s split (``path:split`` overrides)."""
    path, split = _split_suffix(Path(path), split)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        return read_coco(path, images)
    if path.suffix.lower() in (".yaml", ".yml") or (path / "data.yaml").is_file():
        return read_yolo(path, split)
    if path.suffix.lower() == ".txt" and path.parent.name == "Main":
        return read_voc(path)
    if path.is_dir() and ((path / "Annotations").is_dir() or any(path.glob("*.xml"))):
        return read_voc(path)
    if path.is_dir() and ("images" in path.parts or (path / "labels").is_dir()):
        return read_yolo(path)
    raise ValueError(
        f"{str(path)!r} is not a dataset detgraft reads: give a COCO .json, a Pascal VOC folder (Annotations/ or "
        "*.xml files), or a YOLO folder (data.yaml, images/ and labels/)"
    )


def _split_suffix(path: Path, split: str) -> tuple[Path, str]:
    """``data.yaml:val`` -> (``data.yaml``, ``val``); any other path as it is."""
    head, colon, tail = str(path).rpartition(":")
    if colon and tail.isidentifier() and not path.exists() and Path(head).exists():
        return Path(head), tail
    return path, split


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None


def read_coco(path: str | Path, images: str | Path | None = None) -> Dataset:
    path = Path(path)
    try:
        coco = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); a cut-off export?"
        ) from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{str(path)!r} is not COCO detection json: it needs lists 'images' and 'annotations'")
    if not isinstance(coco.get("categories"), list):
        raise ValueError(f"{str(path)!r} is not COCO detection json: it needs a list 'categories' (id and name)")
    if images is None:
        images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {str(images)!r} does not exist")
    return Dataset(coco, images, source=str(path))


def read_voc(path: str | Path) -> Dataset:
    """A VOC root (``Annotations/``, ``JPEGImages/``), a split file ``ImageSets/Main/NAME.txt``, or a
    folder of XML files with their images beside them."""
    path = Path(path)
    if path.is_file():  # ImageSets/Main/split.txt
        root = path.parents[2]
        stems = [line.split()[0] for line in _read_text(path).splitlines() if line.strip()]
        files = [root / "Annotations" / f"{stem}.xml" for stem in stems]
    else:
        root = path
        folder = path / "Annotations" if (path / "Annotations").is_dir() else path
        files = sorted(folder.glob("*.xml"))
    image_folder = root / "JPEGImages" if (root / "JPEGImages").is_dir() else None
    coco: dict = {"images": [], "annotations": [], "categories": []}
    for image_id, xml in enumerate(files, start=1):
        if not xml.is_file():
            raise FileNotFoundError(f"{str(path)!r} lists {xml.stem!r}, but {str(xml)!r} does not exist")
        try:
            node = ET.parse(xml).getroot()
        except ET.ParseError as err:
            raise ValueError(f"{str(xml)!r} is not valid XML ({err}); a cut-off export?") from None
        file_name = (node.findtext("filename") or f"{xml.stem}.jpg").strip()
        located = (image_folder or xml.parent) / file_name
        if not located.is_file() and image_folder is None:
            located = root / file_name
        entry = {"id": image_id, "file_name": str(located.resolve()), "source": str(xml)}
        size = node.find("size")
        if size is not None:
            entry["width"], entry["height"] = _number(size.findtext("width")), _number(size.findtext("height"))
        coco["images"].append(entry)
        for k, obj in enumerate(node.iter("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            box = obj.find("bndbox")
            values = [_number(box.findtext(t)) if box is not None else None for t in ("xmin", "ymin", "xmax", "ymax")]
            if all(isinstance(v, float) for v in values):
                x0, y0, x1, y1 = values
                bbox = [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]  # 1-based inclusive pixels, as VOC counts
            else:
                bbox = values  # data_check names what is wrong
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": name,  # numbered below, in name order
                    "bbox": bbox,
                    "iscrowd": int(_number(obj.findtext("difficult")) == 1.0),
                    "source": f"{xml} object {k}",
                }
            )
    names = sorted({a["category_id"] for a in coco["annotations"]})
    for a in coco["annotations"]:
        a["category_id"] = names.index(a["category_id"]) + 1
    coco["categories"] = [{"id": k, "name": n} for k, n in enumerate(names, start=1)]
    return Dataset(coco, Path("/"), source=str(path))


def _number(text: str | None) -> float | str | None:
    """A float, or the text as it is (for data_check to name)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text.strip()


def read_yolo(path: str | Path, split: str = "train") -> Dataset:
    """A YOLO dataset: ``data.yaml`` (or its folder), its ``split`` (``train``, ``val``, ``test``),
    or an images folder (``split`` does not apply)."""
    path = Path(path)
    yaml_file = path if path.is_file() else path / "data.yaml"
    if yaml_file.is_file():
        spec = _read_yaml(yaml_file)
        names = _yolo_names(spec.get("names"), yaml_file)
        base = yaml_file.parent / str(spec.get("path", "") or "")
        entries = spec.get(split) or ("images" if split == "train" and (base / "images").is_dir() else None)
        if not entries:
            have = [k for k in ("train", "val", "test") if spec.get(k)] or ["none"]
            raise ValueError(
                f"{str(yaml_file)!r} has no {split!r} split (it has {', '.join(have)}): add "
                f"'{split}: images/{split}' to it, or choose a split after a colon: {yaml_file}:{have[0]}"
            )
        image_files = []
        for entry in entries if isinstance(entries, list) else [entries]:
            where = base / str(entry)
            if where.suffix == ".txt":
                image_files += [
                    (where.parent / line.strip()).resolve() for line in _read_text(where).splitlines() if line.strip()
                ]
            elif where.is_dir():
                image_files += _images_in(where)
            else:
                raise FileNotFoundError(f"{str(yaml_file)!r}: its {split} entry {str(where)!r} does not exist")
    else:
        names = _names_near(path)
        image_files = _images_in(path / "images" if (path / "images").is_dir() else path)
    coco: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }
    for image_id, image in enumerate(image_files, start=1):
        label_file = _label_file(image)
        entry = {"id": image_id, "file_name": str(image), "source": str(label_file)}
        coco["images"].append(entry)
        try:
            width, height = image_size(image)
        except ImageError:
            width = height = None  # data_check reports the image
        if width is not None:
            entry["width"], entry["height"] = width, height
        if not label_file.is_file():
            continue  # no label file: an image without objects, as YOLO counts it
        for line_number, line in enumerate(_read_text(label_file).splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_file}:{line_number}"
            annotation = {"id": len(coco["annotations"]) + 1, "image_id": image_id, "source": where}
            try:
                values = [float(v) for v in fields]
            except ValueError:
                values = None
            if values is None or len(values) < 5 or len(values) % 2 == 0 or not values[0].is_integer():
                annotation.update(category_id=None, bbox=line.strip())  # data_check: not a YOLO line
            else:
                annotation["category_id"] = int(values[0]) + 1
                xs, ys = values[1::2], values[2::2]
                if len(values) == 5:  # cx cy w h
                    cx, cy, w, h = values[1:]
                else:  # a segmentation polygon: its box
                    cx, cy, w, h = (
                        (min(xs) + max(xs)) / 2,
                        (min(ys) + max(ys)) / 2,
                        max(xs) - min(xs),
                        max(ys) - min(ys),
                    )
                scale_w, scale_h = (width, height) if width is not None else (float("nan"), float("nan"))
                annotation["bbox"] = [(cx - w / 2) * scale_w, (cy - h / 2) * scale_h, w * scale_w, h * scale_h]
            annotation["iscrowd"] = 0
            coco["annotations"].append(annotation)
    return Dataset(coco, Path("/"), source=f"{path}:{split}" if yaml_file.is_file() else str(path))


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        spec = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise ValueError(f"{str(path)!r} is not valid YAML ({err})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{str(path)!r} is not a YOLO data.yaml: it needs 'names' and 'train'")
    return spec


def _yolo_names(names, where: Path) -> list[str]:
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        return [str(names.get(k, f"class{k}")) for k in range(max(names) + 1)] if names else []
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ValueError(f"{str(where)!r}: 'names' must be a list of class names or a mapping index -> name")


def _names_near(folder: Path) -> list[str]:
    """Class names of a YOLO images folder: a data.yaml or classes.txt in it or up to 3 folders above."""
    for parent in [folder, *list(folder.parents)[:3]]:
        if (parent / "data.yaml").is_file():
            return _yolo_names(_read_yaml(parent / "data.yaml").get("names"), parent / "data.yaml")
        if (parent / "classes.txt").is_file():
            return [n.strip() for n in _read_text(parent / "classes.txt").splitlines() if n.strip()]
    raise FileNotFoundError(f"no data.yaml or classes.txt with the class names in or above {str(folder)!r}")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p.resolve() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _label_file(image: Path) -> Path:
    """YOLO's rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    if "images" in parts:
        k = len(parts) - 1 - parts[::-1].index("images")
        parts[k] = "labels"
    return Path(*parts).with_suffix(".txt")


def combine(datasets: list[Dataset]) -> Dataset:
    """One dataset of several: file names made absolute, ids renumbered, categories joined by
    ``normalize_name`` (the first spelling kept)."""
    if len(datasets) == 1:
        return datasets[0]
    coco: dict = {"images": [], "annotations": [], "categories": []}
    by_name: dict[str, int] = {}
    for data in datasets:
        category = {}
        for c in data.coco["categories"]:
            key = normalize_name(c.get("name", ""))
            if key not in by_name:
                by_name[key] = len(by_name) + 1
                coco["categories"].append({"id": by_name[key], "name": c.get("name")})
            category[c.get("id")] = by_name[key]
        image_ids = {}
        for im in data.coco["images"]:
            image_ids[im.get("id")] = len(coco["images"]) + 1
            coco["images"].append(
                {**im, "id": image_ids[im.get("id")], "file_name": str(data.path(im)), "source": data.source}
            )
        for a in data.coco["annotations"]:
            coco["annotations"].append(
                {
                    **a,
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_ids.get(a.get("image_id"), a.get("image_id")),
                    "category_id": category.get(a.get("category_id"), a.get("category_id")),
                }
            )
    return Dataset(coco, Path("/"), source=" + ".join(d.source for d in datasets))


def choose_categories(data: Dataset, spec: str) -> Dataset:
    """Only the categories ``spec`` names (``"hen=chicken,frog"``: comma-separated, ``name=new``
    renames; names matched by ``normalize_name``), the others' annotations left out (logged with
    their count). An unknown name is an error that lists the dataset's categories."""
    wanted = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, new = part.partition("=")
        wanted[normalize_name(name)] = new.strip()
    have = {normalize_name(c.get("name", "")): c for c in data.coco["categories"]}
    unknown = [n for n in wanted if n not in have]
    if unknown:
        names = ", ".join(repr(c.get("name")) for c in data.coco["categories"])
        raise ValueError(f"{data.source}: --categories names {unknown}, which it does not have; it has {names}")
    kept = {have[n]["id"]: new or have[n]["name"] for n, new in wanted.items()}  # unrenamed: the file's spelling
    dropped = [a for a in data.coco["annotations"] if a.get("category_id") not in kept]
    if dropped:
        others = sorted({str(c.get("name")) for c in data.coco["categories"] if c.get("id") not in kept})
        log.info("%s: %d boxes of categories not chosen left out (%s)", data.source, len(dropped), ", ".join(others))
    coco = {
        **data.coco,
        "categories": [{**c, "name": kept[c["id"]]} for c in data.coco["categories"] if c.get("id") in kept],
        "annotations": [a for a in data.coco["annotations"] if a.get("category_id") in kept],
    }
    return replace(data, coco=coco)


def read_checked(
    paths: list[str], images: str | None, skip_bad: bool, categories: str | None = None, split: str = "train"
):
    """The datasets at ``paths`` read (a YOLO data.yaml's ``split`` unless a path names one:
    ``data.yaml:test``), checked (a problem to fix raises ``DataError``), narrowed to ``categories``
    (``choose_categories``) and combined."""
    checked = []
    for path in paths:
        data, report = check_dataset(read_dataset(path, images, split), skip_bad=skip_bad)
        if categories:
            data = choose_categories(data, categories)
        counts = ", ".join(f"{k} {n}" for k, n in report.counts().items()) or "no problems"
        log.info("%s: %d images, %d boxes; %s", path, report.images, sum(report.boxes_per_class.values()), counts)
        checked.append(data)
    return combine(checked)
