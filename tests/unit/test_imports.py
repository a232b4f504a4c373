"""The import graph of the `ttrl` package: no cycles, the layers hold, entries stay on top.

Read from the source with `ast` (nothing is imported, so this runs in well
under a second and sees imports inside functions too). Three rules:

(a) No import cycle among ttrl modules, at any level: module level, inside
    a function, or under `if TYPE_CHECKING:`. A lazy import cannot deadlock
    start-up, but two modules that need each other cannot be read, moved or
    tested apart either; a cycle hidden inside a function is still a cycle
    (the reports once were one: compare -> grid_report -> compare).
(b) The pure core (labeling/, rewards/, algos/, data/, types.py,
    registry.py) reaches nothing in rollout/, trainer/, distributed/, ser/
    or serve/, and never imports ray, vllm or deepspeed: not at module level,
    not inside a function, not through another ttrl module. The distributed
    parts are handed in as objects (e.g. the reward model's scorer) by the
    code that builds a run.
(c) No library module imports an entry module, at any level.

What is an entry module: a module where a process starts, that parses the
command line or composes a Hydra config and then calls the library:
`ttrl.train` (`ttrl-train`), `ttrl.eval.cli` (`ttrl-eval`),
`ttrl.serve.cli` (`ttrl-serve`), `ttrl.compare` (`ttrl-compare`, over the
reports of ttrl/report/), `ttrl.export` (`ttrl-export`) and every `__main__` module (`python -m
ttrl.serve`, `python -m ttrl.bench`). Entry modules may import each other
(`ttrl/serve/__main__.py` runs `ttrl.serve.cli`). Everything else is
library, including `ttrl.cli` (the Hydra runner the entries share); other
modules with an `if __name__ == "__main__":` block are libraries that can
also be run.
Anything several entries share (the run dir's config.yaml: ttrl/rundir.py)
lives in a library module.

Each failure names the offending import as file:line.
"""

from __future__ import annotations

import ast
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ttrl"

ENTRY = {"ttrl.train", "ttrl.eval.cli", "ttrl.serve.cli", "ttrl.compare", "ttrl.serve.__main__",
         "ttrl.bench.__main__", "ttrl.export"}
# Console scripts whose module is a library that also holds a `main()` (see the docstring); none today.
LIBRARY_SCRIPTS: set[str] = set()

CORE = ("ttrl.labeling", "ttrl.rewards", "ttrl.algos", "ttrl.data", "ttrl.types", "ttrl.registry")
CORE_MUST_NOT_REACH = ("ttrl.rollout", "ttrl.trainer", "ttrl.distributed", "ttrl.ser", "ttrl.serve")
HEAVY = ("ray", "vllm", "deepspeed")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module (a ttrl module, or a top-level external name)
    where: str  # file:line
    top: bool  # at module level (not in a function, not under TYPE_CHECKING)
    text: str  # the import statement, one line


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, top: bool):
    """Yield (import node, at module level) for every import under `node`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, top
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), top)
        else:
            yield from _walk(child, top)


def _graph() -> tuple[set[str], list[Edge]]:
    files = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    modules = set(files)

    def ttrl_target(name: str) -> str | None:
        # The most specific ttrl module a dotted name names (`ttrl.rewards.base.X` -> ttrl.rewards.base).
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: list[Edge] = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node, top in _walk(tree, True):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            text = ast.unparse(node)
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:  # `from . import x`, `from ..rewards import base`
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    absolute = ".".join(base + ([node.module] if node.module else []))
                else:
                    absolute = node.module or ""
                # `from pkg import name`: name is a submodule, or something the package defines.
                targets = [f"{absolute}.{a.name}" if f"{absolute}.{a.name}" in modules else absolute
                           for a in node.names]
            for name in dict.fromkeys(targets):
                if name == "ttrl" or name.startswith("ttrl."):
                    dst = ttrl_target(name)
                    if dst and dst != mod:
                        edges.append(Edge(mod, dst, where, top, text))
                else:
                    edges.append(Edge(mod, name.split(".")[0], where, top, text))
    return modules, edges


def _in(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _find_cycles(modules: set[str], edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected group of modules, by depth-first search.

    Every import counts, wherever it stands (module level, function, TYPE_CHECKING)."""
    out: dict[str, list[Edge]] = {m: [] for m in modules}
    for e in edges:
        if e.dst in modules:
            out[e.src].append(e)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[Edge] = []
    cycles: list[list[Edge]] = []
    seen: set[frozenset[str]] = set()

    def visit(m: str) -> None:
        state[m] = 1
        for e in out[m]:
            if state.get(e.dst) == 1:
                start = next(i for i, s in enumerate(stack) if s.src == e.dst) if e.dst != m else len(stack)
                cycle = stack[start:] + [e]
                key = frozenset(x.src for x in cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cycle)
            elif e.dst not in state:
                stack.append(e)
                visit(e.dst)
                stack.pop()
        state[m] = 2

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(modules)))
    try:
        for m in sorted(modules):
            if m not in state:
                visit(m)
    finally:
        sys.setrecursionlimit(limit)
    return cycles


def _bad_chains(src: str, bad, edges: list[Edge]) -> list[list[Edge]]:
    """Every import (any level) by which `src` reaches a module for which `bad(dst)` holds,
    each as the shortest chain of imports from `src` that ends in it."""
    out: dict[str, list[Edge]] = {}
    for e in edges:
        out.setdefault(e.src, []).append(e)
    prev: dict[str, Edge | None] = {src: None}
    queue, chains = [src], []
    while queue:
        m = queue.pop(0)
        for e in out.get(m, []):
            if bad(e.dst):
                chain = [e]
                while prev[chain[0].src] is not None:
                    chain.insert(0, prev[chain[0].src])
                chains.append(chain)
            elif e.dst not in prev and e.dst.startswith("ttrl"):
                prev[e.dst] = e
                queue.append(e.dst)
    return chains


