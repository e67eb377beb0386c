"""Host events pushed while the client is idle, end to end (docs/protocol.md §10 "Push",
§11 TEST): a real ``viommud serve --testing`` subprocess with a session process per client.

The session process has its own emulated kernel, so the test asks it (TEST frame, like the
kernel selftest's TRIGGER_VEVENT / TRIGGER_IOPF) to raise an event ``delay_ms`` after its
answer; the client then sends nothing and must still get the EVENT frame."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from protocols.frames import FrameType
from tests.shell.test_serve_drain import Served
from viommud import wire
from viommud.shell.client import Client

PSID, VSID = 256, 0x42
SMMU_HOST = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
    "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": PSID, "ats": False}],
}
SMMU_SETUP = [
    {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]},
    {"op": "device_attach", "viommu": "v", "vid": VSID, "device": "0000:01:00.0"},
]
WAIT = 20.0  # seconds a pushed event may take on a loaded machine


def smmu_record(event_id: int, addr: int = 0x1000) -> str:
    """An SMMUv3 event record (SMMUv3 §7.3) as the host raises it: physical StreamID."""
    return struct.pack("<QQQQ", (PSID << 32) | event_id, 0, addr, 0).hex()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    daemon = Served(tmp_path_factory.mktemp("push"), "--testing", "--backend", "emulated")
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0


class Peer:
    """A client that keeps every frame it receives, in order."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, frame_type: int, body: Any) -> wire.Frame:
        seq = self.client.next_seq()
        self.client.send(wire.encode_json(frame_type, seq, body))
        await self.client.drain()
        frame = await self.client.receive()
        assert frame.seq == seq, (frame.type, frame.json())
        return frame

    async def test(self, **body: Any) -> dict[str, Any]:
        reply = await self.call(FrameType.TEST, body)
        assert reply.type == FrameType.RESPONSE, reply.json()
        result: dict[str, Any] = reply.json()
        return result

    async def idle_events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` frames, which must be EVENT frames, received without sending."""
        out = []
        async with asyncio.timeout(WAIT):
            for _ in range(n):
                frame = await self.client.receive()
                assert (frame.type, frame.seq) == (FrameType.EVENT, 0), frame.json()
                out.append(frame.json())
        return out

    async def nothing_within(self, seconds: float) -> None:
        """No frame arrives within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                frame = await self.client.receive()
        except TimeoutError:
            return
        pytest.fail(f"unexpected frame 0x{frame.type:02x}: {frame.payload!r}")


@pytest.fixture
async def connect(served: Served) -> AsyncIterator[Any]:
    clients: list[Client] = []

    async def make(host: dict[str, Any], setup: list[dict[str, Any]], **hello: Any) -> Peer:
        client = await Client.connect(served.socket, wait=30)
        client.timeout = 30
        clients.append(client)
        await client.hello(host=host, **hello)
        peer = Peer(client)
        for record in setup:
            reply = await peer.call(FrameType.RECORD, record)
            assert reply.json() == {"ok": True}, reply.json()
        return peer

    yield make
    for client in clients:
        await client.close()


async def test_an_smmuv3_event_is_pushed_while_the_client_is_idle(connect: Any) -> None:
    peer = await connect(SMMU_HOST, SMMU_SETUP, events=True)
    answer = await peer.test(
        op="trigger_vevent", device="0000:01:00.0", record=smmu_record(0x10), delay_ms=200
    )
    assert answer == {"ok": True, "deferred": True}
    (event,) = await peer.idle_events(1)  # nothing sent since the TEST frame
    assert event == {
        "viommu": "v",
        "model": "smmuv3",
        "iommu": "smmu0",
        "sequence": 0,
        "lost": False,
        "record": struct.pack("<QQQQ", (VSID << 32) | 0x10, 0, 0x1000, 0).hex(),
    }
