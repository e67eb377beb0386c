"""Excerpts of real captures (QEMU 7.2.22, Debian 12; Debian 6.1 / 6.12 guests; data/),
imported with no option and replayed: every request or command replays without a guest
error, the oracle finds nothing missed, and the configuration changes the log shows are there.
Invalidations reach the host, except on VT-d: QEMU 7.2 offers legacy and second-stage tables
only, which viommud never nests (docs/vtd.md "Legacy mode"), and the report warns.

* ``qemu72-vtd-legacy-excerpt``: intel-iommu without caching mode, blk 01:00.0 and net
  02:00.0 with ATS; net switched to an identity domain and back (lines 1-200, 4340-4440 and
  18470-18640 of the capture).
* ``qemu72-vtd-scalable-excerpt``: x-scalable-mode=on, lines 1-200 and 10600-10700.
* ``qemu72-smmuv3-lazy``: the whole log of a lazy-mode SMMUv3 guest and its queue dump
  (found beside the log as ``LOG.cmdq.xz``).
* ``qemu72-smmuv3-lazy-smp2``: the same with two vCPUs (``python -m capture.kit smmuv3-lazy
  --smp 2``): QEMU 7.2's log has one PID for every thread, and the commands come in
  producer order whichever vCPU wrote them; the dump agrees with every traced opcode.
* ``qemu72-virtio-iommu-excerpt``: virtio-iommu, a 6.12 guest; lines 1-140 and 4100-4200,
  with net 00:03.0 moved to an identity (bypass) domain and back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from viommud.shell.cli import main

DATA = Path(__file__).resolve().parent / "data"


def run(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[
    dict[str, Any], list[dict[str, Any]], dict[str, Any]
]:  # fmt: skip
    for path in DATA.glob(f"{name}.*"):
        shutil.copy(path, tmp_path / path.name)
    out = tmp_path / "out.jsonl"
    assert main(["import", "qemu-log", str(tmp_path / f"{name}.log.xz"), "-o", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    capsys.readouterr()
    assert main(["replay", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"]["total"] == 0
    assert report["verify"]["missed"] == 0
    assert ("warnings" in report) == name.startswith("qemu72-vtd")
    return lines[0], lines[1:], report


def test_vtd_legacy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, records, report = run("qemu72-vtd-legacy-excerpt", tmp_path, capsys)
    entries = [(r["sid"], bytes.fromhex(r["data"])) for r in records if r["op"] == "context_entry"]
    # (SID, TT, DID): blk and net mapped without caching mode, then net identity and back
    assert [(sid, d[0] >> 2 & 3, d[9]) for sid, d in entries] == [
        (0x100, 1, 6),
        (0x200, 1, 7),
        (0x200, 2, 7),
        (0x200, 1, 7),
    ]
    # legacy second-level tables are never nested (docs/vtd.md "Legacy mode"): the guest's
    # IOTLB invalidations reach no host object, and the report says why
    assert report["commands"]["by_kind"]["vtd:iotlb_inv"] > 0
    assert "IOMMU_HWPT_INVALIDATE" not in report["backend"]["calls"]
    assert any("legacy-mode or second-stage" in w for w in report["warnings"])


def test_vtd_scalable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, records, report = run("qemu72-vtd-scalable-excerpt", tmp_path, capsys)
    assert records[0]["options"] == {"dw": 256}
    assert [(r["sid"], r["pasid"]) for r in records if r["op"] == "pasid_entry"] == [
        (0x100, 0),
        (0x200, 0),
    ]
    assert report["commands"]["by_kind"]["vtd:pc_inv"] == 1  # the untraced descriptor
    assert any("replayed as global PASID-cache" in n for n in header["notes"])
    # QEMU 7.2's scalable mode offers second-stage tables only: PGTT=2 entries, blocked
    pgtt = {(bytes.fromhex(r["data"])[0] >> 6) & 7 for r in records if r["op"] == "pasid_entry"}
    assert pgtt == {2}
    assert "IOMMU_HWPT_INVALIDATE" not in report["backend"]["calls"]
    assert any("legacy-mode or second-stage" in w for w in report["warnings"])


def test_smmuv3_lazy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, records, report = run("qemu72-smmuv3-lazy", tmp_path, capsys)
    assert [r["vsid"] for r in records if r["op"] == "ste"] == [8, 16]
    assert any(
        "read from" in n and n.endswith("qemu72-smmuv3-lazy.cmdq.xz") for n in header["notes"]
    )
    assert report["commands"]["by_kind"]["smmuv3:CMD_TLBI_NH_ASID"] == 44
    assert report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] == 44


def test_smmuv3_lazy_two_vcpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, records, report = run("qemu72-smmuv3-lazy-smp2", tmp_path, capsys)
    assert [r["vsid"] for r in records if r["op"] == "ste"] == [8, 16]
    assert any("the opcodes of 167 dump entries agree" in n for n in header["notes"])
    tlbi = report["commands"]["by_kind"]["smmuv3:CMD_TLBI_NH_ASID"]
    assert tlbi == report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] == 68
    assert report["baseline"]["invalidate_calls"] == tlbi + 1  # the boot-time TLBI_NSNH_ALL


def test_virtio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, records, report = run("qemu72-virtio-iommu-excerpt", tmp_path, capsys)
    assert records[0]["options"]["domain_range"] == [0, 0xFFFFFFFF]  # printed as -1
    attaches = [
        bytes.fromhex(r["data"]) for r in records if r["op"] == "request" and r["data"][:2] == "01"
    ]
    # (domain, endpoint, flags): blk, net, host bridge; net to identity (BYPASS) and back
    assert [
        (int.from_bytes(a[4:8], "little"), int.from_bytes(a[8:12], "little"), a[12])
        for a in attaches
    ] == [(0, 16, 0), (1, 24, 0), (2, 0, 0), (3, 24, 1), (1, 24, 0)]
    assert report["backend"]["calls"]["IOMMU_IOAS_MAP"] > 0
