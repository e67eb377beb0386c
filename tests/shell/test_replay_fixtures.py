"""Replays the bundled traces through a daemon's socket; asserts report, responses, calls."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from protocols.smmuv3 import Opcode, parse_command
from tests.conftest import FIXTURES, REAL_SMMUV3, Daemon
from viommud.shell.replay import ReplayResult, replay


async def run(daemon: Daemon, trace: Path) -> tuple[ReplayResult, list[Any], list[Any]]:
    responses, calls = io.StringIO(), io.StringIO()
    result = await replay(trace, daemon.socket, responses=responses, calls=calls)
    return (
        result,
        [json.loads(x) for x in responses.getvalue().splitlines()],
        [json.loads(x) for x in calls.getvalue().splitlines()],
    )


def invalidations(calls: list[Any]) -> list[Any]:
    return [c for c in calls if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"]


def by_record(responses: list[Any]) -> dict[int, Any]:
    return {r["record"]: r for r in responses}


async def test_real_linux_trace(daemon: Daemon) -> None:
    result, responses, calls = await run(daemon, REAL_SMMUV3)
    assert result.exit_code == 0, result.error
    report = result.report
    assert report is not None
    assert report["trace"] == "smmuv3-linux61-strict"
    assert report["records"] == 6244
    assert report["commands"]["total"] == 12481
    assert not [k for k in report["commands"]["by_kind"] if k.startswith("smmuv3:CMD_0x")]
    assert report["errors"] == {"total": 0, "by_code": {}}
    assert report["barriers"] == report["commands"]["by_kind"]["smmuv3:CMD_SYNC"] == 6234
    invalidate_calls = report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"]
    assert report["baseline"]["invalidate_calls"] == 6237
    # One per doorbell holding forwarded work (6,221), less the boot-time TLBI_NSNH_ALL:
    # no device had a stage-1 vSTE yet, so the physical SMMU holds nothing of this VM.
    assert invalidate_calls == 6220
    assert report["backend"]["invalidation_entries"] == 6236
    # The responses file has one line per record, in record order, all of them clean.
    assert [r["record"] for r in responses] == list(range(2, 6246))
    assert all(r.get("ok", True) and not r.get("errors") for r in responses)
    # The call log: every call, in order; no CMD_SYNC or CFGI_STE ever forwarded.
    assert [c["seq"] for c in calls] == list(range(1, len(calls) + 1))
    assert len(calls) == sum(report["backend"]["calls"].values())
    forwarded = {
        parse_command(bytes.fromhex(e))["opcode"]
        for c in invalidations(calls)
        for e in c["entries"]
    }
    assert forwarded == {Opcode.TLBI_NH_VA, Opcode.TLBI_NH_ASID}
    assert all(
        c["errno"] == 0 and c["entry_num"] == len(c["entries"])
        for c in calls
        if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"
    )
    barriers = [c["barrier"] for c in calls]
    assert barriers == sorted(barriers)
    # Three devices with three different vSTEs: three nested HWPTs plus one nest parent.
    assert report["backend"]["calls"]["IOMMU_HWPT_ALLOC"] == 4
    assert report["backend"]["calls"]["IOMMU_VDEVICE_ALLOC"] == 3


async def test_every_opcode(daemon: Daemon) -> None:
    trace = FIXTURES / "smmuv3-every-opcode.jsonl"
    result, responses, calls = await run(daemon, trace)
    assert result.exit_code == 0, result.error
    report = result.report
    assert report is not None
    assert report["errors"]["total"] == 0
    assert report["config_errors"] == 0
    kinds = report["commands"]["by_kind"]
    for name in (
        "PREFETCH_CONFIG",
        "PREFETCH_ADDR",
        "CFGI_STE",
        "CFGI_STE_RANGE",
        "CFGI_CD",
        "CFGI_CD_ALL",
        "TLBI_NH_ALL",
        "TLBI_NH_ASID",
        "TLBI_NH_VA",
        "TLBI_NH_VAA",
        "TLBI_NSNH_ALL",
        "ATC_INV",
        "SYNC",
    ):
        assert f"smmuv3:CMD_{name}" in kinds, name
    lines = trace.read_text().splitlines()
    inv = invalidations(calls)
    # CFGI_CD + CFGI_CD_ALL; six TLBIs of which TLBI_NH_ALL covers the rest; the whole-ATC
    # ATC_INV covers the PASID-scoped one, plus a TLBI_NH_ASID.
    assert [len(c["entries"]) for c in inv] == [2, 1, 2]
    assert all(
        c["object"]["kind"] == "viommu" and c["data_type"] == "VIOMMU_ARM_SMMUV3" for c in inv
    )
    # CFGI_CD with vSID 8 reaches the kernel with the guest's vSID (the kernel translates).
    cfgi_cd = parse_command(bytes.fromhex(inv[0]["entries"][0]))
    assert (cfgi_cd["opcode"], cfgi_cd["sid"]) == (Opcode.CFGI_CD, 8)
    atc = by_record(responses)[len(lines) - 1]
    assert (atc["consumed"], atc["syncs"], atc["errors"]) == (5, 2, [])
    # Hints and STE re-reads of unchanged vSTEs cost nothing.
    assert report["backend"]["calls"]["IOMMU_HWPT_ALLOC"] == 3
    assert report["baseline"]["invalidate_calls"] == 11
    assert report["backend"]["invalidation_entries"] == 5
    # viommu_destroy freed everything the session had made on the backend.
    [backend] = daemon.backends
    assert backend.live_objects() == []


async def test_guest_errors(daemon: Daemon) -> None:
    trace = FIXTURES / "smmuv3-guest-errors.jsonl"
    result, responses, _calls = await run(daemon, trace)
    assert result.exit_code == 0, result.error  # guest errors are replayed, not refused
    report = result.report
    assert report is not None
    records = [json.loads(x) for x in trace.read_text().splitlines()[1:]]
    bad = [
        (line, r) for line, r in enumerate(records, start=2) if "CERROR_ILL" in r.get("comment", "")
    ]
    assert len(bad) == 21
    answers = by_record(responses)
    for line, record in bad:
        answer = answers[line]
        assert [(e["index"], e["code"]) for e in answer["errors"]] == [(1, "CERROR_ILL")], record[
            "comment"
        ]
        assert answer["consumed"] == 3
        assert answer["syncs"] == 1  # the bad entry is skipped; the SYNC after it completes
    assert report["errors"] == {"total": 21, "by_code": {"CERROR_ILL": 21}}
    # The good command before each bad one was still forwarded: one call per doorbell.
    assert report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] == 21
    dropped = answers[len(records)]  # the vSID-99 doorbell: no device, nothing sent
    assert dropped["errors"] == []
    assert report["baseline"]["invalidate_calls"] == 21
    assert report["backend"]["errnos"] == {"EIO": 2}  # the two vSTEs the kernel refused


async def test_ste_configs_share_and_free(daemon: Daemon) -> None:
    trace = FIXTURES / "smmuv3-ste-configs.jsonl"
    result, responses, calls = await run(daemon, trace)
    assert result.exit_code == 0, result.error
    report = result.report
    assert report is not None
    assert report["errors"]["total"] == 0
    assert report["config_errors"] == 1  # detaching vSID 99, which was never attached
    failed = [r for r in responses if r.get("ok") is False]
    assert len(failed) == 1
    assert "not attached" in failed[0]["error"]
    allocs = [c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC"]
    nested = [c for c in allocs if c["args"]["data_type"] == 2]
    # vSID 8, vSID 16 (shared later by vSID 24), bypass, abort, then vSID 16 again after
    # its re-attach (its old HWPT was freed when the last user left).
    assert len(nested) == 5
    assert [c["args"]["data"][:16] for c in nested[2:4]] == ["0900000000000000", "0100000000000000"]
    destroys = [c for c in calls if c["ioctl"] == "IOMMU_DESTROY"]
    assert all(c["errno"] == 0 for c in destroys)
    [backend] = daemon.backends
    assert backend.live_objects() == []
