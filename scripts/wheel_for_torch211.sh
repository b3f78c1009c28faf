#!/usr/bin/env bash
# A detgraft wheel for torch 2.11 and Python 3.12: the torch and Python of the GPU machines lent to
# this project, which cannot install packages or build Rust. Run it here (it needs cargo, a C++
# compiler, python3.12 and PyPI); it writes .whl/detgraft-*.whl, which scripts/gpu_check.sh installs
# there (carry .whl).
#
# How: tch 0.24 / pyo3-tch 0.24 / torch-sys 0.24 are tch's release for libtorch 2.11, and detgraft's
# Rust core compiles against them unchanged (cargo check, 2026-11-29). This script copies the
# sources, pins those versions and torch 2.11 in the copy (the repository stays on 2.13), and
# builds against the torch 2.11 wheel from PyPI (its CUDA libraries are not needed to link).
#   bash scripts/wheel_for_torch211.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/.whl"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
cd "$work"
rm -f .cargo/config.toml  # LIBTORCH below names the torch to link, instead of the active Python's
sed -i 's/^pyo3-tch = "0.26"/pyo3-tch = "0.24"/; s/^tch = { version = "0.26"/tch = { version = "0.24"/' Cargo.toml
sed -i 's/^torch-sys = { version = "0.26"/torch-sys = { version = "0.24"/' Cargo.toml
sed -i 's/^TORCH_SERIES = "2.13"/TORCH_SERIES = "2.11"/' python/detgraft/_check_torch.py
sed -i "s/\"torch==2.13.\\*\"/\"torch==2.11.*\"/; s/\"torchvision==0.28.\\*\"/\"torchvision==0.26.*\"/" pyproject.toml
grep -q 'tch = { version = "0.24"' Cargo.toml && grep -q 'TORCH_SERIES = "2.11"' python/detgraft/_check_torch.py
"${PYTHON312:-python3.12}" -m venv venv
venv/bin/pip install -q --no-cache-dir maturin
venv/bin/pip install -q --no-cache-dir --no-deps "torch==2.11.*"  # its headers and libraries only
LIBTORCH="$work/venv/lib/python3.12/site-packages/torch" LIBTORCH_CXX11_ABI=1 \
    venv/bin/maturin build --release --auditwheel skip -i venv/bin/python -o "$out"
ls -l "$out"/detgraft-*.whl
