"""The package layout is the architecture: imports point one way, with no cycles.

``server`` → ``upstream`` → ``adapters`` → ``wire``; ``auth`` and ``node`` know no app; only
``server`` speaks ``aiohttp.web``. The flat leaf modules (errors, metrics, headers) import no
package of the proxy: any package may use them. No cycles, counting the imports made for type
annotations only (``if TYPE_CHECKING:``) as well. Read from the source, so a new import that
breaks a rule fails here.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "proxy"

#: package -> packages it must never import
FORBIDDEN = {
    "wire": {"server", "upstream", "adapters", "auth"},
    "adapters": {"server", "upstream"},
    "upstream": {"server"},
    "auth": {"server", "upstream", "adapters"},
    "node": {"server", "upstream", "adapters"},
}
#: Where aiohttp's server side may be imported.
WEB_ALLOWED = {"server"}
#: Flat modules that import no package of the proxy (entry points such as ``cli`` may).
LEAVES = {"proxy.errors", "proxy.headers", "proxy.metrics"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imports(typing_too: bool = False) -> dict[str, set[str]]:
    """module -> the ``proxy`` modules and ``aiohttp.web`` it imports (at any depth); with
    ``typing_too``, those imported for annotations only as well."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for node in list(ast.walk(tree)) if typing_too else runtime_nodes(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                graph[name].add(base)
                graph[name].update(
                    f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES
                )
                if base == "aiohttp":
                    graph[name].update(f"aiohttp.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names)
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "proxy" or len(parts) < 3:
        return None  # a flat leaf, or not ours
    return parts[1]


@pytest.mark.parametrize("typing_too", [False, True], ids=["runtime", "with-type-checking"])
def test_no_import_cycles(typing_too: bool) -> None:
    graph = {m: {d for d in deps if d.startswith("proxy")}
             for m, deps in imports(typing_too).items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, trail: list[str]) -> bool:
        if state.get(module) == 1:
            cycle.extend([*trail[trail.index(module):], module])
            return True
        if state.get(module) == 2:
            return False
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep in graph and visit(dep, [*trail, module]):
                return True
        state[module] = 2
        return False

    for module in sorted(graph):
        assert not visit(module, []), "import cycle: " + " -> ".join(cycle)


def test_imports_point_one_way() -> None:
    broken = []
    for module, deps in imports(typing_too=True).items():
        own = layer(module)
        for dep in deps:
            target = layer(dep)
            if own in FORBIDDEN and target in FORBIDDEN[own]:
                broken.append(f"{module} imports {dep}")
    assert broken == []


def test_only_the_server_speaks_aiohttp_web() -> None:
    speaking = sorted(
        module for module, deps in imports().items()
        if deps & {"aiohttp.web", "aiohttp.web_request", "aiohttp.web_response"}
        and layer(module) not in WEB_ALLOWED
    )
    assert speaking == []


def test_leaves_import_no_package() -> None:
    graph = imports(typing_too=True)
    reaching = sorted(f"{leaf} imports {dep}" for leaf in LEAVES for dep in graph.get(leaf, ())
                      if layer(dep) is not None)
    assert reaching == []


def test_the_rules_see_the_packages() -> None:
    """Guard against a rule that cannot fail: every named package exists and has imports."""
    graph = imports()
    seen = {layer(m) for m in graph}
    assert set(FORBIDDEN) | WEB_ALLOWED <= seen
    assert LEAVES <= set(graph) | MODULES
    typed = imports(typing_too=True)
    assert any(typed[m] - graph[m] for m in graph)  # TYPE_CHECKING imports are seen
    assert any("proxy.wire.answers" in deps for deps in graph.values())
