"""The package's shape: imports point one way (down the layers), no cycles, small units.

Every `import` / `from ... import` in mlbreg's source counts, the lazy ones inside functions
too: a lazy import hides a cycle from Python, not from a reader. The root package
`mlbreg/__init__.py` (version, `mlbreg.load`) is the public facade and is left out.
"""

import ast
import sys
from pathlib import Path

import pytest

import mlbreg

PACKAGE = Path(mlbreg.__file__).resolve().parent

# Lower layers never import higher ones. A module's layer is that of its top-level name
# (mlbreg.backends.native.ops -> "backends"). A new module must be placed here.
LAYERS = {
    # leaves: import nothing of mlbreg
    "paths": 0,
    "registry": 0,
    "checks": 0,
    "labels": 0,
    "env": 0,
    "cpu_alloc": 0,
    "safe_load": 0,
    "failures": 0,
    "status": 0,
    # building blocks
    "models": 1,
    "optim": 1,
    "distributed": 1,
    "sparsity": 2,
    "data": 2,
    "flops": 2,
    "metrics": 2,
    "rundir": 2,
    "loggers": 2,
    "sparse_format": 2,
    "runlock": 0,
    "methods": 3,
    "backends": 3,
    "config": 4,
    # one run
    "train": 5,
    "build": 5,
    "loop": 5,
    "runstate": 5,
    "loop_hooks": 5,
    # what uses runs
    "export": 6,
    "evaluate": 6,
    "bench": 6,
    "bench_rounds": 6,
    "hydra_glue": 6,
    "report": 7,
    "tune": 7,
    "cli": 8,
    "__main__": 9,
}
LEAVES = {name for name, layer in LAYERS.items() if layer == 0}
MAX_MODULE_LINES = 450  # counted after `ruff format` (its wrapping, not code golf, sets the length)
MAX_FUNCTION_LINES = 70


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("mlbreg", *parts))


def is_package(name: str) -> bool:
    return (PACKAGE.joinpath(*name.split(".")[1:]) / "__init__.py").exists()


def exists(name: str) -> bool:
    rel = name.split(".")[1:]
    return is_package(name) or PACKAGE.joinpath(*rel).with_suffix(".py").exists()


def imports(path: Path) -> set[str]:
    """The mlbreg modules `path` imports (anywhere in the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlbreg.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("mlbreg"):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if exists(sub) else target)
    return {t for t in found if t != "mlbreg" and t != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) != "mlbreg"}


def top(name: str) -> str:
    return name.split(".")[1]


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in graph()} - set(LAYERS))
    assert not missing, f"place these modules in LAYERS: {missing}"


def test_imports_point_down_the_layers():
    upward = [
        f"{m} -> {t}"
        for m, targets in graph().items()
        for t in targets
        if top(m) in LAYERS and top(t) in LAYERS and LAYERS[top(t)] > LAYERS[top(m)]
    ]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_leaf_modules_import_nothing_of_mlbreg():
    bad = {m: targets for m, targets in graph().items() if top(m) in LEAVES and targets}
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walker itself: a relative-import cycle written to disk is found."""
    pkg = tmp_path / "mlbreg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert graph() == {"mlbreg.a": {"mlbreg.b"}, "mlbreg.b": {"mlbreg.a"}}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines (split it along the lines it draws)"
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


# Imports inside functions: heavy or optional third-party packages, and the few mlbreg modules a
# module must not load when it is imported (each with its reason). Everything else is imported at the top.
LAZY_PACKAGES = {"torch", "torchvision", "matplotlib", "sklearn", "PIL", "safetensors", "hydra", "tensorboard", "sparseprop"}
LAZY_INTERNAL = {
    "mlbreg/__init__.py": {".export", ".loop_hooks"},  # `import mlbreg` stays light
    "mlbreg/cli.py": {".hydra_glue", ".train", ".report"},  # `mlbreg --help` starts at once
    "mlbreg/backends/__init__.py": {".native", ".native.backend", ".sparseprop"},  # only the chosen backend
    "mlbreg/report/collect.py": {"..config", "..hydra_glue"},  # the report runs without torch
    "mlbreg/report/configs.py": {"..methods", "..config"},
    "mlbreg/report/masks.py": {"..safe_load"},
    "mlbreg/report/command.py": {".plots"},  # matplotlib only when plotting
    "mlbreg/env.py": {"."},  # a leaf: the version at call time
}


def _function_imports(path: Path):
    seen = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)) and id(sub) not in seen:
                    seen.add(id(sub))
                    if isinstance(sub, ast.ImportFrom):
                        yield "." * sub.level + (sub.module or "")
                    else:
                        yield from (alias.name for alias in sub.names)


def test_imports_at_the_top_except_the_allowed_lazy_ones():
    """A function-level import is of a heavy or optional package, or on the per-module list above."""
    stray = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = f"mlbreg/{path.relative_to(PACKAGE).as_posix()}"
        for name in _function_imports(path):
            if name.split(".")[0] not in LAZY_PACKAGES and name not in LAZY_INTERNAL.get(rel, set()):
                stray.append(f"{rel}: {name}")
    assert not stray, f"move these imports to the top of their module (or list them with a reason): {stray}"
