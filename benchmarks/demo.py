"""Times ``detgraft demo`` as a new user meets it: a fresh cache (the tiny base is trained too).

    python benchmarks/demo.py

Runs ``detgraft demo --out OUT --cache CACHE`` in its own process with empty folders, records its
wall time and peak RSS and the AP table it wrote (``demo.json``), and writes the ``demo`` section of
``benchmarks/RESULTS.md``. Target: under 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="detgraft-demo-"))
    cmd = ["detgraft", "demo", "--out", str(folder / "out"), "--cache", str(folder / "cache")]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    table = json.loads((folder / "out" / "demo.json").read_text())
    shutil.rmtree(folder)
    lines = [
        "## `detgraft demo` from a fresh cache",
        "",
        f"`python benchmarks/demo.py` ({os.cpu_count()} CPU cores): **{seconds:.0f} s** wall "
        f"(target < 300 s), peak RSS {peak_mb:.0f} MB, including drawing the data and training the tiny base.",
        "",
        "| model | old-class AP | new-class AP |",
        "|---|---|---|",
    ]
    for name, groups in table.items():
        new = f"{groups['new']:.3f}" if "new" in groups else "-"
        lines.append(f"| {name} | {groups['old']:.3f} | {new} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("demo", body)


if __name__ == "__main__":
    main()
