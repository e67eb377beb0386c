"""Guest RAM memfds and device fds over the daemon's Unix socket (SCM_RIGHTS), in both modes:
sessions in the daemon's process and in processes of their own (docs/protocol.md §12)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.conftest import TOKEN, Memfds, loopback, running
from tests.shell.test_fd_frames import DEVICE, HOST, MIB, memory
from viommud import wire
from viommud.guest_memory import RamRegion
from viommud.shell import channel, cli
from viommud.shell.client import Client, ClientError, status
from viommud.shell.passed import MAX_QUEUED_FDS
from viommud.shell.replay import replay
from viommud.shell.server import Server

SYNC = bytes.fromhex("46" + "00" * 15)
VIOMMU = {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]}


@pytest.fixture(params=["in-process", "processes"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    options: dict[str, Any] = {}
    if request.param == "processes":
        options = {"processes": True, "backend": "emulated"}
    async with running(tmp_path, **options) as served:
        yield served


def fd_names(pid: int) -> list[str]:
    out = []
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{entry}"))
        except OSError:
            continue
    return out


def held(memfds: Memfds, pid: int) -> set[str]:
    """The names of the test's memfds that process ``pid`` holds an fd of."""
    targets = fd_names(pid)
    return {n for _, n in memfds.made if any(t.startswith(f"/memfd:{n} ") for t in targets)}


async def session_pid(server: Server) -> int:
    """The process holding the (only) session: the daemon's own, or its session process."""
    if not server.processes:
        return os.getpid()
    for _ in range(300):
        clients = (await status(server.socket_path, wait=30))["clients"]
        pids = [c["pid"] for c in clients if c.get("pid")]
        if pids:
            return int(pids[0])
        await asyncio.sleep(0.05)
    raise AssertionError("no session process")


async def gone(pid: int) -> None:
    for _ in range(400):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit")


async def connect(server: Server, **hello: Any) -> Client:
    client = await Client.connect(server.socket_path, wait=30)
    client.timeout = 30  # a session process may take a while to start on a loaded machine
    await client.hello(host=HOST, **hello)
    return client


async def test_memfds_and_device_fds_reach_the_session(server: Server, memfds: Memfds) -> None:
    baseline = len(fd_names(os.getpid()))
    client = await connect(server)
    low, high, dev = memfds(), memfds(4 * MIB), memfds()
    regions = [RamRegion(0, 2 * MIB, low), RamRegion(1 << 32, 2 * MIB, high, 2 * MIB)]
    assert await client.send_memory(regions) == {"ok": True, "regions": 2, "bytes": 4 * MIB}
    assert await client.send_devices({DEVICE: dev}) == {"ok": True, "devices": [DEVICE]}
    for fd, _ in memfds.made:
        os.close(fd)  # the client's copies: what is left open is the daemon's
    pid = await session_pid(server)
    assert held(memfds, pid) == {name for _, name in memfds.made}
    if not server.processes:
        (conn,) = server._connections.values()
        assert conn.session is not None
        resources = conn.session.resources
        assert [(r.gpa, r.size, r.offset) for r in resources.regions] == [
            (0, 2 * MIB, 0),
            (1 << 32, 2 * MIB, 2 * MIB),
        ]
        assert set(resources.devices) == {DEVICE}
    # the session goes on as before
    client.send(wire.encode_json(FrameType.RECORD, client.next_seq(), VIOMMU))
    await client.drain()
    assert (await client.receive()).json() == {"ok": True}
    await client.close()
    if server.processes:
        await gone(pid)
    else:
        await server.wait_idle()
        assert held(memfds, pid) == set()
    assert len(fd_names(os.getpid())) <= baseline


@pytest.mark.parametrize("one_message", [False, True], ids=["pipelined", "one-sendmsg"])
async def test_fds_sent_right_after_hello_survive_the_handoff(
    server: Server, memfds: Memfds, one_message: bool
) -> None:
    """HELLO and MEMORY sent before any reply: with session processes the listener may read
    the MEMORY frame and its fds before it hands the socket over (always so when both travel
    in one sendmsg)."""
    fd = memfds()
    hello = wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST})
    mem = wire.encode_json(FrameType.MEMORY, 2, memory((0, 2 * MIB, 0)))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.socket_path))
    if one_message:
        socket.send_fds(sock, [hello + mem], [fd])
    else:
        sock.sendall(hello)
        socket.send_fds(sock, [mem], [fd])
    sock.sendall(wire.encode(FrameType.STATS, 3))
    os.close(fd)
    got = await asyncio.to_thread(_read_frames, sock, 3)
    assert [(f.type, f.seq) for f in got] == [
        (FrameType.HELLO_OK, 1),
        (FrameType.RESPONSE, 2),
        (FrameType.STATS_OK, 3),
    ]
    assert got[1].json() == {"ok": True, "regions": 1, "bytes": 2 * MIB}
    pid = await session_pid(server)
    assert held(memfds, pid) == {memfds.made[0][1]}
    sock.close()
    if server.processes:
        await gone(pid)
    else:
        await server.wait_idle()
        assert held(memfds, pid) == set()


