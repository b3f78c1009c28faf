from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import detgraft
from detgraft.cli import main

ROOT = Path(__file__).parent.parent


def test_torchvision_tutorial_loop_runs_and_saves_an_extended_model(tmp_path):
    out = tmp_path / "loop"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "torchvision_loop.py"), "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "epoch 0: loss_classifier=" in run.stdout
    model = detgraft.load_model(out)
    assert detgraft.get_card(model).classes[-2:] == ["star", "cross"]
    assert len(model.roi_heads.branches) == 1


def test_quickstart_runs(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path / "q")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def test_demo_quick_prints_both_strategies_and_writes_reports(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--cache", str(tmp_path / "cache")]) == 0
    table = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(table) == {"base", "branch", "naive"}
    assert {"old", "new"} <= set(table["naive"])
    for strategy in ("branch", "naive"):
        assert (tmp_path / "demo" / strategy / "report.html").is_file()
    assert "new-class AP" in capsys.readouterr().out


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("DETGRAFT_QUICK", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # the quick base is cached under ~/.cache
    notebook = nbformat.read(ROOT / "examples" / "add_classes.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()  # raises on any error
    outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "same detections after widening" in outputs and "extended {" in outputs


def test_progress_shows_in_a_notebook_without_ipywidgets():
    """rich's notebook bars need ipywidgets (not a dependency); detgraft's draw one HTML line that
    the kernel updates in place."""
    import nbclient
    import nbformat

    code = (
        "import sys\n"
        "sys.modules['ipywidgets'] = None  # as in an environment without it\n"
        "from detgraft.progress import track\n"
        "total = sum(track(range(3), 'counting'))"
    )
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    (output,) = notebook.cells[0].outputs
    assert output["output_type"] == "display_data"
    shown = output["data"]["text/html"]
    assert "<progress value='3' max='3'" in shown and "counting · 3/3" in shown
