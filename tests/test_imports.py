"""The package's import structure: no cycles, internal imports at the top of each module.

A module that has to import another of the package inside a function to dodge a cycle hides
a dependency the reader (and the import order) cannot see; a function-level import is kept only
for a heavy optional third-party library, with a comment saying why.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distillscale"

# Nothing is exempt from the checks below (the entry kept for a module in a rewrite).
PENDING_REWRITE: tuple[str, ...] = ()
# (module, function): function-level internal imports with a reason to stay for now.
# Each is the command line reaching the training stack (torch, megatron-core, ModelOpt): the
# launchers ask `distillscale launch plan` / `launch sweep` for a plan on login nodes, where
# the container's training stack need not import (and costs ~20 s where it does).
FUNCTION_ALLOWLIST = {
    ("distillscale/launch/sweep.py", "run_sweep_here"),  # the --run-here sweep runs stages
    ("distillscale/cli.py", "_data_command"),  # `data build/import` runs the data stage
    ("distillscale/cli.py", "_dispatch"),  # stage commands and recipes
    ("distillscale/cli.py", "_anticipated"),  # a training error's class (torch)
    ("distillscale/launch/commands.py", "run"),  # `launch stage` runs stages
    ("distillscale/recipes.py", "run_recipe"),  # `distillscale recipes` lists without torch
    # pandas, scipy, matplotlib and scikit-learn (seconds to import): not on the plan path
    ("distillscale/cli.py", "_domain_command"),
    ("distillscale/cli.py", "_table_command"),
    ("distillscale/launch/commands.py", "_fit_sweep"),
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module of the package, dotted
    path: str  # importing file, relative to the repository
    line: int
    function: str | None  # enclosing function, None at module level


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _pending(path: Path) -> bool:
    return _rel(path).startswith(PENDING_REWRITE)


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Modules of the package `node` imports (`from pkg import sub` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:  # `import distillscale.x.y` binds distillscale.x.y
            name = name.rpartition(".")[0]
        if name.startswith("distillscale"):
            out.append(name)
    return out


def _imports(path: Path):
    """(node, enclosing function or None, first line of its run) for every import statement in
    `path`; a run is the consecutive import statements of one block."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        run_start = None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                run_start = run_start or child.lineno
                found.append((child, function, run_start))
                continue
            run_start = None
            inner = (child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                     else function)
            visit(child, inner)

    visit(tree, None)
    return found


def internal_edges() -> list[Edge]:
    edges = []
    for module, path in MODULES.items():
        for node, function, _ in _imports(path):
            for target in _targets(module, path, node):
                if target != module:
                    edges.append(Edge(module, target, _rel(path), node.lineno, function))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_graph_sees_top_and_function_level_imports(tmp_path):
    edges = internal_edges()
    by = {(e.source, e.target): e for e in edges}
    # A known edge, so an empty graph cannot pass the cycle test.
    assert by[("distillscale.launch.ranks", "distillscale.manifest")].function is None
    assert by[("distillscale.cli", "distillscale.launch.commands")].function is None
    assert by[("distillscale.cli", "distillscale.runner")].function in ("_data_command", "_dispatch")
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\n\ndef f():\n    x = 1\n    # why\n"
                      "    import numpy\n    from distillscale import manifest\n"
                      "    return x\n")
    found = [(type(n).__name__, fn, start) for n, fn, start in _imports(sample)]
    assert found == [("Import", None, 1), ("Import", "f", 7), ("ImportFrom", "f", 7)]
    assert _targets("sample", sample, _imports(sample)[2][0]) == ["distillscale.manifest"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in internal_edges():
        if e.function is not None and _pending(PACKAGE.parent / e.path):
            continue
        graph[e.source].add(e.target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_internal_imports_are_at_module_level():
    hidden = [f"{e.path}:{e.line} ({e.function}) imports {e.target}" for e in internal_edges()
              if e.function is not None and not _pending(PACKAGE.parent / e.path)
              and (e.path, e.function) not in FUNCTION_ALLOWLIST]
    assert not hidden, "move these imports to the top of their module:\n" + "\n".join(hidden)


def _top_name(node: ast.Import | ast.ImportFrom) -> str | None:
    if isinstance(node, ast.ImportFrom):
        return None if node.level else (node.module or "").split(".")[0]
    return node.names[0].name.split(".")[0]


def _says_why(line: str) -> bool:
    """A comment on the line that is more than a linter directive."""
    comment = line.partition("#")[2].strip()
    return bool(comment) and not comment.startswith(("noqa", "type:", "pragma"))


def test_function_level_imports_are_commented_third_party():
    """A function-level import is a heavy optional dependency loaded on the path that needs it:
    never the standard library, and a comment on its line, or on the line above the run of
    imports it belongs to, says why."""
    problems = []
    for path in MODULES.values():
        if _pending(path):
            continue
        lines = path.read_text().splitlines()
        for node, function, run_start in _imports(path):
            top = _top_name(node)
            if function is None or top is None or top == "distillscale":
                continue
            where = f"{_rel(path)}:{node.lineno} ({function})"
            if top in sys.stdlib_module_names:
                problems.append(f"{where}: standard library `{top}` belongs at the top")
                continue
            own = any(_says_why(lines[i]) for i in range(node.lineno - 1, node.end_lineno))
            above = run_start > 1 and lines[run_start - 2].lstrip().startswith("#")
            if not (own or above):
                problems.append(f"{where}: `{top}` needs a comment saying why it is imported here")
    assert not problems, "\n".join(problems)


def test_test_module_names_are_unique():
    # The test folders are not packages: pytest imports each test file by its base name, and a
    # second file of the same name stops collection of the whole suite ("import file mismatch").
    names = [p.name for p in Path(__file__).resolve().parent.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
