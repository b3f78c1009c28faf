"""Does label-free ``detgraft drift`` rank extended models the way labelled old-class AP does?

    python benchmarks/drift.py --bench ../shared/bench --data /tmp/emojicoco

Uses the step-1 models that ``benchmarks/incremental.py`` trained (``--runs``). For each model it
computes, on ``val`` and on ``test``, the labelled old-class AP and the drift figures (reference:
the base's old-class detections with score >= 0.5 or >= 0.7; AP@[.5:.95], AP50 and the share of
reference detections kept). Which drift figure ``detgraft drift`` leads with is chosen on ``val``
(the rank agreement with labelled old-class AP); ``test`` confirms it. Detections are cached in
``--runs/drift-cache``. Writes the ``drift`` section of ``benchmarks/RESULTS.md`` and
``benchmarks/drift.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.evaluation.metrics import _results, coco_eval, detect, drift, evaluate, label_to_category  # noqa: E402

HERE = Path(__file__).parent
MODELS = {
    "naive": "step1-naive",
    "head": "step1-head",
    "pseudo": "step1-pseudo",
    "distill": "step1-distill",
    "branch": "step1-branch",
    "oracle": "oracle-lr0.01",
}
SCORES = (0.5, 0.7)
RESAMPLES = 100
FIGURES = ("ap", "ap50", "kept")


def kendall(a: dict[str, float], b: dict[str, float]) -> float:
    """Kendall's tau between two scorings of the same names (1: same order, -1: reversed)."""
    pairs = list(itertools.combinations(a, 2))
    signs = [(a[x] - a[y]) * (b[x] - b[y]) for x, y in pairs]
    return (sum(s > 0 for s in signs) - sum(s < 0 for s in signs)) / len(pairs)


def order(scores: dict[str, float]) -> str:
    return " > ".join(sorted(scores, key=lambda n: -scores[n]))


