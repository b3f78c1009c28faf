"""``detgraft demo``: the whole story offline, on shapes it draws itself.

1. draws a small detection set: circles, squares, triangles and bars (the base's classes) and, in
   the new-class images, stars and crosses among unlabelled base shapes;
2. trains a tiny torchvision FasterRCNN on the base shapes (cached in ``--cache``, built once);
3. adds 'star' and 'cross' with the default strategy and with ``naive``;
4. prints old- and new-class AP before and after for both, and writes report.html.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from . import demo_model
from .data.batches import TrainingSet
from .data.dataset import load_dataset
from .extend import extend
from .model.card import BACKGROUND, ModelCard
from .model.checkpoint import save_checkpoint
from .model.loading import load_model
from .settings import ExtendSettings
from .train import optimizer_and_schedule, train_loop

__all__ = ["DemoSize", "demo_base", "make_shapes", "run_demo"]

log = logging.getLogger(__name__)

BASE_SHAPES = demo_model.BASE_SHAPES
NEW_SHAPES = ("star", "cross")
SIZE = demo_model.SIZE


@dataclass
class DemoSize:
    base_images: int = 1000
    new_images: int = 300
    val_images: int = 200
    base_steps: int = 900
    extend_steps: int = 300

    @classmethod
    def quick(cls) -> DemoSize:
        return cls(base_images=24, new_images=16, val_images=12, base_steps=6, extend_steps=4)


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: list[float], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif kind == "bar":
        draw.rectangle([x0, cy - r / 3, x1, cy + r / 3], fill=color)
    elif kind == "star":
        points = [
            (
                cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(points, fill=color)
    elif kind == "cross":
        w = r / 3
        draw.rectangle([x0, cy - w, x1, cy + w], fill=color)
        draw.rectangle([cx - w, y0, cx + w, y1], fill=color)


def _tight(kind: str, box: list[float]) -> list[float]:
    x0, y0, x1, y1 = box
    if kind == "bar":
        r = (x1 - x0) / 2
        cy = (y0 + y1) / 2
        return [x0, cy - r / 3, x1, cy + r / 3]
    if kind == "star":
        cx, r = (x0 + x1) / 2, (x1 - x0) / 2
        return [
            cx - r * math.sin(2 * math.pi / 5),
            y0,
            cx + r * math.sin(2 * math.pi / 5),
            (y0 + y1) / 2 + r * math.cos(math.pi / 5),
        ]
    return box


def make_shapes(
    out: Path, split: str, count: int, kinds: tuple[str, ...], labelled: tuple[str, ...], seed: int
) -> Path:
    """Draws ``count`` images with 2-5 shapes of ``kinds`` each; writes ``out/split.json`` labelling
    only ``labelled`` kinds (COCO ids: position in BASE_SHAPES + NEW_SHAPES, from 1)."""
    rng = random.Random(seed)
    names = BASE_SHAPES + NEW_SHAPES
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": names.index(k) + 1, "name": k} for k in labelled]}
    for i in range(count):
        image = Image.new("RGB", (SIZE, SIZE), tuple(rng.randrange(0, 90) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        placed: list[list[float]] = []
        for _ in range(rng.randint(2, 5)):
            kind = rng.choice(kinds)
            for _ in range(20):  # a place that does not overlap the others much
                s = rng.uniform(16, 44)
                x, y = rng.uniform(0, SIZE - s), rng.uniform(0, SIZE - s)
                box = [x, y, x + s, y + s]
                if all(
                    min(b[2], box[2]) - max(b[0], box[0]) < 4 or min(b[3], box[3]) - max(b[1], box[1]) < 4
                    for b in placed
                ):
                    break
            placed.append(box)
            _draw(draw, kind, box, tuple(rng.randrange(120, 256) for _ in range(3)))
            if kind in labelled:
                x0, y0, x1, y1 = _tight(kind, box)
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": i + 1,
                        "category_id": names.index(kind) + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
        file = f"{split}/{split}_{i:04d}.jpg"
        image.save(out / "images" / file, quality=92)
        coco["images"].append({"id": i + 1, "file_name": file, "width": SIZE, "height": SIZE})
    path = out / f"{split}.json"
    path.write_text(json.dumps(coco))
    return path


def demo_base(out: Path, cache: Path, size: DemoSize) -> Path:
    """Trains the demo base (or reuses the cached one); returns its checkpoint folder."""
    folder = cache / f"base-{size.base_images}-{size.base_steps}"
    if (folder / "detgraft.json").is_file():
        log.info("using the cached demo base in %s", folder)
        return folder
    log.info("training the demo base detector on %d images (once; cached in %s)", size.base_images, folder)
    torch.manual_seed(0)
    model = demo_model.build_base()
    classes = [BACKGROUND, *BASE_SHAPES]

    model.detgraft_card = ModelCard(
        classes=classes, builder={"kind": "python", "file": demo_model.__file__, "function": "build_base",
                                  "kwargs": {}}, source="detgraft demo (shapes)")  # fmt: skip
    data = load_dataset(out / "base_train.json", out / "images")
    settings = ExtendSettings(strategy="naive", steps=size.base_steps, lr=0.02, warmup=50)
    optimizer, scheduler = optimizer_and_schedule(model, settings)
    train_loop(
        model,
        TrainingSet(data, {i + 1: i + 1 for i in range(len(BASE_SHAPES))}),
        settings,
        optimizer,
        scheduler,
        0,
        out,
    )
    save_checkpoint(model.eval(), folder)
    return folder


def run_demo(out: str | Path = "runs/demo", *, cache: str | Path | None = None, quick: bool = False) -> dict:
    """Runs the demo; returns the AP table it prints."""
    start = time.perf_counter()
    out = Path(out)
    cache = Path(cache) if cache else Path.home() / ".cache" / "detgraft" / "demo"
    size = DemoSize.quick() if quick else DemoSize()
    if not (out / "val.json").is_file() or quick:
        log.info("drawing the demo data in %s", out)
        make_shapes(out, "base_train", size.base_images, BASE_SHAPES, BASE_SHAPES, seed=1)
        make_shapes(out, "new_train", size.new_images, BASE_SHAPES + NEW_SHAPES * 2, NEW_SHAPES, seed=2)
        make_shapes(out, "val", size.val_images, BASE_SHAPES + NEW_SHAPES, BASE_SHAPES + NEW_SHAPES, seed=3)
    base_folder = demo_base(out, cache, size)
    train = load_dataset(out / "new_train.json", out / "images")
    val = load_dataset(out / "val.json", out / "images")
    table: dict[str, dict[str, float]] = {}
    for strategy in (ExtendSettings().strategy, "naive"):
        settings = ExtendSettings(strategy=strategy, steps=size.extend_steps, warmup=min(50, size.extend_steps))
        extend(load_model(base_folder), train, settings, out=out / strategy, val=val)
        report = json.loads((out / strategy / "eval.json").read_text())  # extend scored the base on val too
        table.setdefault("base", _ap(report["base"]["groups"]))
        table[strategy] = _ap(report["groups"])
    _print(table, out, time.perf_counter() - start)
    (out / "demo.json").write_text(json.dumps(table, indent=1))
    return table


def _ap(groups: dict[str, dict[str, float]]) -> dict[str, float]:
    return {g: v["ap"] for g, v in groups.items()}


def _print(table: dict, out: Path, seconds: float) -> None:
    t = Table(title="detgraft demo: adding 'star' and 'cross' to a detector of circles, squares, triangles, bars")
    for column in ("model", "old-class AP", "new-class AP"):
        t.add_column(column, justify="right")
    for name, groups in table.items():
        t.add_row(name, f"{groups.get('old', 0):.3f}", f"{groups['new']:.3f}" if "new" in groups else "-")
    console = Console()
    console.print(t)
    default = ExtendSettings().strategy
    console.print(f"report: {out / default / 'report.html'} (and {out / 'naive' / 'report.html'}); {seconds:.0f} s")
