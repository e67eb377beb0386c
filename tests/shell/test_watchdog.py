"""systemd watchdog (docs/operations.md §4): ``WATCHDOG=1`` at half of ``WATCHDOG_USEC``
from the listener's event loop, only when the environment asks, never blocking."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.shell.conftest import running
from viommud.shell import systemd


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_interval_is_half_the_timeout(environ: dict[str, str], interval: float | None) -> None:
    assert systemd.watchdog_interval(environ, 42) == interval


def test_a_full_notify_queue_raises_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))  # never reads
        started = time.monotonic()
        with pytest.raises(BlockingIOError):  # noqa: PT012 - fill the queue until it refuses
            for _ in range(100_000):
                systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(path)})
        assert time.monotonic() - started < 10


async def test_failed_pings_are_logged_once(tmp_path: Path) -> None:
    sent: list[str] = []

    def notify(state: str) -> None:
        sent.append(state)
        if state == "WATCHDOG=1":
            raise OSError("queue full")

    with capture_logs() as events:
        async with running(tmp_path, notify=notify, watchdog=0.01):
            await asyncio.sleep(0.3)
    assert sent.count("WATCHDOG=1") >= 5
    failed = [e for e in events if e["event"] == "notify_failed"]
    assert [(e["state"], e["error"]) for e in failed] == [("WATCHDOG=1", "queue full")]


async def test_no_pings_without_an_interval(tmp_path: Path) -> None:
    sent: list[str] = []
    async with running(tmp_path, notify=sent.append):
        await asyncio.sleep(0.2)
    assert "WATCHDOG=1" not in sent
    assert sent[0].startswith("READY=1")


def _states(sock: socket.socket, until: float) -> list[str]:
    out = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


@pytest.mark.parametrize("pid", ["", "other"])
def test_serve_pings_while_a_session_is_busy(tmp_path: Path, pid: str) -> None:
    """``viommud serve`` under a fake manager: READY=1, then WATCHDOG=1 every 0.2 s (also
    while a client's huge doorbell keeps its session process busy), STOPPING=1; none with
    a WATCHDOG_PID that is another process's."""
    notify_path = tmp_path / "notify.sock"
    socket_path = tmp_path / "d.sock"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    if pid:
        env["WATCHDOG_PID"] = "1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(notify_path))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "viommud", "serve", "--socket", str(socket_path)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            manager.settimeout(30)
            assert manager.recv(4096).startswith(b"READY=1\n")
            busy = subprocess.Popen(  # 400,000 commands in one doorbell: seconds of work
                [sys.executable, "-c", BUSY, str(socket_path)], stdout=subprocess.PIPE
            )
            assert busy.stdout is not None
            assert busy.stdout.readline() == b"rung\n"  # its doorbell is being worked on
            before = _states(manager, time.monotonic() + 0.01)  # what came until now
            states = _states(manager, time.monotonic() + 2.0)
            busy.kill()
            busy.communicate()
            daemon.send_signal(signal.SIGTERM)
            states += _states(manager, time.monotonic() + 5.0)
            assert daemon.wait(30) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert "STOPPING=1" in states
    if pid:
        assert "WATCHDOG=1" not in before
    pings = states[: states.index("STOPPING=1")].count("WATCHDOG=1")
    if pid:
        assert pings == 0
    else:
        assert 6 <= pings <= 12, states  # 2 s at one per 0.2 s


BUSY = """
import asyncio, sys
from tests.shell.test_isolation import LIGHT, ring_heavy, session
class Target:
    socket_path = sys.argv[1]
async def main():
    client = await session(Target, LIGHT)
    await ring_heavy(client, 400_000)
    print("rung", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""
