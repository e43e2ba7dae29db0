"""Imports run one way (DESIGN.md): no cycle among `lottery`'s modules, nothing in the core
imports `lottery.analysis`, and the run folder's owners (`record`, `checkpoint`) are leaves.

The graph is read from the source with `ast`, not by importing: every `import` and
`from ... import` of a `lottery` module, at module level or inside a function (a deferred
import still makes the importer depend on the module). `from lottery.x import y` counts as
importing `lottery.x.y` where that is a module, else `lottery.x`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lottery"
ENTRY_POINTS = {"lottery.cli", "lottery.lm.cli"}  # may import analysis: they draw figures
LEAVES = {  # module (or package): the lottery modules it may import
    "lottery.atomic": set(),
    "lottery.identity": set(),
    "lottery.faults": set(),
    "lottery.terminal": set(),
    "lottery.distributed": set(),
    "lottery.record": {"lottery.atomic", "lottery.identity",
                       "lottery.terminal"},  # W&B's one line on where its runs are
    # arrays come to the host through one collective; process 0 writes
    "lottery.checkpoint": {"lottery.atomic", "lottery.faults", "lottery.distributed"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The `lottery` module `name` stands for: itself, or the nearest package above it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The `lottery` modules that `module` imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        found |= {resolve(name) for name in names if name.split(".")[0] == "lottery"}
    return found - {None, module}


GRAPH = {module: imports(module) for module in MODULES}


def test_the_graph_is_read():
    """The reader sees what the files say (checked on imports written out here by hand)."""
    assert "lottery.record" in GRAPH["lottery.imp"]
    assert {"lottery.record", "lottery.analysis.plots", "lottery.analysis.results"} <= \
        GRAPH["lottery.analysis.report"]
    assert "lottery.analysis.plots" in GRAPH["lottery.cli"]  # imported inside hydra_main
    assert "lottery.record.rows" in GRAPH["lottery.record"]
    assert "lottery.atomic" in GRAPH["lottery.data.fetch"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order, the first repeated last), or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(set(MODULES) - ENTRY_POINTS))
def test_nothing_outside_analysis_imports_it(module):
    if module.startswith("lottery.analysis"):
        return
    upward = sorted(m for m in GRAPH[module] if m.startswith("lottery.analysis"))
    assert not upward, f"{module} imports {', '.join(upward)}"


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_the_run_folder_owners_are_leaves(leaf):
    own = {m for m in MODULES if m == leaf or m.startswith(leaf + ".")}
    used = set().union(*(GRAPH[m] for m in own)) - own
    assert used <= LEAVES[leaf], f"{leaf} imports {', '.join(sorted(used - LEAVES[leaf]))}"
