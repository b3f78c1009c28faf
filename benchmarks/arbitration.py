"""How the arbitration was chosen, on val: its parts switched off one at a time.

    python benchmarks/arbitration.py --data $DATA --runs $RUNS    (after benchmarks/sizes.py)

Takes every model that ``benchmarks/sizes.py`` trained (three draws of 10, 30 and 50 images per
new class, and all images; default settings). One detection pass over ``val`` per model records
what the merge receives for each image (every source's detections and the base's features at
their boxes); the package's own ``detgraft.arbitration.arbitrate`` is then replayed on them with
each variant:

- merge off: the base's detections untouched; score only: the stronger claim wins (what an
  uncalibrated branch does);
- the default (an old detection under a confident new one, calibrated score >= 0.5, is lowered,
  its score halved, when its base feature is nearer to the new memory than to the old one and it
  scores no higher than the base's surest false alarm on the training images; new scores
  calibrated by the prototypes with alpha = n / (n + 7) for n labelled boxes; below 200 training
  images the memories include the mirror images), and the default without the false-alarm score
  (1.0), without the old memory (every contested old detection under that score lowered), with
  alpha 1.0 (no prototype calibration) or 0.5 for every class, with the lowering before
  ``LOWERED`` (the loser's score times 1 - the winner's), with new claims of any score lowering
  (before ``CLAIM_SCORE``), and calibrated without the mirror images (a copy of the model
  calibrated again on the training images alone; where there were none, the default).

Scores: old-class AP (x the base's on val), new-class AP, old-on-new (chicken/frog objects on
which an old class fires, score >= 0.5, IoU >= 0.5); a size's cell is the mean over its draws.
Writes the ``arbitration`` section of ``benchmarks/RESULTS.md`` and ``arbitration.json`` beside
this file.
"""

from __future__ import annotations

import argparse
import copy
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
from detgraft.training_data import TrainingSet  # noqa: E402

HERE = Path(__file__).parent
MODELS = {str(k): [f"k{k}-draw{d}" for d in range(3)] for k in (10, 30, 50)} | {"all": ["all"]}


def record(model, data) -> list:
    """What the merge (``detgraft.arbitration.merge``) receives for each image of ``data``, in image order."""
    seen = []
    original = branch.merge

    def spy(sources, branches, iou, features):
        seen.append((sources, features))
        return original(sources, branches, iou, features)

    branch.merge = spy
    try:
        detect(model, data)
    finally:
        branch.merge = original
    return seen


def _times_doubt(scores, lowers):
    """The lowering before ``LOWERED``: a lowered detection's score times 1 - each lowering score."""
    doubt = torch.log1p(-scores.clamp(max=1 - 1e-6))[None, :].expand_as(lowers)
    return scores * torch.where(lowers, doubt, torch.zeros_like(doubt)).sum(1).exp()


def replay(model, data, seen, variant: dict, unmirrored=None) -> dict:
    """Scores the detections ``arbitrate`` gives under ``variant`` (``unmirrored``: the model
    calibrated without mirror images)."""
    heads = model.roi_heads
    b = (unmirrored if variant.get("unmirrored") and unmirrored is not None else model).roi_heads.branches[0]
    fake = SimpleNamespace(
        first_label=b.first_label,
        prototypes=b.prototypes,
        new_memory=b.new_memory,
        old_memory=b.old_memory[:0] if variant.get("no_old_memory") else b.old_memory,
        false_alarm_score=variant.get("false_alarm_score", b.false_alarm_score),
        alpha=torch.full_like(b.alpha, variant["alpha"]) if "alpha" in variant else b.alpha,
    )
    detections = {}
    lowered, calibrated = arbitration._lowered, arbitration._calibrated
    if variant.get("times_doubt"):
        arbitration._lowered = _times_doubt
    if "claim" in variant:
        arbitration._calibrated = with_claim(calibrated, variant["claim"])
    try:
        for im, (sources, features) in zip(data.coco["images"], seen):
            iou = None if variant.get("off") else heads.merge_iou
            feats = None if variant.get("score_only") else features
            boxes, scores, labels = arbitration.arbitrate(sources, [fake], iou, feats)
            n = heads.detections_per_img
            detections[im["id"]] = {"boxes": boxes[:n], "scores": scores[:n], "labels": labels[:n]}
    finally:
        arbitration._lowered, arbitration._calibrated = lowered, calibrated
    ev = evaluate(model, data, detections=detections)
    return {
        "old_ap": round(ev.groups["old"]["ap"], 4),
        "new_ap": round(ev.groups["new"]["ap"], 4),
        "old_on_new": sum(c.count for c in ev.confusions if c.new_class in ("chicken", "frog")),
    }


