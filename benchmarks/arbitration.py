"""How the arbitration was chosen, on val: its parts switched off one at a time.

    python benchmarks/arbitration.py --data $DATA --runs $RUNS [--val2 $VAL2/val.json] [--missing-only]
    (after benchmarks/sizes.py)

Takes every model that ``benchmarks/sizes.py`` trained (three draws of 10, 30 and 50 images per
new class, and all images; default settings). One detection pass over ``val`` per model records
what the merge receives for each image (every source's detections and the base's features at
their boxes); the package's own ``detgraft.heads.merge.arbitrate`` is then replayed on them with
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
  (before ``CLAIM_SCORE``) or only from 0.7 or 0.8, and calibrated without the mirror images (a
  copy of the model calibrated again on the training images alone; where there were none, the
  default);
- more cautious lowering, which keeps more real old objects and so more false alarms: only where the
  contested detection's nearest new object is at cosine >= 0.85 or 0.9 (it must look like a new
  object, not only more like one than like the old objects seen), or with the false-alarm score
  capped at 0.95 (the surest old detections are never lowered);
- with old-class images: a copy calibrated as ``detgraft extend --old-images`` does, with the
  ``OLD_IMAGES`` (300) images evenly spaced over ``base_train`` (base classes only, as COCO images
  are for a COCO model), each contested detection compared with the k-th nearest old object, k =
  share x old memory / new memory (``detgraft.heads.merge.old_rank``; share 0: the nearest); and
  with share 1.5, or with new claims from 0.3, which lower more.

With ``--val2``, every variant is also scored on a second val set generated with another seed
(``python ../shared/bench/emojicoco.py --sprites ../shared/bench/sprites --out $VAL2 --seed 1
--scale 2 --splits val``: 800 images), so that a choice does not rest on one set's noise.

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
from detgraft.data.batches import TrainingSet  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.data.images import load_image  # noqa: E402
from detgraft.evaluation.metrics import detect, evaluate  # noqa: E402
from detgraft.extend import OLD_IMAGES, _spaced  # noqa: E402
from detgraft.heads import merge as arbitration  # noqa: E402
from detgraft.heads import rcnn as branch  # noqa: E402

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


def replay(model, data, seen, variant: dict, copies: dict | None = None) -> dict:
    """Scores the detections ``arbitrate`` gives under ``variant`` (``copies``: the model calibrated
    otherwise, by the variant's ``calibrated`` key: without mirror images, with old-class images)."""
    heads = model.roi_heads
    other = (copies or {}).get(variant.get("calibrated"))
    b = (other if other is not None else model).roi_heads.branches[0]
    fake = SimpleNamespace(
        first_label=b.first_label,
        prototypes=b.prototypes,
        new_memory=b.new_memory,
        old_memory=b.old_memory[:0] if variant.get("no_old_memory") else b.old_memory,
        false_alarm_score=_false_alarm_score(b, variant),
        alpha=torch.full_like(b.alpha, variant["alpha"]) if "alpha" in variant else b.alpha,
    )
    detections = {}
    lowered, calibrated, old_rank, nearest = (
        arbitration._lowered,
        arbitration._calibrated,
        arbitration.old_rank,
        arbitration.nearest,
    )
    if "nearest_new_from" in variant:
        arbitration.nearest = nearest_new_from(nearest, fake.new_memory, variant["nearest_new_from"])
    if variant.get("times_doubt"):
        arbitration._lowered = _times_doubt
    if "share" in variant:
        arbitration.old_rank = lambda old, new: old_rank(old, new, variant["share"])
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
        arbitration._lowered, arbitration._calibrated, arbitration.old_rank = lowered, calibrated, old_rank
        arbitration.nearest = nearest
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
    "only new claims >= 0.7 lower": {"claim": 0.7},
    "only new claims >= 0.8 lower": {"claim": 0.8},
    "calibrated without the mirror images": {"calibrated": "unmirrored"},
    "no false-alarm score (1.0)": {"false_alarm_score": torch.tensor(1.0)},
    "no old memory": {"no_old_memory": True},
    "alpha 1.0 (no prototype calibration)": {"alpha": 1.0},
    "alpha 0.5": {"alpha": 0.5},
    "only where the nearest new object is at cosine >= 0.85": {"nearest_new_from": 0.85},
    "only where the nearest new object is at cosine >= 0.9": {"nearest_new_from": 0.9},
    "false-alarm score at most 0.95": {"false_alarm_cap": 0.95},
    f"with {OLD_IMAGES} old-class images (--old-images), k-th old neighbour share 0.5": {
        "calibrated": "old_images",
        "share": 0.5,
    },
    f"with {OLD_IMAGES} old-class images, share {arbitration.OLD_RANK_SHARE} (the default's)": {
        "calibrated": "old_images"
    },
    f"with {OLD_IMAGES} old-class images, share 1.0": {"calibrated": "old_images", "share": 1.0},
    f"with {OLD_IMAGES} old-class images, nearest old neighbour (share 0)": {"calibrated": "old_images", "share": 0.0},
    f"with {OLD_IMAGES} old-class images, share 1.5": {"calibrated": "old_images", "share": 1.5},
    f"with {OLD_IMAGES} old-class images, share {arbitration.OLD_RANK_SHARE}, new claims from 0.3": {
        "calibrated": "old_images",
        "claim": 0.3,
    },
}


