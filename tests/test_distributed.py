"""``torchrun --nproc_per_node=2 -m detgraft extend``: data-parallel on the CPU (gloo), a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import safetensors.torch

from conftest import TINY_BUILDER, write_coco
from tiny_model import build

# the processes draw their own proposal and RoI samples (see detgraft.distributed): the mean
# relative difference of the loss curves stays under this (measured here: 0.001 over 8 steps)
TOLERANCE = 0.02


def run(argv: list[str], processes: int) -> None:
    launch = [sys.executable, "-m", "detgraft"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launch += ["-m", "detgraft"]
    done = subprocess.run([*launch, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_train_like_one_and_rank_0_alone_writes(tmp_path):
    write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 30, 30], [30, 20, 30, 40]], count=8)
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    common = ["extend", "--base", TINY_BUILDER, "--weights", str(weights), "--train", str(tmp_path / "train.json"),
              "--images", str(tmp_path / "images"), "--batch-size", "4", "--lr", "0.01", "--workers", "0",
              "--device", "cpu"]  # fmt: skip
    run([*common, "--steps", "8", "--out", str(tmp_path / "one")], processes=1)
    run([*common, "--steps", "8", "--out", str(tmp_path / "two")], processes=2)
    one = json.loads((tmp_path / "one" / "extend.json").read_text())
    two = json.loads((tmp_path / "two" / "extend.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    a, b = one["loss_curve"]["loss"], two["loss_curve"]["loss"]
    assert len(a) == len(b) == 8
    difference = sum(abs(x - y) / abs(x) for x, y in zip(a, b)) / len(a)
    print(f"loss curves, 1 vs 2 processes: mean relative difference {difference:.3f}\n{a}\n{b}")
    assert difference < TOLERANCE
    assert a != b  # two processes really ran, with their own samples
    # one checkpoint, one log, written by rank 0 alone
    log = (tmp_path / "two" / "extend.log").read_text()
    assert log.count("trained in") == 1 and log.count("new classes:") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())

    # --resume under torchrun continues from rank 0's checkpoint
    run([*common, "--steps", "4", "--out", str(tmp_path / "cut")], processes=2)
    run([*common, "--steps", "8", "--out", str(tmp_path / "cut"), "--resume"], processes=2)
    resumed = json.loads((tmp_path / "cut" / "extend.json").read_text())
    assert resumed["steps"] == 8 and resumed["loss_curve"]["from_step"] == 4 and len(resumed["loss_curve"]["loss"]) == 4
