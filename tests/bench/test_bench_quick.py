"""Every benchmark runs once in its quick mode (slow tier: CI runs it) so none can rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.slow
def test_coalescing_benchmark_verifies_clean() -> None:
    result = run("coalescing.py")
    traces = result["traces"]
    assert isinstance(traces, list)
    assert traces
    for row in traces:
        for policy in ("batching", "coalesced"):
            assert row[policy]["missed"] == 0, row["trace"]
            assert row[policy]["calls"] <= row["baseline"], row["trace"]


@pytest.mark.slow
def test_throughput_benchmark_runs() -> None:
    result = run("throughput.py")
    rows = result["throughput"]
    assert isinstance(rows, list)
    for row in rows:
        assert row["daemon"]["commands_per_s"] > 0
        assert row["echo"]["commands_per_s"] > 0
    latency = result["latency"]
    assert isinstance(latency, dict)
    assert latency["daemon"]["p50_us"] > 0
