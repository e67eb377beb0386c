"""Shared fixtures: paths of bundled traces and an in-process daemon on a temporary socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from viommud.backend.base import Backend
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.shell.server import Server

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
REAL_SMMUV3 = FIXTURES / "smmuv3-linux61-strict.jsonl.xz"


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **options: Any) -> AsyncIterator[Server]:
    """A started Server on ``tmp_path/viommud.sock`` plus ``options`` (factory, tcp, metrics,
    ...), stopped on exit."""
    server = Server(tmp_path / "viommud.sock", grace=1.0, **options)
    await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop.wait))
    try:
        yield server
    finally:
        stop.set()
        await task


@dataclass
class Daemon:
    socket: Path
    server: Server
    backends: list[EmulatedIommufd] = field(default_factory=list)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon serving on a temporary Unix socket; it keeps every backend it made."""
    made: list[EmulatedIommufd] = []

    def factory(host: HostConfig) -> Backend:
        backend = EmulatedIommufd(host)
        made.append(backend)
        return backend

    async with running(tmp_path, factory=factory) as server:
        yield Daemon(server.socket_path, server, made)


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Each test starts from structlog's defaults (the CLI configures it per run)."""
    import logging

    import structlog

    structlog.reset_defaults()
    yield None
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()