@pytest.mark.parametrize("count", [MAX_QUEUED_FDS, MAX_QUEUED_FDS + 1])
async def test_the_most_fds_a_frame_takes_survive_the_handoff(
    server: Server, memfds: Memfds, count: int
) -> None:
    """HELLO and a MEMORY frame of MAX_QUEUED_FDS regions in one sendmsg: with session
    processes all of them travel with the socket in one message (at most SCM_MAX_FD, 253).
    One more is refused in both modes, before any handoff."""
    base = memfds(count * 4096)
    fds = [os.dup(base) for _ in range(count)]
    body = {
        "regions": [
            {"gpa": i * 8192, "size": 4096, "fd": i, "offset": i * 4096} for i in range(len(fds))
        ]
    }
    hello = wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST})
    mem = wire.encode_json(FrameType.MEMORY, 2, body)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.socket_path))
    socket.send_fds(sock, [hello + mem], fds)
    for fd in [*fds, base]:
        os.close(fd)
    got = await asyncio.to_thread(_read_frames, sock, 2)
    if count > MAX_QUEUED_FDS:
        assert got[-1].json() == {
            "error": f"more than {MAX_QUEUED_FDS} file descriptors wait for their frames",
            "fatal": True,
        }
        sock.close()
        await server.wait_idle()
        assert held(memfds, os.getpid()) == set()
        return
    assert [(f.type, f.seq) for f in got] == [(FrameType.HELLO_OK, 1), (FrameType.RESPONSE, 2)]
    assert got[1].json() == {"ok": True, "regions": MAX_QUEUED_FDS, "bytes": MAX_QUEUED_FDS * 4096}
    pid = await session_pid(server)
    name = memfds.made[0][1]
    assert sum(t.startswith(f"/memfd:{name} ") for t in fd_names(pid)) == MAX_QUEUED_FDS
    sock.close()
    if server.processes:
        await gone(pid)
    else:
        await server.wait_idle()
        assert held(memfds, pid) == set()


def _read_frames(sock: socket.socket, n: int) -> list[wire.Frame]:
    sock.settimeout(30)
    decoder = wire.FrameDecoder()
    out: list[wire.Frame] = []
    while len(out) < n:
        data = sock.recv(65536)
        if not data:
            break
        decoder.receive_data(data)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    return out


