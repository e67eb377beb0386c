"""Replays the bundled VT-d traces through a daemon's socket: the real Linux 6.1 guest and the
hand-made ones (fixtures/generate_vtd.py); asserts report, responses and call log."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
from pathlib import Path
from typing import Any

from protocols.vtd import parse_descriptor
from tests.conftest import FIXTURES, Daemon
from viommud.shell.replay import ReplayResult, replay

REAL_VTD = FIXTURES / "vtd-linux61-strict-ats-excerpt.jsonl.xz"
GENERATOR = FIXTURES / "generate_vtd.py"
U64_MAX = (1 << 64) - 1


async def run(daemon: Daemon, trace: Path) -> tuple[ReplayResult, list[Any], list[Any]]:
    responses, calls = io.StringIO(), io.StringIO()
    result = await replay(trace, daemon.socket, responses=responses, calls=calls)
    assert result.exit_code == 0, result.error
    return (
        result,
        [json.loads(x) for x in responses.getvalue().splitlines()],
        [json.loads(x) for x in calls.getvalue().splitlines()],
    )


def invalidations(calls: list[Any]) -> list[Any]:
    return [c for c in calls if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"]


def unpack(hex_entry: str) -> tuple[int, int, int, int]:
    addr, npages, flags, reserved = struct.unpack("<QQII", bytes.fromhex(hex_entry))
    return addr, npages, flags, reserved


def records(trace: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trace.read_text().splitlines()[1:]]


def commented(trace: Path) -> dict[str, int]:
    """Trace line number of each record, by the start of its comment."""
    return {r["comment"]: line for line, r in enumerate(records(trace), start=2) if "comment" in r}


async def test_real_linux_trace(daemon: Daemon) -> None:
    result, responses, calls = await run(daemon, REAL_VTD)
    report = result.report
    assert report is not None
    assert report["trace"] == "vtd-linux61-strict-ats-excerpt"
    assert report["records"] == 4099
    kinds = report["commands"]["by_kind"]
    assert kinds == {
        "vtd:cc_inv": 12,
        "vtd:dev_tlb_inv": 1324,
        "vtd:iec_inv": 56,
        "vtd:inv_wait": 4076,
        "vtd:iotlb_inv": 2684,
    }
    assert report["commands"]["total"] == 8152
    assert report["errors"] == {"total": 0, "by_code": {}}
    assert report["config_errors"] == 0
    assert report["barriers"] == 4076
    # Legacy mode: every context entry names a second-level table, which is never nested.
    # Each device is blocked (detached) at its context-cache invalidation, no guest table
    # reaches the host, and no invalidation has a nested HWPT to reach.
    backend_calls = report["backend"]["calls"]
    assert "IOMMU_HWPT_INVALIDATE" not in backend_calls
    assert report["backend"]["invalidation_entries"] == 0
    assert report["baseline"]["invalidate_calls"] == 0
    assert backend_calls["IOMMU_HWPT_ALLOC"] == 1  # the nesting parent only
    assert backend_calls["VFIO_DEVICE_DETACH_IOMMUFD_PT"] == 11  # every device blocked
    allocs = [c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC"]
    assert [c["args"]["data_type"] for c in allocs] == [0]
    # Responses: one line per record; every doorbell's wait wrote QI_DONE to its slot.
    assert [r["record"] for r in responses] == list(range(2, 4101))
    doorbells = [r for r in responses if "consumed" in r]
    assert len(doorbells) == 4076
    assert all(r["errors"] == [] and r["syncs"] == 1 for r in doorbells)
    assert all(len(r["status_writes"]) == 1 for r in doorbells)
    assert {w["data"] for r in doorbells for w in r["status_writes"]} == {"0x2"}
    assert all(r["status_writes"][0]["index"] == 1 for r in doorbells)
    assert invalidations(calls) == []
    assert all(c["errno"] == 0 for c in calls)
    barriers = [c["barrier"] for c in calls]
    assert barriers == sorted(barriers)


async def test_every_descriptor(daemon: Daemon) -> None:
    trace = FIXTURES / "vtd-every-descriptor.jsonl"
    result, responses, calls = await run(daemon, trace)
    report = result.report
    assert report is not None
    assert report["errors"]["total"] == 0
    assert report["config_errors"] == 0
    assert set(report["commands"]["by_kind"]) == {
        "vtd:cc_inv",
        "vtd:iotlb_inv",
        "vtd:dev_tlb_inv",
        "vtd:iec_inv",
        "vtd:inv_wait",
        "vtd:p_iotlb_inv",
        "vtd:pc_inv",
        "vtd:p_dev_tlb_inv",
        "vtd:pgrp_resp",
    }
    # Decoded again from the call log: the descriptors that reached the host.
    lines = commented(trace)
    answers = {r["record"]: r for r in responses}
    allocs = [c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC" and c["args"]["data_type"]]
    assert len(allocs) == 2
    assert struct.unpack("<QQII", bytes.fromhex(allocs[0]["args"]["data"])) == (
        0b100,  # WPE
        0x40000000,
        48,
        0,
    )
    inv = invalidations(calls)
    assert [len(c["entries"]) for c in inv] == [1, 1, 1, 2, 1, 1]
    assert unpack(inv[3]["entries"][1]) == (0x12344000, 4, 0, 0)
    assert report["baseline"]["invalidate_calls"] == 8
    waits = answers[
        lines[
            "interrupt-entry cache (nothing forwarded); waits with IF, FN and PD "
            "(ECAP.PDS) only: three syncs, no status write"
        ]
    ]
    assert (waits["consumed"], waits["syncs"], waits["status_writes"]) == (5, 3, [])
    elided = answers[
        lines["device-TLB invalidations covered by the whole-space flushes above: elided, no call"]
    ]
    assert elided["errors"] == []
    [backend] = daemon.backends
    assert backend.live_objects() == []


async def test_guest_errors(daemon: Daemon) -> None:
    trace = FIXTURES / "vtd-guest-errors.jsonl"
    result, responses, calls = await run(daemon, trace)
    report = result.report
    assert report is not None
    answers = {r["record"]: r for r in responses}
    bad = [
        (line, r)
        for line, r in enumerate(records(trace), start=2)
        if r.get("comment", "").startswith("index 1 IQE")
    ]
    assert len(bad) == 29
    for line, record in bad:
        answer = answers[line]
        assert [(e["index"], e["code"]) for e in answer["errors"]] == [(1, "IQE")], record
        assert (answer["consumed"], answer["syncs"]) == (3, 1)
        assert [w["index"] for w in answer["status_writes"]] == [2]
    assert report["errors"] == {"total": 29, "by_code": {"IQE": 29}}
    # The good descriptor before each bad one was carried out: on the 256-bit vIOMMU it
    # reached R's HWPT (8 rules + the page group response); the 128-bit one is in legacy
    # mode, where A is blocked and nothing is nested, so its 21 reach no HWPT.
    inv = invalidations(calls)
    assert len(inv) == report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] == 8 + 1
    assert {c["iommu"] for c in inv} == {"dmar1"}
    kinds = report["commands"]["by_kind"]
    assert kinds["vtd:type_0x0c"] == kinds["vtd:type_0x0a"] == kinds["vtd:type_0x11"] == 1
    [backend] = daemon.backends
    assert backend.live_objects() == []
    assert all(c["errno"] == 0 for c in calls)


async def test_shared_domain(daemon: Daemon) -> None:
    trace = FIXTURES / "vtd-shared-domain.jsonl"
    result, responses, calls = await run(daemon, trace)
    report = result.report
    assert report is not None
    assert report["errors"]["total"] == 0
    assert report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] == 8
    assert report["baseline"]["invalidate_calls"] == 15
    inv = invalidations(calls)
    by_barrier: dict[int, list[Any]] = {}
    for c in inv:
        by_barrier.setdefault(c["barrier"], []).append(c)
    # barrier 2: the 6.12 batch, one call per HWPT (dmar0 shared, dmar1 own).
    assert [(c["iommu"], len(c["entries"])) for c in by_barrier[2]] == [
        ("dmar0", 1),
        ("dmar1", 1),
    ]
    assert 4 not in by_barrier  # the 6.1-shape device TLB: elided
    assert [unpack(e) for c in by_barrier[5] for e in c["entries"]] == [(0x10000000, 4, 1, 0)]
    assert [c["object"]["id"] for c in by_barrier[8]] != [by_barrier[2][0]["object"]["id"]]
    [backend] = daemon.backends
    assert backend.live_objects() == []
    assert len([r for r in responses if r.get("ok") is False]) == 0


async def test_legacy_domain(daemon: Daemon) -> None:
    trace = FIXTURES / "vtd-legacy-domain.jsonl"
    result, _responses, calls = await run(daemon, trace)
    report = result.report
    assert report is not None
    assert report["errors"]["total"] == 0
    # A and B (TT=1) are blocked, C (TT=2) stays on the nesting parent: no nested HWPT,
    # nothing to invalidate, no guest table handed to the host.
    assert "IOMMU_HWPT_INVALIDATE" not in report["backend"]["calls"]
    assert report["baseline"]["invalidate_calls"] == 0
    allocs = [c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC"]
    assert [c["args"]["data_type"] for c in allocs] == [0]  # the nesting parent
    detaches = [c["args"]["dev_id"] for c in calls if c["ioctl"] == "VFIO_DEVICE_DETACH_IOMMUFD_PT"]
    assert len(detaches) == 3  # A and B when blocked, C at viommu_destroy
    [backend] = daemon.backends
    assert backend.live_objects() == []


def test_the_descriptors_of_the_real_trace_decode() -> None:
    """A sample of the real trace through the construct declarations: no unknown type."""
    import lzma

    with lzma.open(REAL_VTD, "rt") as handle:
        lines = [json.loads(x) for _, x in zip(range(400), handle, strict=False)][1:]
    for record in lines:
        if record["op"] == "cmds":
            data = bytes.fromhex(record["data"])
            for offset in range(0, len(data), 16):
                assert parse_descriptor(data[offset : offset + 16])["type"] in range(1, 10)


def test_fixtures_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("fixtures_generate_vtd", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python fixtures/generate_vtd.py"


DERIVED_VTD = FIXTURES / "vtd-linux61-strict-ats-scalable-derived.jsonl.xz"
DERIVER = FIXTURES / "derive_vtd_scalable.py"


async def test_scalable_first_stage_derived_trace(daemon: Daemon) -> None:
    """The real guest's work in scalable mode (fixtures/derive_vtd_scalable.py): first-stage
    RID_PASID entries are nested, P_IOTLB reaches them, device TLBs are elided."""
    result, responses, calls = await run(daemon, DERIVED_VTD)
    report = result.report
    assert report is not None
    assert report["trace"] == "vtd-linux61-strict-ats-scalable-derived"
    kinds = report["commands"]["by_kind"]
    assert kinds == {
        "vtd:cc_inv": 12,
        "vtd:dev_tlb_inv": 1324,
        "vtd:iec_inv": 56,
        "vtd:inv_wait": 4098,
        "vtd:iotlb_inv": 12,  # boot global + one domain-selective per context mapping
        "vtd:p_iotlb_inv": 2683,  # 2,672 unmaps + 11 PASID setups
        "vtd:pc_inv": 11,
    }
    assert report["errors"] == {"total": 0, "by_code": {}}
    assert report["barriers"] == 4098
    backend = report["backend"]["calls"]
    assert backend["IOMMU_HWPT_ALLOC"] == 12  # nesting parent + 11 first-stage HWPTs
    assert backend["IOMMU_HWPT_INVALIDATE"] == report["baseline"]["invalidate_calls"] == 2689
    allocs = [c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC" and c["args"]["data_type"]]
    assert len(allocs) == 11
    for alloc in allocs:  # no SRE / EAFE / WPE, 4-level: what the host accepts at attach
        flags, _table, width, reserved = unpack(alloc["args"]["data"])
        assert (flags, width, reserved) == (0, 48, 0)
    inv = invalidations(calls)
    assert all(c["errno"] == 0 and c["object"]["kind"] == "hwpt" for c in inv)
    for c in inv:  # IOTLB-class entries only: every device-TLB invalidation was elided
        for e in c["entries"]:
            addr, npages, flags, _ = unpack(e)
            assert flags == 0
            assert (addr, npages) == (0, U64_MAX) or (addr % 4096 == 0 and npages in (1, 2))
    doorbells = [r for r in responses if "consumed" in r]
    assert all(r["errors"] == [] and r["syncs"] == 1 for r in doorbells)


def test_derived_fixture_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("fixtures_derive_vtd_scalable", DERIVER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python fixtures/derive_vtd_scalable.py"
