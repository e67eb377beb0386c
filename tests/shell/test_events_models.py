"""Host events of the VT-d and virtio-iommu models through a ``Connection`` (docs/protocol.md
§10, docs/vtd.md "Page requests", docs/virtio-iommu.md §8), the TEST frame's refusals
(§11), and the shared queue rules (``viommud.models.eventq``)."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from protocols.vtd import DescType, build_descriptor, parse_page_request
from tests.shell.conftest import replies
from viommud import wire
from viommud.backend.base import Backend, DeviceFault
from viommud.backend.emulator import EmulatedIommufd, testing
from viommud.backend.emulator.objects import FaultObject, HwptNestedObject
from viommud.host import HostConfig
from viommud.models.eventq import SEQUENCE_MASK, GuestEventQueue
from viommud.shell.connection import Connection
from viommud.shell.testframe import NOT_ENABLED

DEVICE = "0000:01:00.0"
HOST = {
    "iommus": [{"id": "dmar0", "model": "intel-vtd"}, {"id": "smmu0", "model": "arm-smmuv3"}],
    "devices": [
        {"id": DEVICE, "iommu": "dmar0", "sid": 256, "ats": True},
        {"id": "0000:04:00.0", "iommu": "smmu0", "sid": 1024, "ats": False},
    ],
}
VTD: list[dict[str, Any]] = [
    {"op": "viommu_create", "viommu": "w", "model": "vtd", "iommus": ["dmar0"]},
    {"op": "device_attach", "viommu": "w", "vid": 16, "device": DEVICE},
    {"op": "context_entry", "viommu": "w", "sid": 16, "data": "05000150" + "00" * 28},
    {
        "op": "pasid_entry",
        "viommu": "w",
        "sid": 16,
        "pasid": 0,
        "data": "4100000000000000020000000000000000000040" + "00" * 44,
    },
]
WAIT = build_descriptor(DescType.INV_WAIT, width=32, sw=1, status_data=2, status_addr=0x1FC00)
REREAD = build_descriptor(DescType.CC_INV, width=32, g=1) + WAIT


class Rig:
    def __init__(self, hello: dict[str, Any], *, testing_frames: bool = True) -> None:
        self.backends: list[EmulatedIommufd] = []

        def factory(host: HostConfig) -> Backend:
            be = EmulatedIommufd(host)
            self.backends.append(be)
            return be

        log = structlog.get_logger("viommud").bind(client=1)
        self.conn = Connection(1, factory, None, log, testing=testing_frames)
        self.seq = 0
        (ok,) = self.send(
            wire.encode_json(FrameType.HELLO, 0, {"protocol": 1, "host": HOST, **hello})
        )
        assert ok.type == FrameType.HELLO_OK, ok.json()

    @property
    def be(self) -> EmulatedIommufd:
        return self.backends[-1]

    def send(self, frame: bytes) -> list[wire.Frame]:
        return replies(self.conn.receive(frame))

    def next(self) -> int:
        self.seq += 1
        return self.seq

    def record(self, body: dict[str, Any]) -> list[wire.Frame]:
        return self.send(wire.encode_json(FrameType.RECORD, self.next(), body))

    def cmds(self, viommu: str, data: bytes) -> list[wire.Frame]:
        return self.send(wire.encode_guest_data(FrameType.CMDS, self.next(), viommu, data))

    def test(self, **body: Any) -> list[wire.Frame]:
        return self.send(wire.encode_json(FrameType.TEST, self.next(), body))


def _vtd(hello: dict[str, Any], *, prs: bool = True) -> Rig:
    rig = Rig(hello)
    create = {**VTD[0], "options": {"dw": 256, "prs": prs}}
    for body in (create, *VTD[1:]):
        (reply,) = rig.record(body)
        assert reply.json()["ok"] is True, reply.json()
    (reply,) = rig.cmds("w", REREAD)
    assert reply.json()["errors"] == []
    return rig


def _nested(be: EmulatedIommufd) -> list[HwptNestedObject]:
    return [o for o in be._objects.values() if isinstance(o, HwptNestedObject)]


def _faults(be: EmulatedIommufd) -> list[FaultObject]:
    return [o for o in be._objects.values() if isinstance(o, FaultObject)]


def test_prs_with_events_ties_the_nested_hwpt_to_a_fault_object() -> None:
    rig = _vtd({"events": True})
    (fault,) = _faults(rig.be)
    (hwpt,) = _nested(rig.be)
    assert hwpt.fault_id == fault.id


@pytest.mark.parametrize(("hello", "prs"), [({}, True), ({"events": True}, False)])
def test_without_prs_or_events_no_fault_object(hello: dict[str, Any], prs: bool) -> None:
    rig = _vtd(hello, prs=prs)
    assert _faults(rig.be) == []
    (hwpt,) = _nested(rig.be)
    assert hwpt.fault_id == 0
    assert testing.inject_iopf(rig.be, DEVICE, 0x1000) != 0  # nowhere to go


def test_a_page_request_and_the_guest_response_reach_the_host() -> None:
    rig = _vtd({"events": True})
    (answer, event) = rig.test(
        op="trigger_iopf", device=DEVICE, addr=0xABC000, pasid=3, grpid=5, perm=["write"]
    )
    assert answer.json() == {"ok": True}
    assert event.type == FrameType.EVENT
    fields = parse_page_request(bytes.fromhex(event.json()["record"]))
    assert (fields["rid"], fields["pp"], fields["pasid"], fields["prgi"]) == (16, 1, 3, 5)
    assert (fields["wr_req"], fields["rd_req"], fields["lpig"], fields["addr"]) == (
        1,
        0,
        1,
        0xABC,
    )
    (fault,) = _faults(rig.be)
    assert len(fault.response) == 1  # read: the group waits for its response
    # a response to another group answers nothing; the one to group 5 does
    for prgi, pending in ((6, 1), (5, 0)):
        resp = build_descriptor(
            DescType.PGRP_RESP, width=32, pp=1, rid=16, pasid=3, rc=0, prgi=prgi, lpig=1
        )
        (reply,) = rig.cmds("w", resp + WAIT)
        assert reply.json()["errors"] == []
        assert len(fault.response) == pending


def test_page_requests_overflow_into_a_lost_events_header() -> None:
    rig = _vtd({"events": 2})
    for grpid in range(3):
        testing.inject_iopf(rig.be, DEVICE, 0x1000, grpid=grpid)
    (_, *events) = rig.send(wire.encode(FrameType.STATS, rig.next(), b""))
    assert [(e.json()["sequence"], e.json()["lost"]) for e in events] == [
        (0, False),
        (1, False),
        (2, True),
    ]


def test_the_fault_object_goes_with_the_viommu() -> None:
    rig = _vtd({"events": True, "calls": True})
    (fault,) = _faults(rig.be)
    (reply,) = rig.record({"op": "viommu_destroy", "viommu": "w"})
    assert reply.json()["ok"] is True
    destroyed = [c for c in reply.json()["calls"] if c["ioctl"] == "IOMMU_DESTROY"]
    assert all(c["errno"] == 0 for c in destroyed)
    assert destroyed[-1]["args"]["id"] == fault.id  # after the HWPTs that held it
    assert _faults(rig.be) == []
    assert not rig.be._event_files


def test_virtio_faults_without_events_stay_in_responses() -> None:
    rig = Rig({})
    create = {
        "op": "viommu_create",
        "viommu": "x",
        "model": "virtio-iommu",
        "iommus": [],
        "options": {"bypass": 0},
    }
    rig.record(create)
    rig.record({"op": "device_attach", "viommu": "x", "vid": 0x100, "device": "0000:04:00.0"})
    testing.inject_device_fault(rig.be, DeviceFault("0000:04:00.0", 0x5000, write=True))
    out = rig.send(wire.encode(FrameType.STATS, rig.next(), b""))
    assert [f.type for f in out] == [FrameType.STATS_OK]  # no EVENT: it waits for a request


def test_test_frames_refused_unless_enabled() -> None:
    rig = Rig({}, testing_frames=False)
    (reply,) = rig.test(op="trigger_vevent", device=DEVICE, record="00" * 32)
    assert reply.json() == {"error": NOT_ENABLED, "fatal": False}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([], "bad TEST: the payload must be a JSON object"),
        (
            {"op": "reboot"},
            "bad TEST: 'op' must be one of trigger_vevent, trigger_iopf, device_fault",
        ),
        ({"op": "device_fault"}, "bad TEST: 'device' must be a host device name"),
        (
            {"op": "device_fault", "device": DEVICE},
            f"bad TEST: {DEVICE} is not bound in this session",
        ),
        (
            {"op": "trigger_vevent", "device": "0000:04:00.0", "record": "00"},
            "bad TEST: 'record' must be 32 bytes of hex",
        ),
        (
            {"op": "device_fault", "device": "0000:04:00.0", "delay_ms": -1},
            "bad TEST: 'delay_ms' must be an integer 0..60000",
        ),
        (
            {"op": "trigger_iopf", "device": "0000:04:00.0", "addr": 0, "perm": ["fly"]},
            "bad TEST: 'perm' must be a list of read, write, exec, priv",
        ),
    ],
)
def test_bad_test_frames_are_non_fatal_errors(body: Any, error: str) -> None:
    rig = Rig({})
    rig.record({"op": "viommu_create", "viommu": "s", "model": "smmuv3", "iommus": ["smmu0"]})
    rig.record({"op": "device_attach", "viommu": "s", "vid": 1, "device": "0000:04:00.0"})
    (reply,) = rig.send(wire.encode_json(FrameType.TEST, rig.next(), body))
    assert reply.json() == {"error": error, "fatal": False}
    (stats,) = rig.send(wire.encode(FrameType.STATS, rig.next(), b""))
    assert stats.type == FrameType.STATS_OK


def test_a_delayed_test_is_handed_to_the_pump() -> None:
    rig = Rig({"events": True})
    rig.record({"op": "viommu_create", "viommu": "s", "model": "smmuv3", "iommus": ["smmu0"]})
    rig.record({"op": "device_attach", "viommu": "s", "vid": 7, "device": "0000:04:00.0"})
    record = ((1024 << 32) | 0x10).to_bytes(8, "little") + bytes(24)
    (reply,) = rig.test(
        op="trigger_vevent", device="0000:04:00.0", record=record.hex(), delay_ms=250
    )
    assert reply.json() == {"ok": True, "deferred": True}
    (deferred,) = rig.conn.deferred
    assert deferred.delay == 0.25
    assert rig.conn.push_events() == b""  # not raised yet
    assert deferred.run() == {"ok": True}
    (event,) = replies(rig.conn.push_events())
    assert event.type == FrameType.EVENT
    assert bytes.fromhex(event.json()["record"])[4:8] == (7).to_bytes(4, "little")


def test_the_guest_event_queue_rules() -> None:
    queue = GuestEventQueue(2)
    assert [queue.report("u", bytes([n])) for n in range(4)] == [True, True, False, False]
    # two records, then one header with the number of the latest drop
    assert queue.drain() == [("u", 0, False, b"\0"), ("u", 1, False, b"\1"), ("u", 3, True, b"")]
    assert queue.lost == 2
    queue.sequence = SEQUENCE_MASK
    queue.report("u", b"a")
    queue.report("u", b"b")
    assert [s for _, s, _, _ in queue.drain()] == [SEQUENCE_MASK, 0]  # wraps as INT_MAX


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"prs": 1}, "vtd option 'prs' must be a boolean"),
        (
            {"prs": True, "compat": "qemu"},
            "vtd option 'prs' needs compat 'architecture' (QEMU 10.0 has no PRS)",
        ),
    ],
)
def test_bad_prs_options_are_refused(options: dict[str, Any], error: str) -> None:
    rig = Rig({"events": True})
    (reply,) = rig.record({**VTD[0], "options": options})
    assert reply.json() == {"ok": False, "error": error}
    assert _faults(rig.be) == []
