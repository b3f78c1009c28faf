"""Which torchvision detection models ``torch.export`` takes (``detgraft export --format pt2``), with
torchvision's ops and with detgraft's, and what stops the others.

    python benchmarks/pt2.py

Each family's torchvision builder, untrained, 5 classes, one 128 x 128 image (SSD at its own 320),
exported with ``torch.export.export`` (non-strict) as torchvision made it, and by ``detgraft export
--format pt2`` (the same with detgraft's operators; the program then compared with the model on the
image). An export that stops is listed with the line of code where it stopped (a Python branch on a
value computed from the image: torch.export cannot trace a data-dependent branch). Writes the
``pt2`` section of benchmarks/RESULTS.md and ``pt2`` in results.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

from detgraft.export import ExportBlocked, export, stopped_at  # noqa: E402

HERE = Path(__file__).parent
SMALL = {"weights": None, "weights_backbone": None, "num_classes": 5, "min_size": 128, "max_size": 128}
BUILDERS = {
    "fasterrcnn_mobilenet_v3_large_fpn": SMALL,
    "maskrcnn_resnet50_fpn": SMALL,
    "retinanet_resnet50_fpn": SMALL | {"score_thresh": 0.005},  # untrained: scores its threshold lets through
    "fcos_resnet50_fpn": SMALL | {"score_thresh": 0.05},
    "ssdlite320_mobilenet_v3_large": {"weights": None, "weights_backbone": None, "num_classes": 5},
}


def attempt(model, image, rust_ops: bool, out: Path) -> dict:
    """torch.export of ``model`` as torchvision made it, or as ``detgraft export --format pt2`` does
    (with detgraft's operators; the written program then compared with the model on ``image``)."""
    start = time.perf_counter()
    try:
        if rust_ops:
            check = export(model, out, "pt2", images=[image])
        else:
            torch.export.export(model, ([image],), strict=False)
            check = None
    except Exception as err:  # what stops it, and where in torchvision's (or detgraft's) code
        return {
            "exported": False,
            "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}",
            "at": err.at if isinstance(err, ExportBlocked) else stopped_at(err),
        }
    return {"exported": True, "seconds": round(time.perf_counter() - start, 1), "check": check}


def main() -> None:
    rows = {}
    for name, kwargs in BUILDERS.items():
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, **kwargs).eval()
        image = torch.rand(3, 320 if name.startswith("ssd") else 128, 320 if name.startswith("ssd") else 128)
        with tempfile.TemporaryDirectory() as tmp:
            rows[name] = {
                "torchvision ops": attempt(model, image, False, Path(tmp) / "model.pt2"),
                "detgraft ops": attempt(model, image, True, Path(tmp) / "model.pt2"),
            }
        print(name, rows[name], flush=True)
    results = json.loads((HERE / "results.json").read_text())
    results["pt2"] = {"torch": torch.__version__, "torchvision": torchvision.__version__, "models": rows}
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    def cell(r: dict) -> str:
        if not r["exported"]:
            return f"stops at `{r['at']}`"
        c = r["check"]
        return "exported" + (
            f", {c['detections']} detections, max box difference {c['max_box_difference']:.2g} px" if c else ""
        )

    lines = [
        "## torch.export (`detgraft export --format pt2`)",
        "",
        f"`python benchmarks/pt2.py` — torch {torch.__version__}, torchvision {torchvision.__version__}: each "
        "builder untrained, one image, `torch.export.export(model, ([image],), strict=False)` as torchvision made "
        "it, and `detgraft export --format pt2` (the same with detgraft's operators, the program compared with "
        "the model on the image).",
        "",
        "| model | torchvision's ops | detgraft's ops |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {cell(r['torchvision ops'])} | {cell(r['detgraft ops'])} |" for n, r in rows.items()]
    write_section("pt2", "\n".join(lines))


if __name__ == "__main__":
    main()