def nearest_new_from(nearest, new_memory, floor: float):
    """``arbitration._nearest`` for which a detection whose nearest new object is at cosine below
    ``floor`` has no new object near (-2): the old memory wins."""

    def patched(features, memory, rank: int = 1):
        found = nearest(features, memory, rank)
        return torch.where(found >= floor, found, torch.full_like(found, -2.0)) if memory is new_memory else found

    return patched


def _false_alarm_score(b, variant: dict):
    """The false-alarm score the variant replays with: its own, or the model's (at most ``false_alarm_cap``)."""
    if "false_alarm_score" in variant:
        return variant["false_alarm_score"]
    return b.false_alarm_score.clamp(max=variant.get("false_alarm_cap", 1.0))


def with_claim(calibrated, claim: float):
    """``arbitration._calibrated`` at the claim score ``claim``, whatever the merge passes."""
    return lambda *args, **kwargs: calibrated(*args[:7], claim=claim)


def recalibrated(model, folder: Path, mirrored: bool = False, old_images: list[Path] = ()):
    """A copy of ``model`` calibrated again on its training images, as ``detgraft extend`` does with
    ``--old-images`` (``mirrored`` as it trained), or without the mirror images and old images."""
    settings = json.loads((folder / "settings.json").read_text())
    train = load_dataset(settings["train"], Path(settings["train"]).parent / "images")
    ids = {c["name"]: c["id"] for c in train.coco["categories"]}
    data = TrainingSet(train, {ids[name]: label for name, label in settings["mapping"].items()})
    other = copy.deepcopy(model)
    images = (load_image(p).float().div(255) for p in old_images)
    detgraft.calibrate(other, (data.example(i) for i in range(len(data))), mirrored=mirrored, old_images=images)
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    parser.add_argument("--val2", type=Path, help="a second val set (another seed's val.json, images/ beside it)")
    parser.add_argument("--from-results", action="store_true", help="only redraw the section and figure from the json")
    parser.add_argument(
        "--missing-only",
        action="store_true",
        help="replay only the default and the variants that arbitration.json lacks rows of on some val set; "
        "keep the other rows",
    )
    args = parser.parse_args()
    if args.from_results:
        return written(json.loads((HERE / "arbitration.json").read_text()))
    sets = {"val": load_dataset(args.data / "val.json", args.data / "images")}
    if args.val2:
        sets["val2"] = load_dataset(args.val2, args.val2.parent / "images")
    earlier = json.loads((HERE / "arbitration.json").read_text()) if args.missing_only else None
    chosen = {
        name: v for name, v in VARIANTS.items() if not earlier or name == "default" or missing(earlier, name, sets)
    }
    # old-class images: base_train's, which show no chicken or frog (a COCO model's user: COCO images)
    base_train = load_dataset(args.data / "base_train.json", args.data / "images")
    old_images = _spaced(sorted(base_train.images / im["file_name"] for im in base_train.coco["images"]), OLD_IMAGES)
    b = args.bench
    base = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    results = {"sets": {}, "models": {}}
    for split, data in sets.items():
        base_eval = evaluate(base, data, detections=detect(base, data))
        results["sets"][split] = {
            "images": len(data.coco["images"]),
            "base_old_ap": round(base_eval.groups["old"]["ap"], 4),
            "base_old_on_new": sum(c.count for c in base_eval.confusions if c.new_class in ("chicken", "frog")),
        }
    with_old = any(v.get("calibrated") == "old_images" for v in chosen.values())  # a copy with old-class images
    for size, folders in MODELS.items():
        results["models"][size] = {"learned": []} | {f"rows_{split}": {name: [] for name in VARIANTS} for split in sets}
        if earlier:  # the rows not replayed now
            for split in sets:
                for name in VARIANTS.keys() - chosen.keys():
                    results["models"][size][f"rows_{split}"][name] = earlier["models"][size][f"rows_{split}"][name]
        for folder in folders:
            model = detgraft.load_model(args.runs / folder)
            learned = json.loads((args.runs / folder / "extend.json").read_text())["arbitration"]
            results["models"][size]["learned"].append(learned)
            unmirrored = learned.get("mirrored") and "calibrated without the mirror images" in chosen
            copies = {
                "unmirrored": recalibrated(model, args.runs / folder) if unmirrored else None,
                "old_images": recalibrated(model, args.runs / folder, learned.get("mirrored", False), old_images)
                if with_old
                else None,
            }
            for split, data in sets.items():
                print(f"{split}:", folder, flush=True)
                seen = record(model, data)
                for name, v in chosen.items():
                    results["models"][size][f"rows_{split}"][name].append(replay(model, data, seen, v, copies))
    for split in (earlier or {}).get("sets", {}).keys() - sets.keys():  # a val set not read now: its earlier rows
        results["sets"][split] = earlier["sets"][split]
        for size in MODELS:
            rows = earlier["models"][size][f"rows_{split}"]
            results["models"][size][f"rows_{split}"] = {name: rows.get(name, []) for name in VARIANTS}
    (HERE / "arbitration.json").write_text(json.dumps(results, indent=1))
    written(results)


