"""EmojiCOCO ``new_train`` as COCO json, Pascal VOC and YOLO: the same ``extend`` result from each.

    python benchmarks/formats.py --data $DATA --runs $RUNS [--steps 40]

Writes ``new_train`` in the VOC layout (``$RUNS/formats/voc``) and as a YOLO dataset
(``$RUNS/formats/yolo``) with ``detgraft.writers``, runs ``detgraft data check`` on each, then
``detgraft extend`` with its defaults and ``--steps`` on each of the three (same seed) and compares
the trained weights (SHA-256 of ``model.safetensors``) and the final losses. Writes the
``formats`` section of RESULTS.md and ``formats`` in results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from sizes import shown  # noqa: E402

from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.data.writers import write_voc, write_yolo  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-formats"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    coco = load_dataset(args.data / "new_train.json", args.data / "images")
    sources = {
        "coco": ["--train", str(args.data / "new_train.json"), "--images", str(args.data / "images")],
        "voc": ["--train", str(write_voc(coco, args.runs / "formats" / "voc"))],
        "yolo": ["--train", str(write_yolo(coco, args.runs / "formats" / "yolo"))],
    }
    base = ["--base", f"{args.bench}/base_model.py:build", "--weights", str(args.bench / "base.safetensors")]
    base += ["--classes", str(args.bench / "base.json")]
    rows = {}
    for name, train in sources.items():
        check = [sys.executable, "-m", "detgraft", "data", "check", train[1], *train[2:]]
        check += ["--json", str(args.runs / f"check-{name}.json")]
        subprocess.run(check, check=True, capture_output=True)
        report = json.loads((args.runs / f"check-{name}.json").read_text())[0]
        out = args.runs / f"extend-{name}"
        cmd = [sys.executable, "-m", "detgraft", "extend", *base, *train, "--out", str(out), "--steps", str(args.steps)]
        if not (out / "extend.json").is_file():
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(name, f"{time.perf_counter() - start:.0f} s", flush=True)
        rows[name] = {
            "images": report["images"],
            "boxes": report["boxes_per_class"],
            "problems": report["counts"],
            "weights_sha256": json.loads((out / "detgraft.json").read_text())["weights_sha256"],
            "final_losses": json.loads((out / "extend.json").read_text())["final_losses"],
            "command": shown(args, cmd),
        }
    results = json.loads((HERE / "results.json").read_text())
    results["formats"] = rows
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("formats", table(rows, args.steps))
    print(table(rows, args.steps))


def table(rows: dict, steps: int) -> str:
    same = len({r["weights_sha256"] for r in rows.values()}) == 1
    lines = [
        "## One dataset in three formats (EmojiCOCO `new_train`)",
        "",
        "Command: `python benchmarks/formats.py --data $DATA --runs $RUNS` (`new_train` written as Pascal VOC and "
        f"YOLO by `detgraft.writers`, checked by `detgraft data check`, then `detgraft extend` with its defaults and "
        f"`--steps {steps}` on each). Trained weights identical across the three: **{'yes' if same else 'no'}**.",
        "",
        "| format | images | boxes per class | problems | weights SHA-256 | final losses | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        losses = ", ".join(f"{k} {v:.4f}" for k, v in r["final_losses"].items())
        lines.append(
            f"| {name} | {r['images']} | {r['boxes']} | {r['problems'] or 'none'} | `{r['weights_sha256'][:16]}` "
            f"| {losses} | `{r['command']}` |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
