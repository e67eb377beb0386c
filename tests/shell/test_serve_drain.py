"""``viommud serve`` as operators run it: SIGTERM while clients stream, and the jq
recipes of docs/operations.md §5 against the log it wrote."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.test_isolation import LIGHT, SYNC, session
from viommud import wire
from viommud.shell.client import Client, ClientError
from viommud.shell.replay import replay

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


class Served:
    """A ``viommud serve`` subprocess with its JSON log in a file."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.socket = tmp_path / "d.sock"
        self.log = tmp_path / "viommud.log"
        env = {**os.environ, "VIOMMUD_LOG_FORMAT": "json"}
        with self.log.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "viommud", "serve", "--socket", str(self.socket), *args],
                stderr=sink,
                env=env,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)

    @property
    def socket_path(self) -> Path:  # what tests.shell.test_isolation.session needs
        return self.socket

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


async def stream(client: Client) -> tuple[int, str]:
    """Ring doorbells, a window of 32 in flight, until the daemon ends the session;
    returns how many were answered and the client's last error."""
    answered = 0
    sent = 0
    try:
        while True:
            while sent - answered < 32:
                client.send(wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v0", SYNC))
                sent += 1
            await client.drain()
            reply = await client.receive()
            assert reply.type in (FrameType.RESPONSE, FrameType.CMDS_OK), reply.json()
            answered += 1
    except ClientError as exc:
        return answered, str(exc)


async def test_sigterm_while_clients_stream(tmp_path: Path) -> None:
    daemon = Served(tmp_path, "--grace", "10")
    try:
        clients = [await session(daemon, LIGHT, compact=True) for _ in range(2)]  # type: ignore[arg-type]
        streams = [asyncio.create_task(stream(c)) for c in clients]
        await asyncio.sleep(1.0)
        daemon.process.send_signal(signal.SIGTERM)
        ended = await asyncio.wait_for(asyncio.gather(*streams), 60)
        for answered, last in ended:
            assert answered > 0
            assert "ended the session: shutting down" in last
        for client in clients:
            await client.close()
        code = await asyncio.to_thread(daemon.process.wait, 60)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    assert code == 0
    events = daemon.events()
    assert [e["event"] for e in events][-1] == "shutdown_complete"
    assert not [e for e in events if e["level"] in ("error", "critical")], events
    assert not [e for e in events if "exception" in e or "Traceback" in json.dumps(e)]


def recipes() -> list[str]:
    """The shell commands of the "Questions and the jq that answers them" block."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"### Questions and the jq that answers them\s+```sh\n(.*?)```", text, re.S)
    assert block, "docs/operations.md lost its jq recipes"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        if line.startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").rstrip() + " "
        if not line.endswith("\\") and current.count("'") % 2 == 0:
            commands.append(current.strip())
            current = ""
    return commands


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq")
def test_the_documented_jq_recipes_run_on_a_real_log(tmp_path: Path) -> None:
    daemon = Served(tmp_path, "--log-level", "debug")
    try:
        for trace in ("smmuv3-guest-errors.jsonl", "vtd-guest-errors.jsonl"):
            result = asyncio.run(replay(FIXTURES / trace, daemon.socket))
            assert result.exit_code == 0, result.error
    finally:
        assert daemon.stop() == 0
    ran = 0
    for command in recipes():
        if command.startswith("podman"):
            continue  # needs a container
        out = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, (command, out.stderr)
        ran += 1
        if (
            "guest_error" in command
            or "batch_forwarded" in command
            or "session_progress" in command
        ):
            assert out.stdout.strip(), command  # these logs hold what they look for
    assert ran >= 6
