"""The wheel: built by maturin without bundling libtorch, installed into a fresh virtual
environment that has torch 2.13 and no Rust toolchain on its PATH, where the quickstart runs; and a
torch of another series is an ImportError that says what to install, not a crash. (The wheels of
the other series: scripts/build_wheels.sh, which .ci/run runs for torch 2.14.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(shutil.which("maturin") is None, reason="needs maturin (pip install maturin)")
def test_the_wheel_installs_without_rust_and_runs_the_quickstart(tmp_path):
    try:
        _install_and_run(tmp_path)
    finally:  # the venv holds a second torch (~5 GB with its CUDA libraries): don't leave it in pytest's temp
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)


def _install_and_run(tmp_path):
    dist = tmp_path / "dist"
    # --auditwheel skip: a manylinux repair would copy libtorch into the wheel; it must link torch's own
    subprocess.run(["maturin", "build", "--release", "--auditwheel", "skip", "-o", dist], cwd=ROOT, check=True)
    (wheel,) = dist.glob("detgraft-*.whl")
    assert wheel.stat().st_size < 5_000_000  # the extension and the Python package, not libtorch (~GBs)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "install", "-q", "--no-cache-dir"]
    subprocess.run([*pip, "torch==2.13.*", "torchvision==0.28.*"], check=True)
    subprocess.run([*pip, wheel], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}  # no cargo, no rustc
    env.pop("PYTHONPATH", None)
    assert shutil.which("cargo", path=env["PATH"]) is None
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True}
    alone = subprocess.run([python, "-c", "import detgraft._core, detgraft; print(detgraft.__file__)"], **run)
    assert alone.returncode == 0, alone.stderr
    assert str(venv) in alone.stdout  # the installed package, not the source tree
    quick = subprocess.run([python, ROOT / "examples" / "quickstart.py", "--out", tmp_path / "quick"], **run)
    assert quick.returncode == 0, quick.stderr[-2000:]
    other = "import torch; torch.__version__ = '2.11.0'; import detgraft"
    mismatch = subprocess.run([python, "-c", other], **run)
    assert mismatch.returncode == 1 and "was built for torch 2.13.x" in mismatch.stderr
    assert "the detgraft wheel for torch 2.11" in mismatch.stderr
    assert "pip install 'torch==2.13.*' 'torchvision==0.28.*'" in mismatch.stderr
    unsupported = subprocess.run([python, "-c", other.replace("2.11.0", "2.9.1")], **run)
    assert unsupported.returncode == 1 and "supports torch 2.10, 2.11, 2.12, 2.13, 2.14, 2.15" in unsupported.stderr
