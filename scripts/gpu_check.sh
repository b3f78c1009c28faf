#!/usr/bin/env bash
# On a CUDA machine, a few minutes: the CUDA tests (widening and ops on CUDA tensors, nothing moved
# to the CPU), the Rust ops against torchvision's CUDA kernels (benchmarks/ops.py: NMS as one packed
# suppression matrix brought to the host once, RoIAlign with a few reads per call; time ratios to
# torchvision's, small inputs included) and the speed of
# fasterrcnn_resnet50_fpn at 800 px (benchmarks/gpu_speed.py: training images/s with and without
# AMP, latency of the extended model over the base). Both benchmarks write benchmarks/RESULTS.md and
# results.json; the script copies them, and its log, to $OUT when that is set.
#   bash scripts/gpu_check.sh
#
# What it needs, and what it does on each machine:
# - cargo and a C++ compiler: builds detgraft from source against the torch there (2.10 to 2.15);
# - no Rust (the lent H200 machines: torch 2.11, Python 3.12, nothing to install from): the wheel of
#   that torch series and Python, made beforehand where cargo and PyPI are by scripts/build_wheels.sh,
#   copied into .whl/ (carry .whl) and installed into /tmp/site with --no-deps:
#     PYTHONS=3.12 bash scripts/build_wheels.sh 2.11 && mkdir -p .whl && cp dist/detgraft-*+torch211-cp312-*.whl .whl/
# - anything else: it stops and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
series=$(python3 -c 'import torch; print(".".join(torch.__version__.split("+")[0].split(".")[:2]))')
python3 - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch")
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PY
tag="torch${series/./}"
if command -v cargo >/dev/null; then
    python3 -m pip install -q --no-build-isolation .
elif ls .whl/detgraft-*+"$tag"-*.whl >/dev/null 2>&1; then
    wheel=$(ls .whl/detgraft-*+"$tag"-*.whl | head -1)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel"
    export PYTHONPATH=/tmp/site
    # the wheel says which torch it was built for: a mismatch is an ImportError naming both
    python3 -c 'import detgraft; print("detgraft from", detgraft.__file__)'
else
    echo "gpu_check: torch $series is installed. detgraft's Rust core links libtorch: build it here (cargo and a"
    echo "C++ compiler), or carry the wheel of torch $series in .whl/ (scripts/build_wheels.sh $series, copied"
    echo "from dist/; detgraft builds against torch 2.10 to 2.15)."
    exit 2
fi
log=$(mktemp)
{
    # tests import the installed detgraft, not python/ of this checkout
    python3 -m pytest -q -m cuda tests -rA -p no:cacheprovider
    python3 benchmarks/ops.py --device cuda
    python3 benchmarks/gpu_speed.py --device cuda
} 2>&1 | tee "$log"
if [ -n "${OUT:-}" ]; then
    cp "$log" "$OUT/gpu_check.log"
    cp benchmarks/RESULTS.md benchmarks/results.json "$OUT/"
fi
