"""The layering holds: no import cycle, a ground floor that imports nothing of the project, Hydra in one module,
and `fit` made of short functions with few parameters. Read from the source (ast), so nothing runs."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rethink"
GROUND_FLOOR = ("rethink.errors", "rethink.atomic", "rethink.stats", "rethink.keys", "rethink.environment")
HYDRA_FACING = ("rethink.hydra_app", "rethink.tasks.sweep")  # sweep.py: its callback subclasses Hydra's public Callback


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(the project's modules that `name` imports anywhere in its file, the top-level packages of the others)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            (ours if target.split(".")[0] == "rethink" else others).add(
                target if target.split(".")[0] == "rethink" else target.split(".")[0]
            )
    return {t for t in ours if t in known and t != name}, others


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    found = modules()
    edges, outside = {}, {}
    for name, path in found.items():
        edges[name], outside[name] = imports_of(name, path, set(found))
    return edges, outside


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read_whole():
    edges, _ = graph()
    assert "rethink.train.fit" in edges and "rethink.tasks.train" in edges
    assert "rethink.train.fit" in edges["rethink.tasks.train"]  # relative imports resolved
    assert {"rethink.config", "rethink.errors"} <= edges["rethink.rundir"]


def test_no_import_cycle_anywhere():
    assert cycles(graph()[0]) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", GROUND_FLOOR)
def test_the_ground_floor_imports_nothing_of_the_project(module):
    assert graph()[0][module] == set()


def test_only_the_hydra_module_imports_hydra():
    _, outside = graph()
    assert sorted(name for name, packages in outside.items() if "hydra" in packages) == sorted(HYDRA_FACING)


@pytest.mark.slow
def test_importing_the_models_loads_no_hydra():
    code = "import sys, rethink.models; sys.exit('hydra' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent).returncode == 0


def test_the_layers_point_down():
    """models and data know nothing of training or tasks; the loop does not call up into the tasks."""
    edges, _ = graph()
    forbidden = {
        "rethink.models": ("rethink.train", "rethink.tasks", "rethink.data"),
        "rethink.data": ("rethink.models", "rethink.train", "rethink.tasks"),
        "rethink.train": ("rethink.tasks",),
        "rethink.config": ("rethink.tasks", "rethink.train", "rethink.data", "rethink.models"),
    }
    wrong = [
        (a, b)
        for a, targets in edges.items()
        for b in targets
        for layer, below in forbidden.items()
        if (a == layer or a.startswith(layer + ".")) and b.startswith(below)
    ]
    assert wrong == []


def functions(path: Path) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]


@pytest.mark.parametrize("module", ["train/fit.py", "train/session.py", "train/report.py", "tasks/train.py"])
def test_fit_and_what_it_calls_are_short_functions_with_few_parameters(module):
    for function in functions(PACKAGE / module):
        parameters = [a.arg for a in function.args.args + function.args.kwonlyargs if a.arg not in ("self", "cls")]
        assert function.end_lineno - function.lineno + 1 <= 60, f"{module}:{function.name} has more than 60 lines"
        assert len(parameters) <= 5, f"{module}:{function.name} takes {len(parameters)} parameters: {parameters}"