def _show(chain: list[Edge]) -> str:
    return "\n".join(f"    {e.where}: {e.text}   ({e.src} -> {e.dst}{'' if e.top else ', not at module level'})"
                     for e in chain)


class _Graph(tuple):
    def __repr__(self) -> str:  # pytest prints the fixture on a failure: keep it to one line
        return f"<import graph: {len(self[0])} modules, {len(self[1])} imports>"


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Edge]]:
    t0 = time.perf_counter()
    g = _Graph(_graph())
    assert time.perf_counter() - t0 < 5, "reading the import graph should take about a second"
    return g


def test_the_graph_is_read(graph) -> None:
    """Guards the other tests against passing on an empty graph."""
    modules, edges = graph
    assert {"ttrl.run", "ttrl.step", "ttrl.train", "ttrl.labeling.grade", "ttrl.rewards.base"} <= modules
    assert ENTRY <= modules and LIBRARY_SCRIPTS <= modules
    pairs = {(e.src, e.dst) for e in edges}
    assert ("ttrl.parts", "ttrl.rewards") in pairs  # `from ttrl.rewards import Reward, build_reward`
    assert ("ttrl.labeling", "ttrl.labeling.extract") in pairs
    assert ("ttrl.serve.__main__", "ttrl.serve.cli") in pairs
    # function-level imports are seen too: train.py imports the run only when it runs
    assert any(e.src == "ttrl.train" and e.dst == "ttrl.run" and not e.top for e in edges)
    assert any(e.src == "ttrl.compare" and e.dst == "ttrl.report.grid" and not e.top for e in edges)


def test_relative_imports_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`from . import x` and `from ..pkg import y` name the right modules."""
    root = tmp_path / "ttrl"
    (root / "a").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a" / "__init__.py").write_text("from . import b\n")
    (root / "a" / "b.py").write_text("def f():\n    from ..c import g\n")
    (root / "c.py").write_text("from .a.b import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", root)
    _, edges = _graph()
    got = {(e.src, e.dst, e.top) for e in edges}
    assert got == {("ttrl.a", "ttrl.a.b", True), ("ttrl.a.b", "ttrl.c", False), ("ttrl.c", "ttrl.a.b", True)}


def test_a_cycle_is_found_at_any_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Imports inside functions and under TYPE_CHECKING close a cycle too; the failure says where they stand."""
    root = tmp_path / "ttrl"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("import ttrl.b\n")
    (root / "b.py").write_text("import os\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", root)
    assert _find_cycles(*_graph()) == [], "a -> b alone is no cycle"
    for back, line in (("from . import a\n", 1),                                   # module level
                       ("import os\ndef f():\n    from ttrl.a import x\n", 3),    # inside a function
                       ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ttrl import a\n", 3)):
        (root / "b.py").write_text(back)
        (cycle,) = _find_cycles(*_graph())
        assert [e.src for e in cycle] == ["ttrl.a", "ttrl.b"] and cycle[-1].where == f"ttrl/b.py:{line}"
        assert ("not at module level" in _show(cycle)) == (line != 1)


def test_no_import_cycles(graph) -> None:
    modules, edges = graph
    cycles = _find_cycles(modules, edges)
    msg = "\n".join("  " + " -> ".join([c[0].src] + [e.dst for e in c]) + "\n" + _show(c) for c in cycles)
    assert not cycles, f"import cycles (imports at any level count):\n{msg}"


def test_pure_core_reaches_no_engine_layer(graph) -> None:
    modules, edges = graph
    broken: dict[str, str] = {}  # the offending import -> how the core gets there
    for mod in sorted(m for m in modules if _in(m, CORE)):
        for chain in _bad_chains(mod, lambda d: _in(d, CORE_MUST_NOT_REACH) or d in HEAVY, edges):
            last = chain[-1]
            key = f"  {last.where}: {last.text}   ({last.src} -> {last.dst})"
            if key not in broken:
                # A core module's own import needs no route; one outside the core gets the route to it.
                broken[key] = "" if _in(last.src, CORE) else f"\n    reached from {mod}:\n{_show(chain[:-1])}"
    msg = "\n".join(k + v for k, v in broken.items())
    assert not broken, f"the pure core reaches the engine layers (at any level):\n{msg}"


def test_no_library_module_imports_an_entry(graph) -> None:
    modules, edges = graph
    broken = [f"  {e.where}: {e.text}   ({e.src} is a library module, {e.dst} an entry)"
              for e in edges if e.dst in ENTRY and e.src not in ENTRY]
    assert not broken, "library modules import entry modules:\n" + "\n".join(broken)


def test_every_console_script_is_classified() -> None:
    """A new console script makes its author decide: entry (above the library) or library with a main()."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    unknown = {name: target for name, target in scripts.items()
               if target.split(":")[0] not in ENTRY | LIBRARY_SCRIPTS}
    assert not unknown, f"console scripts missing from ENTRY or LIBRARY_SCRIPTS in {__file__}: {unknown}"
    mains = {_module_name(p) for p in PKG.rglob("__main__.py")}
    assert mains <= ENTRY, f"__main__ modules are entries: add {sorted(mains - ENTRY)} to ENTRY"
