"""The throughput benchmark's VT-d and virtio-iommu workloads and its transport pieces.

The workloads must be what Linux sends and what the daemon takes without a single error;
the echo server must answer as the daemon answers a clean frame (same kind, same size).
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest

from protocols.frames import FrameType
from protocols.virtio_iommu import RequestType, parse_request
from protocols.vtd import DescType, parse_descriptor
from tests.replies import as_json
from viommud import wire
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.session import Session
from viommud.trace import Cmds, Request, parse_record

# Loaded by name, not imported: the workloads import fixtures/generate_*.py as
# ``fixtures.generate_*``, and mypy, which checks fixtures/ as top-level modules, must not
# follow them there (tests/models/test_vtd_replay.py loads the generators the same way).
throughput: Any = importlib.import_module("bench.throughput")
transport: Any = importlib.import_module("bench.transport")
workloads_virtio: Any = importlib.import_module("bench.workloads_virtio")
workloads_vtd: Any = importlib.import_module("bench.workloads_vtd")
ECHO_REQUEST = transport.ECHO_REQUEST
command_sizes = transport.command_sizes
commands_in = transport.commands_in
failed = transport.failed
frames = transport.frames
vtd_reply = transport._vtd_reply
GUEST = workloads_vtd.GUEST


def replay(records: list[dict[str, Any]]) -> tuple[Session, list[Any]]:
    """Every record through a session in process; the responses of the records."""
    session = Session(EmulatedIommufd(HostConfig.from_json(records[0]["host"])), verify=True)
    out = [
        as_json(session.handle(parse_record(line, obj)))
        for line, obj in enumerate(records[1:], start=2)
    ]
    return session, out


def descriptors(data: str, width: int) -> list[dict[str, int]]:
    raw = bytes.fromhex(data)
    return [parse_descriptor(raw[i : i + width]) for i in range(0, len(raw), width)]


@pytest.mark.parametrize("scalable", [True, False])
def test_vtd_strict_ats_replays_clean(scalable: bool) -> None:
    records, first = workloads_vtd.strict_ats(600, scalable=scalable)
    session, responses = replay(records)
    report = session.report()
    assert report["errors"]["total"] == 0
    assert report["config_errors"] == 0
    for response in responses:
        assert response.get("ok", True), response
    if not scalable:
        # Legacy second-level tables are never nested (docs/vtd.md, "Legacy mode"): every
        # device is blocked and nothing is forwarded, which the oracle agrees is sound.
        assert "IOMMU_HWPT_INVALIDATE" not in report["backend"]["calls"]
        assert report["verify"]["missed"] == 0
        session.close()
        return
    assert report["verify"]["missed"] == 0
    # device TLBs of a domain flushed in the same doorbell cost nothing (docs/vtd.md)
    kinds = report["commands"]["by_kind"]
    assert report["backend"]["invalidation_entries"] < kinds["vtd:dev_tlb_inv"] + (
        kinds.get("vtd:p_iotlb_inv", 0) + kinds.get("vtd:iotlb_inv", 0)
    )
    assert all(r["op"] == "cmds" for r in records[first:])
    session.close()


def test_vtd_unmap_shape_is_linux_strict() -> None:
    records, first = workloads_vtd.strict_ats(300)
    ats = {
        d.did: [GUEST[x] for x in d.devices if workloads_vtd.ATS[x]] for d in workloads_vtd.DOMAINS
    }
    for record in records[first:]:
        descs = descriptors(record["data"], 32)
        iotlb, *devtlb, wait = descs
        assert iotlb["type"] == DescType.P_IOTLB_INV
        assert (iotlb["g"], iotlb["pasid"]) == (3, 0)
        assert [d["sid"] for d in devtlb] == ats[iotlb["did"]]
        assert all(d["type"] == DescType.DEV_TLB_INV for d in devtlb)
        assert wait["type"] == DescType.INV_WAIT
        assert (wait["sw"], wait["status_data"]) == (1, workloads_vtd.QI_DONE)
        # the status dword of the wait's own slot in Linux's 256-entry queue
        slot = ((wait["status_addr"] << 2) - workloads_vtd.STATUS_BASE) // 4
        assert 0 <= slot < workloads_vtd.QI_LENGTH


@pytest.mark.parametrize(
    ("iova_page", "pages", "expected"),
    [
        (0x100, 1, (0x100, 0)),
        (0x100, 2, (0x100, 1)),
        (0x101, 2, (0x100, 2)),
        (0x1F0, 16, (0x1F0, 4)),
    ],
)
def test_psi_range_covers_aligned(iova_page: int, pages: int, expected: tuple[int, int]) -> None:
    assert workloads_vtd.psi_range(iova_page << 12, pages) == expected


def test_dev_tlb_size_encoding() -> None:
    assert workloads_vtd.dev_tlb_addr(0x100, 0) == (0x100, 0)
    # two pages: S=1, address bit 12 clear (bits below the size set, none here)
    assert workloads_vtd.dev_tlb_addr(0x100, 1) == (0x100, 1)
    # 16 pages from 0x1f0: the low 3 page bits set (PCIe ATS: 2^(k+1) pages for k ones)
    assert workloads_vtd.dev_tlb_addr(0x1F0, 4) == (0x1F7, 1)


def test_virtio_map_unmap_replays_clean() -> None:
    records, first = workloads_virtio.map_unmap(3000)
    assert len(records) - first == 3000
    session, responses = replay(records)
    assert session.report()["errors"]["total"] == 0
    kinds = set()
    for obj, response in zip(records[1:], responses, strict=True):
        if obj["op"] == "request":
            assert response["status"] == "OK", response
        else:
            assert response["ok"], response
    for obj in records[first:]:
        fields = parse_request(bytes.fromhex(obj["data"]))
        kinds.add(fields["type"])
    assert kinds == {RequestType.MAP, RequestType.UNMAP}
    session.close()


def test_frames_split_at_timed_from() -> None:
    records, first = workloads_virtio.map_unmap(50)
    host, setup, timed = frames(records, first)
    assert host == records[0]["host"]
    assert len(setup) == first - 1
    assert len(timed) == 50
    for frame in timed:
        decoded = wire.FrameDecoder()
        decoded.receive_data(frame)
        got = decoded.next_frame()
        assert got is not None
        assert got.type == FrameType.REQUEST
    assert commands_in(timed, command_sizes(records)["p"]) == 50
    records, first = workloads_vtd.strict_ats(20)
    _, setup, timed = frames(records, first)
    assert len(timed) == 20
    sizes = command_sizes(records)
    assert sizes == {"v": 32}
    expected = sum(len(r["data"]) // 64 for r in records[first:])
    assert commands_in(timed, 32) == expected


def test_echo_answers_as_the_daemon_does() -> None:
    """The echo's replies are the daemon's, byte for byte, for clean VT-d doorbells and
    virtio-iommu requests: the ceiling moves the same bytes."""
    records, first = workloads_vtd.strict_ats(50)
    session = Session(EmulatedIommufd(HostConfig.from_json(records[0]["host"])))
    for line, obj in enumerate(records[1:], start=2):
        record = parse_record(line, obj)
        response = as_json(session.handle(record))
        if line - 1 >= first:
            assert isinstance(record, Cmds)
            echo = vtd_reply(7, record.data, 32, False)
            assert echo == wire.encode_json(FrameType.RESPONSE, 7, response)
            compact = wire.Frame(
                FrameType.CMDS_OK_WRITES, 7, vtd_reply(7, record.data, 32, True)[12:]
            )
            assert compact.response() == response
    session.close()
    records, first = workloads_virtio.map_unmap(50)
    session = Session(EmulatedIommufd(HostConfig.from_json(records[0]["host"])))
    for line, obj in enumerate(records[1:], start=2):
        record = parse_record(line, obj)
        response = as_json(session.handle(record))
        if line - 1 >= first:
            assert isinstance(record, Request)
            assert json.loads(ECHO_REQUEST) == response
    session.close()


def test_failed_replies_are_counted() -> None:
    def frame(kind: int, body: object) -> wire.Frame:
        return wire.Frame(kind, 1, json.dumps(body, separators=(",", ":")).encode())

    assert failed(frame(FrameType.ERROR, {"error": "no", "fatal": False}))
    assert failed(frame(FrameType.RESPONSE, {"consumed": 2, "errors": [{"index": 0}], "syncs": 1}))
    assert failed(frame(FrameType.RESPONSE, {"status": "INVAL", "reply": "", "used": 4}))
    assert failed(frame(FrameType.RESPONSE, {"ok": False, "error": "no"}))
    assert not failed(frame(FrameType.RESPONSE, {"consumed": 2, "errors": [], "syncs": 1}))
    assert not failed(frame(FrameType.RESPONSE, {"status": "OK", "reply": "00", "used": 4}))
    assert not failed(frame(FrameType.RESPONSE, {"ok": True}))
    assert not failed(wire.Frame(FrameType.CMDS_OK, 1, bytes(8)))
    # spaces in the JSON: the slow path decides
    assert not failed(wire.Frame(FrameType.RESPONSE, 1, b'{"status": "OK"}'))
    assert failed(wire.Frame(FrameType.RESPONSE, 1, b'{"status": "NOENT"}'))


@pytest.mark.slow
def test_throughput_reports_a_dirty_stream() -> None:
    """A guest error in the timed stream (an unknown VT-d descriptor type: IQE) and a
    doorbell for a vIOMMU that does not exist (ERROR frame) are problems, not figures."""
    records, first = workloads_vtd.strict_ats(200)
    bad = dict(records[-1])
    bad["data"] = "00" * 32 + bad["data"]  # descriptor type 0 first
    records.append(bad)
    records.append({"op": "cmds", "viommu": "nobody", "data": bad["data"]})
    workload = throughput._from_records("dirty", "dirty", records, first)
    row, problems = throughput.run_workload(workload, ["per-doorbell"], 10**9)
    figures = row["modes"]["per-doorbell"]
    assert figures["errors"] == 2
    assert figures["daemon_errors"] == {"IQE": 1}
    assert any("failed replies" in p for p in problems)
    assert any("STATS reports errors" in p for p in problems)
    assert any("counted" in p for p in problems)  # the refused doorbell was not counted
