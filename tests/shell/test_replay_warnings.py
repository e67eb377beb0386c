"""Empty is never clean: a replay in which the guest invalidated and nothing reached the host
carries ``warnings`` saying why (docs/trace-format.md §3.6)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from protocols.vtd import build_context_entry, build_pasid_entry, build_scalable_context_entry
from tests.conftest import FIXTURES
from viommud.importers import write_trace
from viommud.shell.cli import main

HOST = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}, {"id": "dmar0", "model": "intel-vtd"}],
    "devices": [
        {"id": "0000:01:00.0", "iommu": "smmu0", "sid": 8},
        {"id": "0000:02:00.0", "iommu": "dmar0", "sid": 0x200},
    ],
}
SYNC = struct.pack("<QQ", 0x46, 0)
TLBI_ASID = struct.pack("<QQ", 0x11 | 1 << 48, 0)
CFGI_STE = struct.pack("<QQ", 0x03 | 8 << 32, 1)
STAGE1_STE = struct.pack("<8Q", 0xB | 0x40000000, 0xD6, 0, 0, 0, 0, 0, 0)
BYPASS_STE = struct.pack("<8Q", 0x9, 0, 0, 0, 0, 0, 0, 0)
WAIT = struct.pack("<QQ", 0x2000_0002_5, 0x1000)


def iotlb_dsi(did: int) -> bytes:
    return struct.pack("<QQ", 0x2 | 2 << 4 | 3 << 6 | did << 16, 0)


def cc_device(sid: int, did: int) -> bytes:
    return struct.pack("<QQ", 0x1 | 3 << 4 | did << 16 | sid << 32, 0)


def smmu(*records: dict[str, Any], attach: str | None = "0000:01:00.0") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"op": "viommu_create", "viommu": "s", "model": "smmuv3", "iommus": ["smmu0"]}
    ]
    if attach:
        out.append({"op": "device_attach", "viommu": "s", "vid": 8, "device": attach})
    return [*out, *records]


def cmds(viommu: str, *entries: bytes) -> dict[str, Any]:
    return {"op": "cmds", "viommu": viommu, "data": b"".join(entries).hex()}


def vtd(*records: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"op": "viommu_create", "viommu": "v", "model": "vtd", "iommus": ["dmar0"]},
        {"op": "device_attach", "viommu": "v", "vid": 0x200, "device": "0000:02:00.0"},
        *records,
    ]


def context(did: int) -> dict[str, Any]:
    data = build_context_entry(p=1, tt=0, aw=2, did=did, slptptr=0x20000)
    return {"op": "context_entry", "viommu": "v", "sid": 0x200, "data": data.hex()}


def scalable(did: int) -> list[dict[str, Any]]:
    """A 256-bit vIOMMU whose device has a first-stage RID_PASID entry of domain ``did``."""
    ctx = build_scalable_context_entry(p=1, pasiddirptr=0x30000, rid_pasid=0)
    pasid = build_pasid_entry(p=1, pgtt=1, aw=2, did=did, flptptr=0x20000)
    return [
        {"op": "viommu_create", "viommu": "v", "model": "vtd", "iommus": ["dmar0"],
         "options": {"dw": 256}},
        {"op": "device_attach", "viommu": "v", "vid": 0x200, "device": "0000:02:00.0"},
        {"op": "context_entry", "viommu": "v", "sid": 0x200, "data": ctx.hex()},
        {"op": "pasid_entry", "viommu": "v", "sid": 0x200, "pasid": 0, "data": pasid.hex()},
    ]  # fmt: skip


def wide(*descriptors: bytes) -> bytes:
    """128-bit descriptors as 256-bit ones (upper half zero)."""
    return b"".join(d + bytes(16) for d in descriptors)


def ste(data: bytes) -> dict[str, Any]:
    return {"op": "ste", "viommu": "s", "vsid": 8, "data": data.hex()}


VIRTIO: list[dict[str, Any]] = [
    {"op": "viommu_create", "viommu": "i", "model": "virtio-iommu", "iommus": [],
     "options": {"emulated_endpoints": [8]}},
    {"op": "request", "viommu": "i", "data": struct.pack("<BxxxIII4x", 1, 1, 8, 0).hex()},
    {"op": "request", "viommu": "i",
     "data": struct.pack("<BxxxIQQQI", 3, 1, 0x1000, 0x1FFF, 0x80000, 3).hex()},
]  # fmt: skip

CASES: dict[str, tuple[list[dict[str, Any]], str | None]] = {
    "no device attached": (
        smmu(cmds("s", TLBI_ASID, SYNC), attach=None),
        "no device attached (the trace has no device_attach record)",
    ),
    "only emulated endpoints": (VIRTIO, "only emulated endpoints, no host device attached"),
    "no device bound": (
        smmu(cmds("s", TLBI_ASID, SYNC), attach="0000:99:00.0"),
        "no device bound (1 device_attach records, 1 config errors)",
    ),
    "no STE": (
        smmu(cmds("s", CFGI_STE, SYNC), cmds("s", TLBI_ASID, SYNC)),
        "no stage-1 configuration: the trace writes no STE",
    ),
    "no context entry": (
        vtd(cmds("v", cc_device(0x200, 1), WAIT), cmds("v", iotlb_dsi(1), WAIT)),
        "no stage-1 configuration: the trace writes no context entry",
    ),
    "every device in bypass": (
        smmu(ste(BYPASS_STE), cmds("s", CFGI_STE, SYNC), cmds("s", TLBI_ASID, SYNC)),
        "every device is in bypass, pass-through or blocked (its last STE, context or PASID "
        "entry does not translate)",
    ),
    "legacy tables": (
        vtd(context(1), cmds("v", cc_device(0x200, 1), WAIT), cmds("v", iotlb_dsi(1), WAIT)),
        "every translating device uses legacy-mode or second-stage (PGTT=2/3) tables, which "
        "viommud never nests as stage 1: those devices are blocked (docs/vtd.md, Legacy mode)",
    ),
    "no invalidation names a bound device": (
        [
            *scalable(1),
            cmds("v", wide(cc_device(0x200, 1), WAIT)),
            cmds("v", wide(iotlb_dsi(2), WAIT)),
        ],
        "no invalidation named a device bound to a stage-1 configuration (check the DIDs, "
        "ASIDs, StreamIDs and domains)",
    ),
    "stage 1 reaches the host": (
        smmu(ste(STAGE1_STE), cmds("s", CFGI_STE, SYNC), cmds("s", TLBI_ASID, SYNC)),
        None,
    ),
    "nothing invalidated": (smmu(ste(BYPASS_STE), cmds("s", CFGI_STE, SYNC)), None),
}


def replay(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    assert main(["replay", str(path), *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in args else out


@pytest.mark.parametrize("case", list(CASES))
def test_warning_reason(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records, reason = CASES[case]
    path = tmp_path / "t.jsonl"
    write_trace(path, {"format": "viommud-trace", "version": 1, "name": case, "host": HOST},
                records)  # fmt: skip
    report = replay(path, capsys, "--json")
    if reason is None:
        assert "warnings" not in report
        assert "warning" not in replay(path, capsys)
        return
    [warning] = report["warnings"]
    assert warning.startswith("the guest invalidated ")
    assert warning.endswith(reason)
    table = replay(path, capsys)
    assert f"warning               {warning}" in table.splitlines()


@pytest.mark.parametrize(("tlbis", "said"), [(1, "once"), (2, "2 times"), (3, "3 times")])
def test_warning_counts_invalidations(
    tlbis: int, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    records = smmu(*(cmds("s", TLBI_ASID, SYNC) for _ in range(tlbis)), attach=None)
    write_trace(path, {"format": "viommud-trace", "version": 1, "host": HOST}, records)
    [warning] = replay(path, capsys, "--json")["warnings"]
    assert warning.startswith(f"the guest invalidated {said} and no invalidation reached")


_LEGACY = (
    "every translating device uses legacy-mode or second-stage (PGTT=2/3) tables, which viommud "
    "never nests as stage 1: those devices are blocked (docs/vtd.md, Legacy mode)"
)
JUSTIFIED = {
    # conformance traces of the device model alone: no host device on purpose
    "virtio-qemu-qtest.jsonl": "only emulated endpoints, no host device attached",
    "virtio-spec-cases.jsonl": "only emulated endpoints, no host device attached",
    # legacy-mode VT-d guests: their devices are blocked (docs/vtd.md "Legacy mode")
    "vtd-legacy-domain.jsonl": _LEGACY,
    "vtd-linux61-strict-ats-excerpt.jsonl.xz": _LEGACY,
}


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.jsonl*")))
def test_bundled_fixtures_carry_no_unjustified_warning(
    fixture: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = replay(FIXTURES / fixture, capsys, "--json", "--no-verify")
    warnings = report.get("warnings", [])
    if fixture in JUSTIFIED:
        assert [w.split(": ", 1)[1] for w in warnings] == [JUSTIFIED[fixture]]
    else:
        assert warnings == []
