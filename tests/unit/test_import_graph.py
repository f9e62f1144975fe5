"""The taskomatic package has no import cycles, and the plugin API stays public.

Module-level imports only (the ones that run when a module is loaded); imports
inside ``if TYPE_CHECKING:`` and inside functions do not count. A cycle means
two modules cannot be understood (or loaded) one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import taskomatic

PACKAGE_ROOT = Path(taskomatic.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            pending += [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            pending += [*node.body, *node.orelse, *node.finalbody, *(s for h in node.handlers for s in h.body)]
    return found


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package's modules it imports when loaded."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                # ``from taskomatic import metrics`` names a module; ``from x import name`` names a member.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in ``graph`` as a path that returns to its start, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        path.append(node)
        on_path.add(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle is not None:
            return cycle
    return None


def _package_modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(_package_modules())
    assert graph.get("taskomatic.runtime.shard")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    modules = {
        "a": ast.parse("import b\n"),
        "b": ast.parse("from c import thing\n"),
        "c": ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import d\nimport a\n"),
        "d": ast.parse("import c\n"),
    }
    assert find_cycle(import_graph(modules)) == ["a", "b", "c", "a"]
    # Imports under TYPE_CHECKING or inside functions are not cycles.
    modules["c"] = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                             "def f() -> None:\n    import a\n")
    assert find_cycle(import_graph(modules)) is None


def test_the_registry_is_the_only_module_importing_every_action() -> None:
    graph = import_graph(_package_modules())
    assert "taskomatic.actions.vm" not in graph["taskomatic.actions.base"]
    assert {"taskomatic.actions.vm", "taskomatic.actions.storage", "taskomatic.actions.host"} <= \
        graph["taskomatic.actions.registry"]


def test_the_bench_plugin_imports_only_public_modules() -> None:
    plugin = PACKAGE_ROOT.parent / "bench" / "plugin" / "actions.py"
    tree = ast.parse(plugin.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    taskomatic_modules = {m for m in imported if m.startswith("taskomatic")}
    assert taskomatic_modules and taskomatic_modules <= {"taskomatic.model", "taskomatic.actions.base"}
