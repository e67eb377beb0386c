"""Logs written line by line from QEMU 7.2's and 10.0's own format strings (qemu_formats.py),
with and without the ``PID@SEC.USEC:`` prefix, imported with no option and replayed."""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.importers.qemu_formats import VERSIONS, Log
from viommud.importers import ImportLogError, ImportOptions
from viommud.importers.qemu_log import convert
from viommud.importers.qemu_vtd import PC_GLOBAL
from viommud.shell.cli import main

CASES = [(v, s) for v in VERSIONS for s in (True, False)]
IDS = [f"{v}-{'stamped' if s else 'plain'}" for v, s in CASES]
WAIT = 0x2000_0002_5  # wait, SW=1, status data 2


def desc(log: Log, head: int, name: str, qw0: int, qw1: int = 0) -> None:
    log.emit("vtd_inv_qi_head", head)
    log.emit("vtd_inv_desc", name, qw1, qw0)


def doorbell(log: Log, tail: int, *descs: tuple[str, int, int]) -> int:
    """One IQT write and the descriptors QEMU then processed; returns the new tail."""
    log.emit("vtd_reg_write", 0x88, 4, (tail + len(descs)) << 4)
    log.emit("vtd_inv_qi_tail", tail + len(descs))
    log.emit("vtd_inv_qi_fetch")
    for i, (name, qw0, qw1) in enumerate(descs):
        desc(log, tail + i, name, qw0, qw1)
    return tail + len(descs)


def switch(log: Log, sid: int, on: int, event: str = "vtd_switch_address_space") -> None:
    log.emit(event, sid >> 8, sid >> 3 & 0x1F, sid & 7, on)


