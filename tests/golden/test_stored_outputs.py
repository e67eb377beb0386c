"""Behaviour is stored: every fixture's replies, report and call log equal the stored ones.

The stored files were written before the redesign by ``python -m tests.golden.capture``; a
change that alters what a guest or the host sees must rewrite them on purpose and say why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden.capture import MODES, fixtures, load, run, stored_path

CASES = [(trace, mode) for trace in fixtures() for mode in MODES]


@pytest.mark.parametrize(
    ("trace", "mode"), CASES, ids=[f"{t.name.split('.jsonl')[0]}-{m}" for t, m in CASES]
)
def test_outputs_unchanged(trace: Path, mode: str) -> None:
    stored = load(stored_path(trace, mode))
    now = run(trace, mode)
    assert len(now) == len(stored)
    for got, want in zip(now, stored, strict=True):
        assert got == want
