"""VT-d wait descriptors with IF=1 (VT-d §6.5.2.8): a completed one is a completion
interrupt, reported in the doorbell's reply (``interrupts``, the wait's index) per doorbell
and with group commit alike; the wire forms carry it (docs/trace-format.md §4, docs/protocol.md
§2, §7), and a client that asked for compact replies gets a RESPONSE for such a doorbell."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from protocols.vtd import build_descriptor
from tests.models.vtd_harness import HOST, A, T, Vm
from tests.shell.conftest import replies
from viommud import wire
from viommud.backend.base import Backend
from viommud.backend.emulator import EmulatedIommufd
from viommud.host import HostConfig
from viommud.replies import DoorbellReply
from viommud.shell.connection import Connection
from viommud.shell.replies import doorbell_json, encode_doorbell


def _vm() -> Vm:
    vm = Vm(dw=128)
    vm.attach(A)
    vm.bind_legacy(A, 1, 0x1000000)
    return vm


# (SW, IF, FN) of a wait -> (status write?, interrupt?); none of them is an IQE
_WAITS = [
    pytest.param((1, 0, 0), True, False, id="SW"),
    pytest.param((0, 1, 0), False, True, id="IF"),
    pytest.param((1, 1, 0), True, True, id="SW+IF"),
    pytest.param((0, 1, 1), False, True, id="IF+FN"),
    pytest.param((0, 0, 1), False, False, id="FN"),
    pytest.param((1, 1, 1), True, True, id="SW+IF+FN"),
]


@pytest.mark.parametrize(("flags", "writes", "raises"), _WAITS)
@pytest.mark.parametrize("grouped", [False, True], ids=["per-doorbell", "group-commit"])
def test_a_completed_wait_with_if_is_a_completion_interrupt(
    flags: tuple[int, int, int], writes: bool, raises: bool, grouped: bool
) -> None:
    sw, if_, fn = flags
    vm = _vm()
    iotlb = vm.d(T.IOTLB_INV, g=3, did=1, addr=0x40000, ih=1)
    wait = vm.d(T.INV_WAIT, sw=sw, if_=if_, fn=fn, status_data=7, status_addr=0x2000)
    doorbells = [iotlb + wait, iotlb + wait + iotlb + wait]
    if grouped:
        answers = vm.session.doorbells("v", doorbells)
    else:
        answers = [vm.session.doorbell("v", d) for d in doorbells]
    for answer, waits in zip(answers, ([1], [1, 3]), strict=True):
        assert isinstance(answer, DoorbellReply)
        assert answer.errors == ()
        assert answer.interrupts == (tuple(waits) if raises else ())
        assert [w.index for w in answer.status_writes or ()] == (waits if writes else [])
        body = doorbell_json(answer)
        assert body.get("interrupts") == (waits if raises else None)


def test_the_wait_an_iqe_refuses_raises_nothing() -> None:
    vm = _vm()
    bad = vm.d(T.INV_WAIT)  # none of SW, IF, FN: IQE
    good = vm.d(T.INV_WAIT, if_=1)
    answer = vm.doorbell(bad, good)
    assert [(e["index"], e["code"]) for e in answer["errors"]] == [(0, "IQE")]
    assert answer["interrupts"] == [1]


@pytest.mark.parametrize(
    ("reply", "compact", "writes", "frame"),
    [
        (DoorbellReply(2, 1, (), (), (1,)), True, True, FrameType.RESPONSE),
        (DoorbellReply(2, 1, (), (), (1,)), True, False, FrameType.RESPONSE),
        (DoorbellReply(2, 1, (), (), (1,)), False, False, FrameType.RESPONSE),
        (DoorbellReply(2, 1, (), ()), True, True, FrameType.CMDS_OK_WRITES),
        (DoorbellReply(2, 1), True, False, FrameType.CMDS_OK),
    ],
)
def test_compact_forms_never_drop_an_interrupt(
    reply: DoorbellReply, compact: bool, writes: bool, frame: FrameType
) -> None:
    (sent,) = replies(encode_doorbell(9, reply, compact=compact, writes=writes))
    assert sent.type == frame
    if frame == FrameType.RESPONSE:
        assert sent.json()["interrupts"] == [1]


def _connection() -> Connection:
    def factory(host: HostConfig) -> Backend:
        return EmulatedIommufd(host)

    return Connection(1, factory, None, structlog.get_logger("viommud").bind(client=1))


@pytest.mark.parametrize(
    "hello",
    [
        {},
        {"compact": True, "compact_writes": True},
        {"compact": True, "compact_writes": True, "group_commit": True},
    ],
)
def test_a_client_sees_the_interrupt_whatever_it_asked_for(hello: dict[str, Any]) -> None:
    conn = _connection()
    records = [
        {"op": "viommu_create", "viommu": "v", "model": "vtd", "iommus": ["dmar0"]},
    ]
    frames = [wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST_JSON, **hello})]
    frames += [wire.encode_json(FrameType.RECORD, 2, r) for r in records]
    plain = build_descriptor(T.INV_WAIT, sw=1, status_addr=0xC00, status_data=1)
    raising = build_descriptor(T.INV_WAIT, sw=1, if_=1, status_addr=0xC00, status_data=1)
    frames.append(wire.encode_guest_data(FrameType.CMDS, 3, "v", plain))
    frames.append(wire.encode_guest_data(FrameType.CMDS, 4, "v", raising))
    out = replies(conn.receive(b"".join(frames)))
    assert [f.seq for f in out] == [1, 2, 3, 4]
    quiet, loud = out[2], out[3]
    assert quiet.type == (FrameType.CMDS_OK_WRITES if hello else FrameType.RESPONSE)
    assert loud.type == FrameType.RESPONSE
    assert loud.json() == {
        "consumed": 1,
        "errors": [],
        "syncs": 1,
        "status_writes": [{"index": 0, "addr": "0x3000", "data": "0x1"}],
        "interrupts": [0],
    }


HOST_JSON = {
    "iommus": [{"id": i.id, "model": i.model} for i in HOST.iommus],
    "devices": [{"id": d.id, "iommu": d.iommu, "sid": d.sid, "ats": d.ats} for d in HOST.devices],
}
