"""The package's import structure: no import cycle among the modules of ``modelgrow/`` (module-level imports; an
import inside a function or under ``if TYPE_CHECKING:`` runs later and cannot deadlock the import), and the cheap
entry points stay cheap (a config without torch, ``import modelgrow`` without torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modelgrow"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module):
    """Import nodes executed when the module is imported: not in a function, not under ``if TYPE_CHECKING``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, ast.ClassDef):
            todo.extend(n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        else:
            todo.extend(n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt))


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package whose code runs when it is imported (module-level imports): the module
    named and the packages on the way to it, except the importer's own ancestor packages, which Python has always
    imported before the importer runs (``from . import sibling`` needs the sibling, not the package's ``__init__``;
    ``from .. import name`` of a non-module name does need the package's ``__init__``)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")))}

        def add(target: str, direct: bool, mod=mod, ancestors=ancestors) -> None:
            """``target`` and the packages on the way to it; ``direct``: ``target`` itself is needed whole."""
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                last = i == len(parts)
                if t in files and t != mod and (t not in ancestors or (last and direct)):
                    graph[mod].add(t)

        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, direct=True)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in files:  # a submodule: it runs, and the packages on the way
                    add(sub, direct=True)
                else:  # a name defined by ``base``: its module runs in full
                    add(base, direct=True)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``) or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50 and "modelgrow.data.cache.build" in graph
    assert "modelgrow.data.cache.format" in graph["modelgrow.data.cache.build"]  # edges are found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle(tmp_path):
    """The checker itself: a package whose modules import each other at module level is caught; the same imports
    inside a function or under TYPE_CHECKING are not a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import pkg.a\nthing = 1\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and "pkg.a" in cycle and "pkg.sub.b" in cycle
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
                                      "def f():\n    import pkg.a\nthing = 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_config_and_package_import_without_torch():
    code = ("import sys, modelgrow.config as c; c.load_config(None, ['--model.preset', 'STDiT-tiny']); "
            "import modelgrow; "
            "print([m for m in ('torch', 'triton', 'diffusers', 'modelgrow.models.stdit') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
