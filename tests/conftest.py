from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

sys.path.insert(0, str(Path(__file__).parent))

import tiny_model  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402

TINY_BUILDER = f"{Path(__file__).parent / 'tiny_model.py'}:build"


@pytest.fixture
def tiny():
    return tiny_model.build()


@pytest.fixture
def tiny_images():
    return tiny_model.images()


@torch.no_grad()
def detect(model, images):
    model.eval()
    return model([im.to(next(model.parameters()).device) for im in images])


@torch.no_grad()
def detect64(model, images):
    """Detections of a float64 copy of ``model``. A widened Linear is a differently shaped product
    than the original, and float32 products of different shapes round differently on different
    CPUs (AVX-512 and AVX2 GEMM kernels), by more than ``preserve`` moves a score; in float64 that
    noise is near 1e-15, so a comparison can check the exact-arithmetic promise itself. float32 ->
    float64 is exact, so the copy computes with the model's very weights."""
    return detect(copy.deepcopy(model).double(), [im.double() for im in images])


def preserve_rtol(num_new: int) -> float:
    """How far ``preserve`` may move an old score, relative, in exact arithmetic: num_new * e^-16."""
    return num_new * math.exp(-16) + 1e-12


def assert_same_detections(before, after, score_rtol=1e-6):
    """Same boxes and labels, scores equal within score_rtol (relative)."""
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b["labels"].shape[0] > 0, "no detections: the comparison would prove nothing"
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=score_rtol, atol=0)


def write_coco(tmp_path, name, categories, boxes_per_image, count=6):
    """``count`` noise images (64 px) with one box of each listed category, in a COCO json."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 100 + i, "name": n} for i, n in enumerate(categories)],
    }
    for i, image in enumerate(tiny_model.images(count, seed=7)):
        file = f"{name}_{i}.png"
        write_png((image * 255).byte(), str(folder / file))
        coco["images"].append({"id": i + 1, "file_name": file, "width": 64, "height": 64})
        for k, (cat, box) in enumerate(zip(coco["categories"], boxes_per_image)):
            coco["annotations"].append(
                {
                    "id": 10 * i + k + 1,
                    "image_id": i + 1,
                    "category_id": cat["id"],
                    "bbox": box,
                    "area": 1,
                    "iscrowd": 0,
                }
            )
    (tmp_path / f"{name}.json").write_text(json.dumps(coco))
    return load_dataset(tmp_path / f"{name}.json", folder)


def as_saved_by_detgraft_0_1(folder) -> None:
    """Rewrites the checkpoint in ``folder`` with the names detgraft 0.1 wrote: ``frozen_batchnorm``
    and ``batchnorm_frozen``, the branch layout's ``base_width``, ``kind: dense`` and
    ``num_classes`` (an R-CNN branch's counting its background, a dense branch's not)."""
    import json
    from pathlib import Path

    path = Path(folder) / "detgraft.json"
    meta = json.loads(path.read_text())
    meta["frozen_batchnorm"] = meta.pop("torchvision_frozen_batchnorm")
    meta["batchnorm_frozen"] = meta.pop("detgraft_frozen_batchnorm")
    layout = meta["branches"]
    if layout:
        layout["base_width"] = layout.pop("old_num_classes")
        dense = "others" not in layout["branches"][0]
        if dense:
            layout["kind"] = "dense"
        for branch in layout["branches"]:
            branch["num_classes"] = branch.pop("num_new") + (0 if dense else 1)
    path.write_text(json.dumps(meta, indent=1))
