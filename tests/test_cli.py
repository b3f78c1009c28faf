from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import safetensors.torch
from torchvision.io import write_png

import detgraft
from conftest import TINY_BUILDER
from detgraft.cli import main
from tiny_model import build, images


def _checkpoint(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    model = detgraft.load_model(TINY_BUILDER, weights)
    detgraft.expand_predictor(model, ["chicken", "frog"])
    return detgraft.save_checkpoint(model, tmp_path / "ckpt")


def test_inspect_shows_classes_and_history(tmp_path, capsys):
    assert main(["inspect", str(_checkpoint(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "FastRCNNPredictor(32 -> 8 classes, 32 box outputs)" in out
    assert "chicken" in out and "new (step 1)" in out and "preserve" in out
    assert "5 old classes, 2 new" in out


def test_predict_writes_json_and_pictures_and_reports_unreadable_files(tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images(2)):
        write_png((image * 255).byte(), str(folder / f"im{i}.png"))
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", str(_checkpoint(tmp_path)), str(folder), "--out", str(out), "--score", "0.1"]) == 0
    report = json.loads((out / "detections.json").read_text())
    assert [p["file"].rsplit("/", 1)[1] for p in report["images"]] == ["im0.png", "im1.png"]
    assert report["skipped"][0]["file"].endswith("broken.jpg")
    assert "broken.jpg" in caplog.text
    assert (out / "im0.png").is_file() and (out / "im1.png").is_file()
    first = report["images"][0]
    assert len(first["boxes"]) == len(first["names"]) == len(first["scores"]) > 0
    assert all(s >= 0.1 for s in first["scores"])


def test_cli_errors_are_one_clear_line(tmp_path, caplog):
    assert main(["inspect", "no_such_builder"]) == 2
    assert "cannot load 'no_such_builder'" in caplog.text


def test_version_names_detgraft_and_both_torch_series(capsys):
    import torch

    from detgraft._check_torch import BUILT_FOR

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"detgraft {detgraft.__version__} ") and f"built for torch {BUILT_FOR}" in out
    assert f"torch {torch.__version__} here" in out


def test_quiet_and_verbose_set_the_log_level(tmp_path, caplog):
    checkpoint = str(_checkpoint(tmp_path))
    for flags, level in (([], logging.INFO), (["-q"], logging.WARNING), (["-v"], logging.DEBUG)):
        assert main([*flags, "inspect", checkpoint]) == 0
        assert logging.getLogger("detgraft").level == level, flags
    caplog.clear()
    assert main(["-q", "inspect", "no_such_builder"]) == 2  # errors still say what is wrong
    assert "cannot load 'no_such_builder'" in caplog.text


def test_a_missing_optional_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["export", str(_checkpoint(tmp_path)), "--out", str(tmp_path / "m.onnx"), "--format", "onnx"]) == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "--format onnx needs onnxruntime: pip install 'detgraft[onnx]' (onnx and onnxruntime)"
    assert record.exc_info is None  # no traceback


def test_detgraft_imports_and_extends_where_resource_does_not_exist():
    """``resource`` is POSIX-only: on Windows ``import detgraft`` must work, peak memory unknown."""
    code = (
        "import sys; sys.modules['resource'] = None\n"
        "import detgraft\n"
        "from detgraft.train import peak_memory_mb\n"
        "assert peak_memory_mb() is None\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
