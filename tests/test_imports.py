"""The package's import graph: no cycles and no upward imports, function-level imports included.

Why: a cycle hidden in a function-level import works until someone moves that import to the top of a file, and an
upward import (model code reaching into checkpoints, the engine into command-line parsing) is how one concern starts
to depend on another it should not know about. The graph is read from the source with `ast` (nothing is imported),
so every import statement counts wherever it sits; only `if TYPE_CHECKING:` blocks, which never run, are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

from common import REPO

PACKAGE = REPO / "src" / "qwenlink"

# Layers, lowest first: a module may import its own layer or a lower one, never a higher one. So models/ imports no
# checkpoint code, checkpoint/ nothing from train/, parallel/ nothing from train/, inference/ nothing from commands/.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors"),
    ("fileio", "device", "outputs", "signals", "png_chart"),
    ("tokenizer", "models"),
    ("data",),
    ("checkpoint",),
    ("parallel",),
    ("train",),
    ("inference",),
    ("evaluation",),
    ("commands",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py under `root` (a package's __init__ is the package itself)."""
    found = {}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = file
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom | ast.Call]:
    """Every import statement under `node` (module level, in functions, classes, try blocks) and every call (which
    may name a module to load as a string), but not inside an `if TYPE_CHECKING:` block."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom, ast.Call)):
            yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]))
            continue
        yield from _import_nodes(child)


def imports_of(module: str, file: Path, modules: dict[str, Path], package: str) -> dict[str, int]:
    """{imported module of the package: first line} for one file; `from a.b import c` counts a.b.c when c is a
    module, else a.b; relative imports are resolved against the file's package; a call given a module's full name
    as a string (`importlib.import_module("qwenlink.x")`, or a helper that imports it later) counts as importing it."""
    is_package = file.name == "__init__.py"
    found: dict[str, int] = {}
    for node in _import_nodes(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        targets: list[str] = []
        if isinstance(node, ast.Call):
            values = [*node.args, *(k.value for k in node.keywords)]
            targets = [v.value for v in values if isinstance(v, ast.Constant) and v.value in modules]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.append(full if full in modules else base)
        for target in targets:
            while target and target not in modules:  # `import qwenlink.a.b.c` where c is not a module
                target = target.rpartition(".")[0]
            if target and (target == package or target.startswith(package + ".")) and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    modules = module_names(root, package)
    return {name: imports_of(name, file, modules, package) for name, file in modules.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(sorted(c)[0], set(c), graph) for c in components]


def _cycle_through(start: str, members: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first), for a readable message."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """'a imports b (line n): layer x is below layer y' for each import of a higher layer; unknown layers too."""
    problems = []
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets.items()):
            src, dst = layer_of(module), layer_of(target)
            for layer in (src, dst):
                if layer not in RANK:
                    problems.append(f"{layer}: not in LAYERS of tests/test_imports.py (place the new module there)")
            if src in RANK and dst in RANK and RANK[dst] > RANK[src]:
                problems.append(f"{module} imports {target} (line {line}): {src} is below {dst}")
    return sorted(set(problems))


# ---- the package ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(PACKAGE, "qwenlink")


def test_the_walk_sees_function_level_imports(graph) -> None:
    """The walker itself: imports made only when a function runs are edges (chat opens its session inside run_chat;
    the CLI loads each command's module when that command runs)."""
    assert "qwenlink.inference.session" in graph["qwenlink.inference.chat"]
    assert "qwenlink.commands.generate" in graph["qwenlink.cli"]
    assert len(graph) > 50


def test_no_import_cycles(graph) -> None:
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports(graph) -> None:
    problems = upward_imports(graph)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_every_top_level_module_has_a_layer() -> None:
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert names <= set(RANK), f"add to LAYERS: {sorted(names - set(RANK))}"


# ---- the checks on a package made to break them -----------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "qwenlink" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "qwenlink"


def test_a_cycle_through_a_function_level_import_is_found(tmp_path) -> None:
    root = _write(tmp_path, {
        "__init__.py": "",
        "checkpoint/__init__.py": "",
        "checkpoint/a.py": "from qwenlink.checkpoint import b\n",
        "checkpoint/b.py": "def f():\n    from . import c\n",
        "checkpoint/c.py": "import qwenlink.checkpoint.a as a\n",
        "checkpoint/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qwenlink.checkpoint import a\n",
        "checkpoint/e.py": "from qwenlink.checkpoint.d import *\n",
        "checkpoint/f.py": "import importlib\ndef g():\n    return importlib.import_module('qwenlink.checkpoint.e')\n",
    })
    graph = import_graph(root, "qwenlink")
    assert find_cycles(graph) == [["qwenlink.checkpoint.a", "qwenlink.checkpoint.b", "qwenlink.checkpoint.c",
                                   "qwenlink.checkpoint.a"]]
    assert graph["qwenlink.checkpoint.d"] == {}  # a TYPE_CHECKING import never runs
    assert "qwenlink.checkpoint.d" in graph["qwenlink.checkpoint.e"]
    assert graph["qwenlink.checkpoint.f"] == {"qwenlink.checkpoint.e": 3}  # named as a string to a call


def test_an_upward_import_is_found(tmp_path) -> None:
    root = _write(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/loader.py": "def load():\n    from qwenlink.checkpoint.hf import read\n",
        "checkpoint/__init__.py": "",
        "checkpoint/hf.py": "from qwenlink.models import loader\n",
    })
    problems = upward_imports(import_graph(root, "qwenlink"))
    assert "qwenlink.models.loader imports qwenlink.checkpoint.hf (line 2): models is below checkpoint" in problems
    assert not any("qwenlink.checkpoint.hf imports" in p for p in problems)  # downward is fine
    assert find_cycles(import_graph(root, "qwenlink"))  # and this pair is also a cycle
