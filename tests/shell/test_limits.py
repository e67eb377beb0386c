"""The serve limits (docs/operations.md §10): device ownership, deadlines, client cap,
per-session quotas, backlog, accept-error logging, shutdown goodbye, peer credentials."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import stat
import weakref
from pathlib import Path
from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.conftest import running
from tests.shell.test_isolation import HOST, LIGHT, SETUP, SYNC, round_trips, session
from viommud import wire
from viommud.host import HostConfig
from viommud.shell import cli
from viommud.shell import server as server_module
from viommud.shell.client import Client, ClientError
from viommud.shell.connection import Connection
from viommud.shell.limits import Limits
from viommud.shell.replay import replay
from viommud.shell.server import Server
from viommud.trace import DeviceAttach, ViommuCreate, record_to_json

ATTACH = SETUP[1]
assert isinstance(ATTACH, DeviceAttach)
# Device ownership is the daemon's when its host is (serve --host) or the backend is real: a
# client-supplied host on the emulated kernel is that session's own machine.
DAEMON_HOST = HostConfig.from_json(HOST)


async def record(client: Client, rec: Any) -> wire.Frame:
    client.send(wire.encode_json(FrameType.RECORD, client.next_seq(), record_to_json(rec)))
    await client.drain()
    return await client.receive()


async def raw(path: Path, data: bytes = b"", wait: float = 10) -> list[wire.Frame]:
    """Connect, send ``data``, read every frame until the daemon closes."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    decoder = wire.FrameDecoder()
    frames = []
    async with asyncio.timeout(wait):
        while chunk := await reader.read(65536):
            decoder.receive_data(chunk)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    writer.close()
    return frames


@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "processes"])
async def test_a_device_belongs_to_one_live_session(tmp_path: Path, processes: bool) -> None:
    async with running(
        tmp_path, processes=processes, backend="emulated", fixed_host=DAEMON_HOST
    ) as server:
        first = await session(server, SETUP[:2], vm="first")  # viommu_create, attach 01:00.0
        second = await session(server, LIGHT)
        refused = await record(second, ATTACH)
        assert refused.type == FrameType.ERROR
        body = refused.json()
        assert body["fatal"] is False
        assert body["error"] == (
            "EBUSY: device '0000:01:00.0' is attached by another session (client 1, vm 'first')"
        )
        # the session goes on, and another device is free
        other = DeviceAttach(0, "v0", 16, "0000:02:00.0")
        assert (await record(second, other)).json() == {"ok": True}
        await first.close()
        async with asyncio.timeout(20):
            while "0000:01:00.0" in server.registry.held():  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.05)
        assert (await record(second, ATTACH)).json() == {"ok": True}
        await second.close()


async def test_a_client_supplied_host_owns_its_emulated_devices(tmp_path: Path) -> None:
    """Without serve --host, each session's emulated machine is its own: two sessions may
    attach "the same" device (64 replays of one trace at once must not contend)."""
    async with running(tmp_path, backend="emulated") as server:
        first = await session(server, SETUP[:2])
        second = await session(server, LIGHT)
        assert (await record(second, ATTACH)).json() == {"ok": True}
        assert server.registry.held() == {}
        await first.close()
        await second.close()


async def test_detach_and_destroy_give_devices_back(tmp_path: Path) -> None:
    async with running(tmp_path, fixed_host=DAEMON_HOST) as server:
        first = await session(server, SETUP[:3])
        assert set(server.registry.held()) == {"0000:01:00.0", "0000:02:00.0"}
        detach = {"op": "device_detach", "viommu": "v0", "vid": 8}
        first.send(wire.encode_json(FrameType.RECORD, first.next_seq(), detach))
        await first.drain()
        assert (await first.receive()).json() == {"ok": True}
        assert set(server.registry.held()) == {"0000:02:00.0"}
        destroy = {"op": "viommu_destroy", "viommu": "v0"}
        first.send(wire.encode_json(FrameType.RECORD, first.next_seq(), destroy))
        await first.drain()
        assert (await first.receive()).json() == {"ok": True}
        assert server.registry.held() == {}
        await first.close()


