"""The seams between the layers, checked on the source: each layer is reached through its face, and
the face costs nothing to import."""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "src", "torchckpt")


@functools.lru_cache(maxsize=1)  # parsed once for all the checks below
def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (``read.formats`` for ``read/formats/__init__.py``)."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
                rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else ("" if rel == "__init__" else rel)
                with open(path, encoding="utf-8") as f:
                    out[rel] = ast.parse(f.read(), path)
    return out


def _imported(module: str, tree: ast.Module, is_package: bool) -> list[tuple[str, int]]:
    """The package-relative dotted module of every import of the package itself, with its line."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = [p for p in base if p]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(parts + ([node.module] if node.module else []))
            elif (node.module or "").startswith("torchckpt"):
                target = (node.module or "")[len("torchckpt."):]
            else:
                continue
            found.append((target, node.lineno))
    return found


def test_nothing_outside_read_reaches_into_its_readers_or_vm() -> None:
    reach_ins = []
    for module, tree in _modules().items():
        if module == "read" or module.startswith("read."):
            continue
        is_package = os.path.exists(os.path.join(PKG, *module.split("."), "__init__.py")) if module else True
        for target, line in _imported(module, tree, is_package):
            if target.startswith(("read.unpickle", "read.formats")):
                reach_ins.append(f"{module}:{line} imports {target}")
    assert reach_ins == [], "import these names from torchckpt.read (the layer's face):\n" + "\n".join(reach_ins)


@pytest.mark.slow
def test_the_read_face_names_only_what_exists_and_imports_nothing_until_asked() -> None:
    code = (
        "import sys, torchckpt.read as r\n"
        "before = sorted(m for m in sys.modules if m.startswith('torchckpt.read.'))\n"
        "assert before == [], before\n"
        "for name in r.__all__: getattr(r, name)\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
        "try:\n    r.no_such_name\nexcept AttributeError as e:\n    print('ok', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert done.returncode == 0, done.stderr
    assert "ok module 'torchckpt.read' has no attribute 'no_such_name'" in done.stdout


def _own_imports(tree: ast.AST) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.level or (n.module or "").startswith("torchckpt"))]


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [f"{module}:{node.lineno} imports {alias.name}" for module, tree in _modules().items()
               for node in _own_imports(tree) for alias in node.names
               if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert private == []


def test_function_level_imports_of_own_modules_are_few_and_say_why() -> None:
    """Imports sit at the top; inside a function only to break a cycle or to keep start-up cheap
    (lazy), and the line's comment says which."""
    found: set[tuple[str, int, str]] = set()  # a set: a nested function's import is seen from each enclosing one
    for module, tree in _modules().items():
        path = os.path.join(PKG, *module.split(".")) + ".py"
        lines = open(path if os.path.exists(path) else os.path.join(PKG, *module.split("."), "__init__.py"),
                     encoding="utf-8").read().splitlines()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found |= {(module, node.lineno, lines[node.lineno - 1]) for node in _own_imports(fn)}
    assert len(found) <= 5, found
    why = ("cycle", "start-up", "lazy")
    unexplained = [f"{m}:{n}" for m, n, line in found if "#" not in line or not any(w in line.split("#", 1)[1] for w in why)]
    assert unexplained == [], unexplained


def test_no_import_cycles_between_modules() -> None:
    """Every import of the package's own modules (top-level, in functions, for type checkers) as a graph:
    it has no cycle, so every layer can be read, tested and changed from the bottom up."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, tree in modules.items():
        is_package = os.path.exists(os.path.join(PKG, *module.split("."), "__init__.py")) if module else True
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            for target, _ in _imported(module, ast.Module(body=[node], type_ignores=[]), is_package):
                for name in [f"{target}.{a.name}".strip(".") for a in node.names] + [target]:
                    while name and name not in modules:
                        name = name.rpartition(".")[0]
                    if name != module and (name or target == ""):
                        graph[module].add(name)
                        break
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []
