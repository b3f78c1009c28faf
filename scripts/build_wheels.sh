#!/usr/bin/env bash
# detgraft wheels: one per supported torch series and Python, each installed into a fresh venv
# without cargo and tested there.
#   bash scripts/build_wheels.sh [SERIES ...]          default: 2.10 2.11 2.12 2.13 2.14 2.15
#   PYTHONS="3.11" bash scripts/build_wheels.sh 2.14   only those Pythons (default 3.10 3.11 3.12 3.13,
#                                                      each from PATH or pyenv; one missing is logged)
# Writes dist/detgraft-VERSION+torchXYZ-cpXY-cpXY-linux_x86_64.whl and one line per series and Python
# to $LOG (default benchmarks/wheels.log): built / installed / tested, or what failed; the output of
# each test goes to the log as well.
#
# How: each wheel is built by maturin in a venv of its Python holding that torch (headers and
# libraries only, --no-deps, named by LIBTORCH); tch 0.26 with the patched torch-sys in
# vendor/torch-sys links it (C++20 from 2.14 on). Not abi3: torch-sys's C++ glue to torch's Python
# objects compiles against the full Python API of the build interpreter (an abi3 wheel built with
# 3.11 fails on 3.13: undefined symbol _PyThreadState_UncheckedGet). A copy of the sources pins the
# wheel's metadata to its series (torch==S.* and that series' torchvision; version +torchSS), so
# that installing it never replaces the user's torch. The test venv gets torch S and its torchvision
# from PyPI, then the wheel, and runs with a PATH without cargo: scripts/core_smoke.py (the Rust core
# alone) and examples/quickstart.py. torch 2.15 has no torchvision yet: its wheel runs the core
# smoke test only. Each venv holds a torch with its CUDA libraries (~5 GB): removed after each test.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
series_list=${*:-2.10 2.11 2.12 2.13 2.14 2.15}
pythons=${PYTHONS:-3.10 3.11 3.12 3.13}
log=${LOG:-$root/benchmarks/wheels.log}
mkdir -p dist "$(dirname "$log")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "$(date -u +%FT%TZ) $*" | tee -a "$log"; }

