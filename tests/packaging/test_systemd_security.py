"""The unit's hardening (docs/operations.md §4): `systemd-analyze security` rates
viommud.service at 3.0 or less, the figure the docs state, and the --netns drop-in of the
docs at what they say too."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
DOC = ROOT / "docs" / "operations.md"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (systemd ≥ 252)"
)


def exposure(tmp_path: Path, service: str) -> float:
    for unit in UNITS.iterdir():
        shutil.copy(unit, tmp_path / unit.name)
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", service],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(rf"Overall exposure level for {re.escape(service)}: (\d+\.\d)", out.stdout)
    assert match, (out.returncode, out.stdout[-2000:], out.stderr)
    return float(match.group(1))


def documented() -> tuple[float, float, str]:
    text = DOC.read_text(encoding="utf-8")
    unit = re.search(r"rates the unit \*\*(\d+\.\d) OK\*\*", text)
    netns = re.search(r"raises the exposure to\s+(\d+\.\d)", text)
    dropin = re.search(r"```ini\n(.*?)```", text, re.S)
    assert unit, "docs/operations.md §4 lost the unit's exposure"
    assert netns, "docs/operations.md §4 lost the --netns drop-in's exposure"
    assert dropin, "docs/operations.md §4 lost the --netns drop-in"
    return float(unit.group(1)), float(netns.group(1)), textwrap.dedent(dropin.group(1))


def test_the_unit_is_exposed_at_most_3(tmp_path: Path) -> None:
    score = exposure(tmp_path, "viommud.service")
    assert score <= 3.0
    assert score == documented()[0]
    comment = re.search(r"rates this (\d+\.\d)", (UNITS / "viommud.service").read_text())
    assert comment
    assert float(comment.group(1)) == score


def test_the_documented_netns_drop_in_scores_as_documented(tmp_path: Path) -> None:
    _unit, netns, dropin = documented()
    (tmp_path / "sub").mkdir()
    service = (UNITS / "viommud.service").read_text()
    # the drop-in's settings, after the unit's own (as systemd reads viommud.service.d/)
    merged = service.replace("\n[Install]", dropin.replace("[Service]\n", "") + "\n[Install]")
    (tmp_path / "sub" / "viommud-netns.service").write_text(merged)
    assert exposure(tmp_path / "sub", "viommud-netns.service") == netns
