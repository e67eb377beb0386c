"""Host events pushed while the client is idle, end to end (docs/protocol.md §10 "Push",
§11 TEST): a real ``viommud serve --testing`` subprocess with a session process per client.

The session process has its own emulated kernel, so the test asks it (TEST frame, like the
kernel selftest's TRIGGER_VEVENT / TRIGGER_IOPF) to raise an event ``delay_ms`` after its
answer; the client then sends nothing and must still get the EVENT frame."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocols.frames import FrameType
from protocols.virtio_iommu import FaultReason, RequestType, build_request, parse_fault
from protocols.vtd import parse_page_request
from tests.conftest import running
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


async def test_overflow_gives_the_lost_events_header_while_idle(connect: Any) -> None:
    peer = await connect(SMMU_HOST, SMMU_SETUP, events=2)
    # three events at once while the client is idle: the queue holds two, then the
    # kernel's lost-events header (it took the third sequence number)
    await peer.test(
        op="trigger_vevent",
        device="0000:01:00.0",
        record=smmu_record(0x10),
        repeat=3,
        delay_ms=100,
    )
    events = await peer.idle_events(3)
    assert [(e["sequence"], e["lost"]) for e in events] == [(0, False), (1, False), (2, True)]
    assert "record" not in events[2]
    await peer.test(
        op="trigger_vevent", device="0000:01:00.0", record=smmu_record(0x11), delay_ms=100
    )
    (after,) = await peer.idle_events(1)
    assert (after["sequence"], after["lost"]) == (3, False)


async def test_a_client_without_events_gets_no_event_frame(connect: Any) -> None:
    peer = await connect(SMMU_HOST, SMMU_SETUP)
    answer = await peer.test(op="trigger_vevent", device="0000:01:00.0", record=smmu_record(0x10))
    # no vEVENTQ was allocated: the host drops the event, as the kernel does
    assert answer == {
        "ok": False,
        "error": "ENOTSUP: no queue of that type: the host drops the event",
    }
    await peer.test(
        op="trigger_vevent", device="0000:01:00.0", record=smmu_record(0x10), delay_ms=50
    )
    await peer.nothing_within(0.5)
    stats = await peer.call(FrameType.STATS, {})
    assert stats.type == FrameType.STATS_OK  # and still nothing but replies


VTD_HOST = {
    "iommus": [{"id": "dmar0", "model": "intel-vtd"}],
    "devices": [{"id": "0000:01:00.0", "iommu": "dmar0", "sid": 256, "ats": True}],
}
VTD_CREATE = {
    "op": "viommu_create",
    "viommu": "w",
    "model": "vtd",
    "iommus": ["dmar0"],
    "options": {"dw": 256, "prs": True},
}
VTD_SETUP = [
    VTD_CREATE,
    {"op": "device_attach", "viommu": "w", "vid": 16, "device": "0000:01:00.0"},
    # scalable mode, DID 2, a first-stage PASID entry (as fixtures/vtd-shared-domain.jsonl)
    {"op": "context_entry", "viommu": "w", "sid": 16, "data": "05000150" + "00" * 28},
    {
        "op": "pasid_entry",
        "viommu": "w",
        "sid": 16,
        "pasid": 0,
        "data": "4100000000000000020000000000000000000040" + "00" * 44,
    },
]
# a global context-cache invalidation, then a wait: the VMM re-reads the entries and the
# device gets its nested HWPT (tied to the vIOMMU's FAULT object)
VTD_REREAD = bytes.fromhex(
    "1100000000000000" + "00" * 24 + "2500000002000000" + "0400007f00000000" + "00" * 16
)


async def vtd_peer(connect: Any, **hello: Any) -> Peer:
    peer: Peer = await connect(VTD_HOST, VTD_SETUP, **hello)
    seq = peer.client.next_seq()
    peer.client.send(wire.encode_guest_data(FrameType.CMDS, seq, "w", VTD_REREAD))
    await peer.client.drain()
    reply = await peer.client.receive()
    assert reply.type == FrameType.RESPONSE, reply.json()
    assert reply.json()["errors"] == []
    return peer


async def test_a_vtd_page_request_reaches_the_guest_queue_while_idle(connect: Any) -> None:
    peer = await vtd_peer(connect, events=True)
    answer = await peer.test(
        op="trigger_iopf",
        device="0000:01:00.0",
        addr=0x12345000,
        perm=["read", "write"],
        grpid=5,
        delay_ms=100,
    )
    assert answer == {"ok": True, "deferred": True}
    (event,) = await peer.idle_events(1)
    assert {k: event[k] for k in ("viommu", "model", "iommu", "sequence", "lost")} == {
        "viommu": "w",
        "model": "vtd",
        "iommu": "dmar0",
        "sequence": 0,
        "lost": False,
    }
    # the page request descriptor (VT-d §7.5.1): type 1, the guest's source ID 16 (not the
    # host's 256), no PASID; read and write requested, last page of group 5, the page
    assert parse_page_request(bytes.fromhex(event["record"])) == {
        "type": 1,
        "pp": 0,
        "pdp": 0,
        "rid": 16,
        "pasid": 0,
        "exe_req": 0,
        "pm_req": 0,
        "rd_req": 1,
        "wr_req": 1,
        "lpig": 1,
        "prgi": 5,
        "addr": 0x12345,
        "private0": 0,
        "private1": 0,
    }


async def test_without_prs_or_events_a_page_request_has_nowhere_to_go(connect: Any) -> None:
    peer = await vtd_peer(connect)  # prs, but no HELLO events: no FAULT object
    answer = await peer.test(op="trigger_iopf", device="0000:01:00.0", addr=0x1000)
    assert answer == {
        "ok": False,
        "error": "ENOENT: the device has nowhere to report it: the host drops the event",
    }
    await peer.nothing_within(0.3)


VIRTIO_HOST = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
    "devices": [{"id": "0000:04:00.0", "iommu": "smmu0", "sid": 1024, "ats": False}],
}
VIRTIO_SETUP = [
    {
        "op": "viommu_create",
        "viommu": "x",
        "model": "virtio-iommu",
        "iommus": [],
        "options": {"bypass": 0, "guest_memory": [{"gpa": 0, "size": "0x10000000"}]},
    },
    {"op": "device_attach", "viommu": "x", "vid": 0x100, "device": "0000:04:00.0"},
]
FAULT = {"op": "device_fault", "device": "0000:04:00.0", "address": 0x5000, "write": True}


async def test_a_virtio_fault_is_an_event_frame_and_the_same_record_as_in_a_response(
    connect: Any,
) -> None:
    # a client without events: the fault leaves with the next request's response
    plain = await connect(VIRTIO_HOST, VIRTIO_SETUP)
    await plain.test(**FAULT)
    seq = plain.client.next_seq()
    probe = build_request(RequestType.PROBE, endpoint=0x100)  # changes nothing
    plain.client.send(wire.encode_guest_data(FrameType.REQUEST, seq, "x", probe))
    await plain.client.drain()
    response = (await plain.client.receive()).json()
    (in_response,) = response["faults"]
    # a client with events: an EVENT frame, pushed while idle, carrying the same record
    peer = await connect(VIRTIO_HOST, VIRTIO_SETUP, events=True)
    await peer.test(**FAULT, delay_ms=100)
    (event,) = await peer.idle_events(1)
    assert event == {
        "viommu": "x",
        "model": "virtio-iommu",
        "iommu": "smmu0",
        "sequence": 0,
        "lost": False,
        "record": in_response,
    }
    fault = parse_fault(bytes.fromhex(event["record"]))
    assert (fault["endpoint"], fault["reason"]) == (0x100, FaultReason.DOMAIN)
    # and its responses carry no faults any more
    await peer.test(**FAULT)  # answered, then the EVENT right after the answer
    (event,) = await peer.idle_events(1)
    assert event["sequence"] == 1
    seq = peer.client.next_seq()
    peer.client.send(wire.encode_guest_data(FrameType.REQUEST, seq, "x", probe))
    await peer.client.drain()
    assert "faults" not in (await peer.client.receive()).json()


async def test_test_frames_are_refused_without_serve_testing(tmp_path: Path) -> None:
    daemon = Served(tmp_path, "--backend", "emulated")
    try:
        client = await Client.connect(daemon.socket, wait=30)
        client.timeout = 30
        await client.hello(host=SMMU_HOST, events=True)
        peer = Peer(client)
        reply = await peer.call(FrameType.TEST, {"op": "trigger_vevent"})
        assert reply.type == FrameType.ERROR
        assert reply.json() == {
            "error": "TEST frames are refused: the daemon was not started with serve --testing",
            "fatal": False,
        }
        stats = await peer.call(FrameType.STATS, {})  # the session goes on
        assert stats.type == FrameType.STATS_OK
        await client.close()
    finally:
        assert daemon.stop() == 0


async def test_a_state_loaded_session_is_watched_too(connect: Any) -> None:
    """STATE_LOAD swaps the session (and its emulated kernel): the push follows it."""
    source = await connect(SMMU_HOST, SMMU_SETUP, events=True, state=True)
    document = await source.client.state_save()
    await source.client.close()  # its devices are free again
    peer = await connect(SMMU_HOST, [], events=True)
    await peer.client.state_load(document)
    await peer.test(
        op="trigger_vevent", device="0000:01:00.0", record=smmu_record(0x12), delay_ms=100
    )
    (event,) = await peer.idle_events(1)
    assert bytes.fromhex(event["record"])[4:8] == VSID.to_bytes(4, "little")


async def test_the_in_process_server_pushes_too(tmp_path: Path) -> None:
    async with running(tmp_path, testing=True) as server:
        client = await Client.connect(server.socket_path, wait=30)
        await client.hello(host=SMMU_HOST, events=True)
        peer = Peer(client)
        for record in SMMU_SETUP:
            assert (await peer.call(FrameType.RECORD, record)).json() == {"ok": True}
        await peer.test(
            op="trigger_vevent", device="0000:01:00.0", record=smmu_record(0x10), delay_ms=100
        )
        (event,) = await peer.idle_events(1)
        assert event["sequence"] == 0
        await client.close()


async def test_pushed_events_fall_between_whole_replies(connect: Any) -> None:
    """Events raised while a stream of doorbells is being answered: every frame the client
    reads is whole (a split reply would not decode), replies keep request order and the
    events keep their sequence order."""
    peer = await connect(SMMU_HOST, SMMU_SETUP, events=64)
    sync = struct.pack("<QQ", 0x46, 0)  # CMD_SYNC
    await peer.test(
        op="trigger_vevent",
        device="0000:01:00.0",
        record=smmu_record(0x10),
        repeat=5,
        delay_ms=20,
    )
    first = peer.client.next_seq()
    for k in range(2000):
        peer.client.send(wire.encode_guest_data(FrameType.CMDS, first + k, "v", sync))
        if k % 100 == 99:
            await asyncio.sleep(0.005)  # let the daemon answer while the timer fires
    await peer.client.drain()
    replies_seen: list[int] = []
    events: list[int] = []
    async with asyncio.timeout(WAIT):
        while len(replies_seen) < 2000 or len(events) < 5:
            frame = await peer.client.receive()
            if frame.type == FrameType.EVENT:
                events.append(frame.json()["sequence"])
            else:
                assert frame.type == FrameType.RESPONSE, frame.type
                replies_seen.append(frame.seq)
    assert replies_seen == [first + k for k in range(2000)]
    assert events == [0, 1, 2, 3, 4]