vision_of() {  # the torchvision made for a torch series (_check_torch.SUPPORTED), or nothing
    python3 - "$1" <<'PY'
import ast, sys
tree = ast.parse(open("python/detgraft/_check_torch.py").read())
(table,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SUPPORTED"]
print(table.get(sys.argv[1]) or "")
PY
}

python_for() {  # an interpreter of version $1: python3 if it is that version, else pythonX.Y, else pyenv's
    local candidate
    for candidate in python3 "python$1" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$1".*/bin/python 2>/dev/null); do
        if command -v "$candidate" >/dev/null \
                && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$1" ]; then
            command -v "$candidate"
            return
        fi
    done
}

test_wheel() {  # series, torchvision, wheel, python version
    local s=$1 vision=$2 wheel=$3 version=$4 py venv
    py=$(python_for "$version")
    if [ -z "$py" ]; then say "torch $s python $version: not tested (no python$version here)"; return 1; fi
    venv="$work/test-$s-$version"
    "$py" -m venv "$venv" || { say "torch $s python $version: venv failed"; return 1; }
    local pip=("$venv/bin/python" -m pip install -q)
    if [ -n "$vision" ]; then
        "${pip[@]}" "torch==$s.*" "torchvision==$vision.*" "$wheel" \
            || { say "torch $s python $version: install FAILED"; rm -rf "$venv"; return 1; }
    else  # no torchvision: the wheel without its Python dependencies, then torch and numpy alone
        "${pip[@]}" "torch==$s.*" numpy && "${pip[@]}" --no-deps "$wheel" \
            || { say "torch $s python $version: install FAILED"; rm -rf "$venv"; return 1; }
    fi
    local got site
    got=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    local env=(env -i HOME="$HOME" PATH="$venv/bin:/usr/bin:/bin")  # no cargo, no rustc
    if "${env[@]}" bash -c 'command -v cargo' >/dev/null; then say "torch $s: cargo on the test PATH"; return 1; fi
    if ! (cd "$work" && "${env[@]}" "$venv/bin/python" "$root/scripts/core_smoke.py" "$site" >>"$log" 2>&1); then
        say "torch $s python $version: installed (torch $got); core smoke test FAILED"; rm -rf "$venv"; return 1
    fi
    if [ -n "$vision" ]; then
        if (cd "$work" && "${env[@]}" "$venv/bin/python" "$root/examples/quickstart.py" --out "$work/quick-$s" \
                >>"$log" 2>&1); then
            say "torch $s python $version: installed (torch $got), no cargo on PATH; core smoke test and quickstart passed"
        else
            say "torch $s python $version: installed (torch $got); quickstart FAILED"; rm -rf "$venv"; return 1
        fi
    else
        say "torch $s python $version: installed (torch $got), no cargo on PATH; core smoke test passed" \
            "(no torchvision for torch $s yet: quickstart not run)"
    fi
    rm -rf "$venv"
}

failed=0
for s in $series_list; do
    vision=$(vision_of "$s")
    tag="torch${s/./}"
    src="$work/src-$s"
    mkdir -p "$src" && git ls-files -z | xargs -0 cp --parents -t "$src"
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
    sed -i "s/^version = \"$version\"/version = \"$version+$tag\"/" "$src/pyproject.toml"
    sed -i "s/^    \"torch>=[^\"]*\",.*/    \"torch==$s.*\",/" "$src/pyproject.toml"
    if [ -n "$vision" ]; then
        sed -i "s/^    \"torchvision>=[^\"]*\",.*/    \"torchvision==$vision.*\",/" "$src/pyproject.toml"
    else
        sed -i "/^    \"torchvision>=/d" "$src/pyproject.toml"
    fi
    grep -q "\"torch==$s.\*\"" "$src/pyproject.toml" || { say "torch $s: could not pin pyproject.toml"; failed=1; continue; }
    # torch without its CUDA packages does not import: name its folder (LIBTORCH) instead of asking
    # Python (.cargo/config.toml's LIBTORCH_USE_PYTORCH); torch-sys reads the version from version.py
    rm "$src/.cargo/config.toml"
    for v in $pythons; do
        py=$(python_for "$v")
        if [ -z "$py" ]; then say "torch $s python $v: not built (no python$v here)"; failed=1; continue; fi
        venv="$work/build-$s-$v"
        "$py" -m venv "$venv" && "$venv/bin/python" -m pip install -q maturin \
            && "$venv/bin/python" -m pip install -q --no-deps "torch==$s.*" \
            || { say "torch $s python $v: build venv FAILED"; failed=1; rm -rf "$venv"; continue; }
        torch_dir=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch
        start=$(date +%s)
        rm -rf "$src/dist"
        if (cd "$src" && PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" LIBTORCH="$torch_dir" LIBTORCH_CXX11_ABI=1 \
                "$venv/bin/maturin" build --release --auditwheel skip -i "$venv/bin/python" -o "$src/dist" \
                >"$work/build-$s-$v.log" 2>&1); then
            wheel=$(ls "$src"/dist/detgraft-*.whl)
            cp "$wheel" dist/
            wheel="$root/dist/$(basename "$wheel")"
            say "torch $s python $v: built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) kB, $(( $(date +%s) - start )) s)"
            rm -rf "$venv"
            test_wheel "$s" "$vision" "$wheel" "$v" || failed=1
        else
            say "torch $s python $v: build FAILED: $(grep -m3 -E 'error' "$work/build-$s-$v.log" | tr '\n' ' ')"
            failed=1; rm -rf "$venv"
        fi
    done
    rm -rf "$src"
done
exit $failed
