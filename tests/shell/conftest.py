"""Helpers for the shell tests: a daemon with TCP, token and metrics, in this process, and the
frames of a byte stream."""

from __future__ import annotations

import itertools
import os
import secrets
from typing import Any

import pytest

from tests.conftest import running
from viommud import wire
from viommud.shell.endpoints import TcpAddress

__all__ = ["TOKEN", "Memfds", "loopback", "memfds", "replies", "running", "without_timing"]

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


MIB = 1 << 20
_NAMES = itertools.count()


class Memfds:
    """memfds made by a test, each findable by its name in /proc/self/fd."""

    def __init__(self) -> None:
        self.made: list[tuple[int, str]] = []

    def __call__(self, size: int = 2 * MIB) -> int:
        name = f"viommud-test-{next(_NAMES)}-{os.getpid()}"
        fd = os.memfd_create(name)
        os.ftruncate(fd, size)
        self.made.append((fd, name))
        return fd

    def open_names(self) -> set[str]:
        """The names of this test's memfds that some fd of this process still refers to."""
        names = {name for _, name in self.made}
        out = set()
        for entry in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{entry}")
            except OSError:
                continue
            for name in names:
                if target.startswith(f"/memfd:{name} "):
                    out.add(name)
        return out

    def names(self, fds: list[int]) -> set[str]:
        return {name for fd, name in self.made if fd in fds}


@pytest.fixture
def memfds() -> Memfds:
    return Memfds()
