"""Group commit reports a host failure exactly as per-doorbell dispatch does
(docs/coalescing.md, "Host failures"): failures are injected into the emulated kernel
(``testing.inject_invalidate_error``, the kernel's own errnos and ``entry_num``) at many
points — which doorbell of a run, which of its commands, which physical IOMMU, once or
every time — and the replies of a session that takes the doorbells as one group are compared,
byte for byte, with those of a session that takes them one by one; the oracle checks that
no barrier was reported complete without its work."""

from __future__ import annotations

from typing import Any

import pytest

from bench import workloads
from protocols.smmuv3 import Opcode, build_command
from tests.models.vtd_harness import A, B, N, R, T, Vm
from tests.oracle.workload import SYNC, Rig, build, host
from tests.replies import as_json
from viommud.backend.emulator import testing
from viommud.replies import DoorbellReply
from viommud.shell.replies import doorbell_json


def _va(asid: int, page: int) -> bytes:
    return build_command(Opcode.TLBI_NH_VA, asid=asid, addr=page << 12)


def _smmu_doorbells() -> list[bytes]:
    """Six doorbells of distinct single-page TLBIs (nothing for a coalescing rule to merge,
    so each guest command is one host entry on both paths); doorbell 3 holds 70 of them, so
    the 63-entry issue groups of the run's call cross doorbell boundaries."""
    out = []
    for k in range(6):
        count = 70 if k == 3 else 3
        out.append(b"".join([*(_va(1 + j % 2, 1000 * k + 2 * j) for j in range(count)), SYNC]))
    return out


def _smmu_rig() -> Rig:
    return build(host(2, 2, False), {"v": ["smmu0", "smmu1"]}, ats=False)


def _wire(reply: Any) -> Any:
    return doorbell_json(reply) if isinstance(reply, DoorbellReply) else repr(reply)


def _smmu_answers(
    grouped: bool, doorbell: int, command: int, iommu: str, *, at: str, times: int | None
) -> tuple[list[Any], dict[str, Any], int]:
    doorbells = _smmu_doorbells()
    rig = _smmu_rig()
    target = doorbells[doorbell][16 * command : 16 * command + 16]
    fault = testing.inject_invalidate_error(rig.backend, iommu, target, at=at, times=times)  # type: ignore[arg-type]
    if grouped:
        replies = rig.session.doorbells("v", doorbells)
    else:
        replies = [rig.session.doorbell("v", data) for data in doorbells]
    return [_wire(r) for r in replies], rig.session.report(), fault.hits


_SMMU_POINTS = [
    pytest.param(d, c, iommu, "entry", times, id=f"db{d}-cmd{c}-{iommu}-entry-{times}")
    for d in (0, 2, 3, 5)
    for c in (0, 2 if d != 3 else 69)
    for iommu in ("smmu0", "smmu1")
    for times in (1, None)
] + [
    # an issue failure names the last entry of its 63-group: in the run's last doorbell
    # that is the same guest command on both paths
    pytest.param(5, c, iommu, "issue", times, id=f"db5-cmd{c}-{iommu}-issue-{times}")
    for c in (0, 2)
    for iommu in ("smmu0", "smmu1")
    for times in (1, None)
]


@pytest.mark.parametrize(("doorbell", "command", "iommu", "at", "times"), _SMMU_POINTS)
def test_smmuv3_group_commit_reports_host_failures_as_per_doorbell(
    doorbell: int, command: int, iommu: str, at: str, times: int | None
) -> None:
    alone, alone_report, alone_hits = _smmu_answers(
        False, doorbell, command, iommu, at=at, times=times
    )
    grouped, grouped_report, grouped_hits = _smmu_answers(
        True, doorbell, command, iommu, at=at, times=times
    )
    assert alone_hits >= 1
    assert grouped_hits >= 1
    assert grouped == alone
    failed = [e for a in alone for e in a["errors"]]
    assert failed
    assert all(e["code"] == "CERROR_ILL" for e in failed)
    named = {e["index"] for e in alone[doorbell]["errors"]}
    # an entry failure names its own command; an issue failure the group's last (then, when
    # it persists, the re-sent entries before it until the failing one has been dropped)
    assert (command if at == "entry" else 2) in named
    for key in ("commands", "errors", "barriers"):
        assert grouped_report[key] == alone_report[key], key
    assert grouped_report["verify"]["missed"] == 0
    assert alone_report["verify"]["missed"] == 0


