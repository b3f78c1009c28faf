"""Speed on a CUDA machine (run by ``scripts/gpu_check.sh``): torchvision's
``fasterrcnn_resnet50_fpn`` (random weights, 800 x 800 images) and the default strategy.

    python benchmarks/gpu_speed.py [--device cuda] [--steps 20] [--size 800]

- training: ``extend``'s own loop (``detgraft.extend._train``: batches of 4 decoded in a DataLoader
  worker into pinned memory, the ``branch`` strategy) on 32 synthetic images (noise with chicken and
  frog boxes), images/s with ``--amp off`` and with ``--amp auto`` (bf16 where the GPU has it,
  else fp16 with a gradient scaler), from the same start;
- latency: the base and the extended model (one calibrated branch), one image at a time,
  interleaved, median of 30 after a warm-up; the ratio is the extended model's over the base's.

Random weights detect nothing meaningful, but the computation, and so the time, is the model's.
Writes the ``gpu_speed`` section of RESULTS.md and ``gpu_speed`` in results.json. With
``--device cpu --size 320 --steps 2`` it runs anywhere (a check of the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torchvision.models.detection import fasterrcnn_resnet50_fpn

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.batches import TrainingSet  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.extend import class_mapping  # noqa: E402
from detgraft.model.builders import torchvision_builder  # noqa: E402
from detgraft.settings import ExtendSettings  # noqa: E402
from detgraft.train import optimizer_and_schedule  # noqa: E402
from detgraft.train import train_loop as extend_loop  # noqa: E402

HERE = Path(__file__).parent


def synthetic(folder: Path, size: int, count: int = 32):
    """``count`` noise images of ``size`` with one chicken and one frog box each, as COCO json."""
    g = torch.Generator().manual_seed(0)
    (folder / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "chicken"}, {"id": 2, "name": "frog"}]}
    for i in range(count):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        for k in (1, 2):
            x, y = (torch.rand(2, generator=g) * size / 2).tolist()
            coco["annotations"].append(
                {"id": 2 * i + k, "image_id": i, "category_id": k, "bbox": [x, y, size / 4, size / 4], "area": 1.0}
            )
    (folder / "train.json").write_text(json.dumps(coco))
    return load_dataset(folder / "train.json", folder / "images")


def base_model(device: str):
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).to(device).eval()
    detgraft.get_card(model).builder = torchvision_builder("fasterrcnn_resnet50_fpn")  # for extend's checkpoints
    return model


def extended(train, device: str):
    model = base_model(device)
    names, by_id = class_mapping(train, model)
    detgraft.expand_predictor(model, names)
    detgraft.incremental(model, "branch")
    return model.to(device), TrainingSet(train, by_id)


def training_rate(train, settings: ExtendSettings, out: Path) -> float:
    model, data = extended(train, settings.device)
    optimizer, scheduler = optimizer_and_schedule(model, settings)
    warm = replace(settings, steps=2)
    extend_loop(model, data, warm, optimizer, scheduler, 0, out)  # CUDA kernels chosen, memory reserved
    sync(settings.device)
    start = time.perf_counter()
    extend_loop(model, data, settings, optimizer, scheduler, 2, out)
    sync(settings.device)
    return (settings.steps - 2) * settings.batch_size / (time.perf_counter() - start)


@torch.no_grad()
def latency(base, model, pictures, device: str) -> tuple[float, float]:
    for im in pictures[:3]:
        base([im]), model([im])
    times = {"base": [], "model": []}
    for im in pictures:
        for name, m in (("base", base), ("model", model)):
            sync(device)
            start = time.perf_counter()
            m([im])
            sync(device)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["base"]), statistics.median(times["model"])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--no-write", action="store_true", help="print only (a check of the script)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="detgraft-gpu-speed-"))
    train = synthetic(folder, args.size)
    settings = ExtendSettings(steps=args.steps + 2, batch_size=4, device=args.device, checkpoint_every=10**6)
    rates = {}
    for amp in ("off", "auto"):
        chosen = replace(settings, amp=amp)  # __post_init__ resolves auto for this device (the CPU: off)
        if chosen.amp in rates:
            continue
        rates[chosen.amp] = round(training_rate(train, chosen, folder / f"run-{amp}"), 2)
        print("training", chosen.amp, rates[chosen.amp], "images/s", flush=True)
    base = base_model(args.device)
    model, data = extended(train, args.device)
    detgraft.calibrate(model.eval(), (data.example(i) for i in range(8)))
    pictures = [data.example(i)[0].to(args.device) for i in range(30)]
    base_s, model_s = latency(base, model.eval(), pictures, args.device)
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "training_images_per_s": rates,
        "base_ms": round(1000 * base_s, 2),
        "extended_ms": round(1000 * model_s, 2),
        "latency_ratio": round(model_s / base_s, 3),
        "command": "python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.no_write:
        return
    results = json.loads((HERE / "results.json").read_text())
    results["gpu_speed"] = result
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("gpu_speed", table(result))


def table(r: dict) -> str:
    rates = ", ".join(f"{amp}: {rate}" for amp, rate in r["training_images_per_s"].items())
    return "\n".join(
        [
            f"## Speed on {r['device']} (fasterrcnn_resnet50_fpn, random weights, {r['size']} px)",
            "",
            f"Command: `{r['command']}` (torch {r['torch']}; `scripts/gpu_check.sh` runs it).",
            "",
            "| training images/s (extend's loop, branch, batches of 4), by --amp | base ms | extended ms | ratio |",
            "|---|---|---|---|",
            f"| {rates} | {r['base_ms']} | {r['extended_ms']} | {r['latency_ratio']} |",
        ]
    )


if __name__ == "__main__":
    main()
