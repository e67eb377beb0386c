"""Helpers for the shell tests: a daemon with TCP, token and metrics, in this process, and the
frames of a byte stream."""

from __future__ import annotations

import secrets
from typing import Any

from tests.conftest import running
from viommud import wire
from viommud.shell.endpoints import TcpAddress

__all__ = ["TOKEN", "loopback", "replies", "running", "without_timing"]

TOKEN = secrets.token_hex(16)


def loopback() -> TcpAddress:
    return TcpAddress("127.0.0.1", 0)


def without_timing(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("elapsed_s", "commands_per_s")}


def replies(data: bytes) -> list[wire.Frame]:
    """Every whole frame in ``data`` (what a Connection answered), in order."""
    decoder = wire.FrameDecoder()
    decoder.receive_data(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out