async def test_per_session_quotas(tmp_path: Path) -> None:
    limits = Limits(max_viommus=1, max_devices=1)
    async with running(tmp_path, limits=limits) as server:
        client = await session(server, SETUP[:2])
        second_viommu = ViommuCreate(0, "v1", "smmuv3", ("smmu0",))
        refused = await record(client, second_viommu)
        assert refused.json() == {
            "error": "quota: at most 1 vIOMMUs per session (--max-viommus)",
            "fatal": False,
        }
        refused = await record(client, DeviceAttach(0, "v0", 16, "0000:02:00.0"))
        assert "quota: at most 1 devices per session (--max-devices)" in refused.json()["error"]
        await round_trips(client, 1)  # the session goes on
        await client.close()


async def test_frame_limits_before_and_after_hello(tmp_path: Path) -> None:
    limits = Limits(max_hello_frame=1000, max_frame=4096)
    async with running(tmp_path, limits=limits) as server:
        frames = await raw(server.socket_path, wire.encode(FrameType.HELLO, 1, bytes(1001)))
        assert "frame payload of 1001 bytes exceeds the limit of 1000" in frames[-1].json()["error"]
        client = await session(server, LIGHT)
        client.send(wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v0", bytes(4096)))
        await client.drain()
        with pytest.raises(ClientError, match="frame payload of 4099 bytes exceeds the limit"):
            await client.receive()
        await client.close()


async def test_handshake_and_idle_timeouts(tmp_path: Path) -> None:
    limits = Limits(handshake_timeout=0.3, idle_timeout=0.5)
    async with running(tmp_path, limits=limits) as server:
        [frame] = await raw(server.socket_path)  # says nothing
        assert frame.seq == 0
        assert frame.json() == {"error": "no HELLO accepted within 0.3 s", "fatal": True}
        client = await session(server, LIGHT)
        await round_trips(client, 1)
        await asyncio.sleep(0.8)
        with pytest.raises(ClientError, match=r"ended the session: idle for 0\.5 s"):
            await client.receive()
        await client.close()


async def test_max_clients(tmp_path: Path) -> None:
    async with running(tmp_path, limits=Limits(max_clients=1)) as server:
        first = await session(server, LIGHT)
        [frame] = await raw(server.socket_path)
        assert frame.json() == {
            "error": "too many clients: this daemon serves at most 1 at once (serve --max-clients)",
            "fatal": True,
        }
        await first.close()
        async with asyncio.timeout(10):
            await server.wait_idle()
        second = await session(server, LIGHT)
        await second.close()


async def test_a_burst_of_connects_fits_the_backlog(tmp_path: Path) -> None:
    """500 clients connect while the daemon is not accepting (its loop is busy): the
    listen backlog (1024 by default; asyncio's own is 100) holds them all."""
    async with running(tmp_path) as server:
        socks = []
        try:
            for _ in range(500):  # no await in this loop: nothing is accepted meanwhile
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                socks.append(sock)
                sock.connect(str(server.socket_path))  # EAGAIN once a backlog is full
        finally:
            for sock in socks:
                sock.close()


async def test_accept_failures_are_logged_at_most_every_ten_seconds(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        loop = asyncio.get_running_loop()
        with structlog.testing.capture_logs() as logs:
            for _ in range(1000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    }
                )
        lines = [e for e in logs if e["event"] == "accept_failed"]
        assert len(lines) == 1
        assert lines[0]["log_level"] == "warning"
        server._accept_logged -= server_module.ACCEPT_LOG_INTERVAL  # ten seconds later
        with structlog.testing.capture_logs() as logs:
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": OSError(24)}
            )
        assert [e["failures"] for e in logs if e["event"] == "accept_failed"] == [1000]


