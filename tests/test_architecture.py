"""The house plan (ARCHITECTURE.md) holds: every import inside the package, at the top of a module
or inside a function, goes to the same layer or a lower one, no two modules import each other
through any chain, and no module imports another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import detgraft

PACKAGE = Path(detgraft.__file__).parent
# ARCHITECTURE.md's layers, lowest first: a module may import its own layer and the ones below
LAYERS = [
    {"_built_for", "_check_torch", "_core", "extras", "progress", "ops", "distributed"},
    {"data"},
    {"heads"},
    {"model"},
    {"strategies", "evaluation"},
    {"settings"},
    {"train", "kept"},
    {"extend", "export", "demo_model", "demo"},
    {"cli", "__main__", "__init__"},
    {"evaluate", "training_data", "report"},  # detgraft 0.1's import paths the README and notebook showed
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":  # a subpackage is named by its folder
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer(module: str) -> int:
    top = module.split(".")[0]
    return next(k for k, names in enumerate(LAYERS) if top in names)


def imports(module: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every detgraft import in ``path``."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "detgraft":
                base = []
            else:
                continue
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target[:1] == ["detgraft"]:
                target = target[1:]
            for alias in node.names:
                name = ".".join([*target, alias.name])
                if name in MODULES or name in EXTENSIONS:  # ``from . import families``: a module
                    found.append((name, "", node.lineno))
                else:
                    found.append((".".join(target) or "__init__", alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("detgraft."):
                    found.append((alias.name.removeprefix("detgraft."), "", node.lineno))
    return found


MODULES = modules()
EXTENSIONS = {"_core"}  # the Rust extension: imported, imports nothing


def edges() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for target, _, _ in imports(m, path):
            if target != m and target in MODULES:
                graph[m].add(target)
    return graph


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in MODULES)


def test_lower_layers_never_import_upper_ones():
    upward = [
        f"{m} (layer {layer(m)}) imports {target} (layer {layer(target)}) at line {line}"
        for m, path in MODULES.items()
        for target, _, line in imports(m, path)
        if target in MODULES and layer(target) > layer(m)
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = edges()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    done: set[str] = set()
    for m in MODULES:
        if m not in done:
            visit(m, [m])
    assert not cycles, cycles


def private_imports(m: str, path: Path) -> list[str]:
    """``m``'s imports of another module's private names (``_core``, a module, is not a name)."""
    return [
        f"{m} imports {target}.{name} at line {line}"
        for target, name, line in imports(m, path)
        if name.startswith("_")
        and name != "__version__"
        and f"{target}.{name}".removeprefix("__init__.") not in MODULES.keys() | EXTENSIONS
    ]


def test_no_private_name_is_imported_across_modules():
    private = [p for m, path in MODULES.items() for p in private_imports(m, path)]
    assert not private, private


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a lower module importing an upper one is reported."""
    fake = tmp_path / "data" / "dataset.py"
    fake.parent.mkdir()
    fake.write_text("from ..extend import extend\nfrom ..train import _helper\n")
    found = imports("data.dataset", fake)
    assert ("extend", "extend", 1) in found and ("train", "_helper", 2) in found
    assert layer("data.dataset") < layer("extend")
    assert private_imports("data.dataset", fake) == ["data.dataset imports train._helper at line 2"]


def test_the_import_paths_of_detgraft_0_1_give_the_same_objects():
    """Scripts written for the flat layout (the README's and notebook's imports) still run."""
    from detgraft import evaluate, report, training_data
    from detgraft.data import batches, dataset
    from detgraft.evaluation import metrics
    from detgraft.evaluation import report as evaluation_report

    assert evaluate.load_dataset is dataset.load_dataset and evaluate.detect is metrics.detect
    assert evaluate.evaluate is metrics.evaluate and training_data.TrainingSet is batches.TrainingSet
    assert report.plot_loss is evaluation_report.plot_loss


def test_strategies_and_evaluation_import_neither_each_other():
    crossing = [
        f"{m} imports {target}"
        for m, path in MODULES.items()
        for target, _, _ in imports(m, path)
        if {m.split(".")[0], target.split(".")[0]} == {"strategies", "evaluation"}
    ]
    assert not crossing, crossing
