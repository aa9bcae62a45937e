"""hessdiag's modules import each other without a circle.

The graph is built from the source (``ast``), not by importing: an edge ``a -> b`` for
every ``import b`` / ``from b import ...`` in module ``a`` (``from pkg import name``
reaches ``pkg.name`` when that is a module, and ``pkg`` when some name is not). Imports
under ``if TYPE_CHECKING:`` are never run and are left out. Top-level imports must form
no cycle at all. Function-local imports (deferred until the function runs, to keep
``import hessdiag`` cheap) may only close a cycle listed in ``DEFERRED_CYCLES``, which is
empty: a deferred import that closes a circle still ties the two modules' roles together
(``records`` and ``sharpness`` did, until ``SharpnessResult`` moved to ``results``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hessdiag"

# cycles through function-local imports that are accepted, as sorted tuples of modules
DEFERRED_CYCLES: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    """Every module of the library (``hessdiag.cli`` is the command line, outside it)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name == "hessdiag.cli" or name.startswith("hessdiag.cli."):
            continue
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]
             ) -> tuple[set[str], set[str]]:
    """The library modules ``name`` imports at the top level and inside functions."""
    is_package = path.name == "__init__.py"
    top: set[str] = set()
    local: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        found = set()
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
            return found
        base = node.module or ""
        if node.level:
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = {f"{base}.{alias.name}" for alias in node.names}
        submodules = names & set(modules)
        # ``from pkg import module`` needs the module; ``pkg`` itself only when a name is
        # not a module (a package is always initialised before its modules anyway)
        return submodules if submodules == names else submodules | {base}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                (local if in_function else top).update(
                    t for t in targets(child) if t in modules and t != name)
                continue
            visit(child, in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return top, local - top


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    top, local = {}, {}
    for name, path in modules.items():
        top[name], local[name] = _imports(name, path, modules)
    return top, local


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_graph_sees_the_imports(tmp_path):
    """The parser finds imports of every form, top-level and deferred, and skips those
    under ``TYPE_CHECKING``."""
    source = """
from typing import TYPE_CHECKING
import pkg.a
from pkg import b
from pkg.c import thing
from . import d
from .e import other
if TYPE_CHECKING:
    from pkg import f
def later():
    from pkg.g import x
    import pkg.a
"""
    names = ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.f", "pkg.g", "pkg.m"]
    modules = {name: tmp_path / f"{name}.py" for name in names}
    path = tmp_path / "m.py"
    path.write_text(source)
    top, local = _imports("pkg.m", path, modules)
    assert top == {"pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert local == {"pkg.g"}
    real, _ = _graph()
    assert "hessdiag.curvature.lanczos" in real["hessdiag.curvature"]


def test_no_import_cycle_at_the_top_level():
    top, _ = _graph()
    assert _cycles(top) == [], "modules that import each other at the top level"


def test_no_import_cycle_through_deferred_imports():
    top, local = _graph()
    both = {name: top[name] | local[name] for name in top}
    cycles = [c for c in _cycles(both) if tuple(c) not in DEFERRED_CYCLES]
    assert cycles == [], "modules that import each other (counting function-local imports)"


def test_cycles_are_found():
    """The check itself: a circle of three and a deferred pair are reported."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_old_import_paths_still_give_the_moved_names():
    """Code written against the old homes keeps working: the same objects."""
    import hessdiag.align as align
    import hessdiag.measures as measures
    import hessdiag.results as results
    import hessdiag.sharpness as sharpness
    import hessdiag.spectrum as spectrum

    for name in measures.__all__:
        owner = spectrum if hasattr(spectrum, name) else align
        assert getattr(measures, name) is getattr(owner, name), name
    assert sharpness.SharpnessResult is results.SharpnessResult
    assert sharpness.SharpnessResult.__module__ == "hessdiag.results"


def test_nothing_in_hessdiag_uses_the_old_measures_module():
    """``hessdiag.measures`` only re-exports; the library imports the owners."""
    top, local = _graph()
    users = sorted(name for name in top if "hessdiag.measures" in top[name] | local[name])
    assert users == []
