"""Each strategy's learning rate, chosen on val from one grid, so that the sizes comparison is fair.

    python benchmarks/lr_grid.py --bench ../shared/bench --data $DATA --runs $RUNS [--per-class 30]
    (after benchmarks/sizes.py --others head naive)

For the strategies the ``sizes`` section compares (``naive``, ``head`` and the default ``branch``),
``detgraft extend --strategy S --lr LR`` with otherwise default settings, on draw 0 of
``--per-class`` images per new class (10, 30 or 50; ``benchmarks/sizes.py``'s draw), for every LR of
``GRID``. The runs at a strategy's
default rate are ``sizes.py``'s own (reused). Every model is scored on val; a strategy's rate is
the one with the best val score (the mean of old-class AP x base and new-class AP: keeping the old
classes and learning the new ones count alike), and only that model is scored on test. A run whose
loss stops being finite is recorded as diverged. Writes ``lr_grid`` into
``benchmarks/results.json`` and the ``lr_grid`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from sizes import STEP1, draw, scored, shown  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.evaluation.metrics import detect, evaluate  # noqa: E402
from detgraft.model.families import FASTER_RCNN  # noqa: E402

HERE = Path(__file__).parent
GRID = (0.01, 0.02, 0.05)
STRATEGIES = ("naive", "head", "branch")
DRAW = 0


def folder(runs: Path, strategy: str, lr: float, k: int) -> Path:
    """sizes.py's folder for the default rate, else one of this script's (``k`` images per class)."""
    if lr == FASTER_RCNN.lr[strategy]:
        return runs / (f"k{k}-draw{DRAW}" if strategy == "branch" else f"{strategy}-k{k}-draw{DRAW}")
    return runs / f"{strategy}-k{k}-draw{DRAW}-lr{lr}"


def train(args, out: Path, strategy: str, lr: float, base: list[str]) -> dict:
    """``detgraft extend`` unless ``out`` holds its result: extend.json, or ``{"diverged": reason}``."""
    cmd = [sys.executable, "-m", "detgraft", "extend", *base, "--train", str(draw(args.data, args.per_class, DRAW))]
    cmd += ["--images", str(args.data / "images"), "--out", str(out), "--strategy", strategy, "--lr", str(lr)]
    failed = out / "diverged.txt"
    if not (out / "extend.json").is_file() and not failed.is_file():
        print("$", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True)
        said = run.stdout + run.stderr  # the CLI logs to the console
        if run.returncode != 0:
            if "training stopped" not in said:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{said[-2000:]}")
            out.mkdir(parents=True, exist_ok=True)
            failed.write_text(next(line for line in said.splitlines() if "training stopped" in line).strip())
    command = shown(args, cmd)
    if failed.is_file():
        return {"diverged": failed.read_text(), "command": command}
    return json.loads((out / "extend.json").read_text()) | {"command": command}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    parser.add_argument("--per-class", type=int, choices=(10, 30, 50), default=10)
    parser.add_argument("--from-results", action="store_true", help="only write RESULTS.md's section from results.json")
    args = parser.parse_args()
    if args.from_results:
        return write_section("lr_grid", table(json.loads((HERE / "results.json").read_text())["lr_grid"]))
    k = args.per_class
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    b = args.bench
    base = ["--base", f"{b}/base_model.py:build", "--weights", f"{b}/base.safetensors", "--classes", f"{b}/base.json"]
    runs = {(s, lr): train(args, folder(args.runs, s, lr, k), s, lr, base) for s in STRATEGIES for lr in GRID}
    val = load_dataset(args.data / "val.json", args.data / "images")
    test = load_dataset(args.data / "test.json", args.data / "images")
    base_model = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    base_old = {
        split: evaluate(base_model, data, detections=detect(base_model, data)).groups["old"]["ap"]
        for split, data in (("val", val), ("test", test))
    }
    rows = {}
    for (strategy, lr), run in runs.items():
        row = {"lr": lr, "command": run["command"]}
        if "diverged" in run:
            rows.setdefault(strategy, []).append(row | {"diverged": run["diverged"]})
            continue
        print("scoring on val", strategy, lr, flush=True)
        got = scored(folder(args.runs, strategy, lr, k), val, STEP1, merge_off=False, split="val")
        old = got["old_ap"] / base_old["val"]
        row |= {"val_old_x_base": round(old, 4), "val_new_ap": got["new_ap"], "val_old_on_new": got["old_on_new"]}
        row |= {"val_score": round((old + got["new_ap"]) / 2, 4), "seconds": run["seconds"]}
        rows.setdefault(strategy, []).append(row)
    chosen = {}
    for strategy, grid in rows.items():
        best = max((r for r in grid if "val_score" in r), key=lambda r: r["val_score"])
        print("scoring on test", strategy, best["lr"], flush=True)
        got = scored(folder(args.runs, strategy, best["lr"], k), test, STEP1, merge_off=False)
        chosen[strategy] = {
            "lr": best["lr"],
            "default_lr": FASTER_RCNN.lr[strategy],
            "test_old_x_base": round(got["old_ap"] / base_old["test"], 4),
            "test_new_ap": got["new_ap"],
            "test_old_on_new": got["old_on_new"],
        }
    results = json.loads((HERE / "results.json").read_text())
    grids = results.get("lr_grid", {})
    if "grid" in grids:  # written before sizes other than 10 were gridded
        grids = {str(grids["per_class"]): grids}
    grids[str(k)] = {"grid": list(GRID), "per_class": k, "draw": DRAW, "runs": rows, "chosen": chosen}
    results["lr_grid"] = dict(sorted(grids.items(), key=lambda item: int(item[0])))
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("lr_grid", table(results["lr_grid"]))
    print(table(results["lr_grid"]))


def table(grids: dict) -> str:
    if "grid" in grids:  # written before sizes other than 10 were gridded
        grids = {str(grids["per_class"]): grids}
    lines = [
        "## Each strategy's learning rate, chosen on val (draw 0)",
        "",
        "Command: `python benchmarks/lr_grid.py --bench ../shared/bench --data $DATA --runs $RUNS --per-class K` "
        "(after `benchmarks/sizes.py --others head naive`): `detgraft extend --strategy S --lr LR`, otherwise the "
        "defaults, on K images per class; scored on val; the rate with the best mean of old x base and new AP is "
        "chosen and only its model scored on test. Val cells: old x base / new AP / old-on-new (of 38) / train s.",
    ]
    for k, res in grids.items():
        lines += [
            "",
            f"{k} images per class:",
            "",
            "| strategy | " + " | ".join(f"lr {lr}" for lr in res["grid"]) + " | chosen (default) | test: old x base / "
            "new AP / old-on-new (of 106) |",
            "|---|" + "---|" * len(res["grid"]) + "---|---|",
        ]
        for strategy, grid in res["runs"].items():
            cells = []
            for r in grid:
                if "diverged" in r:
                    cells.append("diverged")
                else:
                    cells.append(
                        f"{r['val_old_x_base']:.3f} / {r['val_new_ap']:.3f} / {r['val_old_on_new']} / "
                        f"{r['seconds']:.0f}"
                    )
            c = res["chosen"][strategy]
            lines.append(
                f"| {strategy} | " + " | ".join(cells) + f" | {c['lr']} ({c['default_lr']}) | "
                f"{c['test_old_x_base']:.3f} / {c['test_new_ap']:.3f} / {c['test_old_on_new']} |"
            )
    lines += ["", "Commands:", ""]
    for res in grids.values():
        for grid in res["runs"].values():
            for r in grid:
                lines.append(f"- `{r['command']}`")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
