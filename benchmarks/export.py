"""``detgraft export`` on EmojiCOCO models: TorchScript and ONNX against the eager model.

    python benchmarks/export.py --data $DATA --runs $RUNS [--families-runs $FAMILY_RUNS]
    (after benchmarks/sizes.py --others head; and benchmarks/families.py for its Mask R-CNN and FCOS models)

Exports the default strategy's model (``branch``, 10 images per class, draw 0: calibrated, its
merge acting) and the ``head`` model of the same images to TorchScript and to ONNX (and the
``head`` model as a plain torchvision state dict, which a branch model cannot be) with
``detgraft.export.export``, which runs the written file (``torch.jit.load``; onnxruntime) and the
eager model on the same images and reports the largest box and score difference. Images: the first
4 test images (256 x 256) and the first one resized to 300 x 500 (another size and aspect than the
ONNX trace's). Writes the ``export`` section of RESULTS.md and ``export`` in results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.images import (
    find_images,  # noqa: E402
    load_image,  # noqa: E402
)
from detgraft.export import export  # noqa: E402

HERE = Path(__file__).parent
MODELS = {"branch (the default)": "k10-draw0", "head": "head-k10-draw0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/detgraft-export"))
    parser.add_argument(
        "--families-runs", type=Path, help="benchmarks/families.py's runs: also its Mask R-CNN and FCOS models"
    )
    args = parser.parse_args()
    files = find_images(args.data / "images" / "test")[:4]
    images = [load_image(str(f)).float() / 255 for f in files]
    images.append(F.interpolate(images[0][None], size=(300, 500), mode="bilinear")[0])
    rows = []
    models = {name: args.runs / folder for name, folder in MODELS.items()}
    if args.families_runs:
        models["Mask R-CNN branch (all images)"] = args.families_runs / "maskrcnn-all"
        models["FCOS branch (all images)"] = args.families_runs / "fcos-all"
    for name, path in models.items():
        folder = path.name
        model = detgraft.load_model(path)
        for format, suffix in (("torchscript", "pt"), ("onnx", "onnx"), ("torchvision", "safetensors")):
            if format == "torchvision" and "branch" in name:
                continue  # refused: a branch model is not one torchvision predictor
            out = args.out / f"{folder}.{suffix}"
            check = export(model, out, format, images=images)
            rows.append(
                {"model": name, "folder": folder, "format": format, "file_mb": round(out.stat().st_size / 2**20, 1)}
                | check
            )
            print(rows[-1], flush=True)
    results = json.loads((HERE / "results.json").read_text())
    results["export"] = rows
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("export", table(rows))


def table(rows: list[dict]) -> str:
    lines = [
        "## Export to TorchScript, ONNX and a torchvision state dict (EmojiCOCO)",
        "",
        "Command: `python benchmarks/export.py --data $DATA --runs $RUNS --families-runs $FAMILY_RUNS` (the "
        "models of `benchmarks/sizes.py "
        "--others head`, 10 images per class, draw 0): each model written by `detgraft.export.export`, the file "
        "run (`torch.jit.load`; onnxruntime on the CPU; a fresh model of its builder loading the state dict) and "
        "the eager model on the first 4 test images (256 x 256) and the first one resized to 300 x 500, one image "
        "at a time; the same labels and counts, each detection paired with the exported one of the same label "
        "nearest in box and score, and the largest differences. The branch model is refused as a torchvision "
        "state dict (one predictor cannot hold it). With `--families-runs $FAMILY_RUNS` (`benchmarks/families.py`'s "
        "runs) also its Mask R-CNN and FCOS step-1 models, masks compared. CLI: "
        "`python -m detgraft export $RUNS/k10-draw0 "
        "--format onnx --out model.onnx --images $DATA/images/test`.",
        "",
        "| model | format | detections compared | largest box difference (px) | largest score difference | "
        "largest mask difference | file MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mask = f"{r['max_mask_difference']:.2g}" if "max_mask_difference" in r else "-"
        lines.append(
            f"| {r['model']} | {r['format']} | {r['detections']} | {r['max_box_difference']:.2g} | "
            f"{r['max_score_difference']:.2g} | {mask} | {r['file_mb']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
