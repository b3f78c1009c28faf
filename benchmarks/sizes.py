"""The default strategy at every data size: 10, 30, 50 and all images per new class, and step 2.

    python benchmarks/sizes.py --bench ../shared/bench --data $DATA --runs $RUNS

A few-data size is three fixed draws from ``new_train`` (draw d: the images in an order shuffled
with seed d, taken until each new class has appeared in K of them). Every training run is
``detgraft extend`` with its default settings (``--steps auto``, arbitration calibrated on the
training images) in its own process; its seconds (loading, training, calibration, checkpoint) and
peak RSS come from that process. Step 2 adds duck, turtle and penguin (``step2_train``) to the
all-data model. Everything is scored on ``test``: old- and new-class AP, and old-on-new, the new
objects (chicken and frog; for step 2 duck, turtle and penguin) on which an old class fires
(score >= 0.5, IoU >= 0.5). Draw 0 of each size is scored a second time with the merge off
(``merge_iou`` None: the base's detections as they are). With ``--others naive head``, those
strategies are trained on draw 0 of each few-data size the same way (``--strategy``, otherwise the
defaults) and scored beside it (``naive:10`` only at 10 images per class); without ``--others`` their
earlier rows in ``results.json`` are kept. With ``--old-images $DATA/old_images`` (made by
``--link-old-images``: links to base_train's images, base classes only), every size and draw is also
trained with ``detgraft extend --old-images`` and scored the same way; without it, those rows are
kept. Writes ``sizes`` and ``step2.branch`` into ``benchmarks/results.json`` and the ``sizes``
section of ``benchmarks/RESULTS.md`` (``sizes_table.py``). Finished runs in ``--runs`` are reused (delete a folder to
redo it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from sizes_table import SIZES, table  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.evaluation.metrics import detect, evaluate  # noqa: E402

HERE = Path(__file__).parent
# the code between a model's weights and its detections on the branch path: a cached score is only
# reused for the same weights and the same code
INFERENCE_CODE = hashlib.sha256(
    b"".join((Path(detgraft.__file__).parent / f).read_bytes() for f in ("heads/merge.py", "heads/rcnn.py"))
).hexdigest()[:16]
DRAWS = (0, 1, 2)
STEP1, STEP2 = ("chicken", "frog"), ("duck", "turtle", "penguin")


def draw(data: Path, per_class: int, seed: int) -> Path:
    """``new_train`` images in a seeded order, taken until each class has appeared in ``per_class``."""
    coco = json.loads((data / "new_train.json").read_text())
    classes_in: dict[int, set] = {}
    for a in coco["annotations"]:
        classes_in.setdefault(a["image_id"], set()).add(a["category_id"])
    counts = {c["id"]: 0 for c in coco["categories"]}
    images = sorted(coco["images"], key=lambda im: im["id"])
    random.Random(seed).shuffle(images)
    keep = set()
    for im in images:
        have = classes_in.get(im["id"], set())
        if any(counts[c] < per_class for c in have):
            keep.add(im["id"])
            for c in have:
                counts[c] += 1
    path = data / f"new_train_{per_class}_draw{seed}.json"
    path.write_text(
        json.dumps(
            {
                **coco,
                "images": [im for im in coco["images"] if im["id"] in keep],
                "annotations": [a for a in coco["annotations"] if a["image_id"] in keep],
            }
        )
    )
    return path


def bench_base(bench: Path) -> list[str]:
    """``detgraft extend``'s arguments that load the EmojiCOCO base from the bench folder."""
    return ["--base", f"{bench}/base_model.py:build", "--weights", f"{bench}/base.safetensors", "--classes",
            f"{bench}/base.json"]  # fmt: skip


def train(args, out: Path, train_file: Path, base: list[str], extra: tuple[str, ...] = ()) -> dict:
    """Runs ``detgraft extend`` with its defaults (and ``extra`` flags) unless ``out`` holds its
    result; returns extend.json."""
    cmd = [sys.executable, "-m", "detgraft", "extend", *base, "--train", str(train_file)]
    cmd += ["--images", str(args.data / "images"), "--out", str(out), *extra]
    if not (out / "extend.json").is_file():
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((out / "extend.json").read_text()) | {"command": shown(args, cmd)}


def shown(args, cmd: list[str]) -> str:
    """The command with paths a reader can paste: the bench relative to the repository, $DATA, $RUNS."""
    text = " ".join("python" if c == sys.executable else c for c in cmd)
    return (
        text.replace(str(args.bench), "../shared/bench")
        .replace(str(args.data), "$DATA")
        .replace(str(args.runs), "$RUNS")
    )


