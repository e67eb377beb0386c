"""``serve`` on a socket path: a live daemon is never displaced, a stale socket is, a
world-writable mode is logged, bind failures name the path, disconnect lines name the VM
(docs/operations.md §1, §5)."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import FIXTURES, Daemon
from viommud.shell.cli import main
from viommud.shell.client import Client, health
from viommud.shell.server import AlreadyServingError, Server
from viommud.trace import TraceReader

with TraceReader(FIXTURES / "smmuv3-every-opcode.jsonl") as _reader:
    HOST = _reader.header.host.to_json()


async def test_a_second_server_on_a_live_socket_refuses_and_leaves_the_first_alone(
    daemon: Daemon,
) -> None:
    second = Server(daemon.socket, grace=0.1)
    with pytest.raises(AlreadyServingError, match=f"another viommud is serving on {daemon.socket}"):
        await second.start()
    assert daemon.socket.is_socket()
    assert (await health(daemon.socket)).startswith("viommud/")


async def test_serve_cli_refuses_a_live_socket(daemon: Daemon) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "viommud",
        "serve",
        "--socket",
        str(daemon.socket),
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, err = await process.communicate()
    assert process.returncode == 1
    assert f"viommud: cannot serve: another viommud is serving on {daemon.socket}" in err.decode()
    assert (await health(daemon.socket)).startswith("viommud/")  # still there, still serving


async def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a crashed daemon's leftover: the file, nobody listening
    dead.close()
    assert path.is_socket()
    server = Server(path, grace=0.1)
    await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop.wait))
    try:
        assert (await health(path)).startswith("viommud/")
    finally:
        stop.set()
        await task
    assert not path.exists()


def test_bind_failures_name_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "denied.sock"

    async def denied(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # the Unix listener is bound by the loop's create_unix_server (viommud.shell.channel.grab)
    loop_class = asyncio.unix_events._UnixSelectorEventLoop
    monkeypatch.setattr(loop_class, "create_unix_server", denied)
    assert main(["serve", "--socket", str(path), "--backend", "emulated"]) == 1
    assert f"cannot serve: [Errno 13] Permission denied: '{path}'" in capsys.readouterr().err


def test_a_file_in_the_way_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("mine")
    assert main(["serve", "--socket", str(path), "--backend", "emulated"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("viommud: cannot serve: [Errno 98] ")
    assert str(path) in err
    assert path.read_text() == "mine"


@pytest.mark.parametrize(("mode", "warned"), [(0o666, True), (0o660, False), (0o600, False)])
async def test_a_world_writable_socket_is_served_with_a_warning(
    tmp_path: Path, mode: int, warned: bool
) -> None:
    path = tmp_path / "open.sock"
    server = Server(path, mode=mode, grace=0.1)
    with capture_logs() as logs:
        await server.start()
        await server.close()
    warnings = [e for e in logs if e["event"] == "socket_world_writable"]
    if warned:
        assert warnings == [
            {
                "event": "socket_world_writable",
                "log_level": "warning",
                "path": str(path),
                "mode": oct(mode),
            }
        ]
    else:
        assert not warnings


async def test_disconnect_lines_name_the_vm(daemon: Daemon) -> None:
    with capture_logs() as logs:
        client = await Client.connect(daemon.socket)
        await client.hello(host=HOST, vm="guest-7")
        await client.close()
        for _ in range(500):  # the line comes after the socket is closed: wait for it
            if any(e["event"] == "client_disconnected" for e in logs):
                break
            await asyncio.sleep(0.01)
    (line,) = (e for e in logs if e["event"] == "client_disconnected")
    assert line["vm"] == "guest-7"
    assert line["client"] >= 1
