"""How fast the training data comes, against how fast the model trains on it (EmojiCOCO, 2 cores).

    python benchmarks/loader.py --bench ../shared/bench --data $DATA [--steps 40]

Loader: ``detgraft.training_data.training_batches`` over ``new_train`` (batches of 8, flips) with
0 workers (decoding in the calling thread, the worst case) and with jitter, timed alone: images/s.
Training: the default strategy's training step (``branch`` on the EmojiCOCO base) on batches
already in memory: images/s. The loader keeps up when its rate is well above the step's; with
``--workers 1`` (the default) it decodes while the step runs. Writes the ``loader`` section of
RESULTS.md and ``loader`` in results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.batches import TrainingSet, training_batches  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.extend import class_mapping  # noqa: E402
from detgraft.settings import ExtendSettings  # noqa: E402
from detgraft.train import optimizer_and_schedule  # noqa: E402

HERE = Path(__file__).parent


def images_per_second(settings: ExtendSettings, data: TrainingSet, steps: int) -> float:
    start = time.perf_counter()
    for _ in training_batches(data, 0, steps, settings):
        pass
    return steps * settings.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    b = args.bench
    model = detgraft.load_model(f"{b}/base_model.py:build", b / "base.safetensors", b / "base.json")
    train = load_dataset(args.data / "new_train.json", args.data / "images")
    names, by_id = class_mapping(train, model)
    data = TrainingSet(train, by_id)
    settings = ExtendSettings(workers=0)
    loader = images_per_second(settings, data, args.steps)
    jitter = images_per_second(replace(settings, jitter=True), data, args.steps)
    detgraft.expand_predictor(model, names)
    detgraft.incremental(model, "branch")
    optimizer, _ = optimizer_and_schedule(model, replace(settings, steps=args.steps))
    batches = list(training_batches(data, 0, args.steps, settings))
    model.train()
    start = time.perf_counter()
    for images, targets in batches:
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step = args.steps * settings.batch_size / (time.perf_counter() - start)
    row = {
        "loader_images_per_s": round(loader, 1),
        "loader_jitter_images_per_s": round(jitter, 1),
        "train_step_images_per_s": round(step, 1),
        "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/loader.py --bench ../shared/bench --data $DATA",
    }
    results = json.loads((HERE / "results.json").read_text())
    results["loader"] = row
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("loader", table(row))
    print(table(row))


def table(r: dict) -> str:
    return "\n".join(
        [
            "## Training data against the training step (EmojiCOCO `new_train`, 2 cores)",
            "",
            f"Command: `{r['command']}` (batches of 8 with flips; the loader timed alone with 0 workers, "
            f"decoding in one thread; the `branch` training step on batches in memory; {r['torch_threads']} torch "
            "threads).",
            "",
            "| loader, images/s | loader with `--jitter`, images/s | training step, images/s |",
            "|---|---|---|",
            f"| {r['loader_images_per_s']} | {r['loader_jitter_images_per_s']} | {r['train_step_images_per_s']} |",
        ]
    )


if __name__ == "__main__":
    main()
