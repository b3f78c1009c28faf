"""The README's commands cannot rot: every ``detgraft ...`` command in it parses with today's CLI,
its Python blocks compile, and its first two commands are the ones ``.ci/run`` and the tests run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision

import detgraft
from conftest import write_coco
from detgraft.cli import _parser, main
from detgraft.model.builders import weights_cache_path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def detgraft_commands() -> list[str]:
    found = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("detgraft "):
                    found.append(part)
    return found


@pytest.mark.parametrize("command", detgraft_commands())
def test_every_readme_command_parses(command):
    args = _parser().parse_args(shlex.split(command)[1:])
    assert callable(args.run)


def test_readme_names_the_commands_it_should():
    names = {shlex.split(c)[1] for c in detgraft_commands()}
    assert {"demo", "extend", "eval", "predict", "drift", "inspect"} <= names


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_readme_python_blocks_compile(index):
    compile(BLOCKS[index][1], f"README block {index}", "exec")


def test_readme_model_commands_run(tmp_path, monkeypatch):
    """Runs the README's extend/eval/predict/inspect/drift lines as written for fasterrcnn_resnet50_fpn with
    COCO_V1 weights from torch's cache (a stand-in file with random weights at the cached name, so that
    the offline path of the README is what runs), placeholders filled and a 2-step budget added."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    coco = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None)
    with torch.no_grad():  # every proposal a confident 'person', so the base has detections to keep
        coco.roi_heads.box_predictor.cls_score.bias[1] = 10.0
    cached = weights_cache_path(torchvision.models.get_model_weights("fasterrcnn_resnet50_fpn").COCO_V1)
    cached.parent.mkdir(parents=True)
    torch.save(coco.state_dict(), cached)
    base = tmp_path / "base"
    detgraft.save_checkpoint(detgraft.load_model("fasterrcnn_resnet50_fpn", "COCO_V1"), base)
    images = tmp_path / "images"
    boxes = [[2, 8, 18, 18], [22, 8, 18, 18], [42, 8, 18, 18]]
    write_coco(tmp_path, "new", ["chicken", "frog"], boxes[:2], count=1)
    for split in ("val", "test"):
        write_coco(tmp_path, split, ["person", "chicken", "frog"], boxes, count=1)
    fill = {
        "new.json": tmp_path / "new.json",
        "val.json": tmp_path / "val.json",
        "test.json": tmp_path / "test.json",
        "DIR": images,
        "photos/": images,
        "IMAGE_OR_DIR": images,
        "MODEL": "runs/chicken-frog",  # what the README's extend line wrote
        "BASE": base,
    }
    ran = []
    for command in detgraft_commands():
        words = shlex.split(command)[1:]
        if words[0] == "demo":
            continue  # run by tests/test_examples.py (--quick)
        for i, word in enumerate(words):
            if i and words[i - 1] == "--out" and word == "DIR":
                words[i] = str(tmp_path / "out" / f"{len(ran)}-{words[0]}")
            elif word in fill:
                words[i] = str(fill[word])
        if words[0] == "extend":
            words += ["--steps", "2", "--batch-size", "1", "--warmup", "1", "--checkpoint-every", "1"]
        assert main(words) == 0, command
        ran.append(words[0])
    assert {"extend", "eval", "predict", "inspect", "drift"} <= set(ran)
    assert (tmp_path / "runs" / "chicken-frog" / "detgraft.json").is_file()


def test_ci_runs_the_readme_test_command():
    bash = [body for lang, body in BLOCKS if lang == "bash"]
    assert bash[0].strip().endswith("detgraft demo")
    assert bash[1].strip() == ". .venv/bin/activate && cargo test && pytest"
    assert "cargo test && pytest" in (ROOT / ".ci" / "run").read_text()


RESULTS_MD = (ROOT / "benchmarks" / "RESULTS.md").read_text()
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.]|\.\d)")


def version_numbers() -> set[str]:
    """The versions the README names (torch and torchvision series, the wheels' Pythons, tch): not
    measurements."""
    from detgraft._check_torch import SUPPORTED

    tch = re.search(r'^tch = \{ version = "([\d.]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    pythons = re.search(r"PYTHONS:-([\d. ]+)\}", (ROOT / "scripts" / "build_wheels.sh").read_text()).group(1).split()
    return set(SUPPORTED) | {v for v in SUPPORTED.values() if v} | set(pythons) | {tch}


def recorded_values() -> list[float]:
    """Every number in benchmarks/results.json but the loss curves (thousands of values, which a
    README number would match by chance)."""
    import json

    values: list[float] = []

    def walk(x, key: str = "") -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, k)
        elif isinstance(x, list) and key != "loss":
            for v in x:
                walk(v, key)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            values.append(x)

    walk(json.loads((ROOT / "benchmarks" / "results.json").read_text()))
    return values


def unrecorded(text: str, results_md: str, values: list[float]) -> list[str]:
    """The decimal numbers of ``text`` (versions aside) found neither in ``results_md`` (the sections
    the benchmark scripts write) nor, at the precision written, in ``values``."""
    versions, missing = version_numbers(), []
    for m in NUMBER.finditer(text):
        n = m.group(1)
        if n in versions:
            continue
        decimals = len(n.split(".")[1])
        if re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", results_md) or any(f"{v:.{decimals}f}" == n for v in values):
            continue
        missing.append(f"{n} in '...{text[max(0, m.start() - 60) : m.end() + 20]}...'")
    return missing


def test_every_number_the_readme_states_is_recorded_by_a_benchmark():
    """Every decimal number in the README is in benchmarks/results.json or in RESULTS.md (whose
    sections the benchmark scripts write, each with its command). Integers (seconds, counts) are
    not checked: too many of them match by chance."""
    missing = unrecorded(README, RESULTS_MD, recorded_values())
    assert not missing, "\n".join(missing)


def test_the_readme_check_finds_a_number_no_benchmark_recorded():
    found = unrecorded("new AP 0.7049 at lr 0.05 on torch 2.14", RESULTS_MD, recorded_values())
    assert [f.split(" in ")[0] for f in found] == ["0.7049"]  # 0.05 is a recorded rate, 2.14 a version