def test_per_doorbell_failed_merged_range_resends_the_commands_it_stood_for() -> None:
    """Two touching range TLBIs of one doorbell become one RIL entry (merge_ranges): when
    the host refuses it, the first command gets CERROR_ILL and the second is re-sent as the
    guest wrote it, so the doorbell's CMD_SYNC does not complete without its work."""
    rig = _smmu_rig()
    first, second = workloads.tlbi_range(1, 0, 4)[0], workloads.tlbi_range(1, 4, 4)[0]
    fault = testing.inject_invalidate_error(
        rig.backend, "smmu0", lambda e: e not in (first, second)
    )
    rig.session.drain_calls()
    answer = as_json(rig.session.doorbell("v", first + second + SYNC))
    assert fault.hits == 1
    assert [(e["index"], e["code"]) for e in answer["errors"]] == [(0, "CERROR_ILL")]
    sent = [c for c in rig.session.drain_calls() if c["iommu"] == "smmu0"]
    assert [c["errno"] for c in sent] == [5, 0]
    assert sent[0]["entries"] not in ([first.hex(), second.hex()], [second.hex(), first.hex()])
    assert sent[1]["entries"] == [second.hex()]
    assert rig.session.report()["verify"]["missed"] == 0


# -- VT-d ---------------------------------------------------------------------------------
def _vtd_vm() -> Vm:
    """A, B on one HWPT of domain 1 and N on another (dmar0); R has domain 2 on dmar1: each a
    first-stage RID_PASID entry in scalable mode (legacy entries are never nested)."""
    vm = Vm(dw=256, verify=True)
    vm.attach(A, B, N, R)
    for sid, did, table in ((A, 1, 0x1000000), (B, 1, 0x1000000), (N, 1, 0x2000000)):
        vm.bind_first_stage(sid, did, table)
    vm.bind_first_stage(R, 2, 0x3000000)
    return vm


def _vtd_doorbells(vm: Vm) -> list[bytes]:
    """Six doorbells of page invalidations far apart (nothing for the coalescer to merge):
    domain 1's IOTLB and A's device TLB, domain 2's IOTLB, a wait with a status write."""
    return [
        b"".join(
            (
                vm.d(T.IOTLB_INV, g=3, did=1, addr=0x40000 + 16 * k, ih=1),
                vm.d(T.DEV_TLB_INV, sid=A, addr=0x40000 + 16 * k),
                vm.d(T.IOTLB_INV, g=3, did=2, addr=0x50000 + 16 * k, ih=1),
                vm.wait(),
            )
        )
        for k in range(6)
    ]


def _vtd_answers(
    grouped: bool, page: int, iommu: str, times: int | None
) -> tuple[list[Any], dict[str, Any], int]:
    vm = _vtd_vm()
    doorbells = _vtd_doorbells(vm)
    fault = testing.inject_invalidate_error(
        vm.backend, iommu, lambda e: e[:8] == (page << 12).to_bytes(8, "little"), times=times
    )
    if grouped:
        replies = vm.session.doorbells("v", doorbells)
    else:
        replies = [vm.session.doorbell("v", data) for data in doorbells]
    return [_wire(r) for r in replies], vm.report(), fault.hits


_VTD_POINTS = [
    pytest.param(k, base, iommu, times, id=f"db{k}-{iommu}-{times}")
    for k in (0, 3, 5)
    for base, iommu in ((0x40000, "dmar0"), (0x50000, "dmar1"))
    for times in (1, 2, None)
]


@pytest.mark.parametrize(("doorbell", "base", "iommu", "times"), _VTD_POINTS)
def test_vtd_group_commit_reports_host_failures_as_per_doorbell(
    doorbell: int, base: int, iommu: str, times: int | None
) -> None:
    page = base + 16 * doorbell
    alone, alone_report, alone_hits = _vtd_answers(False, page, iommu, times)
    grouped, grouped_report, grouped_hits = _vtd_answers(True, page, iommu, times)
    assert alone_hits >= 1
    assert grouped_hits >= 1
    assert grouped == alone
    iqe = [(k, e["index"]) for k, a in enumerate(alone) for e in a["errors"]]
    assert (doorbell, 0 if base == 0x40000 else 2) in iqe
    assert all(e["code"] == "IQE" for a in alone for e in a["errors"])
    assert all(len(a["status_writes"]) == 1 for a in grouped)  # as per doorbell: waits complete
    for key in ("commands", "errors", "barriers"):
        assert grouped_report[key] == alone_report[key], key
    assert grouped_report["verify"]["missed"] == 0
    assert alone_report["verify"]["missed"] == 0
