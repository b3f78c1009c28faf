"""How the arbitration was chosen, on val: its parts switched off one at a time.

    python benchmarks/arbitration.py --data $DATA --runs $RUNS    (after benchmarks/sizes.py)

Takes draw 0 of each size that ``benchmarks/sizes.py`` trained (10, 30, 50 and all images per new
class, default settings). One detection pass over ``val`` per model records what the merge
receives for each image (every source's detections and the base's features at their boxes); the
package's own ``detgraft.arbitration.arbitrate`` is then replayed on them with each variant:

- merge off: the base's detections untouched; score only: the stronger claim wins (the merge
  before this arbitration, and what an uncalibrated branch does);
- the default (prototype calibration with alpha = n / (n + 7) for n labelled boxes of the class,
  ``look_alike`` and ``at_least`` learned from the training images), and the default with alpha
  1.0 (no prototype calibration), 0.7 or 0.5 for every class, without the ``at_least`` gate,
  without ``look_alike``, or with ``look_alike`` raised by 0.01 / 0.02.

Scores: old-class AP (x the base's on val), new-class AP, old-on-new (chicken/frog objects on
which an old class fires, score >= 0.5, IoU >= 0.5). Writes the ``arbitration`` section of
``benchmarks/RESULTS.md`` and ``arbitration.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402
from detgraft import arbitration, branch  # noqa: E402
from detgraft.evaluate import detect, evaluate, load_dataset  # noqa: E402

HERE = Path(__file__).parent
MODELS = {"10": "k10-draw0", "30": "k30-draw0", "50": "k50-draw0", "all": "all"}


def record(model, data) -> list:
    """What ``arbitrate`` receives for each image of ``data``, in image order."""
    seen = []
    original = branch.arbitrate

    def spy(sources, branches, iou, features):
        seen.append((sources, features))
        return original(sources, branches, iou, features)

    branch.arbitrate = spy
    try:
        detect(model, data)
    finally:
        branch.arbitrate = original
    return seen


def replay(model, data, seen, variant: dict) -> dict:
    """Scores the detections ``arbitrate`` gives under ``variant``."""
    heads = model.roi_heads
    b = heads.branches[0]
    fake = SimpleNamespace(
        first_label=b.first_label,
        prototypes=b.prototypes,
        at_least=variant.get("at_least", b.at_least),
        look_alike=variant.get("look_alike", b.look_alike),
        alpha=torch.full_like(b.alpha, variant["alpha"]) if "alpha" in variant else b.alpha,
    )
    detections = {}
    for im, (sources, features) in zip(data.coco["images"], seen):
        iou = None if variant.get("off") else heads.merge_iou
        feats = None if variant.get("score_only") else features
        boxes, scores, labels = arbitration.arbitrate(sources, [fake], iou, feats)
        n = heads.detections_per_img
        detections[im["id"]] = {"boxes": boxes[:n], "scores": scores[:n], "labels": labels[:n]}
    ev = evaluate(model, data, detections=detections)
    return {
        "old_ap": round(ev.groups["old"]["ap"], 4),
        "new_ap": round(ev.groups["new"]["ap"], 4),
        "old_on_new": sum(c.count for c in ev.confusions if c.new_class in ("chicken", "frog")),
    }


def variants(b) -> dict[str, dict]:
    return {
        "merge off": {"off": True},
        "score only (stronger claim wins)": {"score_only": True},
        "default": {},
        "alpha 1.0 (no prototype calibration)": {"alpha": 1.0},
        "alpha 0.7": {"alpha": 0.7},
        "alpha 0.5": {"alpha": 0.5},
        "no at_least gate": {"at_least": torch.tensor(-1.0)},
        "no look_alike": {"look_alike": torch.tensor(2.0)},
        "look_alike + 0.01": {"look_alike": b.look_alike + 0.01},
        "look_alike + 0.02": {"look_alike": b.look_alike + 0.02},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    args = parser.parse_args()
    val = load_dataset(args.data / "val.json", args.data / "images")
    b = args.bench
    base = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    base_eval = evaluate(base, val, detections=detect(base, val))
    results = {
        "base_old_ap": round(base_eval.groups["old"]["ap"], 4),
        "base_old_on_new": sum(c.count for c in base_eval.confusions if c.new_class in ("chicken", "frog")),
        "models": {},
    }
    for size, folder in MODELS.items():
        print("val:", size, flush=True)
        model = detgraft.load_model(args.runs / folder)
        seen = record(model, val)
        learned = json.loads((args.runs / folder / "extend.json").read_text())["arbitration"]
        rows = {name: replay(model, val, seen, v) for name, v in variants(model.roi_heads.branches[0]).items()}
        results["models"][size] = {"learned": learned, "rows": rows}
    (HERE / "arbitration.json").write_text(json.dumps(results, indent=1))
    write_section("arbitration", table(results))
    print(table(results))


def table(res: dict) -> str:
    base_ap, base_on = res["base_old_ap"], res["base_old_on_new"]
    sizes = list(res["models"])
    lines = [
        "## How the arbitration was chosen (val)",
        "",
        "Command: `python benchmarks/arbitration.py --data $DATA --runs $RUNS` (after `benchmarks/sizes.py`): the "
        "draw-0 model of each size, one detection pass over val, `detgraft.arbitration.arbitrate` replayed with each "
        f"variant. Base on val: old-class AP {base_ap:.3f}, old classes fire on {base_on} chicken/frog objects. "
        "Cells: old AP x base / new AP / old-on-new.",
        "",
        "| variant | " + " | ".join(f"{s} per class" if s != "all" else "all" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in res["models"][sizes[0]]["rows"]:
        cells = []
        for s in sizes:
            r = res["models"][s]["rows"][name]
            cells.append(f"{r['old_ap'] / base_ap:.3f} / {r['new_ap']:.3f} / {r['old_on_new']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Learned on the training images (look_alike / at_least; new and old objects seen):", ""]
    for s in sizes:
        a = res["models"][s]["learned"]
        lines.append(
            f"- {s}: {a['look_alike']:.3f} / {a['at_least']:.3f}; alpha {a['alpha']}; {a['new_boxes']} new, "
            f"{a['old_objects']} old; "
            f"similarity quantiles 5-100% new {a['new_similarity']}, old {a['old_similarity']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
