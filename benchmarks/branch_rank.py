"""The rank a branch keeps of its trained box head (``--branch-rank``, issue 30), chosen on val.

    python benchmarks/branch_rank.py --bench ../shared/bench --data $DATA --runs $RUNS

``detgraft extend`` with its defaults and ``--branch-rank R`` for R in ``RANKS`` (0: the whole copy,
the branch before issue 30) on draw 0 of 10 and 30 images per class (``benchmarks/sizes.py``'s
draws) and on all of ``new_train``; each run trains the same copy (same seed), then ``calibrate``
compresses it to rank R and calibrates. Scored on EmojiCOCO ``val``: old AP, new AP (and its ratio
to the whole copy's), old-class detections on new objects. Writes the ``branch_rank`` section of
RESULTS.md and ``branch_rank`` in results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from sizes import STEP1, bench_base, draw, score, train  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402

HERE = Path(__file__).parent
RANKS = (0, 32, 64)
SIZES = ("10", "30", "all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    parser.add_argument("--from-results", action="store_true", help="only write RESULTS.md's section from results.json")
    args = parser.parse_args()
    if args.from_results:
        return write_section("branch_rank", table(json.loads((HERE / "results.json").read_text())["branch_rank"]))
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)
    val = load_dataset(args.data / "val.json", args.data / "images")
    rows = {}
    for size in SIZES:
        train_file = args.data / "new_train.json" if size == "all" else draw(args.data, int(size), 0)
        for rank in RANKS:
            out = args.runs / f"rank{rank}-{size}-draw0"
            run = train(args, out, train_file, bench_base(args.bench), ("--branch-rank", str(rank)))
            model = detgraft.load_model(out)
            rows[f"{size}/{rank}"] = score(model, val, STEP1) | {
                "branch_parameters": sum(p.numel() for p in model.roi_heads.branches[0].parameters()),
                "command": run["command"],
            }
            print(size, rank, rows[f"{size}/{rank}"], flush=True)
    results = json.loads((HERE / "results.json").read_text())
    results["branch_rank"] = {"ranks": list(RANKS), "sizes": list(SIZES), "rows": rows}
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("branch_rank", table(results["branch_rank"]))
    print(table(results["branch_rank"]))


def table(s: dict) -> str:
    lines = [
        "## branch_rank: how much of its trained box head a branch keeps (issue 30), chosen on val",
        "",
        "EmojiCOCO `val`, draw 0 of each size, default settings but `--branch-rank` (0: the whole copy). New AP x "
        "copy: the run's new AP over rank 0's. Branch parameters: the whole branch (box head, predictor), EmojiCOCO's "
        "ResNet-18 FPN base (fc6 3136 -> 256).",
        "",
        "| images per class | rank | old AP | new AP | new AP x copy | old-on-new | branch parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in s["sizes"]:
        copy = s["rows"][f"{size}/0"]["new_ap"]
        for rank in s["ranks"]:
            r = s["rows"][f"{size}/{rank}"]
            lines.append(
                f"| {size} | {rank} | {r['old_ap']:.4f} | {r['new_ap']:.4f} | {r['new_ap'] / copy:.3f} | "
                f"{r['old_on_new']} | {r['branch_parameters']} |"
            )
    lines += ["", "Commands, in the order of the rows:", ""]
    lines += [f"- `{s['rows'][f'{size}/{rank}']['command']}`" for size in s["sizes"] for rank in s["ranks"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