VARIANTS = {
    "merge off": {"off": True},
    "score only (stronger claim wins)": {"score_only": True},
    "default": {},
    "lowered to score x (1 - the winner's score), not x 0.5": {"times_doubt": True},
    "new claims of any score lower (not only >= 0.5)": {"claim": 0.0},
    "calibrated without the mirror images": {"unmirrored": True},
    "no false-alarm score (1.0)": {"false_alarm_score": torch.tensor(1.0)},
    "no old memory": {"no_old_memory": True},
    "alpha 1.0 (no prototype calibration)": {"alpha": 1.0},
    "alpha 0.5": {"alpha": 0.5},
}


def with_claim(calibrated, claim: float):
    """``arbitration._calibrated`` at the claim score ``claim``, whatever the merge passes."""
    return lambda *args, **kwargs: calibrated(*args[:7], claim=claim)


def recalibrated(model, folder: Path):
    """A copy of ``model`` calibrated on its training images alone (no mirror images)."""
    settings = json.loads((folder / "settings.json").read_text())
    train = load_dataset(settings["train"], Path(settings["train"]).parent / "images")
    ids = {c["name"]: c["id"] for c in train.coco["categories"]}
    data = TrainingSet(train, {ids[name]: label for name, label in settings["mapping"].items()})
    plain = copy.deepcopy(model)
    arbitration.calibrate(plain, (data.example(i) for i in range(len(data))))
    return plain


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
    for size, folders in MODELS.items():
        results["models"][size] = {"learned": [], "rows": {name: [] for name in VARIANTS}}
        for folder in folders:
            print("val:", folder, flush=True)
            model = detgraft.load_model(args.runs / folder)
            seen = record(model, val)
            learned = json.loads((args.runs / folder / "extend.json").read_text())["arbitration"]
            results["models"][size]["learned"].append(learned)
            unmirrored = recalibrated(model, args.runs / folder) if learned.get("mirrored") else None
            for name, v in VARIANTS.items():
                results["models"][size]["rows"][name].append(replay(model, val, seen, v, unmirrored))
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
        "models of every size and draw, one detection pass over val each, `detgraft.arbitration.arbitrate` replayed "
        f"with each variant. Base on val: old-class AP {base_ap:.3f}, old classes fire on {base_on} chicken/frog "
        "objects. Cells: old AP x base / new AP / old-on-new, the mean over the draws (3 per few-data size).",
        "",
        "| variant | " + " | ".join(f"{s} per class" if s != "all" else "all" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in res["models"][sizes[0]]["rows"]:
        cells = []
        for s in sizes:
            runs = res["models"][s]["rows"][name]
            old = mean([r["old_ap"] for r in runs]) / base_ap
            new = mean([r["new_ap"] for r in runs])
            cells.append(f"{old:.4f} / {new:.3f} / {mean([r['old_on_new'] for r in runs]):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Learned on the training images, per draw: new boxes / the base's false alarms on them / old objects; "
        "the false-alarm score; the share of old objects nearer (leave-one-out) to the new memory, and of the new "
        "memory nearer to the old one:",
        "",
    ]
    for s in sizes:
        learned = "; ".join(
            f"{a['new_boxes']} / {a['false_alarms']} / {a['old_objects']}, {a['false_alarm_score']:.3f}, "
            f"{a['old_like_new']} / {a['new_like_old']}"
            for a in res["models"][s]["learned"]
        )
        lines.append(f"- {s}: {learned}")
    return "\n".join(lines)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