def import_and_replay(
    tmp_path: Path, log: Log, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], str]:
    """Write the log as .xz, import it with no option, replay it; header, records, report,
    import stderr."""
    path = tmp_path / "trace.log.xz"
    path.write_bytes(lzma.compress(log.text().encode()))
    out = tmp_path / "out.jsonl"
    assert main(["import", "qemu-log", str(path), "-o", str(out), *extra]) == 0
    stderr = capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert main(["replay", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    return lines[0], lines[1:], report, stderr


def legacy_log(version: str, stamp: bool) -> Log:
    """A Linux guest without caching mode: blk 01:00.0 (ATS, DID 6) mapped before any
    device-selective invalidation; net 02:00.0 switched to identity (DID 7 cleared, QEMU's
    fast path then says pass-through)."""
    log = Log(version, stamp=stamp)
    log.emit("vtd_reg_write", 0x90, 8, 0x2409000)  # IQA, DW=0
    log.emit("vtd_reg_dmar_root", 0x2400000, 0)
    switch(log, 0x100, 0)  # translation off: not informative
    tail = doorbell(log, 0, ("context-cache", 0x11, 0), ("wait", WAIT, 0x1F3AED00))
    log.emit("vtd_dmar_enable", 1)
    switch(log, 0x100, 1)
    switch(log, 0x200, 1)
    tail = doorbell(log, tail, ("iotlb", 0x600F2, 0xFFFFB000), ("wait", WAIT, 0x1F3AED04))
    tail = doorbell(log, tail, ("device", 0x100_0000_0003, 0xFFFFB000), ("wait", WAIT, 0x1F3AED08))
    tail = doorbell(log, tail, ("iotlb", 0x700F2, 0xFFFFA000), ("wait", WAIT, 0x1F3AED0C))
    tail = doorbell(log, tail, ("context-cache", 0x200_0007_0031, 0), ("wait", WAIT, 0x10))
    log.emit("vtd_inv_desc_cc_device", 2, 0, 0)
    switch(log, 0x200, 1)  # the cleared entry
    tail = doorbell(log, tail, ("iotlb", 0x700E2, 0), ("wait", WAIT, 0x1F3AED14))
    switch(log, 0x200, 0)  # the identity entry, read at the next DMA
    doorbell(log, tail, ("iotlb", 0x600F2, 0xFFFFC000), ("wait", WAIT, 0x1F3AED18))
    return log


@pytest.mark.parametrize(("version", "stamp"), CASES, ids=IDS)
def test_vtd_legacy(
    version: str, stamp: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, records, report, _ = import_and_replay(tmp_path, legacy_log(version, stamp), capsys)
    devices = {d["sid"]: d["ats"] for d in header["host"]["devices"]}
    assert devices == {0x100: True, 0x200: False}
    configs = [(r["sid"], r["data"]) for r in records if r["op"] == "context_entry"]
    # blk: translated (TT=1, ATS), DID 6, before the first context-cache invalidation;
    # net: pass-through (TT=2) before the device-selective invalidation of DID 7
    assert [(sid, bytes.fromhex(d)[0] >> 2 & 3, bytes.fromhex(d)[9]) for sid, d in configs] == [
        (0x100, 1, 6),
        (0x200, 2, 7),
    ]
    ops = [r["op"] for r in records]
    assert ops.index("context_entry") + 1 == ops.index("cmds")  # right before the first doorbell
    assert ops[ops.index("cmds") + 4] == "context_entry"  # before the 5th doorbell
    assert ("t" in records[-1]) == stamp
    assert report["errors"]["total"] == 0
    # legacy second-level tables are never nested (docs/vtd.md "Legacy mode"): blk is blocked
    # and net is pass-through, so nothing reaches the host, and the report says why
    assert "IOMMU_HWPT_INVALIDATE" not in report["backend"]["calls"]
    [warning] = report["warnings"]
    assert "legacy-mode or second-stage" in warning


def scalable_log(version: str, stamp: bool) -> Log:
    log = Log(version, stamp=stamp)
    log.emit("vtd_reg_write", 0x90, 8, 0x1F3C0801)  # IQA, DW=1
    log.emit("vtd_reg_dmar_root", 0x2429000, 1)
    tail = doorbell(log, 0, ("context-cache", 0x11, 0), ("wait", WAIT, 0x10))
    log.emit("vtd_dmar_enable", 1)
    switch(log, 0x100, 1)
    tail = doorbell(log, tail, ("iotlb", 0x600F2, 0xFFFFB000), ("wait", WAIT, 0x14))
    tail = doorbell(log, tail, ("device", 0x100_0000_0003, 0xFFFFB000), ("wait", WAIT, 0x18))
    # a PASID-cache invalidation QEMU does not trace: its head, then the wait's
    log.emit("vtd_reg_write", 0x88, 4, (tail + 2) << 5)
    log.emit("vtd_inv_qi_tail", tail + 2)
    log.emit("vtd_inv_qi_fetch")
    log.emit("vtd_inv_qi_head", tail)
    desc(log, tail + 1, "wait", WAIT, 0x1C)
    switch(log, 0x100, 0)  # identity from now on
    return log


@pytest.mark.parametrize(("version", "stamp"), CASES, ids=IDS)
def test_vtd_scalable(
    version: str, stamp: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, records, report, stderr = import_and_replay(
        tmp_path, scalable_log(version, stamp), capsys
    )
    assert records[0]["options"] == {"dw": 256}
    pasid = [bytes.fromhex(r["data"]) for r in records if r["op"] == "pasid_entry"]
    pgtt = [struct.unpack_from("<Q", p)[0] >> 6 & 7 for p in pasid]
    # the guest invalidates with IOTLB descriptors (second-stage tables, as QEMU 7.2-10.0
    # offer): second stage, never first; then pass-through at the untraced descriptor
    assert pgtt == [2, 4]
    assert struct.unpack_from("<Q", pasid[0])[0] >> 12 == 0x20000 + 0x100  # SLPTPTR
    assert struct.unpack_from("<Q", pasid[0], 16)[0] == 0  # no FLPTPTR
    last = bytes.fromhex(records[-1]["data"])
    assert last[:32] == PC_GLOBAL + bytes(16)  # the stand-in, 256 bits wide
    assert records[-2]["op"] == "pasid_entry"
    assert any("1 descriptors QEMU processed without tracing" in n for n in header["notes"])
    assert any("upper 128 bits" in n for n in header["notes"])
    assert any("tables are second-stage" in n for n in header["notes"])
    assert "upper 128 bits" in stderr
    assert report["errors"]["total"] == 0
    assert "IOMMU_HWPT_INVALIDATE" not in report["backend"]["calls"]  # blocked, then PT
    assert report["warnings"]
    assert report["commands"]["by_kind"]["vtd:pc_inv"] == 1


def smmuv3_log(version: str, stamp: bool) -> tuple[Log, bytes]:
    """A 4-entry queue at 0x40000000 with 6 commands published (it wraps): the first doorbell
    is overwritten in the final dump. The device's STE is bypass after the last CFGI_STE."""
    log = Log(version, stamp=stamp)
    cfgi = struct.pack("<QQ", 0x03 | 8 << 32, 1)
    sync = struct.pack("<QQ", 0x46, 0)
    tlbi = struct.pack("<QQ", 0x12 | 1 << 48, 0x1000)
    log.emit("smmuv3_write_mmio", 0x90, 0x4000000040000002, 8, 0)  # CMDQ_BASE, LOG2SIZE 2
    log.emit("smmuv3_write_mmio", 0x98, 0, 4, 0)
    queue = [cfgi, sync, tlbi, sync, cfgi, sync]
    names = ["CFGI_STE", "SYNC", "TLBI_NH_VA", "SYNC", "CFGI_STE", "SYNC"]
    for prod in (2, 4, 6):
        for i in range(prod - 2, prod):
            log.emit("smmuv3_cmdq_consume", prod % 4, i % 4, prod >> 2 & 1, i >> 2 & 1)
            log.emit("smmuv3_cmdq_opcode", f"SMMU_CMD_{names[i]}")
        log.emit("smmuv3_write_mmio", 0x98, prod, 4, 0)
        if prod == 2:
            log.emit("smmuv3_translate_success", "smmuv3-iommu-memory-region-8-1", 8, 0x1000,
                     0x80000, 3, *([1] if version != "7.2" else []))  # fmt: skip
    log.emit("smmuv3_translate_bypass", "smmuv3-iommu-memory-region-8-1", 8, 0x2000, 1)
    memory = bytearray(64)
    for index, command in enumerate(queue):
        memory[16 * (index % 4) : 16 * (index % 4) + 16] = command
    return log, bytes(memory)


@pytest.mark.parametrize(("version", "stamp"), CASES, ids=IDS)
def test_smmuv3_raw_dump(
    version: str, stamp: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, dump = smmuv3_log(version, stamp)
    (tmp_path / "queue.bin.xz").write_bytes(lzma.compress(dump))  # found beside the log
    header, records, report, stderr = import_and_replay(tmp_path, log, capsys)
    cmds = [bytes.fromhex(r["data"]) for r in records if r["op"] == "cmds"]
    assert cmds == [dump[32:64], dump[0:32]]  # the first doorbell was overwritten
    assert any("1 doorbells (2 commands) are not in the queue dump" in n for n in header["notes"])
    # the two doorbells in the dump, checked against the opcodes QEMU traced for them
    assert any("the opcodes of 4 dump entries agree" in n for n in header["notes"])
    assert "queue.bin.xz" in stderr
    [ste] = [r for r in records if r["op"] == "ste"]
    assert bytes.fromhex(ste["data"])[0] == 0x9  # V=1, Config bypass
    assert records.index(ste) == len(records) - 2
    assert report["errors"]["total"] == 0
    explicit = tmp_path / "elsewhere.bin"
    explicit.write_bytes(dump)
    out = tmp_path / "o.jsonl"
    assert main(["import", "qemu-log", str(tmp_path / "trace.log.xz"), "-o", str(out),
                 "--cmdq-dump", str(explicit)]) == 0  # fmt: skip
    assert "elsewhere.bin" in capsys.readouterr().err


def test_smmuv3_dump_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, dump = smmuv3_log("10.0", True)
    with pytest.raises(
        ImportLogError, match=r"30 bytes, shorter than the command queue .* offset 64"
    ):
        convert(log.lines, ImportOptions(), dump[:30])
    with pytest.raises(ImportLogError, match="give the queue's memory with --cmdq-dump"):
        convert(log.lines, ImportOptions())
    path = tmp_path / "trace.log"
    path.write_text(log.text())
    bad = tmp_path / "cut.bin.xz"
    bad.write_bytes(lzma.compress(dump)[:-12])
    out = tmp_path / "o.jsonl"
    assert main(["import", "qemu-log", str(path), "-o", str(out), "--cmdq-dump", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cut.bin.xz: truncated .xz" in err
    assert "Traceback" not in err


def virtio_log(version: str, stamp: bool) -> Log:
    log = Log(version, stamp=stamp)
    log.emit("virtio_iommu_get_config", 0xFFFFFFFFFFFFF000, 0, 0xFFFFFFFFFFFFFFFF, 0,
             0xFFFFFFFF, 0x200, 1)  # fmt: skip
    log.emit("virtio_iommu_fill_resv_property", 8, 1, 0xFEE00000, 0xFEEFFFFF)
    log.emit("virtio_iommu_fill_resv_property", 8, 0, 0x100000, 0x1FFFFF)
    log.emit("virtio_iommu_attach", 1, 8)
    log.emit("virtio_iommu_get_domain", 1)
    switch(log, 8, 1, "virtio_iommu_switch_address_space")
    log.emit("virtio_iommu_map", 1, 0x1000, 0x1FFF, 0x80000, 3)
    log.emit("virtio_iommu_unmap", 1, 0x1000, 0x1FFF)
    log.emit("virtio_iommu_unmap_done", 1, 0x1000, 0x1FFF)
    log.emit("virtio_iommu_attach", 2, 16)
    switch(log, 16, 0, "virtio_iommu_switch_address_space")  # a bypass domain
    log.emit("virtio_iommu_set_config", 0)
    log.emit("virtio_iommu_attach", 3, 8)  # a move: QEMU detaches it first
    switch(log, 8, 0, "virtio_iommu_switch_address_space")
    log.emit("virtio_iommu_get_domain", 3)
    switch(log, 8, 1, "virtio_iommu_switch_address_space")
    log.emit("virtio_iommu_detach", 3, 8)
    return log


@pytest.mark.parametrize(("version", "stamp"), CASES, ids=IDS)
def test_virtio(
    version: str, stamp: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, records, report, _ = import_and_replay(tmp_path, virtio_log(version, stamp), capsys)
    create = records[0]
    assert create["model"] == "virtio-iommu"
    assert create["options"]["probe_size"] == 0x200
    assert create["options"]["domain_range"] == [0, 0xFFFFFFFF]
    assert create["options"]["msi_window"] == [0xFEE00000, 0xFEEFFFFF]
    assert create["options"]["resv_mem"] == [{"start": 0x100000, "end": 0x1FFFFF,
                                              "endpoints": [8]}]  # fmt: skip
    requests = [bytes.fromhex(r["data"]) for r in records if r["op"] == "request"]
    # PROBE ATTACH MAP UNMAP ATTACH ATTACH DETACH
    assert [r[0] for r in requests] == [5, 1, 3, 4, 1, 1, 2]
    assert struct.unpack_from("<III", requests[1], 4) == (1, 8, 0)
    assert struct.unpack_from("<III", requests[4], 4) == (2, 16, 1)  # BYPASS
    assert struct.unpack_from("<III", requests[5], 4) == (3, 8, 0)  # the last switch counts
    assert struct.unpack_from("<IQQQI", requests[2], 4) == (1, 0x1000, 0x1FFF, 0x80000, 3)
    assert any("1 writes of the config 'bypass' field" in n for n in header["notes"])
    assert report["errors"]["total"] == 0
    assert report["backend"]["calls"]["IOMMU_IOAS_MAP"] >= 1


def test_malformed_and_truncated_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = legacy_log("7.2", True)
    bad = [*log.lines[:5], "4242@1.000001:vtd_inv_desc invalidate desc type iotlb high zz"]
    with pytest.raises(ImportLogError, match=r"line 6: unreadable vtd_inv_desc"):
        convert(bad, ImportOptions())
    path = tmp_path / "cut.log.xz"
    path.write_bytes(lzma.compress(log.text().encode())[:-40])
    out = tmp_path / "o.jsonl"
    assert main(["import", "qemu-log", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "truncated .xz after line" in err
    assert "uncompressed byte offset" in err
    assert "Traceback" not in err
    wide = "virtio_iommu_map domain=1 virt_start=0x1000 virt_end=0x1fff phys_start=0x1" + "0" * 17
    with pytest.raises(ImportLogError, match=r"line 1: virtio_iommu_map: "):
        convert([wide + " flags=3"], ImportOptions())
    smmu, dump = smmuv3_log("7.2", False)
    wide_sid = "smmuv3_translate_bypass smmuv3-mr sid=0x1ffffffff STE bypass iova:0x0 is_write=1"
    with pytest.raises(ImportLogError, match=r"StreamID 0x1ffffffff is over 32 bits"):
        convert([*smmu.lines, wide_sid], ImportOptions(), dump)
    bdf = "vtd_switch_address_space Device 1ff:00.0 switching address space (iommu enabled=1)"
    with pytest.raises(ImportLogError, match=r"line 1: vtd_switch_address_space: no PCI device"):
        convert([bdf, *log.lines], ImportOptions())
    text = tmp_path / "bad.log"
    text.write_text("\n".join(bad) + "\n")
    assert main(["import", "qemu-log", str(text), "-o", str(out)]) == 2
    assert "line 6: unreadable vtd_inv_desc" in capsys.readouterr().err


def test_no_synthesize_is_stated_and_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, records, report, _ = import_and_replay(
        tmp_path, legacy_log("10.0", False), capsys, "--no-synthesize"
    )
    assert not [r for r in records if r["op"] == "context_entry"]
    assert any("no configuration synthesized" in n for n in header["notes"])
    assert report["warnings"] == [
        "the guest invalidated 5 times and no invalidation reached the host: no stage-1 "
        "configuration: the trace writes no context entry"
    ]


def test_model_detection_errors() -> None:
    with pytest.raises(ImportLogError, match="no virtual-IOMMU event"):
        convert(["qemu-system-x86_64: warning: nothing"], ImportOptions())
    mixed = [*legacy_log("7.2", False).lines, *virtio_log("7.2", False).lines]
    with pytest.raises(ImportLogError, match="say which with --model"):
        convert(mixed, ImportOptions())
    _, records = convert(mixed, ImportOptions(model="virtio-iommu"))
    assert records[0]["model"] == "virtio-iommu"


def test_iso_timestamp_prefix() -> None:
    """Lines as a QEMU whose qemu_log puts ``-msg timestamp=on``'s ISO time (and the program)
    first: read, and the time becomes ``t``."""
    log = legacy_log("10.0", False)
    times = iter(range(10_000))
    lines = [
        f"2026-12-03T13:00:{next(times) % 60:02d}.250000Z qemu-system-x86_64(42:43): {line}"
        for line in log.lines
    ]
    _, records = convert(lines, ImportOptions())
    cmds = [r for r in records if r["op"] == "cmds"]
    assert len(cmds) == 7
    assert cmds[0]["t"] == 0.0
    assert cmds[1]["t"] > 0


@pytest.mark.parametrize(("version", "stamp"), CASES, ids=IDS)
def test_vtd_scalable_first_stage(
    version: str, stamp: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """x-flts=on: the guest invalidates with PASID-based IOTLB (DID 9, PASID 0) and PASID-based
    device-TLB descriptors (SID in qw0[31:16])."""
    log = Log(version, stamp=stamp)
    log.emit("vtd_reg_write", 0x90, 8, 0x1F3C0801)
    tail = doorbell(log, 0, ("context-cache", 0x11, 0), ("wait", WAIT, 0x10))
    log.emit("vtd_dmar_enable", 1)
    for _ in range(2):
        tail = doorbell(log, tail, ("p-iotlb", 0x9_0036, 0x7000), ("wait", WAIT, 0x14))
        tail = doorbell(log, tail, ("device-piotlb", 0x100_0008, 0x7000), ("wait", WAIT, 0x18))
    header, records, report, _ = import_and_replay(tmp_path, log, capsys)
    assert header["host"]["devices"] == [
        {"id": "0000:01:00.0", "iommu": "dmar0", "sid": 0x100, "ats": True}
    ]
    [entry] = [bytes.fromhex(r["data"]) for r in records if r["op"] == "pasid_entry"]
    qw0, qw1 = struct.unpack_from("<QQ", entry)
    assert (qw0 >> 6 & 7, qw1 & 0xFFFF) == (1, 9)  # first stage, DID 9
    assert not any("second-stage" in n for n in header.get("notes", []))
    assert report["errors"]["total"] == 0
    assert report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] == 2


@pytest.mark.parametrize(("version", "stamp"), CASES, ids=IDS)
def test_vtd_context_entries_qemu_read(
    version: str, stamp: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With vtd_iotlb_cc_update in the log, legacy context entries are the guest's own: each
    change before the context-cache invalidation that preceded QEMU's read of it."""
    translated = (0x3F001005, 0x0602)  # qw0 (P, TT=1, SLPTPTR), qw1 (AW 2, DID 6)
    passthrough = (0x9, 0x0602)  # TT=2
    log = Log(version, stamp=stamp)
    log.emit("vtd_reg_write", 0x90, 8, 0x2409000)
    tail = doorbell(log, 0, ("context-cache", 0x11, 0), ("wait", WAIT, 0x10))
    log.emit("vtd_dmar_enable", 1)
    log.emit("vtd_iotlb_cc_update", 1, 0, translated[1], translated[0], 1, 2)
    tail = doorbell(log, tail, ("iotlb", 0x600F2, 0xFFFFB000), ("wait", WAIT, 0x14))
    tail = doorbell(log, tail, ("context-cache", 0x100_0006_0031, 0), ("wait", WAIT, 0x18))
    log.emit("vtd_iotlb_cc_update", 1, 0, translated[1], translated[0], 2, 3)  # the same
    tail = doorbell(log, tail, ("context-cache", 0x100_0006_0031, 0), ("wait", WAIT, 0x1C))
    log.emit("vtd_iotlb_cc_update", 1, 0, passthrough[1], passthrough[0], 3, 4)
    doorbell(log, tail, ("iotlb", 0x600F2, 0xFFFFC000), ("wait", WAIT, 0x20))
    header, records, report, _ = import_and_replay(tmp_path, log, capsys)
    ops = [r["op"] for r in records]
    entries = [
        (sum(1 for o in ops[:i] if o == "cmds"), struct.unpack("<QQ", bytes.fromhex(r["data"])))
        for i, r in enumerate(records)
        if r["op"] == "context_entry"
    ]
    assert entries == [(0, translated), (3, passthrough)]  # before doorbells 0 and 3
    assert any("are the guest's own" in n for n in header["notes"])
    assert report["errors"]["total"] == 0
    # the translated entry is legacy (blocked, docs/vtd.md "Legacy mode"), then pass-through
    assert "IOMMU_HWPT_INVALIDATE" not in report["backend"]["calls"]
