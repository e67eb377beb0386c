"""One session can only slow itself (docs/operations.md §10).

With sessions in processes of their own (``Server(processes=True)``, the default of
``viommud serve``), a client busy with a huge doorbell, or one whose session process dies,
does not delay another client's doorbell round trips. The same huge doorbell in the
in-process mode does delay them: the test can tell the two apart.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.conftest import TOKEN, loopback, running
from viommud import wire
from viommud.shell.client import Client, ClientError
from viommud.shell.server import Server
from viommud.trace import Cmds, TraceReader, record_to_json

with TraceReader(FIXTURES / "smmuv3-every-opcode.jsonl") as _reader:
    HOST = _reader.header.host.to_json()
    SETUP = list(_reader)[:6]  # viommu_create, two device_attach, two ste, one doorbell
LIGHT = SETUP[:1]  # a vIOMMU without devices: the devices belong to one session at a time
# Two TLBI_NH_VA commands (SMMUv3 §4.4.2): a heavy doorbell is many of them.
TLBI_PAIR = bytes.fromhex("12000000000001000107ffff0000000012000000000001000100004000000000")
SYNC = bytes.fromhex("4620c00f000000000000000000000000")


@pytest.fixture
async def isolated(tmp_path: Path) -> AsyncIterator[Server]:
    async with running(tmp_path, processes=True, backend="emulated") as server:
        yield server


async def session(server: Server, records: list[Any] = SETUP, **hello: Any) -> Client:
    client = await Client.connect(server.socket_path, wait=30)
    client.timeout = 30  # a session process may take a while to start on a loaded machine
    await client.hello(host=HOST, **hello)
    for record in records:
        if isinstance(record, Cmds):
            frame = wire.encode_guest_data(
                FrameType.CMDS, client.next_seq(), record.viommu, record.data
            )
        else:
            frame = wire.encode_json(FrameType.RECORD, client.next_seq(), record_to_json(record))
        client.send(frame)
    await client.drain()
    for _ in records:
        assert (await client.receive()).type == FrameType.RESPONSE
    return client


async def round_trips(client: Client, n: int) -> None:
    for _ in range(n):
        client.send(wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v0", SYNC))
        await client.drain()
        reply = await client.receive()
        assert reply.type == FrameType.RESPONSE, reply.json()


async def ring_heavy(client: Client, commands: int) -> asyncio.Task[wire.Frame]:
    data = TLBI_PAIR * (commands // 2)
    client.send(wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v0", data))
    await client.drain()
    return asyncio.create_task(client.receive())


async def test_a_huge_doorbell_does_not_delay_another_session(isolated: Server) -> None:
    busy = await session(isolated)
    other = await session(isolated, LIGHT)
    heavy = await ring_heavy(busy, 400_000)  # seconds of work for busy's process
    await asyncio.sleep(0.2)  # it has reached the session process
    await round_trips(other, 50)
    assert not heavy.done(), "the second client waited for the first one's doorbell"
    reply = await asyncio.wait_for(heavy, 120)
    assert reply.json()["consumed"] == 400_000
    await busy.close()
    await other.close()


async def test_a_cpu_bound_stream_does_not_delay_another_session(isolated: Server) -> None:
    """The busy client keeps 30 large doorbells in flight until the other client's 50 round
    trips are done: they must finish while the stream still runs, however fast the daemon
    handles a doorbell (a fixed number of doorbells may all be answered first)."""
    busy = await session(isolated)
    other = await session(isolated, LIGHT)
    doorbell = TLBI_PAIR * 2500  # 5,000 commands
    stop, cap = asyncio.Event(), 100_000

    def send() -> None:
        busy.send(wire.encode_guest_data(FrameType.CMDS, busy.next_seq(), "v0", doorbell))

    async def stream() -> int:
        sent = in_flight = 0
        for _ in range(30):
            send()
        sent = in_flight = 30
        await busy.drain()
        while in_flight:
            assert (await busy.receive()).type == FrameType.RESPONSE
            in_flight -= 1
            if not stop.is_set() and sent < cap:
                send()
                await busy.drain()
                sent += 1
                in_flight += 1
        return sent

    streamed = asyncio.create_task(stream())
    try:
        await asyncio.sleep(0.2)
        await round_trips(other, 50)
        assert not streamed.done(), "the second client waited for the first one's stream"
        stop.set()
        assert await asyncio.wait_for(streamed, 120) < cap
    finally:
        stop.set()
        if not streamed.done():
            streamed.cancel()
        await busy.close()
        await other.close()


async def test_in_process_sessions_share_one_loop(tmp_path: Path) -> None:
    """The control case: without session processes the same test blocks."""
    async with running(tmp_path) as server:
        busy = await session(server)
        other = await session(server, LIGHT)
        heavy = await ring_heavy(busy, 60_000)
        await asyncio.sleep(0.2)
        await round_trips(other, 5)
        assert heavy.done()  # other's first round trip had to wait for the heavy doorbell
        await busy.close()
        await other.close()


async def test_a_dying_session_process_ends_only_its_session(
    isolated: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    doomed = await session(isolated)
    other = await session(isolated, LIGHT)
    await asyncio.sleep(1.2)  # both have told the listener who they are
    pids = {c["client"]: c["pid"] for c in isolated.status()["clients"]}
    assert len(pids) == 2
    doomed_pid = pids[min(pids)]
    heavy = await ring_heavy(doomed, 400_000)
    await asyncio.sleep(0.2)
    os.kill(doomed_pid, signal.SIGKILL)
    with pytest.raises(ClientError, match="ended the session: session process killed by SIGKILL"):
        await asyncio.wait_for(heavy, 30)
    await round_trips(other, 20)
    # the dead session's devices are free again: a new session attaches them
    third = await session(isolated)
    await round_trips(third, 2)
    assert len(isolated.status()["clients"]) == 2
    logged = capsys.readouterr()
    assert "session_failed" in logged.out + logged.err
    for client in (doomed, other, third):
        await client.close()


async def test_a_tcp_session_is_handed_over_too(tmp_path: Path) -> None:
    async with running(
        tmp_path, processes=True, backend="emulated", tcp=[loopback()], token=TOKEN
    ) as server:
        target = f"tcp://{server.tcp_addresses[0]}"
        client = await Client.connect(target, token=TOKEN, wait=30)
        client.timeout = 30
        await client.hello(host=HOST)
        client.send(wire.encode_json(FrameType.RECORD, client.next_seq(), record_to_json(LIGHT[0])))
        await client.drain()
        assert (await client.receive()).json() == {"ok": True}
        await round_trips(client, 3)
        [described] = server.status()["clients"]
        assert described["transport"] == "tcp"
        assert described["pid"] != os.getpid()
        await client.close()


async def test_status_and_metrics_see_a_session_process(isolated: Server) -> None:
    client = await session(isolated)
    await round_trips(client, 5)
    await asyncio.sleep(1.5)  # the session process reports at most once a second
    status = isolated.status()
    [described] = status["clients"]
    counters = described["session"]["counters"]
    assert counters["commands"]["by_kind"]["smmuv3:CMD_SYNC"] == 6  # the setup's and 5 more
    assert described["session"]["viommus"][0]["name"] == "v0"
    assert status["sessions"] == {"active": 1, "closed": 0}
    snap = isolated.snapshot()
    assert sum(snap.latency["cmds"].counts) == 6
    await client.close()
    await isolated.wait_idle()
    after = isolated.snapshot()
    assert after.totals.sessions == 1
    assert after.totals.commands["smmuv3:CMD_SYNC"] == 6
    assert sum(after.latency["cmds"].counts) == 6
