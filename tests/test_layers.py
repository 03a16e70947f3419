"""The house rules of issue 18, enforced: imports point down the pipeline (import-linter's layers contract in
pyproject.toml), no import cycle anywhere in the package, and both checks fail on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted: every import cycle in ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return cycles


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy_with_upward_import(tmp_path: Path) -> Path:
    """A copy of the package whose lowest layer imports a higher one that imports it back (the defect both checks
    must catch): core/paths.py, which bundle.py imports, imports bundle.py."""
    shutil.copytree(REPO / "nailkit", tmp_path / "nailkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    paths = tmp_path / "nailkit" / "core" / "paths.py"
    paths.write_text(paths.read_text() + "\n\ndef _upward():\n    from nailkit.bundle import make_bundle  # noqa\n")
    return tmp_path


def test_layers_contract_is_kept():
    res = _lint(REPO, REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("nailkit", cache_dir=None)
    assert len(graph.modules) > 40  # the whole package was read
    assert import_cycles(graph) == []


def test_an_upward_import_breaks_the_contract_and_makes_a_cycle(tmp_path, monkeypatch):
    root = _copy_with_upward_import(tmp_path)
    res = _lint(root, root)
    assert res.returncode != 0 and "BROKEN" in res.stdout, res.stdout
    assert "nailkit.core.paths -> nailkit.bundle" in res.stdout
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "nailkit" or m.startswith("nailkit.")]:
        monkeypatch.delitem(sys.modules, name)
    graph = grimp.build_graph("nailkit", cache_dir=None)
    assert graph.direct_import_exists(importer="nailkit.core.paths", imported="nailkit.bundle")  # the copy was read
    cycles = import_cycles(graph)
    assert any("nailkit.core.paths" in c and "nailkit.bundle" in c for c in cycles), cycles


@pytest.mark.parametrize("graph_edges, want", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
])
def test_import_cycles_on_small_graphs(graph_edges, want):
    g = grimp.ImportGraph()
    for m in graph_edges:
        g.add_module(m)
    for m, targets in graph_edges.items():
        for t in targets:
            g.add_import(importer=m, imported=t)
    assert import_cycles(g) == want
