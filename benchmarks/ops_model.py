"""A whole detector with detgraft's ops against the same detector with torchvision's.

    python benchmarks/ops_model.py --bench ../shared/bench --data /tmp/emojicoco [--images 50]

Loads the EmojiCOCO base through the builder path, widens it for chicken and frog, runs
``--images`` test images with and without ``detgraft.ops.use_rust_ops`` and one training step on
8 ``new_train`` images, and writes the differences and timings to benchmarks/RESULTS.md (section ops-model).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torchvision.io import decode_image

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402
from detgraft import ops  # noqa: E402


def load_images(data: Path, split: str, count: int):
    coco = json.loads((data / f"{split}.json").read_text())
    by_image = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(a)
    items = []
    for im in coco["images"][:count]:
        image = decode_image(str(data / "images" / im["file_name"])).float() / 255
        anns = by_image[im["id"]]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        ).reshape(-1, 4)
        items.append((image, {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns])}))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    b = args.bench
    base = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    detgraft.expand_predictor(base, ["chicken", "frog"])  # new_train labels 91 and 92
    rust = ops.use_rust_ops(copy.deepcopy(base))

    images = [im for im, _ in load_images(args.data, "test", args.images)]
    timings = {}
    outputs = {}
    with torch.no_grad():
        for name, model in (("torchvision", base), ("detgraft", rust), ("torchvision ", base), ("detgraft ", rust)):
            start = time.perf_counter()
            outputs[name.strip()] = [model([im])[0] for im in images]
            timings.setdefault(name.strip(), []).append(time.perf_counter() - start)
    pairs = list(zip(outputs["torchvision"], outputs["detgraft"]))
    same_labels = all(torch.equal(a["labels"], r["labels"]) for a, r in pairs)
    box_diff = max(
        ((a["boxes"] - r["boxes"]).abs().max().item() if len(a["boxes"]) else 0.0)
        for a, r in zip(outputs["torchvision"], outputs["detgraft"])
    )
    score_diff = max(
        ((a["scores"] - r["scores"]).abs().max().item() if len(a["scores"]) else 0.0)
        for a, r in zip(outputs["torchvision"], outputs["detgraft"])
    )
    detections = sum(len(a["labels"]) for a in outputs["torchvision"])

    batch = load_images(args.data, "new_train", 8)
    losses = {}
    for name, model in (("torchvision", base), ("detgraft", rust)):
        model.train()
        torch.manual_seed(0)
        losses[name] = {k: v.item() for k, v in model([im for im, _ in batch], [t for _, t in batch]).items()}
    loss_diff = max(
        abs(losses["torchvision"][k] - losses["detgraft"][k]) / abs(losses["torchvision"][k])
        for k in losses["torchvision"]
    )

    t_tv, t_dg = min(timings["torchvision"]), min(timings["detgraft"])
    table = "\n".join(
        [
            "## Ops in a whole model (EmojiCOCO base, CPU)",
            "",
            "Command: `python benchmarks/ops_model.py --bench ../shared/bench --data /tmp/emojicoco "
            f"--images {args.images}`",
            "",
            "| check | result |",
            "|---|---|",
            f"| detections on {args.images} test images ({detections} in all) | labels identical: {same_labels}; "
            f"max box difference {box_diff:.1e} px; max score difference {score_diff:.1e} |",
            f"| one training step, 8 new_train images | largest relative loss difference {loss_diff:.1e} "
            f"({', '.join(f'{k} {v:.4f}' for k, v in losses['detgraft'].items())}) |",
            f"| inference time, {args.images} images one by one (best of 2) | torchvision ops {t_tv:.2f} s, "
            f"detgraft ops {t_dg:.2f} s, ratio {t_dg / t_tv:.2f} |",
        ]
    )
    print(table)
    if not args.no_write:
        write_section("ops-model", table)


if __name__ == "__main__":
    main()