def score(model, test, objects: tuple[str, ...]) -> dict:
    ev = evaluate(model, test, detections=detect(model, test))
    new_labels = set(detgraft.get_card(model).new_labels)
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    row = {
        "old_ap": mean([c.ap for c in ev.classes if c.label not in new_labels and c.name not in STEP1]),
        "new_ap": mean([c.ap for c in ev.classes if c.label in new_labels]),
        "old_on_new": sum(c.count for c in ev.confusions if c.new_class in objects),
    }
    if objects == STEP2:
        row["step1_ap"] = mean([c.ap for c in ev.classes if c.name in STEP1])
    return row


def scored(folder: Path, test, objects: tuple[str, ...], merge_off: bool, split: str = "test") -> dict:
    """``score`` of the model in ``folder`` (and with the merge off) on ``test`` (the ``split``),
    kept in ``folder/{split}_scores.json`` for the weights it was computed on (their SHA-256 in
    detgraft.json) and the code that merges detections (``INFERENCE_CODE``)."""
    cache = folder / f"{split}_scores.json"
    sha = json.loads((folder / "detgraft.json").read_text())["weights_sha256"] + "+" + INFERENCE_CODE
    if cache.is_file() and json.loads(cache.read_text())["weights_sha256"] == sha:
        return json.loads(cache.read_text())["scores"]
    model = detgraft.load_model(folder)
    row = score(model, test, objects)
    if merge_off:
        model.roi_heads.merge_iou = None
        row["merge_off"] = score(model, test, objects)
    cache.write_text(json.dumps({"weights_sha256": sha, "scores": row}))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    parser.add_argument("--from-results", action="store_true", help="only write RESULTS.md's section from results.json")
    parser.add_argument(
        "--others", nargs="*", default=[], help="strategies also trained on draw 0 of each size (naive:10: at 10 only)"
    )
    parser.add_argument(
        "--old-images",
        type=Path,
        help="also train every size and draw with --old-images of this folder (base_train's images: "
        "python benchmarks/sizes.py --link-old-images)",
    )
    parser.add_argument(
        "--link-old-images", action="store_true", help="make $DATA/old_images: links to base_train's images, then stop"
    )
    parser.add_argument(
        "--old-images-only", action="store_true", help="with --old-images: only those runs; keep every other row"
    )
    args = parser.parse_args()
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    results = json.loads((HERE / "results.json").read_text())
    if args.from_results:
        return write_section("sizes", table(results))
    if args.link_old_images:
        return link_old_images(args.data)
    b = args.bench
    base_args = bench_base(b)
    if args.old_images_only:
        return with_old_images_only(args, base_args, results)
    runs = {}
    for k in SIZES:
        for d in DRAWS:
            runs[(str(k), d)] = train(args, args.runs / f"k{k}-draw{d}", draw(args.data, k, d), base_args)
    runs[("all", 0)] = train(args, args.runs / "all", args.data / "new_train.json", base_args)
    # the cap of --steps auto, chosen on val: the all-data run at the previous cap of 600
    longer = train(args, args.runs / "all-steps600", args.data / "new_train.json", base_args, ("--steps", "600"))
    step2 = train(args, args.runs / "step2", args.data / "step2_train.json", ["--base", str(args.runs / "all")])
    with_old = trained_with_old_images(args, base_args) if args.old_images else {}
    others = {}
    for item in args.others:
        strategy, _, sizes_given = item.partition(":")
        for k in sizes_given.split(",") if sizes_given else SIZES:
            out = args.runs / f"{strategy}-k{k}-draw0"
            flags = ("--strategy", strategy)
            others[(strategy, str(k))] = train(args, out, draw(args.data, int(k), 0), base_args, flags)

    test = load_dataset(args.data / "test.json", args.data / "images")
    base = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    base_eval = evaluate(base, test, detections=detect(base, test))
    sizes: dict = {}
    for (k, d), run in runs.items():
        print("scoring", k, d, flush=True)
        folder = args.runs / ("all" if k == "all" else f"k{k}-draw{d}")
        row = sizes.setdefault(
            k, {"old_ap": [], "new_ap": [], "old_on_new": [], "seconds": [], "steps": [], "commands": []}
        )
        got = scored(folder, test, STEP1, merge_off=d == 0)
        for key in ("old_ap", "new_ap", "old_on_new"):
            row[key].append(got[key])
        if d == 0:
            row["merge_off"] = got["merge_off"]
        row["seconds"].append(run["seconds"])
        row["steps"].append(run["steps"])
        row["peak_rss_mb"] = max(row.get("peak_rss_mb", 0), run["peak_rss_mb"])
        row["commands"].append(run["command"])
    print("scoring step 2", flush=True)
    step2_row = scored(args.runs / "step2", test, STEP2, merge_off=True)
    step2_row |= {k: step2[k] for k in ("seconds", "peak_rss_mb", "steps", "command")}
    earlier_old = results.get("sizes", {}).get("old_images")
    kept = {"others": results["sizes"]["others"]} if "others" in results.get("sizes", {}) and not others else {}
    # the training seconds before issue 29 (the frozen base computed in every step), recorded by this
    # script before that issue and kept beside the new ones
    kept |= {k: results["sizes"][k] for k in ("every_step_seconds",) if k in results.get("sizes", {})}
    results["sizes"] = (
        sizes
        | kept
        | {
            "base_old_ap": round(base_eval.groups["old"]["ap"], 4),
            "base_old_on_new": sum(c.count for c in base_eval.confusions if c.new_class in STEP1),
            "base_old_on_new_step2": sum(c.count for c in base_eval.confusions if c.new_class in STEP2),
        }
    )
    results["step2"]["branch"] = results["step2"].get("branch", {}) | step2_row
    if earlier_old and not with_old:  # without --old-images their earlier rows are kept
        results["sizes"]["old_images"] = earlier_old
    score_old_images(args, with_old, test, results)
    for (strategy, k), run in others.items():
        print("scoring", strategy, k, flush=True)
        got = scored(args.runs / f"{strategy}-k{k}-draw0", test, STEP1, merge_off=False)
        results["sizes"].setdefault("others", {}).setdefault(strategy, {})[k] = got | {
            key: run[key] for key in ("seconds", "steps", "command")
        }
    print("scoring the step cap on val", flush=True)
    val = load_dataset(args.data / "val.json", args.data / "images")
    base_val = evaluate(base, val, detections=detect(base, val))
    results["sizes"]["step_cap_val"] = {
        str(run["steps"]): scored(args.runs / name, val, STEP1, merge_off=False, split="val")
        | {k: run[k] for k in ("seconds", "command")}
        for name, run in (("all", runs[("all", 0)]), ("all-steps600", longer))
    } | {"base_old_ap": round(base_val.groups["old"]["ap"], 4)}
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("sizes", table(results))
    print(table(results))


