"""The package sources import each other without cycles, and the built-in plugins register through
the same entry points an outside package uses."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "defences", "attacks", "evaluators", "leaderboard")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at the top or inside functions). A package's own
    ``__init__`` importing its submodules (registration by import) is not an edge back to it."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {t for a in node.names if (t := known(a.name))}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {t for a in node.names if (t := known(f"{base}.{a.name}") or known(base))}
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_sources_have_no_import_cycles():
    graph = import_graph()
    assert "harness.registry" in graph and "harness.errors" in graph["harness.registry"]
    assert cycles(graph) == []


def test_builtin_plugins_are_entry_points_of_the_harness_distribution():
    from harness.registry import DISTRIBUTION, REGISTRIES

    for registry in REGISTRIES.values():
        mine = [ep for ep in importlib.metadata.entry_points(group=registry.entry_point_group)
                if ep.dist is not None and ep.dist.metadata["Name"] == DISTRIBUTION]
        assert mine, registry.kind
    source = (ROOT / "harness" / "registry.py").read_text()
    for package in PACKAGES[1:]:  # no hard-coded list of plugin modules
        assert f'"{package}.' not in source and f"'{package}." not in source, package


def test_a_built_in_recipe_registers_by_being_in_its_package():
    """A new built-in defence is one file: each plugin package imports all its modules itself."""
    import defences

    modules = sorted(p.stem for p in (ROOT / "defences").glob("*.py") if not p.stem.startswith("_"))
    assert all(f"defences.{name}" in sys.modules for name in modules)
    assert "import_package_modules(__name__, __path__)" in (ROOT / "defences" / "__init__.py").read_text()
    assert defences.__name__ == "defences"


def test_missing_entry_point_metadata_is_a_clear_error():
    from harness.registry import Registry

    registry = Registry("defences")
    registry.entry_point_group = "harness.no-such-group"
    with pytest.raises(HarnessError, match=r"built-in defences are not registered.*pip install -e \."):
        registry.get("none")


def test_builtin_plugins_import_only_the_public_api():
    """harness.api is enough to write every built-in plugin, so it is enough for an outside one."""
    offenders = []
    for package in ("defences", "attacks", "evaluators"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if (module and module.startswith("harness") and module != "harness.api") or \
                        any(n.startswith("harness") and n != "harness.api" for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
