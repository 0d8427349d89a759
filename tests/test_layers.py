"""Layers: the import graph of ``persrep`` and ``ray_jobs/`` has no cycle, and only
``persrep/distributed/`` and ``ray_jobs/`` import Ray.

The graph is read with ``ast`` (nothing is imported): an edge A -> B when module A names module B
in an ``import`` / ``from ... import`` (``from pkg import name`` is an edge to ``pkg.name`` when that
is a module, else to ``pkg``). Imports under ``if TYPE_CHECKING:`` never run and are left out.
Two graphs are checked separately:

- **module-level**: imports that run when the module is imported;
- **with lazy imports**: module-level plus imports inside functions. A cycle that only appears
  here does not break importing, but it is still an upward dependency between layers.

``python tests/test_layers.py`` prints both lists of cycles (one per strongly connected component).
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Known cycles owned by another change: (frozenset of modules, why). Remove an entry when it is gone.
KNOWN_LAZY: dict[frozenset[str], str] = {}
KNOWN_MODULE_LEVEL: dict[frozenset[str], str] = {}

RAY_ALLOWED = ("persrep.distributed", "ray_jobs")

# Bottom modules: nothing of persrep below them.
BOTTOM = ("persrep.errors", "persrep.hashing", "persrep.compositing", "persrep.registry", "persrep.sections")
# Layers below generation/ (they are what generators are built from) and what they must not import.
BELOW_GENERATION = ("persrep.data", "persrep.models", "persrep.contrastive", "persrep.captions",
                    "persrep.evaluation")
ABOVE = ("persrep.generation", "persrep.pipeline", "persrep.distributed", "persrep.sweep",
         "persrep.find", "persrep.cli")
# (importer, imported) pairs allowed for now, with why
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    """Module name -> file, for persrep/** and ray_jobs/*.py."""
    out: dict[str, Path] = {}
    for path in sorted((REPO / "persrep").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for path in sorted((REPO / "ray_jobs").glob("*.py")):
        out["ray_jobs." + path.stem] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(imported names, lazy) for every import statement; TYPE_CHECKING blocks skipped."""
    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    yield from walk(ast.Module(body=[c], type_ignores=[]), lazy)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)
    yield from walk(tree, False)


def _targets(node, module: str, is_pkg: bool, known: set[str]) -> list[str]:
    """Modules of ours (or top-level third-party names) an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = []
    for a in node.names:
        full = f"{base}.{a.name}"
        out.append(full if full in known else base)
    return out


@lru_cache(maxsize=1)
def import_graph():
    """(module-level edges, lazy-only edges, third-party top-level names per module)."""
    files = module_files()
    known = set(files)
    eager: dict[str, set[str]] = {m: set() for m in files}
    lazy: dict[str, set[str]] = {m: set() for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, is_lazy in _imports(tree):
            for target in _targets(node, mod, path.name == "__init__.py", known):
                top = target.split(".")[0]
                if target in known:
                    if target != mod:
                        (lazy if is_lazy else eager)[mod].add(target)
                elif top not in ("persrep", "ray_jobs"):
                    external[mod].add(top)
    return eager, lazy, external


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's SCCs with more than one module (self-imports are dropped when building)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the message."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def cycles():
    """(module-level SCCs, SCCs that need lazy imports) with the graphs they come from."""
    eager, lazy, _ = import_graph()
    both = {m: eager[m] | lazy[m] for m in eager}
    module_level = strongly_connected(eager)
    with_lazy = [c for c in strongly_connected(both) if c not in module_level]
    return (module_level, eager), (with_lazy, both)


def _describe(comps, graph, known):
    return [" -> ".join(one_cycle(graph, c)) for c in comps if frozenset(c) not in known]


def test_no_module_level_import_cycle():
    (comps, graph), _ = cycles()
    bad = _describe(comps, graph, KNOWN_MODULE_LEVEL)
    assert not bad, "module-level import cycle(s):\n  " + "\n  ".join(bad)


def test_no_import_cycle_through_lazy_imports():
    _, (comps, graph) = cycles()
    bad = _describe(comps, graph, KNOWN_LAZY)
    assert not bad, ("import cycle(s) through function-level imports (move the shared piece down "
                     "a layer):\n  " + "\n  ".join(bad))


def test_known_cycle_exceptions_still_exist():
    """A known exception that is gone must be removed from the list (it would hide a new cycle)."""
    (eager_comps, _), (lazy_comps, _) = cycles()
    present = {frozenset(c) for c in eager_comps + lazy_comps}
    stale = [sorted(k) for k in (*KNOWN_LAZY, *KNOWN_MODULE_LEVEL) if k not in present]
    assert not stale, f"known import cycle(s) no longer exist, remove them from KNOWN_*: {stale}"


def test_only_distributed_and_ray_jobs_import_ray():
    eager, lazy, external = import_graph()
    bad = sorted(m for m, names in external.items()
                 if "ray" in names and not any(m == a or m.startswith(a + ".") for a in RAY_ALLOWED))
    assert not bad, f"only persrep/distributed/ and ray_jobs/ may import ray; also imported by: {bad}"


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_bottom_modules_import_nothing_of_persrep():
    eager, lazy, _ = import_graph()
    bad = {m: sorted(eager[m] | lazy[m]) for m in BOTTOM if eager[m] | lazy[m]}
    assert not bad, f"bottom modules must not import persrep modules: {bad}"


def test_lower_layers_do_not_import_generation_or_above():
    eager, lazy, _ = import_graph()
    bad = sorted(f"{m} -> {x}" + (" (function-level)" if x not in eager[m] else "")
                 for m in eager if _under(m, BELOW_GENERATION)
                 for x in eager[m] | lazy[m] if _under(x, ABOVE) and (m, x) not in KNOWN_UPWARD)
    assert not bad, ("upward import(s) from a layer below generation/ (move the shared piece down, "
                     "e.g. into persrep/hashing.py or persrep/compositing.py):\n  " + "\n  ".join(bad))
    stale = [k for k in KNOWN_UPWARD if k[1] not in eager[k[0]] | lazy[k[0]]]
    assert not stale, f"KNOWN_UPWARD entries no longer needed, remove them: {stale}"


def test_the_graph_reader_sees_real_edges():
    """The reader is not vacuous: known edges of each kind are found."""
    eager, lazy, external = import_graph()
    assert "persrep.config" in eager["persrep.pipeline.runner"]
    assert "ray" in external["persrep.distributed.session"]
    assert any(lazy.values())
    # a synthetic cycle is found and named
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


if __name__ == "__main__":
    (m_comps, m_graph), (l_comps, l_graph) = cycles()
    print(f"module-level cycles (strongly connected components): {len(m_comps)}")
    for c in m_comps:
        print("  " + " -> ".join(one_cycle(m_graph, c)) + (f"   [{len(c)} modules]" if len(c) > 3 else ""))
    print(f"cycles through function-level (lazy) imports: {len(l_comps)}")
    for c in l_comps:
        print("  " + " -> ".join(one_cycle(l_graph, c)) + (f"   [{len(c)} modules]" if len(c) > 3 else ""))


def test_test_modules_share_helpers_through_helper_modules():
    """Tests import shared helpers from tests/helpers.py, tests/worlds.py, tiny_lm.py, browser.py,
    never from another test module (that runs its module-level fixtures' imports and couples files)."""
    bad = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node, _lazy in _imports(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad += [f"{path.name} imports {n}" for n in names
                    if n.split(".")[0].startswith("test_") and n.split(".")[0] != path.stem]
    assert not bad, "move shared test helpers into tests/helpers.py or tests/worlds.py: " + "; ".join(bad)


# The orchestrator: one module per stage, the stage list, the runner (issue 28)
STAGE_MODULES = tuple(f"persrep.pipeline.stages.{s}" for s in (
    "auto_masks", "captions", "base_images", "generator_prep", "synthesis", "personalization", "evaluation"))
SWEEPS = ("persrep.sweep", "persrep.distributed.sweep", "persrep.distributed.sweep_job")


def test_the_orchestrator_does_not_import_distributed():
    """persrep/pipeline/ runs without Ray: it never imports persrep/distributed/ (nor Ray)."""
    eager, lazy, external = import_graph()
    bad = sorted(f"{m} -> {x}" for m in eager if _under(m, ("persrep.pipeline",))
                 for x in eager[m] | lazy[m] if _under(x, ("persrep.distributed",)))
    assert not bad, f"persrep/pipeline/ imports persrep/distributed/: {bad}"
    assert not [m for m in external if _under(m, ("persrep.pipeline",)) and "ray" in external[m]]


def test_one_module_per_stage_and_sweeps_import_stages_not_the_runner():
    files = module_files()
    assert all(m in files for m in STAGE_MODULES), [m for m in STAGE_MODULES if m not in files]
    eager, lazy, _ = import_graph()
    top = ("persrep.pipeline.runner", "persrep.pipeline.sequence")
    bad = sorted(f"{m} -> {x}" for m in eager if _under(m, STAGE_MODULES + SWEEPS)
                 for x in eager[m] | lazy[m] if x == "persrep.pipeline.runner"
                 or (_under(m, STAGE_MODULES) and x in top))
    assert not bad, f"stage modules and sweeps import the runner (or a stage the stage list): {bad}"
