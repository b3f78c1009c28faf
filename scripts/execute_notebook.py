"""Runs examples/add_classes.ipynb top to bottom (the full run, not DETGRAFT_QUICK) and saves it with
its outputs, pictures included: what a reader sees on opening it. CI executes it again (quick).

    python scripts/execute_notebook.py [--notebook examples/add_classes.ipynb]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbclient
import nbformat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    notebook = Path(__file__).parent.parent / "examples" / "add_classes.ipynb"
    parser.add_argument("--notebook", type=Path, default=notebook)
    args = parser.parse_args()
    os.environ.pop("DETGRAFT_QUICK", None)
    notebook = nbformat.read(args.notebook, as_version=4)
    notebook = nbformat.from_dict(nbformat.validator.normalize(notebook)[1])  # cell ids
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=3600, kernel_name="python3").execute()
    nbformat.write(notebook, args.notebook)
    print(f"{args.notebook}: executed in {time.perf_counter() - start:.0f} s and saved with its outputs")


if __name__ == "__main__":
    main()
