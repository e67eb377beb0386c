"""The layer rules of docs/architecture.md, checked on the code's own imports.

Every ``import`` and ``from … import`` in ``viommud/`` and ``protocols/`` counts: module
level, inside functions and under ``TYPE_CHECKING`` alike.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "viommud").rglob("*.py"), *(ROOT / "protocols").rglob("*.py")])
MAX_LINES = 900

# Modules any layer may use: the values that cross layers.
VALUES = {
    "viommud.events",
    "viommud.replies",
    "viommud.host",
    "viommud.trace",
    "viommud.mappings",
    "viommud.virtio_state",
    "viommud.guest_memory",
}
BACKEND_API = {"viommud.backend.base", "viommud.backend.calls"}

# layer -> the packages/modules it may import (besides itself, the stdlib and third parties)
ALLOWED: dict[str, set[str]] = {
    "protocols": set(),
    "viommud.guest": {"protocols"} | VALUES,
    "viommud.frontends": {"protocols", "viommud.guest"} | VALUES,
    "viommud.backend": {"protocols", "viommud.host"},
    "viommud.topology": {"protocols", "viommud.guest"} | VALUES | BACKEND_API,
    "viommud.dispatcher": {"protocols", "viommud.guest", "viommud.topology"} | VALUES | BACKEND_API,
    # independent of what it checks; tests/oracle/test_independence.py also checks what
    # importing it loads
    "viommud.oracle": {"protocols", "viommud.host", "viommud.trace"},
}
SHELL_ONLY = ("asyncio", "structlog", "pyroute2", "prometheus_client", "uvloop")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                yield ".".join([*base, node.module] if node.module else base)
            else:
                assert node.module is not None
                # ``from viommud import wire`` imports the module viommud.wire; otherwise the
                # module named after ``from``.
                modules = [f"{node.module}.{a.name}" for a in node.names]
                modules = [m for m in modules if existing(m)]
                yield from modules or [node.module]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if within(module, layer):
            return layer
    return None


def ours(name: str) -> bool:
    return within(name, "viommud") or within(name, "protocols")


def existing(name: str) -> bool:
    """``name`` is one of our modules or packages (not a name imported from one)."""
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


GRAPH = {module_name(p): {i for i in imports(p) if ours(i) and existing(i)} for p in SOURCES}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layer_imports_only_what_it_may(path: Path) -> None:
    module = module_name(path)
    layer = layer_of(module)
    if layer is None:
        return
    allowed = ALLOWED[layer] | {layer}
    bad = sorted(
        i
        for i in GRAPH[module]
        if i != "viommud"  # the package root: __version__
        and not any(within(i, a) for a in allowed)
    )
    assert not bad, f"{module} ({layer}) imports {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_shell_does_io(path: Path) -> None:
    module = module_name(path)
    if within(module, "viommud.shell"):
        return
    bad = sorted({i for i in imports(path) if i.split(".")[0] in SHELL_ONLY})
    assert not bad, f"{module} imports {bad}: only viommud.shell may"


def test_no_import_cycles() -> None:
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(GRAPH.get(node, set())):
            if nxt == node or nxt not in GRAPH:
                continue
            if seen.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = 2

    for start in sorted(GRAPH):
        if start not in seen:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_file_is_short_enough(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_LINES})"