def old_ap_bootstrap(data, base, detections: dict[str, dict], resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Labelled old-class AP of each model on ``resamples`` bootstrap resamples of the images (the same
    resamples for every model, so differences are paired)."""
    mapping = label_to_category(base, data)  # the base's classes are the old ones
    old = sorted(set(mapping.values()) & {a["category_id"] for a in data.coco["annotations"]})
    ids = [im["id"] for im in data.coco["images"]]
    annotations: dict[int, list] = {i: [] for i in ids}
    for a in data.coco["annotations"]:
        if a["category_id"] in old:
            annotations[a["image_id"]].append(a)
    results = {}
    for name, d in detections.items():
        results[name] = {i: [] for i in ids}
        for r in _results(d, mapping):
            results[name][r["image_id"]].append(r)
    rng = np.random.default_rng(seed)
    out = {name: np.zeros(resamples) for name in detections}
    for k in range(resamples):
        sample = rng.choice(ids, size=len(ids))
        gt = {
            "images": [{"id": j} for j in range(len(sample))],
            "annotations": [],
            "categories": data.coco["categories"],
        }
        for j, i in enumerate(sample):
            gt["annotations"] += [
                a | {"id": len(gt["annotations"]) + n + 1, "image_id": j} for n, a in enumerate(annotations[i])
            ]
        for name in detections:
            dets = [r | {"image_id": j} for j, i in enumerate(sample) for r in results[name][i]]
            precision, _ = coco_eval(gt, dets, old, "faster-coco-eval")
            per_class = [p[p > -1].mean() for p in np.moveaxis(precision[:, :, :, 0, -1], 2, 0) if (p > -1).any()]
            out[name][k] = float(np.mean(per_class))
    return out


def cached_detect(model, data, path: Path) -> dict:
    if path.is_file():
        return torch.load(path)
    detections = detect(model, data)
    torch.save(detections, path)
    return detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-bench"))
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples of the images")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cache = args.runs / "drift-cache"
    cache.mkdir(parents=True, exist_ok=True)
    b = args.bench.resolve()
    base = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    results: dict = {}
    settled: dict = {}
    for split in ("val", "test"):
        data = load_dataset(args.data / f"{split}.json", args.data / "images")
        base_detections = cached_detect(base, data, cache / f"base-{split}.pt")
        rows, detections = {}, {}
        for name, folder in MODELS.items():
            print(split, name, flush=True)
            model = detgraft.load_model(args.runs / folder)
            detections[name] = cached_detect(model, data, cache / f"{folder}-{split}.pt")
            row = {"old_ap": evaluate(model, data, detections=detections[name]).groups["old"]["ap"]}
            for score in SCORES:
                d = drift(model, base, data, score=score, detections=detections[name], base_detections=base_detections)
                row |= {f"{figure}@{score}": getattr(d, figure) for figure in FIGURES}
            rows[name] = {k: round(v, 4) for k, v in row.items()}
        results[split] = rows
        print(split, f"bootstrap of labelled old-class AP ({args.resamples} resamples)", flush=True)
        boot = old_ap_bootstrap(data, base, detections, args.resamples)
        # a pair is settled when the labels order it the same way in >= 95% of the resamples
        settled[split] = [
            [a, b] for a, b in itertools.permutations(MODELS, 2) if float(np.mean(boot[a] > boot[b])) >= 0.95
        ]
    figures = [f"{figure}@{score}" for score in SCORES for figure in FIGURES]
    agreement = {
        split: {f: kendall(*({n: results[split][n][k] for n in MODELS} for k in ("old_ap", f))) for f in figures}
        for split in results
    }
    on_settled = {
        split: {f: sum(results[split][a][f] > results[split][b][f] for a, b in settled[split]) for f in figures}
        for split in results
    }
    chosen = max(figures, key=lambda f: (on_settled["val"][f], agreement["val"][f]))
    out = {
        "results": results,
        "kendall": agreement,
        "settled": settled,
        "on_settled": on_settled,
        "chosen_on_val": chosen,
    }
    (HERE / "drift.json").write_text(json.dumps(out, indent=1))
    body = section(out)
    print(body)
    if not args.no_write:
        write_section("drift", body)


def section(out: dict) -> str:
    results, agreement, chosen = out["results"], out["kendall"], out["chosen_on_val"]
    settled, on_settled = out["settled"], out["on_settled"]
    lines = [
        "## Label-free drift vs labelled old-class AP (EmojiCOCO step-1 models)",
        "",
        "`python benchmarks/drift.py --bench ../shared/bench --data /tmp/emojicoco` (models from "
        "`benchmarks/incremental.py`; reference = the base's old-class detections with score >= s on the split's "
        "images, labels unused). A pair of models is *settled* when labelled old-class AP orders it the same way "
        "in >= 95% of 100 bootstrap resamples of the images; the drift figure is chosen on `val` (settled pairs "
        "agreed, then Kendall's tau) and confirmed on `test`.",
        "",
        f"| drift figure | settled pairs agreed, val ({len(settled['val'])}) | test ({len(settled['test'])}) "
        "| Kendall's tau, val | test |",
        "|---|---|---|---|---|",
    ]
    for f in agreement["val"]:
        mark = " **(chosen on val)**" if f == chosen else ""
        lines.append(
            f"| {f}{mark} | {on_settled['val'][f]} | {on_settled['test'][f]} | "
            f"{agreement['val'][f]:.2f} | {agreement['test'][f]:.2f} |"
        )
    for split in ("val", "test"):
        rows = results[split]
        main = {n: rows[n] for n in MODELS}
        unsettled = [
            f"{a}/{b}"
            for a, b in itertools.combinations(MODELS, 2)
            if [a, b] not in settled[split] and [b, a] not in settled[split]
        ]
        lines += [
            "",
            f"`{split}`: labelled old AP ranks {order({n: r['old_ap'] for n, r in main.items()})}; "
            f"drift {chosen} ranks {order({n: r[chosen] for n, r in main.items()})}. "
            f"Pairs the labels do not settle: {', '.join(unsettled) or 'none'}.",
            "",
            "| model | old AP (labels) | " + " | ".join(f"drift {f}" for f in agreement["val"]) + " |",
            "|---|---|" + "---|" * len(agreement["val"]),
        ]
        for name, r in rows.items():
            drifts = " | ".join(f"{r[f]:.4f}" for f in agreement["val"])
            lines.append(f"| {name} | {r['old_ap']:.4f} | {drifts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
