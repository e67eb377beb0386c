"""Soak (issue 14, slow tier): 64 concurrent replays against one `viommud serve` (a
session process each) answer exactly as each trace does alone.

The clients replay the three real captures (SMMUv3, VT-d, virtio-iommu: 4,100 to 8,703
records each), 21 or 22 clients per capture. A physical device belongs to one live session
at a time (docs/operations.md §10), so each client's copy of its capture names its devices
in a PCI domain of its own (``0000:01:00.0`` becomes ``0007:01:00.0`` for client 7); device
names appear in no response. Each capture is first replayed alone on the same daemon; every
concurrent client's responses file must equal that lone run's byte for byte, and its report
must too (timings aside).
"""

from __future__ import annotations

import asyncio
import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES
from tests.shell.conftest import without_timing
from tests.shell.test_serve_drain import Served
from viommud.shell.client import timeouts
from viommud.shell.replay import replay

CAPTURES = (
    "smmuv3-linux61-strict.jsonl.xz",
    "vtd-linux61-strict-ats-excerpt.jsonl.xz",
    "virtio-linux-session.jsonl.xz",
)
CLIENTS = 64


def _renamed(device: str, client: int) -> str:
    return f"{client:04x}{device[4:]}"


def variant(capture: str, client: int, into: Path) -> Path:
    """``capture`` with its devices renamed into PCI domain ``client``."""
    out = into / f"{client:02d}-{capture.removesuffix('.xz')}"
    with lzma.open(FIXTURES / capture, "rt", encoding="utf-8") as src, out.open("w") as dst:
        for n, line in enumerate(src):
            obj: dict[str, Any] = json.loads(line)
            if n == 0:
                for device in obj["host"]["devices"]:
                    device["id"] = _renamed(device["id"], client)
            elif "device" in obj:
                obj["device"] = _renamed(obj["device"], client)
            dst.write(json.dumps(obj, separators=(",", ":")) + "\n")
    return out


async def run(trace: Path, socket: Path, responses: Path) -> dict[str, Any]:
    # `viommud replay --timeout 300`: 64 HELLOs at once need 64 session processes, each
    # ~0.6 s of CPU to start (docs/operations.md §10), on two cores
    with responses.open("w") as sink, timeouts(300):
        result = await replay(trace, socket, responses=sink)
    assert result.exit_code == 0, (trace.name, result.error)
    assert result.report is not None
    return without_timing(result.report)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_64_concurrent_replays_answer_as_lone_runs(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    out = tmp_path / "out"
    traces.mkdir()
    out.mkdir()
    clients = [(k, CAPTURES[k % len(CAPTURES)]) for k in range(1, CLIENTS + 1)]
    paths = {k: variant(capture, k, traces) for k, capture in clients}
    daemon = Served(tmp_path, "--log-level", "warning", "--handshake-timeout", "300")
    try:

        async def soak() -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
            alone = {}
            for capture in CAPTURES:  # one at a time, on the same daemon
                k = next(k for k, c in clients if c == capture)
                alone[capture] = await run(paths[k], daemon.socket, out / f"alone-{capture}")
            reports = await asyncio.gather(
                *(run(paths[k], daemon.socket, out / f"{k:02d}.jsonl") for k, _ in clients)
            )
            return alone, list(reports)

        alone, reports = asyncio.run(soak())
    finally:
        assert daemon.stop() == 0
    for (k, capture), report in zip(clients, reports, strict=True):
        lone = (out / f"alone-{capture}").read_bytes()
        assert lone.count(b"\n") > 4000
        assert (out / f"{k:02d}.jsonl").read_bytes() == lone, (k, capture)
        assert report == alone[capture], (k, capture)
    events = daemon.events()
    assert not [e for e in events if e["level"] in ("error", "critical")], events[-5:]
