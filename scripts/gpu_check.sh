#!/usr/bin/env bash
# On a CUDA machine (a few minutes): build detgraft against the installed torch 2.13, run the
# widening and ops tests on CUDA tensors (nothing moved to the CPU), and time the ops against
# torchvision's CUDA kernels (written to benchmarks/RESULTS.md). Prints the card and results.
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch")
if not torch.__version__.startswith("2.13"):
    sys.exit(f"gpu_check: torch {torch.__version__} is installed; detgraft's tch 0.26 needs torch 2.13")
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY
python3 -m pip install -q --no-build-isolation .
python3 -m pytest -q -m cuda tests -rA -p no:cacheprovider
# the kernels issue: parity on CUDA (above, -m cuda) and timings against torchvision's CUDA kernels
python3 benchmarks/ops.py --device cuda