def missing(earlier: dict, name: str, sets: dict) -> bool:
    """Whether ``earlier`` (arbitration.json) lacks the rows of variant ``name`` for some size on one of ``sets``."""
    return any(not sizes[f"rows_{split}"].get(name) for sizes in earlier["models"].values() for split in sets)


def written(results: dict) -> None:
    """The ``arbitration`` section of RESULTS.md and its figure, from ``results``."""
    figure(results, HERE / "arbitration.png")
    write_section("arbitration", table(results))
    print(table(results))


def figure(res: dict, path: Path) -> None:
    """Each variant but merge off as a point (old-on-new cut, old AP x base), one panel per size, one
    marker per val set; the issue's targets as dashed lines (old AP >= 1.000x, cut >= 70% at 10 images
    per class and >= 90% from 30)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(res["models"])
    fig, axes = plt.subplots(2, (len(sizes) + 1) // 2, figsize=(12, 11), sharey=True)
    axes = axes.flatten()
    colours = plt.get_cmap("tab20").colors
    for ax, size in zip(axes, sizes):
        for split, about, marker in zip(res["sets"], res["sets"].values(), "os"):
            for k, (name, runs) in enumerate(res["models"][size][f"rows_{split}"].items()):
                if name == "merge off" or not runs:  # merge off: 0% removed, 1.000, far left of the rest
                    continue
                cut = 100 * (1 - mean([r["old_on_new"] for r in runs]) / about["base_old_on_new"])
                old = mean([r["old_ap"] for r in runs]) / about["base_old_ap"]
                label = name if (ax is axes[0] and split == "val") else None
                size_pt = 80 if name == "default" else 30
                ax.scatter(cut, old, color=colours[k % 20], marker=marker, s=size_pt, label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axvline(70 if size == "10" else 90, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{size} per class" if size != "all" else "all images")
        ax.set_xlabel("old-class false alarms on new objects removed (%)")
        ax.set_ylabel("old-class AP x base")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        "Arbitration variants on val (circles) and val2, seed 1 (squares); merge off is at 0% and 1.000.\n"
        "Dashed: the targets (old AP >= 1.000x; cut >= 70% at 10 per class, >= 90% from 30). Up and right is better"
    )
    fig.tight_layout(rect=(0, 0.2, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(res: dict) -> str:
    sizes = list(res["models"])
    lines = [
        "## How the arbitration was chosen (val)",
        "",
        "Command: `python benchmarks/arbitration.py --data $DATA --runs $RUNS --val2 $VAL2/val.json` (after "
        "`benchmarks/sizes.py`; $VAL2: `../shared/bench/emojicoco.py --seed 1 --scale 2 --splits val --out $VAL2`): "
        "the models of every size and draw, one detection pass over each val set, "
        "`detgraft.heads.merge.arbitrate` replayed with each variant. Cells: old AP x base / new AP / old-on-new, the "
        "mean over the draws (3 per few-data size). Figure: [arbitration.png](arbitration.png). The rows added "
        "later were replayed with `--missing-only` (the default and every variant without rows in "
        "arbitration.json; the other rows are kept from the full run before; the default's rows are the same in "
        "both). Share 0.7 is chosen on val: the variant that removes the most false alarms while keeping old AP "
        ">= 1.000x the base's at every size.",
    ]
    for split, about in res["sets"].items():
        lines += [
            "",
            f"{'val' if split == 'val' else 'val2 (seed 1)'}, {about['images']} images: base old-class AP "
            f"{about['base_old_ap']:.3f}, old classes fire on {about['base_old_on_new']} chicken/frog objects.",
            "",
            "| variant | " + " | ".join(f"{s} per class" if s != "all" else "all" for s in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for name in res["models"][sizes[0]][f"rows_{split}"]:
            cells = []
            for s in sizes:
                runs = res["models"][s][f"rows_{split}"][name]
                if not runs:
                    cells.append("not run")
                    continue
                old = mean([r["old_ap"] for r in runs]) / about["base_old_ap"]
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
