"""What each added group of classes costs at inference on torchvision's ResNet-50 FPN Faster R-CNN
(issue 30): latency, parameters and checkpoint size after 1 to 5 ``branch`` steps, the branch's box
head compressed to rank ``--rank`` (``incremental(..., branch_rank=)``, the default) against the
full copy of the box head (``branch_rank=0``, the branch before issue 30).

    python benchmarks/steps.py --bench ../shared/bench --data $DATA --runs $RUNS

The base: ``fasterrcnn_resnet50_fpn`` with ``box_score_thresh=0`` (100 detections of each source
reach the merge), its seeded random weights scaled as ``benchmarks/kept.py`` scales them (COCO's
cannot be downloaded here). Each step adds two classes: ``expand_predictor``, ``incremental(model,
"branch")``, ``TRAIN_STEPS`` SGD steps of 2 images on EmojiCOCO chicken/frog images (their labels
as the step's classes: latency does not depend on how well a branch learned), ``calibrate`` on 4
of them, ``save_checkpoint``. Latency: the base and the ten models detect ``IMAGES`` EmojiCOCO
test images resized to 800x1066, ``ROUNDS`` passes, each image by every model in turn (the order
rotating), after a warm-up; median seconds per image, each model's over the base's. Writes the
``steps`` section of RESULTS.md and ``steps`` in results.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from kept import r50_weights  # noqa: E402
from sizes import STEP1  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.batches import TrainingSet  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.data.images import load_image  # noqa: E402

HERE = Path(__file__).parent
STEPS, TRAIN_STEPS, IMAGES, ROUNDS = 5, 2, 8, 2
SIZE = (800, 1066)


def examples(data: Path, first_label: int, n: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """The first ``n`` new_train images with chicken or frog boxes, those as labels ``first_label`` and the next."""
    train = load_dataset(data / "new_train.json", data / "images")
    label_of = {c["id"]: first_label + (c["name"] == "frog") for c in train.coco["categories"] if c["name"] in STEP1}
    images = TrainingSet(train, label_of)
    pairs = list(itertools.islice((p for p in map(images.example, range(len(images))) if len(p[1]["labels"])), n))
    if len(pairs) < n:
        raise ValueError(f"new_train has fewer than {n} images with chicken or frog")
    return pairs


def add_step(model, k: int, rank: int, data: Path, folder: Path) -> dict:
    """Step ``k``: two classes added, trained a little, calibrated, saved; its branch's size."""
    first = model.roi_heads.box_predictor.cls_score.out_features
    detgraft.expand_predictor(model, [f"step{k}_a", f"step{k}_b"])
    detgraft.incremental(model, "branch", branch_rank=rank)
    pairs = examples(data, first)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    for s in range(TRAIN_STEPS):
        batch = pairs[2 * s % len(pairs) :][:2]
        loss = sum(model([i for i, _ in batch], [t for _, t in batch]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    detgraft.calibrate(model, pairs)
    detgraft.save_checkpoint(model, folder, builder="fasterrcnn_resnet50_fpn")
    branch = model.roi_heads.branches[-1]
    return {
        "branch_parameters": sum(p.numel() for p in branch.parameters()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": round((folder / "model.safetensors").stat().st_size / 1e6, 2),
    }


@torch.no_grad()
def latencies(models: dict, pictures: list[torch.Tensor]) -> dict[str, float]:
    """Median seconds per image of each model, every image run by each model in turn, the order
    rotating by one from image to image."""
    names = list(models)
    for im in pictures[:2]:
        for m in models.values():
            m([im])
    times = {n: [] for n in names}
    for k in range(ROUNDS * len(pictures)):
        im = pictures[k % len(pictures)]
        for n in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            models[n]([im])
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    parser.add_argument("--rank", type=int, default=detgraft.ExtendSettings.branch_rank)
    parser.add_argument("--from-results", action="store_true", help="only write RESULTS.md's section from results.json")
    args = parser.parse_args()
    if args.from_results:
        return write_section("steps", table(json.loads((HERE / "results.json").read_text())["steps"]))
    args.data, args.runs = args.data.resolve(), args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)
    base = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0
    ).eval()
    base.load_state_dict(load_file(str(r50_weights(args.runs, args.data))))
    models, rows = {"base": base}, {}
    for name, rank in (("low_rank", args.rank), ("full_copy", 0)):
        model = copy.deepcopy(base)
        rows[name] = []
        for k in range(1, STEPS + 1):
            torch.manual_seed(k)
            rows[name].append(add_step(model, k, rank, args.data, args.runs / f"steps-{name}-{k}"))
            models[f"{name}_{k}"] = copy.deepcopy(model).eval()
            print(name, k, rows[name][-1], flush=True)
    test = load_dataset(args.data / "test.json", args.data / "images")
    pictures = [
        F.interpolate((load_image(test.path(im)).float() / 255)[None], size=SIZE, mode="bilinear")[0]
        for im in test.coco["images"][:IMAGES]
    ]
    seconds = latencies(models, pictures)
    for name in rows:
        for k, row in enumerate(rows[name], 1):
            row["latency_x_base"] = round(seconds[f"{name}_{k}"] / seconds["base"], 4)
    results = json.loads((HERE / "results.json").read_text())
    results["steps"] = {
        "rank": args.rank,
        "base_seconds_per_image": round(seconds["base"], 3),
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "rows": rows,
        "command": f"python benchmarks/steps.py --bench ../shared/bench --data $DATA --runs $RUNS --rank {args.rank}",
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("steps", table(results["steps"]))
    print(table(results["steps"]))


def table(s: dict) -> str:
    lines = [
        "## steps: what each added group of classes costs (issue 30)",
        "",
        f"torchvision's `fasterrcnn_resnet50_fpn` (seeded random weights scaled as `benchmarks/kept.py` does, "
        f"`box_score_thresh=0`), 800x1066 images, CPU; each step adds two classes, trains {TRAIN_STEPS} steps and "
        f"is calibrated. Base: {s['base_seconds_per_image']} s per image, {s['base_parameters'] / 1e6:.1f}M "
        "parameters. Latency ratios from one run (each image by every model in turn).",
        "",
        f"| steps | rank {s['rank']}: latency x base | parameters per step | checkpoint MB (+ this step) | full copy: "
        "latency x base | parameters per step | checkpoint MB (+ this step) |",
        "|---|---|---|---|---|---|---|",
    ]

    def grown(rows: list[dict], k: int) -> str:
        return f"{rows[k]['checkpoint_mb']}" + (
            f" (+{rows[k]['checkpoint_mb'] - rows[k - 1]['checkpoint_mb']:.2f})" if k else ""
        )

    low, full = s["rows"]["low_rank"], s["rows"]["full_copy"]
    for k, (a, b) in enumerate(zip(low, full)):
        lines.append(
            f"| {k + 1} | {a['latency_x_base']:.3f} | {a['branch_parameters'] / 1e6:.3f}M | {grown(low, k)} | "
            f"{b['latency_x_base']:.3f} | {b['branch_parameters'] / 1e6:.2f}M | {grown(full, k)} |"
        )
    lines += ["", f"Command: `{s['command']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
