"""The daemon's socket: hello rules, bad clients get an error and go, others carry on."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from protocols.frames import FrameType
from tests.conftest import FIXTURES, REAL_SMMUV3, Daemon
from viommud import wire
from viommud.shell.client import Client, ClientError, health
from viommud.shell.replay import replay
from viommud.trace import Cmds, TraceReader, record_to_json

with TraceReader(FIXTURES / "smmuv3-every-opcode.jsonl") as _reader:
    HOST = _reader.header.host.to_json()


async def raw_exchange(socket: Path, data: bytes) -> list[wire.Frame]:
    reader, writer = await asyncio.open_unix_connection(str(socket))
    writer.write(data)
    await writer.drain()
    decoder = wire.FrameDecoder()
    frames = []
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            decoder.receive_data(chunk)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    writer.close()
    return frames


async def test_socket_is_private(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o600


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "unsupported protocol version 71"),
        (wire.encode(FrameType.CMDS, 1, b"\x01v" + bytes(16)), "the first frame must be HELLO"),
        (wire.encode_json(FrameType.HELLO, 1, {"protocol": 9}), "speaks protocol 9"),
        (wire.encode(FrameType.HELLO, 1, b"{not json"), "not valid JSON"),
        (wire.encode_json(FrameType.HELLO, 1, {"protocol": 1}), "no host of its own"),
        (
            wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": {"iommus": 3}}),
            "bad host in HELLO",
        ),
        (wire.encode_json(FrameType.HELLO_OK, 1, {}), "the first frame must be HELLO"),
    ],
)
async def test_bad_openings_get_a_fatal_error(daemon: Daemon, data: bytes, message: str) -> None:
    frames = await raw_exchange(daemon.socket, data)
    assert frames[-1].type == FrameType.ERROR
    body = frames[-1].json()
    assert body["fatal"] is True
    assert message in body["error"]


async def test_refusals_inside_a_session_are_not_fatal(daemon: Daemon) -> None:
    client = await Client.connect(daemon.socket)
    await client.hello(host=HOST)
    for frame in (
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "nope", bytes(16)),
        wire.encode_json(FrameType.RECORD, client.next_seq(), {"op": "bogus"}),
        wire.encode_json(
            FrameType.RECORD,
            client.next_seq(),
            {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]},
        ),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", bytes(17)),
        wire.encode_guest_data(
            FrameType.CMDS,
            client.next_seq(),
            "v",
            bytes.fromhex("4620c00f000000000000000000000000"),
        ),
    ):
        client.send(frame)
    await client.drain()
    replies = [await client.receive() for _ in range(5)]
    assert [r.type for r in replies] == [
        FrameType.ERROR,
        FrameType.ERROR,
        FrameType.RESPONSE,
        FrameType.ERROR,
        FrameType.RESPONSE,
    ]
    assert "no vIOMMU named 'nope'" in replies[0].json()["error"]
    assert "unknown op 'bogus'" in replies[1].json()["error"]
    assert "whole number of 16-byte commands" in replies[3].json()["error"]
    assert replies[4].json() == {"consumed": 1, "errors": [], "syncs": 1}
    await client.close()


async def test_one_bad_client_does_not_hurt_another(daemon: Daemon) -> None:
    good = asyncio.create_task(replay(REAL_SMMUV3, daemon.socket))
    bad_frames = await raw_exchange(daemon.socket, b"\x01\x42" + bytes(30))
    assert bad_frames[-1].type == FrameType.ERROR
    result = await good
    assert result.exit_code == 0
    assert result.report is not None
    assert result.report["errors"]["total"] == 0


async def test_disconnect_mid_session_frees_its_backend(daemon: Daemon) -> None:
    client = await Client.connect(daemon.socket)
    await client.hello(host=HOST)
    with TraceReader(FIXTURES / "smmuv3-every-opcode.jsonl") as reader:
        records = list(reader)[:6]
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
    [backend] = daemon.backends
    assert backend.live_objects()  # the session holds objects now
    await client.close()
    async with asyncio.timeout(5):
        await daemon.server.wait_idle()
    assert backend.live_objects() == []


async def test_concurrent_replays_are_isolated(daemon: Daemon) -> None:
    traces = [
        FIXTURES / "smmuv3-every-opcode.jsonl",
        FIXTURES / "smmuv3-guest-errors.jsonl",
        FIXTURES / "smmuv3-ste-configs.jsonl",
    ] * 2
    results = await asyncio.gather(*(replay(t, daemon.socket) for t in traces))
    totals = [r.report["errors"]["total"] for r in results if r.report is not None]
    assert totals == [0, 21, 0, 0, 21, 0]


async def test_health(daemon: Daemon, tmp_path: Path) -> None:
    assert (await health(daemon.socket)).startswith("viommud/")
    with pytest.raises(ClientError, match="cannot connect"):
        await health(tmp_path / "absent.sock")


async def test_fixed_host_is_checked(tmp_path: Path) -> None:
    from viommud.host import HostConfig
    from viommud.shell.server import Server

    host = HostConfig.from_json(
        {
            "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
            "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": 256, "ats": True}],
        }
    )
    server = Server(tmp_path / "s.sock", fixed_host=host)
    await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop.wait))
    try:
        result = await replay(FIXTURES / "smmuv3-every-opcode.jsonl", tmp_path / "s.sock")
        assert result.exit_code == 2
        assert result.error is not None
        assert "device 0000:02:00.0 not present" in result.error
        client = await Client.connect(tmp_path / "s.sock")
        reply = await client.hello()  # no host: the daemon's own is used
        assert reply["host"] == json.loads(json.dumps(host.to_json()))
        await client.close()
    finally:
        stop.set()
        await task


async def test_compact_replies_only_for_clean_doorbells(daemon: Daemon) -> None:
    client = await Client.connect(daemon.socket)
    await client.hello(host=HOST, compact=True)
    sync = bytes.fromhex("4620c00f000000000000000000000000")
    for frame in (
        wire.encode_json(
            FrameType.RECORD,
            client.next_seq(),
            {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]},
        ),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", sync + sync),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", bytes([0x5F]) + bytes(15)),
    ):
        client.send(frame)
    await client.drain()
    created, clean, bad = [await client.receive() for _ in range(3)]
    assert created.type == FrameType.RESPONSE
    assert clean.type == FrameType.CMDS_OK
    assert clean.response() == {"consumed": 2, "errors": [], "syncs": 2}
    assert bad.type == FrameType.RESPONSE  # errors carry their reasons: JSON
    assert bad.response()["errors"][0]["code"] == "CERROR_ILL"
    await client.close()
