"""The oracle shares no code with what it checks (docs/oracle.md, "Independence").

It may import the construct declarations (``protocols``), ``viommud.host``, ``viommud.trace``,
its own modules and the standard library; never the daemon's decoders (``viommud.guest``),
frontends, topology, dispatchers, models, group commit or the emulator's cache model. Every
import counts: module level, inside functions and under ``TYPE_CHECKING`` alike; and what
those imports pull in must not reach a forbidden module either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORACLE = sorted((ROOT / "viommud" / "oracle").glob("*.py"))
ALLOWED = ("protocols", "viommud.host", "viommud.trace", "viommud.oracle")
FORBIDDEN = (
    "viommud.frontends",
    "viommud.topology",
    "viommud.dispatcher",
    "viommud.models",
    "viommud.group_commit",
    "viommud.guest",
    "viommud.backend.emulator.caches",
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imported(path: Path) -> Iterator[str]:
    """Every module ``path`` imports (``from a import b`` yields ``a.b`` too, as ``b`` may be
    a module)."""
    package = "viommud.oracle"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                assert node.module is not None
                module = node.module
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def test_every_oracle_module_is_checked() -> None:
    assert {p.name for p in ORACLE} >= {"__init__.py", "smmuv3.py", "vtd.py", "verifier.py"}


@pytest.mark.parametrize("path", ORACLE, ids=lambda p: p.name)
def test_oracle_imports_only_the_declarations_and_values(path: Path) -> None:
    names = set(imported(path))
    forbidden = sorted(n for n in names if any(_within(n, f) for f in FORBIDDEN))
    assert not forbidden, f"{path.name} imports what the oracle checks: {forbidden}"
    ours = {n for n in names if n.split(".")[0] in ("viommud", "protocols")}
    # ``from viommud.oracle import Need`` also yields the non-module name viommud.oracle.Need
    bad = sorted(n for n in ours if not any(_within(n, a) for a in ALLOWED))
    assert not bad, f"{path.name} imports {bad}: the oracle may use {ALLOWED} only"
    third_party = sorted(
        n
        for n in names
        if n.split(".")[0] not in ("viommud", "protocols", "__future__")
        and n.split(".")[0] not in sys.stdlib_module_names
    )
    assert not third_party, f"{path.name} imports {third_party}: stdlib only"


def test_nothing_the_oracle_pulls_in_is_forbidden() -> None:
    """Importing the oracle (its session glue included) loads no forbidden module at all."""
    code = (
        "import sys, viommud.oracle.verifier\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('viommud'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "viommud.oracle.vtd" in out
    loaded = sorted(m for m in out if any(_within(m, f) for f in FORBIDDEN))
    assert not loaded, f"importing the oracle loads {loaded}"
