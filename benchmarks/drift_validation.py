"""Does label-free ``drift`` rank models as labelled old-class AP does? (EmojiCOCO)

    python benchmarks/drift_validation.py --bench ../shared/bench --data /tmp/emojicoco

Makes models with graded forgetting from the EmojiCOCO base (widened for chicken/frog, then
fine-tuned on new_train with only the new labels, the forum user's recipe, for 0/10/40/120 steps,
and the predictor alone for 120 steps), scores each on val with labels (old-class AP) and without
(drift against the base's confident detections), and writes both rankings to
benchmarks/RESULTS.md (section drift-validation).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from ops_model import load_images  # noqa: E402

import detgraft  # noqa: E402
from detgraft.evaluate import Dataset, detect, drift, evaluate, load_dataset  # noqa: E402


def fine_tune(model, batches, steps: int, predictor_only: bool):
    model = copy.deepcopy(model).train()
    params = model.roi_heads.box_predictor.parameters() if predictor_only else model.parameters()
    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        images, targets = batches[step % len(batches)]
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    b = args.bench
    base = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    widened = detgraft.expand_predictor(copy.deepcopy(base), ["chicken", "frog"])
    train = load_images(args.data, "new_train", 240)
    batches = [([im for im, _ in train[i : i + 8]], [t for _, t in train[i : i + 8]]) for i in range(0, 240, 8)]
    start = time.perf_counter()
    models = {"widened, not trained": widened}
    for steps in (10, 40, 120):
        models[f"naive fine-tune, {steps} steps"] = fine_tune(widened, batches, steps, predictor_only=False)
    models["predictor only, 120 steps"] = fine_tune(widened, batches, 120, predictor_only=True)
    trained = time.perf_counter() - start

    val = load_dataset(args.data / "val.json", args.data / "images")
    # the same images with the labels removed: what a user without annotations has
    unlabelled = Dataset({"images": val.coco["images"], "annotations": [], "categories": []}, val.images)
    base_detections = detect(base, val)
    rows = []
    for name, model in models.items():
        detections = detect(model, val)
        labelled = evaluate(model, val, detections=detections).groups["old"]["ap"]
        d = drift(model, base, unlabelled, detections=detections, base_detections=base_detections)
        rows.append((name, labelled, d.ap, d.kept))
    by_label = [r[0] for r in sorted(rows, key=lambda r: -r[1])]
    by_drift = [r[0] for r in sorted(rows, key=lambda r: -r[2])]
    lines = [
        "## Drift ranks like labelled old-class AP (EmojiCOCO val)",
        "",
        "Command: `python benchmarks/drift_validation.py --bench ../shared/bench --data /tmp/emojicoco` "
        f"(training {trained:.0f} s on this machine)",
        "",
        "| model | old-class AP (labels) | drift AP (no labels) | base detections kept |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {a:.3f} | {d:.3f} | {k:.1%} |" for n, a, d, k in rows],
        "",
        f"Same order: **{by_label == by_drift}** (by labelled AP: {' > '.join(by_label)}).",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("drift-validation", table)


if __name__ == "__main__":
    main()
