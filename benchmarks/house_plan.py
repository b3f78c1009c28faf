"""The restructure (issue 27) changes no number: the same seeded runs give the same weights and
detections, bit for bit, before and after, and a checkpoint saved before loads and detects the same.

    # before: the last commit before the restructure, in a worktree beside this checkout (its
    # benchmarks find ../shared/bench from there; this run used /tmp/before and a link /tmp/shared)
    git worktree add ../before 249dcd4
    cp python/detgraft/_core*.so python/detgraft/_built_for.py ../before/python/detgraft/
    cp benchmarks/house_plan.py ../before/benchmarks/
    (cd ../before && PYTHONPATH=python python benchmarks/house_plan.py --stage before --runs $RUNS)
    # after: this checkout; compares with the record of the stage before and writes the section
    python benchmarks/house_plan.py --stage after --runs $RUNS

Three seeded runs of ``detgraft extend`` with their defaults, each in its own process: the Faster
R-CNN base with 10 images per new class (draw 0 of ``benchmarks/sizes.py``), and step 1 (all of
``new_train``) on the FCOS and Mask R-CNN bases of ``benchmarks/families.py`` (trained once, by the
code before, with ``--fcos-steps 60 --mask-steps 20``: the bases are inputs here, not results).
Each run's fingerprint is the SHA-256 of every tensor of its checkpoint and of its detections
(boxes, scores, labels, masks) on the first ``--images`` val images. The stage after also loads the
checkpoints the stage before saved and detects with them. Reads only the model through
``detgraft.load_model`` and the images with Pillow, so the same file runs on either layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms.functional import pil_to_tensor

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402

HERE = Path(__file__).parent
RUNS = ("k10-draw0", "fcos-all", "maskrcnn-all")


def sha(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def weights_of(folder: Path) -> dict[str, str]:
    return {name: sha(t) for name, t in sorted(load_file(str(folder / "model.safetensors")).items())}


def detections_of(folder: Path, data: Path, count: int) -> str:
    """One SHA-256 over the detections of the checkpoint in ``folder`` on the first ``count`` val images."""
    model = detgraft.load_model(folder).eval()
    images = sorted(json.loads((data / "val.json").read_text())["images"], key=lambda im: im["id"])[:count]
    digest = hashlib.sha256()
    with torch.no_grad():
        for im in images:
            image = pil_to_tensor(Image.open(data / "images" / im["file_name"]).convert("RGB")).float() / 255
            (out,) = model([image])
            digest.update(sha(*(out[k] for k in sorted(out))).encode())
    return digest.hexdigest()


def run_all(args) -> dict:
    """The three runs in ``args.runs/{stage}``, the bases (made once, by the stage before) in ``args.runs``."""
    sys.path.insert(0, str(HERE))
    from families import train_fcos_base, train_mask_rcnn_base
    from sizes import draw, train

    shared = Namespace(bench=args.bench, data=args.data, runs=args.runs, fcos_steps=60, mask_steps=20)
    if args.stage == "before":
        train_fcos_base(shared)
        train_mask_rcnn_base(shared)
    stage = Namespace(bench=args.bench, data=args.data, runs=args.runs / args.stage)
    bench = ["--base", f"{args.bench}/base_model.py:build", "--weights", f"{args.bench}/base.safetensors"]
    bench += ["--classes", f"{args.bench}/base.json"]
    trains = {
        "k10-draw0": (draw(args.data, 10, 0), bench),
        "fcos-all": (args.data / "new_train.json", ["--base", str(args.runs / "fcos-base")]),
        "maskrcnn-all": (args.data / "new_train.json", ["--base", str(args.runs / "maskrcnn-base")]),
    }
    record = {}
    for name, (train_file, base) in trains.items():
        run = train(stage, stage.runs / name, train_file, base)
        record[name] = {
            "command": run["command"].replace(str(args.runs), "$RUNS"),
            "seconds": run.get("seconds"),
            "weights": weights_of(stage.runs / name),
            "detections": detections_of(stage.runs / name, args.data, args.images),
        }
        print(name, record[name]["detections"][:16], flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("before", "after"), required=True)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emoji-masks"), help="EmojiCOCO written with --masks")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-house-plan"))
    parser.add_argument("--images", type=int, default=200, help="val images whose detections are compared")
    args = parser.parse_args()
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    (args.runs / args.stage).mkdir(parents=True, exist_ok=True)
    record = run_all(args)
    (args.runs / f"{args.stage}.json").write_text(json.dumps(record, indent=1))
    if args.stage == "before":
        return
    before = json.loads((args.runs / "before.json").read_text())
    rows = []
    for name in RUNS:
        old_checkpoint = detections_of(args.runs / "before" / name, args.data, args.images)
        rows.append(
            {
                "run": name,
                "command": record[name]["command"],
                "tensors": len(record[name]["weights"]),
                "weights_equal": record[name]["weights"] == before[name]["weights"],
                "detections_equal": record[name]["detections"] == before[name]["detections"],
                "old_checkpoint_detections_equal": old_checkpoint == before[name]["detections"],
            }
        )
        print(rows[-1], flush=True)
    results = json.loads((HERE / "results.json").read_text())
    results["house_plan"] = {"images": args.images, "runs": rows}
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = [
        "## The restructure changes no number (issue 27)",
        "",
        "`python benchmarks/house_plan.py --stage after --runs $RUNS`, after `--stage before` ran in a worktree "
        "of commit 249dcd4 (the layout before; commands in the script's docstring). Each run is the command "
        f"shown, seeded, in its own process; detections on the first {args.images} val images.",
        "",
        "| run | tensors | weights identical | detections identical | checkpoint saved before: same detections |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['command']}` | {r['tensors']} | {yes(r['weights_equal'])} | {yes(r['detections_equal'])} "
            f"| {yes(r['old_checkpoint_detections_equal'])} |"
        )
    write_section("house_plan", "\n".join(lines))


if __name__ == "__main__":
    main()
