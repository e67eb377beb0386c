"""Helpers for the virtio-iommu socket tests: the fixture generator's case tables, and
replaying records through a daemon's socket with ``viommud.shell.replay.replay``."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.conftest import FIXTURES, Daemon
from viommud.shell.replay import replay
from viommud.trace import render_trace

GENERATOR = FIXTURES / "generate_virtio.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fixtures_generate_virtio", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


@dataclass
class Replayed:
    report: dict[str, Any]
    responses: list[dict[str, Any]]
    calls: list[dict[str, Any]]

    def by_record(self) -> dict[int, dict[str, Any]]:
        return {r["record"]: r for r in self.responses}

    def requests(self) -> list[dict[str, Any]]:
        """The responses of ``request`` records, in order."""
        return [r for r in self.responses if "status" in r]

    def ioctls(self, name: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["ioctl"] == name]


def write_trace(path: Path, name: str, records: list[dict[str, Any]]) -> Path:
    path.write_text(render_trace(GEN.header(name), records))
    return path


async def replay_records(
    daemon: Daemon, tmp_path: Path, records: list[dict[str, Any]], name: str = "t"
) -> Replayed:
    trace = write_trace(tmp_path / f"{name}.jsonl", name, records)
    return await replay_file(daemon, trace)


async def replay_file(daemon: Daemon, trace: Path) -> Replayed:
    responses, calls = io.StringIO(), io.StringIO()
    result = await replay(trace, daemon.socket, responses=responses, calls=calls)
    assert result.exit_code == 0, result.error
    assert result.report is not None
    return Replayed(
        result.report,
        [json.loads(x) for x in responses.getvalue().splitlines()],
        [json.loads(x) for x in calls.getvalue().splitlines()],
    )


def tail(status: str) -> str:
    """The hex of a 4-byte tail with ``status`` (reserved bytes zero)."""
    from protocols.virtio_iommu import Status, build_tail

    return build_tail(Status[status]).hex()