def trained_with_old_images(args, base_args: list[str]) -> dict:
    """Every size and draw trained with ``--old-images`` (the runs' extend.json by (size, draw))."""
    flags = ("--old-images", str(args.old_images.resolve()))
    runs = {}
    for k in SIZES:
        for d in DRAWS:
            out = args.runs / f"k{k}-draw{d}-old-images"
            runs[(str(k), d)] = train(args, out, draw(args.data, k, d), base_args, flags)
    runs[("all", 0)] = train(args, args.runs / "all-old-images", args.data / "new_train.json", base_args, flags)
    return runs


def score_old_images(args, runs: dict, test, results: dict) -> None:
    """``results["sizes"]["old_images"]``: the ``runs`` with ``--old-images``, scored on ``test``."""
    if runs:
        results["sizes"]["old_images"] = {}
    for (k, d), run in runs.items():
        print("scoring with old images", k, d, flush=True)
        folder = args.runs / ("all-old-images" if k == "all" else f"k{k}-draw{d}-old-images")
        row = results["sizes"]["old_images"].setdefault(
            k, {"old_ap": [], "new_ap": [], "old_on_new": [], "seconds": [], "commands": []}
        )
        got = scored(folder, test, STEP1, merge_off=False)
        for key in ("old_ap", "new_ap", "old_on_new"):
            row[key].append(got[key])
        row["seconds"].append(run["seconds"])
        row["commands"].append(run["command"])


def with_old_images_only(args, base_args: list[str], results: dict) -> None:
    """``--old-images-only``: the ``--old-images`` runs alone, every other row of results.json kept."""
    if not args.old_images:
        raise SystemExit("--old-images-only needs --old-images")
    runs = trained_with_old_images(args, base_args)
    score_old_images(args, runs, load_dataset(args.data / "test.json", args.data / "images"), results)
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("sizes", table(results))
    print(table(results))


def link_old_images(data: Path) -> None:
    """``data/old_images``: a link to each of base_train's images (base classes only, no chicken or
    frog: what COCO images are to a COCO model)."""
    folder = data / "old_images"
    folder.mkdir(exist_ok=True)
    for im in json.loads((data / "base_train.json").read_text())["images"]:
        link = folder / Path(im["file_name"]).name
        if not link.exists():
            link.symlink_to(data / "images" / im["file_name"])
    print(folder, len(list(folder.iterdir())), "images")


if __name__ == "__main__":
    main()
