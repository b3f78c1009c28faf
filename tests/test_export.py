"""``detgraft export``: TorchScript that gives the model's detections without detgraft."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import detgraft
from conftest import TINY_BUILDER
from detgraft.cli import main
from detgraft.export import export
from detgraft.incremental import incremental
from tiny_model import build, images


def test_a_head_model_exports_to_torchscript_with_the_same_detections(tmp_path):
    model = build()
    detgraft.expand_predictor(model, ["chicken", "frog"])
    model = incremental(model, "head").eval()
    check = export(model, tmp_path / "model.pt", images=images())
    assert check["detections"] > 0
    assert check["max_box_difference"] < 1e-3 and check["max_score_difference"] < 1e-5
    # a plain torch.jit.load, no detgraft involved: torchvision's scripted (losses, detections)
    _, detections = torch.jit.load(str(tmp_path / "model.pt"))(images())
    eager = model(images())
    for a, b in zip(eager, detections):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"])


def test_a_branch_model_is_refused_with_what_to_do():
    model = build()
    detgraft.expand_predictor(model, ["chicken"])
    with pytest.raises(ValueError, match="branch model cannot be exported yet.*--strategy head"):
        export(incremental(model, "branch"), "unused.pt")


def test_the_export_command(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    assert main(["export", TINY_BUILDER, "--weights", str(weights), "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").is_file() and "torch.jit.load" in capsys.readouterr().out
    model = ["export", TINY_BUILDER, "--weights", str(weights), "--out", str(tmp_path / "x.pt")]
    assert main([*model, "--format", "onnx"]) == 2
    (tmp_path / "empty").mkdir()
    assert main([*model, "--images", str(tmp_path / "empty")]) == 2