async def round_trips(client: Client, n: int) -> None:
    for _ in range(n):
        client.send(wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", SYNC))
        await client.drain()
        reply = await client.receive()
        assert reply.type == FrameType.RESPONSE, reply.json()


def _flood(path: str, stats_each: bool, total: int = 10_000) -> list[wire.Frame]:
    """Send ``total`` fds, 250 per sendmsg, each message a STATS frame (``stats_each``) or one
    byte of a frame that never ends; the daemon's answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(30)
    sock.sendall(wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST}))
    base = os.memfd_create("viommud-flood")
    sent = 0
    try:
        with open("/dev/null", "rb") as null:
            pool = [base, null.fileno(), sock.fileno()]  # any fd may be sent, even odd ones
            stats = wire.encode(FrameType.STATS, 2)
            for i in range(total // 250):
                payload = stats if stats_each else stats[i % len(stats) : i % len(stats) + 1]
                fds = [os.dup(pool[j % len(pool)]) for j in range(250)]
                try:
                    socket.send_fds(sock, [payload], fds)
                    sent += len(fds)
                except OSError:
                    break  # the daemon hung up (the fatal ERROR is read below)
                finally:
                    for fd in fds:
                        os.close(fd)
        sock.shutdown(socket.SHUT_WR)
        decoder = wire.FrameDecoder()
        out = []
        while data := sock.recv(65536):
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                out.append(frame)
        return out
    except ConnectionResetError:
        return [wire.Frame(FrameType.ERROR, 0, b'{"reset": true}')]
    finally:
        os.close(base)
        sock.close()


@pytest.mark.parametrize("stats_each", [True, False], ids=["with-frames", "waiting"])
async def test_ten_thousand_fds_do_not_hurt_another_client(
    server: Server, stats_each: bool
) -> None:
    baseline = len(fd_names(os.getpid()))
    other = await connect(server)
    other.send(wire.encode_json(FrameType.RECORD, other.next_seq(), VIOMMU))
    await other.drain()
    assert (await other.receive()).json() == {"ok": True}
    flood = asyncio.create_task(asyncio.to_thread(_flood, str(server.socket_path), stats_each))
    while not flood.done():
        await round_trips(other, 5)
        await asyncio.sleep(0.01)
    answers = flood.result()
    if stats_each:  # every STATS answered, their fds closed unread
        assert answers[0].type == FrameType.HELLO_OK
        assert {f.type for f in answers[1:]} == {FrameType.STATS_OK}
        assert len(answers) == 1 + 10_000 // 250
    else:  # more than 256 fds waited for a frame that never ended
        assert answers[-1].type == FrameType.ERROR
        assert answers[-1].seq == 0
        body = answers[-1].json()
        assert body.get("reset") or "file descriptors wait for their frames" in body["error"]
    await round_trips(other, 5)
    await other.close()
    await server.wait_idle()
    if server.processes:
        for _ in range(400):  # the session processes' exits are followed by the listener
            if not server._handed:
                break
            await asyncio.sleep(0.05)
    assert len(fd_names(os.getpid())) <= baseline


async def test_fds_the_kernel_dropped_end_the_connection(
    tmp_path: Path, memfds: Memfds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MSG_CTRUNC: more fds came than the read had room for; the kernel closed the rest."""
    monkeypatch.setattr(channel, "_ANCILLARY", socket.CMSG_SPACE(2 * 4))
    async with running(tmp_path) as server:
        baseline = len(fd_names(os.getpid()))
        client = await connect(server)
        fd = memfds()
        body = {"regions": [{"gpa": i * 2 * MIB, "size": 2 * MIB, "fd": i} for i in range(4)]}
        await client.send_fds(wire.encode_json(FrameType.MEMORY, 5, body), [fd] * 4)
        with pytest.raises(ClientError, match="file descriptors lost"):
            await client.receive()
        await client.close()
        os.close(fd)
        await server.wait_idle()
        assert held(memfds, os.getpid()) == set()
        assert len(fd_names(os.getpid())) <= baseline


async def test_a_refusal_reaches_the_client_and_closes_the_fds(
    server: Server, memfds: Memfds
) -> None:
    client = await connect(server)
    pid = await session_pid(server)
    nulls = fd_names(pid).count("/dev/null")
    null = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(ClientError, match=r"EINVAL: region 0 .* is not a memory file"):
        await client.send_memory([RamRegion(0, 2 * MIB, null)])
    with pytest.raises(ClientError, match="ENODEV: DEVICES: the host has no device"):
        await client.send_devices({"0000:99:00.0": null})
    os.close(null)
    client.send(wire.encode_json(FrameType.RECORD, client.next_seq(), VIOMMU))
    await client.drain()
    assert (await client.receive()).json() == {"ok": True}
    fd = memfds()
    with pytest.raises(ClientError, match="EBUSY: MEMORY must come before"):
        await client.send_memory([RamRegion(0, 2 * MIB, fd)])
    os.close(fd)
    assert held(memfds, pid) == set()
    assert fd_names(pid).count("/dev/null") == nulls
    await round_trips(client, 2)
    await client.close()


async def test_memory_over_tcp_is_refused_without_ending_the_session(tmp_path: Path) -> None:
    async with running(tmp_path, tcp=[loopback()], token=TOKEN) as server:
        client = await Client.connect(f"tcp://{server.tcp_addresses[0]}", token=TOKEN)
        await client.hello(host=HOST)
        with pytest.raises(ClientError, match="not a Unix socket"):
            await client.send_memory([RamRegion(0, 2 * MIB, 0)])
        client.send(wire.encode_json(FrameType.MEMORY, 9, memory((0, 2 * MIB, 0))))
        await client.drain()
        reply = await client.receive()
        assert reply.json() == {
            "error": "EOPNOTSUPP: MEMORY needs the Unix socket (fds cannot cross TCP)",
            "fatal": False,
        }
        assert (await client.stats())["commands"]["total"] == 0
        await client.close()


async def test_replay_gives_the_session_guest_memory(tmp_path: Path) -> None:
    trace = FIXTURES / "smmuv3-every-opcode.jsonl"
    async with running(tmp_path) as server:
        with capture_logs() as logs:
            plain = await replay(trace, server.socket_path)
            given = await replay(trace, server.socket_path, guest_memory=4 << 30)
    assert given.exit_code == plain.exit_code == 0, given.error
    assert given.report is not None
    assert plain.report is not None
    assert given.report["commands"] == plain.report["commands"]
    events = [e for e in logs if e["event"] == "resources_given"]
    assert [(e["frame_type"], e["fds"]) for e in events] == [("MEMORY", 1)]


async def test_replay_guest_memory_needs_a_unix_socket(tmp_path: Path) -> None:
    trace = FIXTURES / "smmuv3-every-opcode.jsonl"
    async with running(tmp_path, tcp=[loopback()], token=TOKEN) as server:
        target = f"tcp://{server.tcp_addresses[0]}"
        result = await replay(trace, target, token=TOKEN, guest_memory=1 << 20)
    assert result.exit_code != 0
    assert result.error is not None
    assert "not a Unix socket" in result.error


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4G", 4 << 30), ("512m", 512 << 20), ("1T", 1 << 40), ("8K", 8192)],
)
def test_guest_memory_sizes(text: str, size: int) -> None:
    assert cli._size(text) == size


@pytest.mark.parametrize("text", ["100", "0", "-4K", "4X", "", "G", "1.5G"])
def test_bad_guest_memory_sizes(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="multiple of 4096"):
        cli._size(text)
