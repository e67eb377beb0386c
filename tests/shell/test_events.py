"""Host events reach the client (docs/protocol.md §10, docs/smmuv3.md "Events"): an SMMUv3
event the host raises for a device behind a vIOMMU becomes an EVENT frame right after the
reply to the frame during which it appeared, with the vSID in place of the physical
StreamID, the vEVENTQ's sequence numbers and its lost-events header; a client whose HELLO
did not ask for events gets none (and the session allocates no vEVENTQ)."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
import structlog

from protocols import iommufd as uapi
from protocols.frames import FrameType
from tests.shell.conftest import replies
from viommud import wire
from viommud.backend.base import Backend
from viommud.backend.calls import BackendCallError, Iommufd
from viommud.backend.emulator import EmulatedIommufd, testing
from viommud.host import HostConfig
from viommud.shell.connection import Connection
from viommud.shell.status import count_kinds

PSID = 256
VSID = 0x42
HOST = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
    "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": PSID, "ats": False}],
}
CREATE = {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]}
ATTACH = {"op": "device_attach", "viommu": "v", "vid": VSID, "device": "0000:01:00.0"}


def _record(event_id: int, addr: int = 0x1000) -> bytes:
    """An SMMUv3 event record (F_TRANSLATION and friends) from the physical StreamID."""
    return struct.pack("<QQQQ", (PSID << 32) | event_id, 0, addr, 0)


class Rig:
    def __init__(self, hello: dict[str, Any]) -> None:
        self.backends: list[EmulatedIommufd] = []

        def factory(host: HostConfig) -> Backend:
            be = EmulatedIommufd(host)
            self.backends.append(be)
            return be

        self.conn = Connection(1, factory, None, structlog.get_logger("viommud").bind(client=1))
        self.seq = 0
        out = self.send(
            wire.encode_json(FrameType.HELLO, 0, {"protocol": 1, "host": HOST, **hello})
        )
        assert out[0].type == FrameType.HELLO_OK, out[0].json()

    @property
    def be(self) -> EmulatedIommufd:
        return self.backends[-1]

    def send(self, frame: bytes) -> list[wire.Frame]:
        return replies(self.conn.receive(frame))

    def record(self, body: dict[str, Any]) -> list[wire.Frame]:
        self.seq += 1
        return self.send(wire.encode_json(FrameType.RECORD, self.seq, body))

    def stats(self) -> list[wire.Frame]:
        self.seq += 1
        return self.send(wire.encode(FrameType.STATS, self.seq, b""))


def _attached(hello: dict[str, Any]) -> Rig:
    rig = Rig(hello)
    for body in (CREATE, ATTACH):
        (reply,) = rig.record(body)
        assert reply.json()["ok"] is True
    return rig


def _events(frames: list[wire.Frame]) -> list[dict[str, Any]]:
    """The EVENT frames after the (single) reply, which must come first."""
    assert frames[0].type != FrameType.EVENT
    assert all(f.type == FrameType.EVENT and f.seq == 0 for f in frames[1:])
    return [f.json() for f in frames[1:]]


def test_an_event_reaches_the_client_with_the_vsid() -> None:
    rig = _attached({"events": True})
    assert testing.inject_event(rig.be, "0000:01:00.0", _record(0x10, 0xABC000)) == 0
    out = rig.stats()
    assert out[0].type == FrameType.STATS_OK
    (event,) = _events(out)
    record = bytes.fromhex(event["record"])
    assert record == struct.pack("<QQQQ", (VSID << 32) | 0x10, 0, 0xABC000, 0)
    assert event == {
        "viommu": "v",
        "model": "smmuv3",
        "iommu": "smmu0",
        "sequence": 0,
        "lost": False,
        "record": record.hex(),
    }
    assert _events(rig.stats()) == []  # read once: the queue is empty now


def test_sequence_increments_and_events_follow_the_reply_they_appeared_in() -> None:
    rig = _attached({"events": True})
    seen: list[int] = []
    for event_id in (0x10, 0x11, 0x12):
        testing.inject_event(rig.be, "0000:01:00.0", _record(event_id))
        (event,) = _events(rig.stats())
        assert int.from_bytes(bytes.fromhex(event["record"])[:1], "little") == event_id
        seen.append(event["sequence"])
    assert seen == [0, 1, 2]


def test_overflow_gives_one_lost_events_header_and_the_sequence_goes_on() -> None:
    depth = 2
    rig = _attached({"events": depth})
    for event_id in (0x10, 0x11, 0x12, 0x13):  # two fit, then the queue is full
        testing.inject_event(rig.be, "0000:01:00.0", _record(event_id))
    events = _events(rig.stats())
    # the kernel's rule: `depth` real events, then one lost-events header at the tail that
    # consumed a sequence number each time it was (re)placed (the last one: 3)
    assert [(e["sequence"], e["lost"]) for e in events] == [(0, False), (1, False), (3, True)]
    assert "record" not in events[2]
    testing.inject_event(rig.be, "0000:01:00.0", _record(0x10))
    (after,) = _events(rig.stats())
    assert (after["sequence"], after["lost"]) == (4, False)


def test_a_client_that_did_not_ask_gets_no_event_and_no_veventq() -> None:
    rig = _attached({})
    kinds = _kinds(rig.be)
    assert "VEVENTQ" not in kinds
    # the host event has nowhere to go: the kernel drops it (no vEVENTQ of that type)
    assert testing.inject_event(rig.be, "0000:01:00.0", _record(0x10)) == errno.EOPNOTSUPP
    out = rig.stats()
    assert [f.type for f in out] == [FrameType.STATS_OK]


def test_events_allocate_one_veventq_per_viommu_object_and_detach_frees_it() -> None:
    rig = _attached({"events": True, "calls": True})
    assert _kinds(rig.be).get("VEVENTQ") == 1
    (reply,) = rig.record({"op": "device_detach", "viommu": "v", "vid": VSID})
    assert reply.json()["ok"] is True
    destroyed = [c["args"]["id"] for c in reply.json()["calls"] if c["ioctl"] == "IOMMU_DESTROY"]
    assert all(c["errno"] == 0 for c in reply.json()["calls"])
    # the open fd holds the vEVENTQ: closed first, then the queue, then the vIOMMU object
    assert len(destroyed) == 4  # vDEVICE, vEVENTQ, vIOMMU, S2 HWPT
    assert "VEVENTQ" not in _kinds(rig.be)
    assert "VIOMMU" not in _kinds(rig.be)


def test_attach_logs_the_veventq_alloc() -> None:
    rig = Rig({"events": 8, "calls": True})
    rig.record(CREATE)
    (reply,) = rig.record(ATTACH)
    allocs = [c for c in reply.json()["calls"] if c["ioctl"] == "IOMMU_VEVENTQ_ALLOC"]
    assert len(allocs) == 1
    assert allocs[0]["args"]["type"] == uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3
    assert allocs[0]["args"]["veventq_depth"] == 8
    assert allocs[0]["errno"] == 0


@pytest.mark.parametrize("value", ["yes", 0, -1, 65537, 1.5, [], {}])
def test_a_bad_events_value_in_hello_is_fatal(value: Any) -> None:
    conn = Connection(1, EmulatedIommufd, None, structlog.get_logger("viommud").bind(client=1))
    hello = {"protocol": 1, "host": HOST, "events": value}
    (frame,) = replies(conn.receive(wire.encode_json(FrameType.HELLO, 1, hello)))
    assert frame.type == FrameType.ERROR
    assert frame.json() == {
        "error": "bad HELLO: 'events' must be a boolean or a queue depth 1..65536",
        "fatal": True,
    }


def _kinds(be: EmulatedIommufd) -> dict[str, int]:
    return count_kinds(be.live_objects())


def test_group_commit_sends_the_events_after_the_groups_replies() -> None:
    rig = _attached({"events": True, "group_commit": True})
    testing.inject_event(rig.be, "0000:01:00.0", _record(0x10))
    sync = struct.pack("<QQ", 0x46, 0)  # CMD_SYNC
    frames = b"".join(wire.encode_guest_data(FrameType.CMDS, 10 + k, "v", sync) for k in range(3))
    out = rig.send(frames)
    assert [f.type for f in out[:3]] == [FrameType.RESPONSE] * 3
    assert [f.seq for f in out[:3]] == [10, 11, 12]
    assert [e["sequence"] for e in _events_only(out[3:])] == [0]


def test_events_follow_a_non_fatal_error_too() -> None:
    rig = _attached({"events": True})
    testing.inject_event(rig.be, "0000:01:00.0", _record(0x10))
    out = rig.send(wire.encode_guest_data(FrameType.CMDS, 20, "nope", b"\0" * 16))
    assert out[0].type == FrameType.ERROR
    assert out[0].json()["fatal"] is False
    assert len(_events(out)) == 1


def test_a_state_loaded_session_keeps_its_events() -> None:
    rig = _attached({"events": True, "state": True})
    (state,) = rig.send(wire.encode(FrameType.STATE_SAVE, 30, b""))
    assert state.type == FrameType.STATE
    other = Rig({"events": 4})
    (loaded,) = other.send(wire.encode(FrameType.STATE_LOAD, 31, state.payload))
    assert loaded.type == FrameType.STATE_LOADED, loaded.json()
    assert _kinds(other.be).get("VEVENTQ") == 1
    testing.inject_event(other.be, "0000:01:00.0", _record(0x12))
    (event,) = _events(other.stats())
    assert bytes.fromhex(event["record"])[4:8] == VSID.to_bytes(4, "little")


def _events_only(frames: list[wire.Frame]) -> list[dict[str, Any]]:
    assert all(f.type == FrameType.EVENT for f in frames)
    return [f.json() for f in frames]


@pytest.mark.parametrize("failing", ["veventq_alloc", "vdevice_alloc"])
def test_a_failed_attach_leaves_no_veventq_behind(
    failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise BackendCallError(failing, errno.ENOMEM, {})

    rig = Rig({"events": True})
    rig.record(CREATE)
    monkeypatch.setattr(Iommufd, failing, refuse)
    (reply,) = rig.record(ATTACH)
    assert reply.json()["ok"] is False
    assert reply.json()["error"] == f"attaching 0000:01:00.0: {failing} failed: ENOMEM"
    assert _kinds(rig.be) == {"IOAS": 1}  # the queue, its fd, the vIOMMU and S2 are gone
    assert not rig.be._event_files


def test_events_with_the_oracle_on() -> None:
    rig = _attached({"events": True, "verify": True})
    testing.inject_event(rig.be, "0000:01:00.0", _record(0x10))
    sync = struct.pack("<QQ", 0x46, 0)  # CMD_SYNC
    out = rig.send(wire.encode_guest_data(FrameType.CMDS, 40, "v", sync))
    assert out[0].json()["errors"] == []
    assert len(_events(out)) == 1
    (stats,) = rig.stats()
    assert stats.json()["verify"]["missed"] == 0


def test_a_failed_event_read_sends_no_event_and_the_session_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = _attached({"events": True})
    testing.inject_event(rig.be, "0000:01:00.0", _record(0x10))

    def broken(self: Iommufd, fd: int, count: int) -> bytes:
        raise BackendCallError("read", errno.EIO, {"fd": fd})

    with monkeypatch.context() as patch:
        patch.setattr(Iommufd, "read_events", broken)
        out = rig.stats()
    assert [f.type for f in out] == [FrameType.STATS_OK]
    (event,) = _events(rig.stats())  # the record stayed queued
    assert event["sequence"] == 0
