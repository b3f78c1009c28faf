#!/usr/bin/env bash
# torchvision's own NMS and RoIAlign tests, run twice: as they are, and with detgraft's ops in
# place of torchvision's (scripts/torchvision_swap.py, which counts the calls into the Rust core).
# Both runs also run TestRoIAlign.test_autocast_cpu, which torchvision 0.21's file skips. Exits
# with the swapped run's status.
#
#   bash scripts/torchvision_suite.sh [TORCHVISION_SOURCE] [LOG]
#
# TORCHVISION_SOURCE: a torchvision source tree (its test/ folder); without one, Debian's
# pytorch-vision 0.21.0 source (deb.debian.org, checked by its sha256) is downloaded and unpacked
# into .torchvision-tests/. LOG (default benchmarks/torchvision_suite.log) gets both summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-}
log=${2:-benchmarks/torchvision_suite.log}
if [ -z "$src" ]; then
  tarball=pytorch-vision_0.21.0.orig.tar.gz
  sha=0a4a967bbb7f9810f792cd0289a07fb98c8fb5d1303fae8b63e3a6b05d720058
  mkdir -p .torchvision-tests
  if [ ! -d .torchvision-tests/vision-0.21.0 ]; then
    curl -sSfL -o ".torchvision-tests/$tarball" "http://deb.debian.org/debian/pool/main/p/pytorch-vision/$tarball"
    echo "$sha  .torchvision-tests/$tarball" | sha256sum -c --quiet
    tar -xzf ".torchvision-tests/$tarball" -C .torchvision-tests
  fi
  src=.torchvision-tests/vision-0.21.0
fi
src=$(cd "$src" && pwd)
plugins="$PWD/scripts"
select="NMS or RoIAlign"
run() {
  (cd "$src/test" && PYTHONPATH="$plugins${PYTHONPATH:+:$PYTHONPATH}" DETGRAFT_UNSKIP=test_autocast_cpu \
    python -m pytest -p torchvision_swap test_ops.py -k "$select" -q -p no:cacheprovider -W ignore "$@" 2>&1)
}
versions=$(python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')
{
  echo "# torchvision's test/test_ops.py -k '$select' ($versions; tests from $(basename "$src"))"
  echo "## as it is"
  DETGRAFT_SWAP=off run | tail -n 3 || true
  echo "## with detgraft's ops (scripts/torchvision_swap.py)"
} > "$log"
status=0
run -rf > "$log.swapped" || status=$?
tail -n 40 "$log.swapped" >> "$log"
rm -f "$log.swapped"
cat "$log"
exit $status
