"""The README's commands cannot rot: every ``detgraft ...`` command in it parses with today's CLI,
its Python blocks compile, and its first two commands are the ones ``.ci/run`` and the tests run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from detgraft.cli import _parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def detgraft_commands() -> list[str]:
    found = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("detgraft "):
                    found.append(part)
    return found


@pytest.mark.parametrize("command", detgraft_commands())
def test_every_readme_command_parses(command):
    args = _parser().parse_args(shlex.split(command)[1:])
    assert callable(args.run)


def test_readme_names_the_commands_it_should():
    names = {shlex.split(c)[1] for c in detgraft_commands()}
    assert {"demo", "extend", "eval", "predict", "drift", "inspect"} <= names


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_readme_python_blocks_compile(index):
    compile(BLOCKS[index][1], f"README block {index}", "exec")


def test_ci_runs_the_readme_test_command():
    bash = [body for lang, body in BLOCKS if lang == "bash"]
    assert bash[0].strip().endswith("detgraft demo")
    assert bash[1].strip() == ". .venv/bin/activate && cargo test && pytest"
    assert "cargo test && pytest" in (ROOT / ".ci" / "run").read_text()
