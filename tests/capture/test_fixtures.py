"""The committed real-guest captures (fixtures/captures/, made by ``python -m capture.kit``):
consistent with their manifests, and imported and replayed the way the kit does it, so the
importer is tested against real QEMU output without QEMU."""

from __future__ import annotations

import functools
import json
import lzma
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from capture.figures import ORDER, host_calls
from capture.kit import event_counts, import_and_replay
from tests.capture.expectations import check_booted, check_replayed, replay_marks

ROOT = Path(__file__).resolve().parents[2]
CAPTURES = ROOT / "fixtures" / "captures"
NAMES = sorted(p.parent.name for p in CAPTURES.glob("*/MANIFEST.json"))


def _manifest(name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((CAPTURES / name / "MANIFEST.json").read_text())
    return manifest


def test_every_configuration_has_a_committed_capture() -> None:
    assert NAMES == ["smmuv3-lazy", "smmuv3-strict", "virtio-iommu", "vtd-legacy", "vtd-scalable"]


@pytest.mark.parametrize("name", NAMES)
def test_capture_matches_its_manifest(name: str, tmp_path: Path) -> None:
    manifest = _manifest(name)
    assert manifest["config"] == name
    assert manifest["qemu"]["version"].startswith("7.2")
    assert manifest["kernel"]["release"] in manifest["markers"][0]
    check_booted(manifest)
    trace = tmp_path / "trace.log"
    trace.write_bytes(lzma.decompress((CAPTURES / name / "trace.log.xz").read_bytes()))
    assert event_counts(trace) == manifest["events"]
    dump = CAPTURES / name / "queue.bin.xz"
    tables = CAPTURES / name / "tables.bin.xz"
    if manifest["queue"]:
        assert len(lzma.decompress(dump.read_bytes())) == manifest["queue"]["size"]
        data = lzma.decompress(tables.read_bytes())
        offset = 0
        for region in manifest["tables"]:
            assert region["offset"] == offset
            offset += region["size"]
        assert len(data) == offset
        # The first region is the root of the walk: the stream table or the root table.
        assert manifest["tables"][0]["what"] in ("strtab-l1", "strtab", "root-table")
    else:
        assert not dump.exists()
        assert not tables.exists()


@functools.cache
def _replayed(name: str) -> dict[str, Any]:
    """``import_and_replay`` of a committed capture, once per test run."""
    return import_and_replay(CAPTURES / name)


@pytest.mark.parametrize("name", [pytest.param(name, marks=replay_marks(name)) for name in NAMES])
def test_capture_imports_and_replays(name: str) -> None:
    check_replayed(_replayed(name))


def _tables(doc: Path) -> dict[str, dict[str, str]]:
    """The real-guest figures table of a document: the table whose header has a column
    ``QEMU's calls``, as {capture: {column: cell}}."""
    lines = doc.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and "QEMU's calls" in line:
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = {}
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                cells = dict(
                    zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True)
                )
                rows[cells["capture"].split("`")[1]] = cells
            return rows
    raise AssertionError(f"{doc}: no table with a column QEMU's calls")


def _number(cell: str) -> int:
    found = re.search(r"\d[\d,]*", cell)
    assert found is not None, cell
    return int(found[0].replace(",", ""))


@pytest.mark.parametrize("doc", ["README.md", "docs/capture.md"])
@pytest.mark.parametrize("name", ORDER)
def test_documented_figures_are_the_replays(doc: str, name: str) -> None:
    """The README's and docs/capture.md's real-guest table states what the replay of each
    committed capture gives today (commands, viommud's host calls, QEMU's own calls, missed;
    the times are measurements, capture/figures.py), so it cannot go stale."""
    row = _tables(ROOT / doc)[name]
    result = _replayed(name)
    report = result["replay"]["report"]
    assert _number(row["commands"]) == report["commands"]["total"]
    assert _number(row["viommud host calls"]) == host_calls(result["model"], report)
    assert _number(row["QEMU's calls"]) == result["qemu_calls"]
    assert _number(row["missed"]) == report["verify"]["missed"]
    assert row["kernel"].strip("`") == _manifest(name)["kernel"]["release"]


@pytest.mark.parametrize("name", ORDER)
def test_qemu_calls_match_the_baseline_where_the_model_has_one(name: str) -> None:
    """SMMUv3: QEMU's one call per invalidation command is what the report's baseline
    counts (docs/trace-format.md §3.3). VT-d: the blocked legacy / second-stage devices
    make the baseline 0, while QEMU shadows: at least one call per IOTLB descriptor."""
    result = _replayed(name)
    report = result["replay"]["report"]
    kinds = report["commands"]["by_kind"]
    if result["model"] == "smmuv3":
        assert result["qemu_calls"] == report["baseline"]["invalidate_calls"]
    elif result["model"] == "vtd":
        assert report["baseline"]["invalidate_calls"] == 0
        assert result["qemu_calls"] >= kinds["vtd:iotlb_inv"]
    else:
        assert result["qemu_calls"] == kinds["virtio:MAP"] + kinds["virtio:UNMAP"]


def _regions(name: str) -> dict[str, bytes]:
    manifest = _manifest(name)
    data = lzma.decompress((CAPTURES / name / "tables.bin.xz").read_bytes())
    return {r["what"]: data[r["offset"] : r["offset"] + r["size"]] for r in manifest["tables"]}


def _devices(name: str) -> dict[str, int]:
    """Guest requester IDs (bus << 8 | devfn) of the devices /init reported."""
    out = {}
    for marker in _manifest(name)["markers"]:
        words = marker.split()
        if words[0] == "device" and len(words) == 3:
            bus, dev_fn = words[2].split(":")[1:]
            dev, fn = dev_fn.split(".")
            out[words[1]] = int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn)
    return out


def test_smmuv3_capture_ends_with_stage1_stes_for_both_devices() -> None:
    regions = _regions("smmuv3-strict")
    for sid in _devices("smmuv3-strict").values():
        l2 = regions[f"strtab-l2 sid 0x{sid & ~0xFF:x}"]
        (word0,) = struct.unpack_from("<Q", l2, 64 * (sid & 0xFF))
        assert word0 & 1, f"SID 0x{sid:x}: STE not valid"
        assert (word0 >> 1) & 7 == 0b101, f"SID 0x{sid:x}: not stage-1 translate"
        assert f"cd-table sid 0x{sid:x}" in regions


def test_vtd_legacy_context_dids_are_the_ones_the_guest_invalidates() -> None:
    """The final context entries give each device's domain ID; the page-selective IOTLB
    invalidations in the trace name exactly those domains."""
    regions = _regions("vtd-legacy")
    dids = set()
    for rid in _devices("vtd-legacy").values():
        table = regions[f"context-table bus {rid >> 8:02x}"]
        lo, hi = struct.unpack_from("<QQ", table, 16 * (rid & 0xFF))
        assert lo & 1, f"RID 0x{rid:x}: context entry not present"
        dids.add((hi >> 8) & 0xFFFF)  # VT-d 9.3 context entry: DID [87:72]
    trace = lzma.decompress((CAPTURES / "vtd-legacy" / "trace.log.xz").read_bytes()).decode()
    invalidated = {
        (int(line.rsplit("0x", 1)[1], 16) >> 16) & 0xFFFF
        for line in trace.splitlines()
        if "invalidate desc type iotlb" in line
        and (int(line.rsplit("0x", 1)[1], 16) >> 4) & 3 == 3  # page-selective
    }
    assert len(dids) == 2
    assert invalidated == dids
