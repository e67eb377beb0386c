"""``serve --state-dir DIR`` (docs/state-format.md §6): a client that reconnects with its
session token after the daemon was killed (SIGKILL while frames were in flight) or stopped
and started again (an upgrade) finds its vIOMMUs rebuilt, learns how many of its frames the
restored session holds, sends the rest and gets the replies an uninterrupted session gives."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from tests.state.traces import HOST, two_smmu_records
from viommud import wire
from viommud.backend.emulator import EmulatedIommufd
from viommud.shell.client import Client, ClientError
from viommud.shell.connection import Connection
from viommud.trace import parse_record

RECORDS = two_smmu_records()


def _frame(seq: int, obj: dict[str, Any]) -> bytes:
    record = parse_record(seq, obj)
    if obj["op"] == "cmds":
        return wire.encode_guest_data(
            FrameType.CMDS, seq, obj["viommu"], bytes.fromhex(obj["data"])
        )
    del record
    return wire.encode_json(FrameType.RECORD, seq, obj)


def _expected() -> list[Any]:
    """Every record's reply from a session that is never interrupted."""
    conn = Connection(1, EmulatedIommufd, None, structlog.get_logger("viommud").bind(client=1))
    hello = {"protocol": 1, "host": HOST, "verify": True}
    conn.receive(wire.encode_json(FrameType.HELLO, 0, hello))
    out = []
    for seq, obj in enumerate(RECORDS, 1):
        data = conn.receive(_frame(seq, obj))
        decoder = wire.FrameDecoder()
        decoder.receive_data(data)
        frame = decoder.next_frame()
        assert frame is not None
        out.append(frame.response())
    conn.close()
    return out


class Daemon:
    def __init__(self, tmp: Path, state_dir: Path | None) -> None:
        self.socket = tmp / "viommud.sock"
        argv = [sys.executable, "-m", "viommud", "serve", "--socket", str(self.socket)]
        argv += ["--backend", "emulated"]
        if state_dir is not None:
            argv += ["--state-dir", str(state_dir)]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while not _answers(self.socket):
            assert self.process.poll() is None, "the daemon exited"
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)

    def stop(self, sig: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        self.process.wait(timeout=30)


def _answers(path: Path) -> bool:
    async def probe() -> bool:
        try:
            client = await Client.connect(path)
        except ClientError:
            return False
        await client.close()
        return True

    return path.exists() and asyncio.run(probe())


async def _first_part(
    socket: Path, answered: int, in_flight: int, then: Any = None
) -> tuple[str, list[Any]]:
    """Send ``answered`` records and read their replies, then ``in_flight`` more unread;
    ``then()`` is called while the connection is still open (to stop the daemon)."""
    client = await Client.connect(socket)
    body = await client.hello(host=HOST, verify=True)
    token: str = body["session_token"]
    got = []
    for seq, obj in enumerate(RECORDS[:answered], 1):
        client.send(_frame(seq, obj))
        await client.drain()
        got.append((await client.receive()).response())
    for seq, obj in enumerate(RECORDS[answered : answered + in_flight], answered + 1):
        client.send(_frame(seq, obj))
    await client.drain()
    if then is not None:
        await then()
    await client.close()
    return token, got


async def _resume(socket: Path, token: str) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    client = await Client.connect(socket)
    body = await client.hello(host=HOST, verify=True, resume=token)
    start = body["resumed"]["frames"]
    got = []
    for seq, obj in enumerate(RECORDS[start:], start + 1):
        client.send(_frame(seq, obj))
        await client.drain()
        got.append((await client.receive()).response())
    totals = await client.stats()
    await client.close()
    return body, got, totals


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "restarted"])
def test_a_session_resumes_after_the_daemon_died(tmp_path: Path, sig: int) -> None:
    want = _expected()
    state_dir = tmp_path / "state"
    daemon = Daemon(tmp_path, state_dir)

    async def stop() -> None:
        if sig == signal.SIGTERM:  # a graceful stop: the daemon answers what it was sent
            await asyncio.sleep(0.5)
        await asyncio.to_thread(daemon.stop, sig)  # SIGKILL: with frames still in flight

    try:
        token, before = asyncio.run(_first_part(daemon.socket, 40, 8, stop))
    finally:
        daemon.stop(signal.SIGKILL)
    assert before == want[:40]
    assert (state_dir / f"{token}.state").exists()
    daemon = Daemon(tmp_path, state_dir)  # the same socket path and directory
    try:
        body, after, totals = asyncio.run(_resume(daemon.socket, token))
    finally:
        daemon.stop(signal.SIGTERM)
    start = body["resumed"]["frames"]
    assert 40 <= start <= 48
    if sig == signal.SIGTERM:
        assert start == 48  # a graceful stop answers and saves what it was sent
    assert body["resumed"]["viommus"] == {"v": "smmuv3"}
    assert body["session_token"] == token
    assert after == want[start:]
    assert totals["verify"]["missed"] == 0
    # the last record destroyed the vIOMMU: nothing is left to resume
    assert not (state_dir / f"{token}.state").exists()


def test_resume_refusals(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    daemon = Daemon(tmp_path, state_dir)

    async def attempts() -> list[str]:
        out = []
        first = await Client.connect(daemon.socket)
        token = (await first.hello(host=HOST))["session_token"]
        for resume in ["0" * 32, "../../etc/passwd", 7, token]:
            client = await Client.connect(daemon.socket)
            try:
                await client.hello(host=HOST, resume=resume)
            except ClientError as exc:
                out.append(str(exc))
            await client.close()
        await first.close()
        return out

    try:
        messages = asyncio.run(attempts())
    finally:
        daemon.stop(signal.SIGTERM)
    assert "cannot resume: no saved session for that token" in messages[0]
    assert "'resume' must be a session token" in messages[1]
    assert "'resume' must be a session token" in messages[2]
    assert "that session is live on another connection" in messages[3]
    assert not list(state_dir.iterdir())  # sessions without vIOMMUs leave no file


def test_resume_needs_a_state_dir(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, None)

    async def attempt() -> str:
        client = await Client.connect(daemon.socket)
        try:
            await client.hello(host=HOST, resume="0" * 32)
        except ClientError as exc:
            return str(exc)
        finally:
            await client.close()
        return ""

    try:
        message = asyncio.run(attempt())
    finally:
        daemon.stop(signal.SIGTERM)
    assert "this daemon keeps no session state (serve --state-dir)" in message


def test_the_state_file_is_a_state_document(tmp_path: Path) -> None:
    """What the directory holds is the documented format, with ``frames``."""
    state_dir = tmp_path / "state"
    daemon = Daemon(tmp_path, state_dir)
    try:
        token, _ = asyncio.run(_first_part(daemon.socket, 12, 0))
        doc = json.loads((state_dir / f"{token}.state").read_bytes())
    finally:
        daemon.stop(signal.SIGTERM)
    assert doc["format"] == "viommud-state"
    assert doc["frames"] == 12
    assert doc["viommus"] == {"v": "smmuv3"}
