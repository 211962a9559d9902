"""The package's layers: each imports only from layers below it (or its own), and core imports no MLflow/KFP/Optuna.

Layers, lowest first (each package's docstring says what lives there): base, data, model, serve, evaluation (the
core: no mlflow, kfp or optuna), ops (MLflow, Optuna), steps (KFP step bodies), cli. Imports inside functions
count too: a lazy import is still a dependency. The top-level `components` and `pipelines` packages sit above
`steps`; only `cli` may import them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import deeplight

LAYERS = ("base", "data", "model", "serve", "evaluation", "ops", "steps", "cli")
CORE = LAYERS[:5]
TRACKING_PACKAGES = ("mlflow", "kfp", "optuna", "optuna_integration")
ROOT = Path(deeplight.__file__).resolve().parent


def modules() -> dict[str, Path]:
    return {p.relative_to(ROOT.parent).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module scope) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno, id(node) in top))
            out += [(f"{node.module}.{a.name}", node.lineno, id(node) in top) for a in node.names
                    if f"{node.module}.{a.name}" in MODULES]
    return out


MODULES = modules()


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] == "deeplight" and len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if parts[0] in ("components", "pipelines"):
        return LAYERS.index("cli") - 0.5  # type: ignore[return-value]
    return None


def test_every_module_lives_in_a_layer():
    loose = [m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in LAYERS + ("__main__",)]
    assert not loose, f"modules outside the layer packages: {loose}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = layer_of(module)
    if own is None:
        return
    for name, line, _ in imports(MODULES[module], module):
        target = layer_of(name)
        where = f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {name}"
        assert target is None or target <= own, f"{where}: a lower layer imports a higher one"
        if LAYERS[own] in CORE:
            assert name.split(".")[0] not in TRACKING_PACKAGES, f"{where}: core code imports a tracking package"


def test_no_import_cycle_at_module_scope():
    graph = {m: {n for n, _, top in imports(p, m) if top and n in MODULES and n != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_a_violation(tmp_path):
    """The rule above is real: a core module importing mlflow, or data importing ops, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import mlflow\n    from deeplight.ops.tracking import client\n")
    found = imports(bad, "deeplight.data.bad")
    assert ("mlflow", 2, False) in found and any(layer_of(n) == LAYERS.index("ops") for n, _, _ in found)


def test_every_module_imports():
    for m in sorted(MODULES):
        if not m.endswith("__main__"):
            importlib.import_module(m)
