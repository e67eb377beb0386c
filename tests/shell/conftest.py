"""Helpers for the shell tests: a daemon with TCP, token and metrics, in this process, and the
frames of a byte stream."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from viommud import wire
from viommud.shell.endpoints import TcpAddress
from viommud.shell.server import Server

TOKEN = secrets.token_hex(16)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **options: Any) -> AsyncIterator[Server]:
    """A started Server on ``tmp_path/viommud.sock`` plus ``options`` (tcp, metrics, ...)."""
    server = Server(tmp_path / "viommud.sock", grace=1.0, **options)
    await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop.wait))
    try:
        yield server
    finally:
        stop.set()
        await task


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
