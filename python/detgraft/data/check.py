"""A dataset checked before anything else: every problem named, handled one fixed way, counted.

``check_dataset`` reads every image file whole and every annotation once, and returns the
dataset as training and scoring will see it plus a ``DataReport``. What happens to each problem:

- image file missing, truncated or not an image: an error; with ``skip_bad`` the image and its
  boxes are left out (counted);
- an id used twice (image, annotation, category), an annotation of an image or category id that is
  not there, an image or category entry without its id / file name / name: an error naming them;
- a box partly outside its image: clipped to the image;
- a box of zero area, inverted, outside its image, non-finite or not 4 numbers: dropped;
- an image without boxes: kept, a negative example;
- width / height in the labels that are not the file's (upright) size: the file's size is used.

Nothing is dropped without being counted. ``detgraft data check`` prints the report (a table, or
JSON); ``detgraft extend`` and ``detgraft eval`` run the check before loading the model.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from ..progress import track
from .dataset import Dataset
from .images import ImageError, image_size

__all__ = ["DataError", "DataReport", "Problem", "check_dataset"]

# kind -> (what happens, what to do about it)
KINDS = {
    "missing_image": ("error, or skipped with --skip-bad", "put the file in the image folder, or fix its file_name"),
    "unreadable_image": ("error, or skipped with --skip-bad", "re-export it: it is cut off or not an image"),
    "duplicate_id": ("error", "give every image, annotation and category its own id"),
    "unknown_image_id": ("error", "the annotation's image_id must be the id of an entry in 'images'"),
    "unknown_category": ("error", "add the category to 'categories', or remove its annotations"),
    "bad_entry": ("error", "every image needs an id and a file_name, every category an id and a name"),
    "not_a_box": ("dropped", "a box is 4 numbers: COCO [x, y, width, height], YOLO 'class cx cy w h'"),
    "non_finite_box": ("dropped", "the labelling tool wrote NaN or infinity: redraw the box"),
    "empty_box": ("dropped", "a box of zero area, inverted or outside its image: redraw it"),
    "clipped_box": ("clipped to the image", ""),
    "size_corrected": ("the file's size is used", ""),
    "skipped_image": ("left out (--skip-bad)", ""),
    "no_boxes": ("kept as a negative example", ""),
}
ERRORS = ("missing_image", "unreadable_image", "duplicate_id", "unknown_image_id", "unknown_category", "bad_entry")


@dataclass
class Problem:
    kind: str  # a key of KINDS
    where: str  # the file, and the line, object or id in it
    detail: str


@dataclass
class DataReport:
    source: str
    images: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    image_sizes: dict[str, list[int]] = field(default_factory=dict)  # width / height: min, median, max
    box_sizes: list[float] = field(default_factory=list)  # sqrt(area) in pixels: min, median, max
    problems: list[Problem] = field(default_factory=list)
    skip_bad: bool = False

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def errors(self) -> list[Problem]:
        errors = ERRORS[2:] if self.skip_bad else ERRORS
        return [p for p in self.problems if p.kind in errors]

    def to_json(self) -> dict:
        return asdict(self) | {"counts": self.counts(), "errors": len(self.errors())}

    def summary(self, limit: int = 10) -> str:
        """The errors (at most ``limit``), each with what to do, and the counts."""
        lines = [f"{self.source}: {len(self.errors())} problem(s) to fix before training or scoring:"]
        for p in self.errors()[:limit]:
            lines.append(f"  {p.where}: {p.detail} ({KINDS[p.kind][1]})")
        if len(self.errors()) > limit:
            lines.append(f"  ... and {len(self.errors()) - limit} more: detgraft data check {self.source} lists all")
        if any(p.kind in ("missing_image", "unreadable_image") for p in self.errors()):
            lines.append("  (--skip-bad leaves out images that cannot be read, and counts them)")
        return "\n".join(lines)

    def table(self):
        """The report as rich renderables: what is there, then every kind of problem with its count."""
        from rich.table import Table

        overview = Table(title=f"{self.source}: {self.images} images")
        overview.add_column("class")
        overview.add_column("boxes", justify="right")
        for name, n in sorted(self.boxes_per_class.items(), key=lambda kv: -kv[1]):
            overview.add_row(name, str(n))
        for key, (low, mid, high) in self.image_sizes.items():
            overview.add_row(f"image {key} (min/median/max px)", f"{low}/{mid}/{high}")
        if self.box_sizes:
            overview.add_row("box side, sqrt of area (min/median/max px)", "/".join(f"{v:.0f}" for v in self.box_sizes))
        problems = Table(title="problems")
        for column in ("problem", "count", "what happens", "first one"):
            problems.add_column(column)
        counts = self.counts()
        for kind, n in counts.items():
            first = next(p for p in self.problems if p.kind == kind)
            problems.add_row(kind, str(n), KINDS[kind][0], f"{first.where}: {first.detail}")
        if not counts:
            problems.add_row("none", "0", "", "")
        return overview, problems


class DataError(ValueError):
    """A dataset with problems that stop training and scoring; ``report`` has them all."""

    def __init__(self, report: DataReport) -> None:
        super().__init__(report.summary())
        self.report = report


def check_dataset(data: Dataset, skip_bad: bool = False, raise_errors: bool = True) -> tuple[Dataset, DataReport]:
    """``data`` as training and scoring will see it (see the module doc), and the report. Raises
    ``DataError`` when there is a problem to fix (unless ``raise_errors`` is False)."""

    report = DataReport(source=data.source or str(data.images), skip_bad=skip_bad)
    coco = data.coco
    problem = report.problems.append

    def where(entry: dict, what: str) -> str:
        return str(entry.get("source") or f"{report.source} {what} {entry.get('id')!r}")

    categories = {}
    for c in coco["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            problem(Problem("bad_entry", report.source, f"category entry {c!r} needs an int id and a name"))
        elif c["id"] in categories:
            problem(Problem("duplicate_id", report.source, f"category id {c['id']} is used twice"))
        else:
            categories[c["id"]] = c["name"]
    images, sizes = {}, {}
    for im in track(coco["images"], description="checking images", transient=True, disable=len(coco["images"]) < 200):
        if (
            not isinstance(im, dict)
            or not isinstance(im.get("id"), (int, str))
            or not isinstance(im.get("file_name"), str)
        ):
            problem(Problem("bad_entry", report.source, f"image entry {str(im)[:80]} needs an id and a file_name"))
            continue
        if im["id"] in images:
            problem(Problem("duplicate_id", report.source, f"image id {im['id']!r} is used twice"))
            continue
        images[im["id"]] = im
        path = data.path(im)
        if not path.is_file():
            problem(Problem("missing_image", str(path), f"image {im['id']!r}: the file does not exist"))
            continue
        try:
            sizes[im["id"]] = image_size(path, decode=True)
        except ImageError as err:
            problem(Problem("unreadable_image", str(path), f"image {im['id']!r}: {str(err).split(' (', 1)[-1][:-1]}"))
            continue
        width, height = sizes[im["id"]]
        if (im.get("width"), im.get("height")) not in ((width, height), (None, None)):
            problem(
                Problem(
                    "size_corrected",
                    where(im, "image"),
                    f"labels say {im.get('width')}x{im.get('height')}, the upright file is {width}x{height}",
                )
            )
    annotations, seen, boxes_of = [], set(), Counter()
    for a in coco["annotations"]:
        if not isinstance(a, dict):
            problem(Problem("not_a_box", report.source, f"annotation {str(a)[:60]} is not an object"))
            continue
        here = where(a, "annotation")
        if _hashable(a.get("id")) and a.get("id") is not None and a["id"] in seen:
            problem(Problem("duplicate_id", here, f"annotation id {a['id']!r} is used twice"))
            continue
        seen.add(a.get("id") if _hashable(a.get("id")) else None)
        if not _hashable(a.get("image_id")) or a.get("image_id") not in images:
            problem(Problem("unknown_image_id", here, f"image_id {a.get('image_id')!r} is not in the images"))
            continue
        if not _hashable(a.get("category_id")) or a.get("category_id") not in categories:
            kind = "not_a_box" if a.get("category_id") is None else "unknown_category"
            problem(Problem(kind, here, f"category {a.get('category_id')!r} is not in the categories: {a.get('bbox')}"))
            continue
        if a["image_id"] not in sizes:
            continue  # its image is reported (and skipped, with skip_bad)
        box = _box(a.get("bbox"), sizes[a["image_id"]], here, problem)
        if box is None:
            continue
        annotations.append({**a, "bbox": box})
        if not a.get("iscrowd", 0):
            boxes_of[categories[a["category_id"]]] += 1
    with_boxes = {a["image_id"] for a in annotations if not a.get("iscrowd", 0)}
    kept_images = []
    for image_id, im in images.items():
        if image_id not in sizes:
            if skip_bad:
                problem(Problem("skipped_image", str(data.path(im)), f"image {image_id!r} left out with its boxes"))
            continue
        if image_id not in with_boxes:
            problem(Problem("no_boxes", where(im, "image"), f"image {image_id!r} has no box"))
        width, height = sizes[image_id]
        kept_images.append({**im, "width": width, "height": height})
    report.images = len(kept_images)
    report.boxes_per_class = {name: boxes_of[name] for name in categories.values()}
    if kept_images:
        for key in ("width", "height"):
            values = sorted(im[key] for im in kept_images)
            report.image_sizes[key] = [values[0], int(statistics.median(values)), values[-1]]
    sides = sorted(math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in annotations)
    if sides:
        report.box_sizes = [round(sides[0], 1), round(statistics.median(sides), 1), round(sides[-1], 1)]
    if raise_errors and report.errors():
        raise DataError(report)
    cleaned = {**coco, "images": kept_images, "annotations": annotations}
    return replace(data, coco=cleaned, checked=True), report


def _box(bbox, size: tuple[int, int], here: str, problem) -> list[float] | None:
    """The COCO box clipped to the image, or None (dropped, with the problem recorded)."""
    numbers = isinstance(bbox, (list, tuple)) and len(bbox) == 4
    if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        problem(Problem("not_a_box", here, f"bbox {bbox!r} is not 4 numbers"))
        return None
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        problem(Problem("non_finite_box", here, f"bbox {list(bbox)}"))
        return None
    if w <= 0 or h <= 0:
        problem(Problem("empty_box", here, f"bbox {list(bbox)} has width or height <= 0"))
        return None
    width, height = size
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        problem(Problem("empty_box", here, f"bbox {list(bbox)} lies outside the {width}x{height} image"))
        return None
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return [x, y, w, h]
    problem(Problem("clipped_box", here, f"bbox {list(bbox)} clipped to the {width}x{height} image"))
    return [x0, y0, x1 - x0, y1 - y0]


def _hashable(value) -> bool:
    return isinstance(value, (int, str, float, type(None))) and not isinstance(value, bool)