@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "processes"])
async def test_stop_says_goodbye_to_every_client(tmp_path: Path, processes: bool) -> None:
    server = Server(tmp_path / "s.sock", grace=5.0, processes=processes, backend="emulated")
    with structlog.testing.capture_logs() as logs:
        await server.start()
        stop = asyncio.Event()
        task = asyncio.create_task(server.run(stop.wait))
        client = await session(server, LIGHT)
        waiting = await Client.connect(server.socket_path)  # no HELLO yet
        # pipelined doorbells the daemon has received but maybe not answered yet
        for _ in range(20):
            client.send(wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v0", SYNC))
        await client.drain()
        await asyncio.sleep(0.3)
        stop.set()
        for _ in range(20):  # every frame sent before the stop is answered
            assert (await client.receive()).type == FrameType.RESPONSE
        with pytest.raises(ClientError, match="ended the session: shutting down"):
            await client.receive()
        with pytest.raises(ClientError, match="shutting down"):
            await waiting.receive()
        await task
        await client.close()
        await waiting.close()
    assert logs[-1]["event"] == "shutdown_complete"
    loud = [
        e for e in logs if e["log_level"] in ("error", "critical") or e["event"] == "loop_error"
    ]
    assert not loud


async def test_peer_credentials_are_logged_and_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    me = os.getuid()
    other_uid = 65534 if me != 65534 else 65533
    async with running(tmp_path, allow_uids=[other_uid], group=os.getgid(), mode=0o660) as server:
        info = os.stat(server.socket_path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getgid()
        client = await session(server, LIGHT)  # the daemon's own user is always allowed
        await client.close()
        async with asyncio.timeout(10):
            await server.wait_idle()
        assert f"peer_uid={me}" in capsys.readouterr().out
        # the same peer, to a daemon running as another user that allows only other_uid
        monkeypatch.setattr(os, "getuid", lambda: me + 1)
        [frame] = await raw(server.socket_path)
        monkeypatch.undo()
        assert frame.json() == {
            "error": f"uid {me} may not use this daemon (serve --allow-uid)",
            "fatal": True,
        }


async def test_a_closed_connection_is_freed_without_the_cycle_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[weakref.ref[Connection]] = []

    class Watched(Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append(weakref.ref(self))

    monkeypatch.setattr(server_module, "Connection", Watched)
    async with running(tmp_path) as server:
        gc.disable()
        try:
            client = await session(server, LIGHT)
            # the client goes away while the daemon writes: a reset, BrokenPipe on its side
            for _ in range(200):
                client.send(wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v0", SYNC))
            await client.drain()
            client._writer.transport.abort()
            await client.close()
            async with asyncio.timeout(10):
                await server.wait_idle()
            await asyncio.sleep(0.1)
            assert seen
            assert all(ref() is None for ref in seen), "a closed Connection is still alive"
        finally:
            gc.enable()


def test_serve_flags_reach_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made: list[dict[str, Any]] = []

    class Fake:
        def __init__(self, *_args: Any, **kwargs: Any) -> None:
            made.append(kwargs)

        async def run(self) -> None:
            return None

    monkeypatch.setattr(cli, "Server", Fake)
    sock = str(tmp_path / "s.sock")
    assert cli.main(["serve", "--socket", sock, "--backend", "emulated"]) == 0
    assert made[-1]["limits"] == Limits()
    assert made[-1]["processes"] is True
    assert made[-1]["mode"] == 0o600
    argv = ["serve", "--socket", sock, "--backend", "emulated", "--in-process"]
    argv += ["--max-clients", "5", "--idle-timeout", "30", "--max-frame", "65536"]
    argv += ["--allow-uid", "1000", "--allow-uid", "1001", "--socket-group", str(os.getgid())]
    assert cli.main(argv) == 0
    options = made[-1]
    assert options["limits"] == Limits(max_clients=5, idle_timeout=30.0, max_frame=65536)
    assert options["processes"] is False
    assert options["allow_uids"] == [1000, 1001]
    assert options["group"] == os.getgid()
    assert options["mode"] == 0o660
    with pytest.raises(SystemExit):
        cli.main(["serve", "--socket", sock, "--max-clients", "0"])
    assert "expected a positive whole number, got '0'" in capsys.readouterr().err
    assert cli.main(["serve", "--socket", sock, "--socket-group", "no-such-group-x"]) == 2
    assert "no group 'no-such-group-x' (--socket-group)" in capsys.readouterr().err


async def test_the_mapping_quota_refuses_a_map_beyond_it(tmp_path: Path) -> None:
    trace = FIXTURES / "virtio-qemu-qtest.jsonl"
    async with running(tmp_path) as server:
        assert (await replay(trace, server.socket_path)).exit_code == 0
    async with running(tmp_path, limits=Limits(max_mappings=1)) as server:
        result = await replay(trace, server.socket_path)
    assert result.exit_code == 2
    assert result.error is not None
    assert "quota: at most 1 mappings per session (--max-mappings)" in result.error
