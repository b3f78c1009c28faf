"""Inference latency of every strategy's model against the base, and extend's training speed
against a plain torchvision loop (EmojiCOCO, CPU; every ratio from one run).

    python benchmarks/speed.py --bench ../shared/bench --data $DATA --runs $RUNS

Models: ``detgraft extend`` with each strategy and ``--steps 20`` (latency does not depend on how
long a model trained), kept in ``$RUNS/speed-STRATEGY``. Latency: the base and each model detect the
same 64 ``test`` images one at a time, three passes, each image by both back to back (which one
first alternating) after a warm-up, median seconds per image; the ratio is the model's over the
base's. Training: ``--steps`` steps of 8 of the ``naive`` strategy on ``new_train`` timed inside
``extend`` (its loop: batches from DataLoader workers, progress bar, loss checks, detgraft's NMS
and RoIAlign) against a plain torchvision loop on the same model, data and optimizer
(``TrainingSet.batch`` in the loop, ``loss.backward()``, ``optimizer.step()``): images/s of each.
Writes the ``speed`` section of RESULTS.md and ``speed`` in results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from sizes import shown  # noqa: E402

import detgraft  # noqa: E402
from detgraft import ops  # noqa: E402
from detgraft.data.batches import TrainingSet  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.data.images import load_image  # noqa: E402
from detgraft.extend import class_mapping  # noqa: E402
from detgraft.settings import ExtendSettings  # noqa: E402
from detgraft.strategies.incremental import STRATEGIES  # noqa: E402
from detgraft.train import optimizer_and_schedule  # noqa: E402
from detgraft.train import train_loop as extend_loop  # noqa: E402  (extend's own training loop)

HERE = Path(__file__).parent
ROUNDS = 3  # passes over the 64 images for latency


@torch.no_grad()
def latency(base, model, pictures, rounds: int = ROUNDS) -> tuple[float, float]:
    """Median seconds per image of the base and of the model over ``rounds`` passes of
    ``pictures``, each image run by both back to back, which one first alternating (the second
    run of an image found its data in the caches)."""
    base.eval(), model.eval()
    for im in pictures[:4]:
        base([im]), model([im])
    times = {"base": [], "model": []}
    for k in range(rounds * len(pictures)):
        im = pictures[k % len(pictures)]
        pair = (("base", base), ("model", model))
        for name, m in pair if k % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            m([im])
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["base"]), statistics.median(times["model"])


def training_speed(args, base_args) -> dict:
    """images/s of extend's loop (with detgraft's ops, as extend runs it on the CPU) and of a plain
    torchvision loop, naive strategy, same model, data and optimizer."""
    train = load_dataset(args.data / "new_train.json", args.data / "images")
    settings = ExtendSettings(strategy="naive", steps=args.steps, lr=0.01, checkpoint_every=10**6)

    def prepared():
        model = detgraft.load_model(*base_args)
        names, by_id = class_mapping(train, model)
        detgraft.expand_predictor(model, names)
        detgraft.incremental(model, "naive")
        return model, TrainingSet(train, by_id)

    model, data = prepared()
    optimizer, scheduler = optimizer_and_schedule(model, settings)
    out = args.runs / "speed-loop"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ops.everywhere():  # as extend runs its loop on the CPU
        extend_loop(model, data, replace(settings, device="cpu"), optimizer, scheduler, 0, out)
    extend_rate = args.steps * settings.batch_size / (time.perf_counter() - start)

    model, data = prepared()
    optimizer, scheduler = optimizer_and_schedule(model, settings)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        images, targets = data.batch(step, settings.batch_size, settings.seed, settings.hflip)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    plain_rate = args.steps * settings.batch_size / (time.perf_counter() - start)
    return {"extend_images_per_s": round(extend_rate, 2), "plain_images_per_s": round(plain_rate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-speed"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    b = args.bench
    base_args = (f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    test = load_dataset(args.data / "test.json", args.data / "images")
    pictures = [load_image(test.path(im)).float() / 255 for im in test.coco["images"][:64]]
    base = detgraft.load_model(*base_args)
    rows = {}
    for strategy in STRATEGIES:
        out = args.runs / f"speed-{strategy}"
        cmd = [sys.executable, "-m", "detgraft", "extend", "--base", base_args[0], "--weights", str(base_args[1])]
        cmd += ["--classes", str(base_args[2]), "--train", str(args.data / "new_train.json")]
        cmd += ["--images", str(args.data / "images"), "--out", str(out), "--strategy", strategy, "--steps", "20"]
        if not (out / "extend.json").is_file():
            subprocess.run(cmd, check=True, capture_output=True)
        base_s, model_s = latency(base, detgraft.load_model(out), pictures)
        rows[strategy] = {
            "base_ms": round(1000 * base_s, 1),
            "model_ms": round(1000 * model_s, 1),
            "ratio": round(model_s / base_s, 3),
            "command": shown(args, cmd),
        }
        print(strategy, rows[strategy], flush=True)
    result = {
        "latency": rows,
        "rounds": ROUNDS,
        "training": training_speed(args, base_args),
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
    }
    result["command"] = shown(args, ["python", "benchmarks/speed.py", *sys.argv[1:]])
    results = json.loads((HERE / "results.json").read_text())
    results["speed"] = result
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("speed", table(result))
    print(table(result))


def table(r: dict) -> str:
    t = r["training"]
    lines = [
        "## Speed on the CPU (EmojiCOCO)",
        "",
        f"Command: `{r['command']}` ({r['torch_threads']} torch threads). Latency: 64 `test` images one at a "
        f"time, {r.get('rounds', 1)} passes, each image by the base and the model back to back (which first "
        "alternating), median per image; each model is `detgraft extend --steps 20` with the strategy (the "
        "command beside it). `naive`, `head`, `pseudo` and `distill` give one model of the same shape (the base "
        "widened by 2 classes); their spread shows the noise.",
        "",
        "| strategy | base ms/image | model ms/image | latency x base | command |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["latency"].items():
        lines.append(f"| {name} | {row['base_ms']} | {row['model_ms']} | {row['ratio']:.3f} | `{row['command']}` |")
    ratio = t["plain_images_per_s"] / t["extend_images_per_s"]
    lines += [
        "",
        f"Training, `naive` on `new_train`, {r['steps']} steps of 8: `extend`'s loop {t['extend_images_per_s']} "
        f"images/s, a plain torchvision loop on the same model, data and optimizer {t['plain_images_per_s']} "
        f"images/s: extend's step takes {ratio:.2f}x the plain loop's time.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
