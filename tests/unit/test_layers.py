"""The project's layers, read from its imports: no cycles, and each layer imports only those below it.

Every ``import`` statement counts, also one inside a function: a function-local import hides a
cycle from Python's start-up but not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support.paths import REPO_ROOT

# Each package and the packages of ours it may import.
ALLOWED = {
    "explainers": set(),
    "serving": {"explainers"},
    "handlers": {"serving", "explainers"},
    # The OIP front server talks HTTP to TorchServe: nothing of ours.
    "oip": set(),
    "demo": set(),
    "tools": {"oip", "handlers", "serving", "explainers", "demo"},
    "benchmarks": {"tools", "oip", "handlers", "serving", "explainers", "demo"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in ALLOWED:
        for path in (REPO_ROOT / package).rglob("*.py"):
            modules[module_name(path)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its body, relative imports resolved."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import module` imports the module; `from module import name` the module.
            candidates = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                          for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def without_parent_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drops edges from a package's own modules to the package itself: ``explainers.api`` running
    while ``explainers/__init__`` imports it is how packages work, not a cycle. Any other edge stays."""
    return {node: {t for t in targets if not node.startswith(t + ".")} for node, targets in graph.items()}


def test_the_graph_finds_what_it_should():
    # The checker itself must see function-local and relative imports, or it proves nothing.
    graph = import_graph()
    assert "explainers.kernels.rule_models" in graph["explainers.kernels.forward_record"]
    assert "explainers.errors" in graph["explainers.methods.cam"]
    assert "serving.settings" in graph["tools.archive"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    assert cycles(without_parent_packages(import_graph())) == []


def test_no_import_cycle_between_packages():
    packages = {}
    for node, targets in import_graph().items():
        top = node.split(".")[0]
        packages.setdefault(top, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] != top)
    assert cycles(packages) == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(package):
    offending = sorted(
        f"{node} imports {target}"
        for node, targets in import_graph().items() if node.split(".")[0] == package
        for target in targets if target.split(".")[0] not in ALLOWED[package] | {package}
    )
    assert offending == []
