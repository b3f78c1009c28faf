"""The main-job benchmark: every strategy of ``detgraft extend`` on EmojiCOCO, against an oracle.

    python benchmarks/incremental.py --bench ../shared/bench --data /tmp/emojicoco

Generates the data if it is missing, loads the base through the generic builder path, runs each
strategy as ``detgraft extend`` in its own process (its time and peak RSS come from that
process), the oracle (the widened base fine-tuned with every label of base_train +
new_train_full, the same budget, learning rate chosen on val), few-data rows, a replay row and
step 2, evaluates everything on ``test``, and writes ``benchmarks/results.json`` and the
``incremental`` section of ``benchmarks/RESULTS.md``. Finished runs in ``--runs`` are reused
(delete the folder to redo one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.dataset import Dataset, load_dataset  # noqa: E402
from detgraft.evaluation.metrics import detect, evaluate  # noqa: E402

HERE = Path(__file__).parent
# (SGD lr, steps) per strategy. The strategies that back-propagate through the whole network take
# 2-4 s a step on 2 cores, so pseudo, distill and head run 300 steps (the brief's quick budget);
# naive and the default 600.
STEP1 = {
    "naive": (0.01, 600),
    "head": (0.05, 300),
    "pseudo": (0.01, 300),
    "distill": (0.01, 300),
    "branch": (0.05, 600),
}
ORACLE_LRS = (0.01, 0.02)
ORACLE_STEPS = 400
DEFAULT = "branch"


def extend_cmd(
    args,
    out: Path,
    strategy: str,
    train: str = "new_train.json",
    base: str | None = None,
    extra: tuple[str, ...] = (),
    steps: int | None = None,
) -> list[str]:
    lr, default_steps = STEP1[strategy]
    steps = steps or default_steps
    b = args.bench
    model = (
        ["--base", base]
        if base
        else ["--base", f"{b}/base_model.py:build", "--weights", f"{b}/base.safetensors", "--classes", f"{b}/base.json"]
    )
    return [
        sys.executable,
        "-m",
        "detgraft",
        "extend",
        *model,
        "--train",
        str(args.data / train),
        "--images",
        str(args.data / "images"),
        "--out",
        str(out),
        "--strategy",
        strategy,
        "--lr",
        str(lr),
        "--steps",
        str(steps),
        *extra,
    ]


def run(cmd: list[str], out: Path) -> dict:
    """Runs a training command unless ``out`` already holds its result; returns extend.json."""
    if not (out / "extend.json").is_file():
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    steps = int(cmd[cmd.index("--steps") + 1])
    return json.loads((out / "extend.json").read_text()) | {
        "steps": steps,
        "command": " ".join("python" if c == sys.executable else c for c in cmd),
    }


def oracle_run(args) -> None:
    """(in a child process) the widened base fine-tuned with every label: base_train + new_train_full."""
    import resource

    from detgraft.data.batches import TrainingSet
    from detgraft.settings import ExtendSettings
    from detgraft.train import optimizer_and_schedule
    from detgraft.train import train_loop as _train

    start = time.perf_counter()
    torch.manual_seed(0)
    b = args.bench
    model = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    detgraft.expand_predictor(model, ["chicken", "frog"])
    detgraft.incremental(model, "naive")
    names = {n: i for i, n in enumerate(detgraft.get_card(model).classes)}
    data = None
    for split in ("new_train_full", "base_train"):
        d = load_dataset(args.data / f"{split}.json", args.data / "images")
        part = TrainingSet(d, {c["id"]: names[c["name"]] for c in d.coco["categories"] if c["name"] in names})
        data = part if data is None else data + part
    settings = ExtendSettings(strategy="naive", steps=args.steps, lr=args.oracle_lr)
    opt, sched = optimizer_and_schedule(model, settings)
    out = Path(args.oracle_run)
    out.mkdir(parents=True, exist_ok=True)
    _train(model, data, settings, opt, sched, 0, out)
    detgraft.save_checkpoint(model.eval(), out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "extend.json").write_text(
        json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak)})
    )


def few_subset(args, per_class: int) -> str:
    """The first images of new_train (by id) until each new class appears in ``per_class`` of them."""
    name = f"new_train_{per_class}.json"
    coco = json.loads((args.data / "new_train.json").read_text())
    cats = {a["image_id"]: set() for a in coco["annotations"]}
    for a in coco["annotations"]:
        cats[a["image_id"]].add(a["category_id"])
    counts = {c["id"]: 0 for c in coco["categories"]}
    keep = []
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        have = cats.get(im["id"], set())
        if any(counts[c] < per_class for c in have):
            keep.append(im["id"])
            for c in have:
                counts[c] += 1
    ids = set(keep)
    subset = {
        **coco,
        "images": [im for im in coco["images"] if im["id"] in ids],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
    }
    (args.data / name).write_text(json.dumps(subset))
    return name


def replay_subset(args, count: int) -> Path:
    coco = json.loads((args.data / "base_train.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])[:count]
    ids = {im["id"] for im in images}
    path = args.data / f"base_train_{count}.json"
    path.write_text(
        json.dumps({**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]})
    )
    return path


@torch.no_grad()
def latency(model, base, data: Dataset, count: int = 60, rounds: int = 3) -> float:
    """Median-of-rounds ratio of model to base time on single test images, interleaved."""
    from torchvision.io import decode_image

    images = [decode_image(str(data.path(im))).float() / 255 for im in data.coco["images"][:count]]
    model.eval(), base.eval()
    ratios = []
    for _ in range(rounds):
        times = {}
        for name, m in (("base", base), ("model", model)):
            m([images[0]])
            t = time.perf_counter()
            for im in images:
                m([im])
            times[name] = time.perf_counter() - t
        ratios.append(times["model"] / times["base"])
    return sorted(ratios)[len(ratios) // 2]


def scores(model, base, test: Dataset) -> dict:
    detections = detect(model, test)
    ev = evaluate(model, test, detections=detections)
    card = detgraft.get_card(model)
    by_step: dict[int, list] = {}
    for c in ev.classes:
        by_step.setdefault(card.step_of(c.label), []).append(c)
    mean = lambda cs, m: round(sum(getattr(c, m) for c in cs) / len(cs), 4) if cs else None  # noqa: E731
    row = {
        "old_ap": mean(by_step.get(0, []), "ap"),
        "old_ap50": mean(by_step.get(0, []), "ap50"),
        "new_ap": mean(by_step.get(max(by_step), []), "ap") if max(by_step) else None,
        "new_ap50": mean(by_step.get(max(by_step), []), "ap50") if max(by_step) else None,
        "all_ap": round(ev.groups["all"]["ap"], 4),
        "all_ap50": round(ev.groups["all"]["ap50"], 4),
        "confusions": {f"{c.new_class}->{c.old_class}": c.count for c in ev.confusions},
    }
    if max(by_step) == 2:
        row["step1_ap"] = mean(by_step.get(1, []), "ap")
    row["latency_ratio"] = round(latency(model, base, test), 3)
    return row


def relative(command: str) -> str:
    """A recorded command as a reader can paste it: the bench relative to the repository, $DATA, $RUNS."""
    places = (
        ("/work/main/benchmarks/", "benchmarks/"),
        ("/work/shared/bench", "../shared/bench"),
        ("/tmp/emojicoco", "$DATA"),
        ("/tmp/detgraft-bench", "$RUNS"),
    )
    for path, name in places:
        command = command.replace(path, name)
    return command


def confusion_total(confusions: dict, objects: tuple[str, ...]) -> int:
    return sum(n for k, n in confusions.items() if k.split("->")[0] in objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-bench"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--from-results", action="store_true", help="only write RESULTS.md's section from results.json of a full run"
    )
    parser.add_argument("--oracle-run", help=argparse.SUPPRESS)
    parser.add_argument("--oracle-lr", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bench, args.data = args.bench.resolve(), args.data.resolve()
    if args.oracle_run:
        return oracle_run(args)
    if args.from_results:
        return write_section("incremental", table(json.loads((HERE / "results.json").read_text()), args))
    if not (args.data / "test.json").is_file():
        subprocess.run(
            [
                sys.executable,
                str(args.bench / "emojicoco.py"),
                "--sprites",
                str(args.bench / "sprites"),
                "--out",
                str(args.data),
            ],
            check=True,
        )
    r = args.runs
    trained = {}
    for strategy in ("naive", "branch", "head", "pseudo", "distill"):
        trained[strategy] = run(extend_cmd(args, r / f"step1-{strategy}", strategy), r / f"step1-{strategy}")
    for lr in ORACLE_LRS:
        out = r / f"oracle-lr{lr}"
        cmd = [
            sys.executable,
            str(Path(__file__)),
            "--bench",
            str(args.bench),
            "--data",
            str(args.data),
            "--steps",
            str(ORACLE_STEPS),
            "--oracle-run",
            str(out),
            "--oracle-lr",
            str(lr),
        ]
        trained[f"oracle lr {lr}"] = run(cmd, out)
    for k in (10, 50):
        name = few_subset(args, k)
        trained[f"{DEFAULT}, {k} images per class"] = run(
            extend_cmd(args, r / f"few-{k}", DEFAULT, train=name), r / f"few-{k}"
        )
    replay = replay_subset(args, 200)
    trained[f"{DEFAULT} + replay 200"] = run(
        extend_cmd(args, r / "replay", DEFAULT, extra=("--replay", str(replay))), r / "replay"
    )
    step2 = {}
    for strategy in (DEFAULT, "naive"):
        out = r / f"step2-{strategy}"
        step2[strategy] = run(
            extend_cmd(
                args,
                out,
                strategy,
                train="step2_train.json",
                base=str(r / f"step1-{strategy}"),
                steps=300 if strategy == "naive" else None,
            ),
            out,
        )

    b = args.bench
    base = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    test = load_dataset(args.data / "test.json", args.data / "images")
    val = load_dataset(args.data / "val.json", args.data / "images")
    # oracle: learning rate chosen on val (all-class AP)
    oracle_val = {lr: evaluate(detgraft.load_model(r / f"oracle-lr{lr}"), val).groups["all"]["ap"] for lr in ORACLE_LRS}
    oracle_lr = max(oracle_val, key=oracle_val.get)
    print("oracle val all-class AP per lr:", oracle_val, "->", oracle_lr, flush=True)

    base_test = detect(base, test)
    base_eval = evaluate(base, test, detections=base_test)
    results = {
        "base": {
            "old_ap": round(base_eval.groups["old"]["ap"], 4),
            "old_ap50": round(base_eval.groups["old"]["ap50"], 4),
            "confusions": {f"{c.new_class}->{c.old_class}": c.count for c in base_eval.confusions},
        },
        "step1": {},
        "step2": {},
        "default": DEFAULT,
        "oracle_val_all_ap": {str(k): round(v, 4) for k, v in oracle_val.items()},
    }
    rows = {s: r / f"step1-{s}" for s in STEP1} | {"oracle": r / f"oracle-lr{oracle_lr}"}
    rows |= {f"{DEFAULT}, {k} images per class": r / f"few-{k}" for k in (10, 50)}
    rows[f"{DEFAULT} + replay 200"] = r / "replay"
    for name, folder in rows.items():
        key = f"oracle lr {oracle_lr}" if name == "oracle" else name
        print("scoring", name, flush=True)
        results["step1"][name] = scores(detgraft.load_model(folder), base, test) | {
            k: trained[key][k] for k in ("seconds", "peak_rss_mb", "steps", "command")
        }
    for name in step2:
        print("scoring step 2", name, flush=True)
        results["step2"][name] = scores(detgraft.load_model(r / f"step2-{name}"), base, test) | {
            k: step2[name][k] for k in ("seconds", "peak_rss_mb", "steps", "command")
        }
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_write:
        write_section("incremental", table(results, args))
    print(table(results, args))


def table(res: dict, args) -> str:
    base = res["base"]
    objects1 = ("chicken", "frog")
    lines = [
        "## Adding chicken and frog to the EmojiCOCO base (test split)",
        "",
        "Command: `python benchmarks/incremental.py --bench ../shared/bench --data $DATA --runs $RUNS` (batches of 8 "
        "images; every training row ran as the command beside it, in its own process, on this 2-core machine; peak "
        "RSS of that process; seconds include loading and the final checkpoint). Base: old-class AP "
        f"{base['old_ap']:.3f}, AP50 {base['old_ap50']:.3f}; old classes fired on chicken/frog objects: "
        f"{confusion_total(base['confusions'], objects1)}.",
        "",
        "| step 1 | old AP | old x base | new AP | new AP50 | all AP | old-on-new (x base) | latency x base "
        "| steps | train s | peak RSS MB | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_conf = confusion_total(base["confusions"], objects1)
    for name, row in res["step1"].items():
        conf = confusion_total(row["confusions"], objects1)
        lines.append(
            f"| {name} | {row['old_ap']:.3f} | {row['old_ap'] / base['old_ap']:.3f} | {row['new_ap']:.3f} | "
            f"{row['new_ap50']:.3f} | {row['all_ap']:.3f} | {conf} ({conf / max(base_conf, 1):.2f}) | "
            f"{row['latency_ratio']:.2f} | {row['steps']} | {row['seconds']:.0f} | "
            f"{row['peak_rss_mb']} | "
            f"`{relative(row['command'])}` |"
        )
    lines += [
        "",
        "The `branch` rows of this table were measured before the arbitration (`detgraft.calibrate`) and "
        "`--steps auto`; the current default at every data size, and the step-2 `branch` row below, come from "
        "`benchmarks/sizes.py` (section `sizes`).",
        "",
        "How label-free `detgraft drift` ranks these models: section `drift` (`benchmarks/drift.py`).",
    ]
    lines += [
        "",
        f"Oracle learning rate chosen on val (all-class AP): {res['oracle_val_all_ap']}.",
        "",
        "| step 2 (duck, turtle, penguin) | old AP | step-1 AP | step-2 AP | step-2 AP50 | latency x base | "
        "steps | train s | peak RSS MB | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in res["step2"].items():
        lines.append(
            f"| {name} | {row['old_ap']:.3f} | {row['step1_ap']:.3f} | {row['new_ap']:.3f} | {row['new_ap50']:.3f} | "
            f"{row['latency_ratio']:.2f} | {row['steps']} | {row['seconds']:.0f} | {row['peak_rss_mb']} | "
            f"`{relative(row['command'])}` |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
