"""capture/figures.py: QEMU's own call count for a guest's work, on made-up imported traces."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from capture.figures import host_calls, qemu_calls, render


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    header = {"format": "viommud-trace", "version": 1, "name": "t", "host": {}}
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, *records]))
    return path


def _context(sid: int, did: int, tt: int = 1) -> dict[str, Any]:
    lo = 1 | tt << 2 | 0x2000_0000
    return {"op": "context_entry", "sid": sid, "data": struct.pack("<QQ", lo, did << 8 | 2).hex()}


def _pasid(sid: int, did: int, pgtt: int) -> dict[str, Any]:
    data = struct.pack("<QQ", 1 | pgtt << 6, did) + bytes(48)
    return {"op": "pasid_entry", "sid": sid, "pasid": 0, "data": data.hex()}


def _iotlb(granularity: int, did: int, width: int = 16) -> bytes:
    return struct.pack("<Q", 2 | granularity << 4 | did << 16) + bytes(width - 8)


def _cmds(*descriptors: bytes) -> dict[str, Any]:
    return {"op": "cmds", "data": b"".join(descriptors).hex()}


def test_vtd_counts_one_walk_per_iotlb_descriptor_per_translating_device(tmp_path: Path) -> None:
    device_tlb = struct.pack("<QQ", 3, 0)
    trace = _write(
        tmp_path / "t.jsonl",
        [
            {"op": "viommu_create", "options": {"dw": 128}},
            _context(0x100, 6),
            _context(0x200, 7),
            _context(0x300, 7),
            _context(0x400, 7, tt=2),  # pass-through: QEMU walks nothing for it
            _cmds(_iotlb(3, 7), device_tlb),  # page-selective, DID 7: two devices
            _cmds(_iotlb(2, 6)),  # domain-selective, DID 6: one
            _cmds(_iotlb(1, 0)),  # global: the three translating devices
            _cmds(_iotlb(3, 9)),  # a domain no device uses
        ],
    )
    assert qemu_calls("vtd", trace, {}) == 2 + 1 + 3 + 0


def test_vtd_scalable_reads_the_pasid_entries(tmp_path: Path) -> None:
    trace = _write(
        tmp_path / "t.jsonl",
        [
            {"op": "viommu_create", "options": {"dw": 256}},
            _pasid(0x100, 6, pgtt=2),
            _pasid(0x200, 6, pgtt=4),  # pass-through
            _cmds(_iotlb(3, 6, 32), _iotlb(3, 6, 32)),
            _pasid(0x200, 6, pgtt=2),
            _cmds(_iotlb(3, 6, 32)),
        ],
    )
    assert qemu_calls("vtd", trace, {}) == 1 + 1 + 2


def test_virtio_counts_each_map_and_unmap_per_endpoint_of_the_domain(tmp_path: Path) -> None:
    def request(kind: int, domain: int, endpoint: int = 0) -> dict[str, Any]:
        return {"op": "request", "data": struct.pack("<B3xII12x", kind, domain, endpoint).hex()}

    trace = _write(
        tmp_path / "t.jsonl",
        [
            request(1, 1, 8),
            request(1, 1, 16),
            request(1, 2, 24),
            request(3, 1),  # MAP in domain 1: two endpoints
            request(4, 2),  # UNMAP in domain 2: one
            request(2, 1, 16),  # DETACH
            request(4, 1),  # one left
            request(5, 0, 8),  # PROBE: nothing
        ],
    )
    assert qemu_calls("virtio-iommu", trace, {}) == 2 + 1 + 1


def test_smmuv3_counts_invalidation_commands_only(tmp_path: Path) -> None:
    kinds = {
        "smmuv3:CMD_TLBI_NH_VA": 5,
        "smmuv3:CMD_TLBI_NSNH_ALL": 1,
        "smmuv3:CMD_ATC_INV": 2,
        "smmuv3:CMD_CFGI_CD": 3,
        "smmuv3:CMD_CFGI_STE": 4,
        "smmuv3:CMD_SYNC": 9,
    }
    report = {"commands": {"by_kind": kinds}}
    assert qemu_calls("smmuv3", tmp_path / "unused", report) == 5 + 1 + 2 + 3


def test_host_calls_and_render() -> None:
    calls = {"IOMMU_HWPT_INVALIDATE": 4, "IOMMU_IOAS_MAP": 2, "IOMMU_IOAS_UNMAP": 1}
    report = {"backend": {"calls": calls}}
    assert host_calls("smmuv3", report) == 4
    assert host_calls("virtio-iommu", report) == 3
    row = {
        "capture": "x",
        "kernel": "6.1",
        "boot_s": 1.0,
        "commands": 1234,
        "host_calls": 4,
        "qemu_calls": 5,
        "missed": 0,
        "import_s": 0.5,
        "replay_s": 0.25,
    }
    assert render([row]).splitlines()[2] == (
        "| `x` | `6.1` | 1.0 s | 1,234 | 4 | 5 | 0 | 0.50 s | 0.25 s |"
    )
