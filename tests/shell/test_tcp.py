"""TCP listeners: off unless asked for, and then only for clients that present the token."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.conftest import TOKEN, loopback, running, without_timing
from viommud.shell.cli import main
from viommud.shell.client import Client, ClientError, health
from viommud.shell.endpoints import TcpAddress
from viommud.shell.replay import replay
from viommud.shell.server import Server
from viommud.trace import TraceReader

TRACE = FIXTURES / "smmuv3-guest-errors.jsonl"


async def test_replay_over_tcp_equals_replay_over_unix(tmp_path: Path) -> None:
    async with running(tmp_path, tcp=[loopback()], token=TOKEN) as server:
        (address,) = server.tcp_addresses
        over_tcp = await replay(TRACE, f"tcp://{address}", token=TOKEN)
        over_unix = await replay(TRACE, server.socket_path)  # no token on the Unix socket
    assert over_tcp.exit_code == over_unix.exit_code == 0
    assert over_tcp.report is not None
    assert over_unix.report is not None
    assert without_timing(over_tcp.report) == without_timing(over_unix.report)


@pytest.mark.parametrize("token", [None, "x" * 32, TOKEN[:-1]])
async def test_hello_without_the_token_is_fatal(tmp_path: Path, token: str | None) -> None:
    async with running(tmp_path, tcp=[loopback()], token=TOKEN) as server:
        (address,) = server.tcp_addresses
        with capture_logs() as logs:
            result = await replay(TRACE, f"tcp://{address}", token=token)
            with pytest.raises(ClientError, match="needs the daemon's token"):
                await health(f"tcp://{address}", token=token)
    assert result.exit_code == 2
    assert result.error is not None
    assert "needs the daemon's token" in result.error
    failures = [e for e in logs if e["event"] == "auth_failed"]
    assert len(failures) == 2
    assert failures[0]["transport"] == "tcp"
    assert failures[0]["peer"].startswith("127.0.0.1:")
    assert TOKEN not in repr(logs)  # the secret is never logged


async def test_status_over_tcp_needs_the_token(tmp_path: Path) -> None:
    async with running(tmp_path, tcp=[loopback()], token=TOKEN) as server:
        target = f"tcp://{server.tcp_addresses[0]}"
        client = await Client.connect(target)
        try:
            reply = await client.request(FrameType.STATUS, {})
        finally:
            await client.close()
        assert reply.type == FrameType.ERROR
        assert reply.json()["fatal"] is True
        client = await Client.connect(target, token=TOKEN)
        try:
            status = await client.status()
        finally:
            await client.close()
    assert status["listeners"][1] == {"kind": "tcp", "address": target[6:], "netns": None}


async def test_a_session_authenticated_by_hello_may_ask_status(tmp_path: Path) -> None:
    async with running(tmp_path, tcp=[loopback()], token=TOKEN) as server:
        client = await Client.connect(f"tcp://{server.tcp_addresses[0]}", token=TOKEN)
        try:
            with TraceReader(TRACE) as reader:
                host = reader.header.host.to_json()
            await client.hello(host=host)
            client.token = None  # STATUS after a good HELLO needs no token of its own
            status = await client.status()
        finally:
            await client.close()
    assert status["sessions"]["active"] == 1


def test_tcp_without_a_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need a token"):
        Server(tmp_path / "s.sock", tcp=[loopback()])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--listen", "tcp://127.0.0.1:0"], "TCP listeners need a token"),
        (["--listen", "127.0.0.1:7070"], "not a tcp://ADDR:PORT"),
        (["--netns", "vmm"], "give at least one"),
        (["--metrics", "nowhere"], "bad address"),
    ],
)
def test_serve_refuses_bad_network_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["serve", "--socket", str(tmp_path / "s.sock"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_missing_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    argv = ["serve", "--socket", str(tmp_path / "s.sock"), "--token-file", str(token)]
    argv += ["--listen", "tcp://127.0.0.1:0", "--netns", "viommud-no-such-ns"]
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err


async def test_a_listener_that_cannot_bind_undoes_the_others(tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        server = Server(
            tmp_path / "s.sock", tcp=[TcpAddress("127.0.0.1", port)], token=TOKEN, grace=1.0
        )
        with pytest.raises(OSError, match="in use"):
            await server.start()
    finally:
        busy.close()
    assert not (tmp_path / "s.sock").exists()
    assert server.listeners == []
