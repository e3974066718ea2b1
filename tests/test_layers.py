"""Imports point down only: app (entry points) -> stages -> pipeline (library) -> cache -> cache.errors.

Walks every module's imports, in-function ones included, and fails on an arrow that points up,
a stage that imports another stage, or a cycle."""

from __future__ import annotations

from app.dvcfile import PACKAGES, ROOT, direct_imports

LEAF = "cache.errors"
RANK = {"app": 3, "stages": 2, "pipeline": 1, "cache": 0}


def _modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def _rank(module: str) -> float:
    return -1 if module == LEAF else RANK[module.split(".")[0]]


def test_imports_point_down():
    upward = [f"{m} -> {i}" for m in _modules() for i in direct_imports(m) if _rank(i) > _rank(m)]
    assert not upward, "imports that point up: " + ", ".join(upward)


def test_the_leaf_imports_nothing_of_ours():
    assert direct_imports(LEAF) == frozenset()


def test_a_stage_never_imports_another_stage():
    crossing = [f"{m} -> {i}" for m in _modules() if m.startswith("stages.")
                for i in direct_imports(m) if i.startswith("stages.")]
    assert not crossing, ", ".join(crossing)


def test_no_import_cycles():
    # a submodule runs its package's __init__ first: that edge is how packages work, not a cycle
    graph = {m: {i for i in direct_imports(m) if not m.startswith(i + ".")} for m in _modules()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in graph.get(module, ()):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_walker_sees_in_function_imports(tmp_path):
    """The walk must catch a lazy import, or an upward arrow inside a function would pass unseen."""
    assert "stages" in direct_imports("app.cli") and "pipeline.latents" in direct_imports("app.cli")
