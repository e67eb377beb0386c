"""A live VMM's session end to end through a real ``viommud serve`` (session processes): the
VMM passes its guest RAM (a memfd) and a device cdev over the Unix socket, the nesting
parent's IOAS is filled from the memfd with IOMMU_IOAS_MAP_FILE, the daemon is killed with
SIGKILL, and the VMM resumes: HELLO ``resume`` answers what must be passed again (fds cannot
be in a state file), frames other than MEMORY / DEVICES wait, an empty STATE_LOAD rebuilds
the session on the new fds, and the rest of the trace is answered as an uninterrupted
session answers it (docs/state-format.md §6, docs/protocol.md §12)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from protocols.frames import FrameType
from tests.state.test_restart import Daemon, _frame
from tests.state.traces import HOST, two_smmu_records
from viommud import wire
from viommud.guest_memory import RamRegion
from viommud.shell.client import Client

MiB = 1 << 20
RAM = [(0, 64 * MiB), (1 << 32, 32 * MiB)]  # guest-physical layout: low RAM and RAM above 4 GiB
CDEV_DEVICE = "0000:00:02.0"  # its cdev comes from the VMM (/dev/null stands in)
RECORDS = [r for r in two_smmu_records(rounds=30) if r["op"] != "viommu_destroy"]
SPLIT = 40


def _memfd() -> int:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, sum(size for _, size in RAM))
    return fd


async def _pass(client: Client) -> list[int]:
    """MEMORY (one memfd backing both regions) and DEVICES (one cdev); the fds this side
    opened, to close once sent (the daemon holds its own copies)."""
    ram = _memfd()
    cdev = os.open("/dev/null", os.O_RDWR)
    regions = [
        RamRegion(RAM[0][0], RAM[0][1], ram, 0),
        RamRegion(RAM[1][0], RAM[1][1], ram, RAM[0][1]),
    ]
    body = await client.send_memory(regions)
    assert body == {"ok": True, "regions": 2, "bytes": 96 * MiB}
    assert await client.send_devices({CDEV_DEVICE: cdev}) == {"ok": True, "devices": [CDEV_DEVICE]}
    return [ram, cdev]


async def _records(client: Client, records: list[dict[str, Any]], start: int) -> list[Any]:
    out = []
    for seq, obj in enumerate(records, start):
        client.send(_frame(seq, obj))
        await client.drain()
        reply = await client.receive()
        assert reply.type != FrameType.ERROR, reply.response()
        out.append(reply.response())
    return out


def _map_file_calls(replies: list[Any]) -> list[dict[str, Any]]:
    return [
        c for r in replies if isinstance(r, dict) for c in r.get("calls", [])
        if c["ioctl"] == "IOMMU_IOAS_MAP_FILE"
    ]  # fmt: skip


async def _uninterrupted(socket: Path) -> tuple[list[Any], dict[str, Any]]:
    client = await Client.connect(socket)
    await client.hello(host=HOST)
    opened = await _pass(client)
    got = await _records(client, RECORDS, 1)
    totals = await client.stats()
    await client.close()
    for fd in opened:
        os.close(fd)
    return [_strip(r) for r in got], totals


def _strip(reply: Any) -> Any:
    return {k: v for k, v in reply.items() if k != "calls"} if isinstance(reply, dict) else reply


def test_a_vmm_with_passed_ram_and_cdev_resumes_after_sigkill(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    daemon = Daemon(tmp_path, state_dir)
    try:
        want, want_totals = asyncio.run(_uninterrupted(daemon.socket))

        async def first() -> tuple[str, list[Any]]:
            client = await Client.connect(daemon.socket)
            token = (await client.hello(host=HOST, calls=True))["session_token"]
            opened = await _pass(client)
            got = await _records(client, RECORDS[:SPLIT], 1)
            for fd in opened:
                os.close(fd)
            # the nesting parent's IOAS (one, shared by both SMMUs' parent HWPTs) is mapped
            # from the memfd at IOVA = GPA, each region once
            maps = sorted(
                (c["args"]["iova"], c["args"]["length"], c["args"]["start"])
                for c in _map_file_calls(got)
            )
            assert maps == [(RAM[0][0], RAM[0][1], 0), (RAM[1][0], RAM[1][1], RAM[0][1])]
            parents = [
                c for r in got for c in r.get("calls", [])
                if c["ioctl"] == "IOMMU_HWPT_ALLOC" and c["args"].get("flags") == 1
            ]  # fmt: skip
            assert {c["iommu"] for c in parents} == {"smmu0", "smmu1"}
            assert all(c["errno"] == 0 for c in _map_file_calls(got))
            await asyncio.to_thread(daemon.stop, signal.SIGKILL)
            await client.close()
            return token, got

        token, got = asyncio.run(first())
    finally:
        daemon.stop(signal.SIGKILL)

    daemon = Daemon(tmp_path, state_dir)
    try:

        async def resume() -> tuple[list[Any], dict[str, Any]]:
            client = await Client.connect(daemon.socket)
            body = await client.hello(host=HOST, resume=token)
            resumed = body["resumed"]
            assert resumed["frames"] == SPLIT
            assert resumed["needs"] == {"ram": [list(r) for r in RAM], "devices": [CDEV_DEVICE]}
            # anything but the fds and the STATE_LOAD waits (refused, not counted)
            seq = client.next_seq()
            client.send(_frame(seq, RECORDS[SPLIT]))
            await client.drain()
            refused = await client.receive()
            assert refused.type == FrameType.ERROR
            assert "waits for the guest RAM" in refused.json()["error"]
            # an empty STATE_LOAD before the fds: refused, saying what to pass; still pending
            client.send(wire.encode(FrameType.STATE_LOAD, client.next_seq()))
            await client.drain()
            early = await client.receive()
            assert early.type == FrameType.ERROR
            assert "pass the same RAM" in early.json()["error"]
            opened = await _pass(client)
            client.send(wire.encode(FrameType.STATE_LOAD, client.next_seq()))
            await client.drain()
            done = await client.receive()
            assert done.type == FrameType.STATE_LOADED, done.response()
            assert done.json()["frames"] == SPLIT
            assert done.json()["viommus"] == {"v": "smmuv3"}
            rest = await _records(client, RECORDS[SPLIT:], SPLIT + 1)
            totals = await client.stats()
            await client.close()
            for fd in opened:
                os.close(fd)
            return rest, totals

        rest, totals = asyncio.run(resume())
    finally:
        daemon.stop(signal.SIGTERM)
    assert [_strip(r) for r in got] + rest == want
    assert totals["commands"] == want_totals["commands"]
    # the saved counts plus what the rebuild made again on the new daemon (state-format §3),
    # among them the RAM mapped again from the new memfd
    calls, base = totals["backend"]["calls"], want_totals["backend"]["calls"]
    assert all(calls[name] >= n for name, n in base.items())
    assert calls["IOMMU_IOAS_MAP_FILE"] == 2 * base["IOMMU_IOAS_MAP_FILE"] == 4
