"""Logs as QEMU writes them when things are not tidy (issue 15): several vCPU threads and
other writers interleaved, a queue dump that is not the log's, a QEMU version whose format
has a field more. Each gives the same trace as the tidy log, a note saying what was
recovered, or an error naming the line.

What is correct with two vCPUs (``-smp 2``): QEMU handles a vIOMMU register write in the
writing vCPU's thread with the BQL held, and traces the processing in that handler, so one
doorbell's lines (SMMUv3: ``smmuv3_cmdq_consume`` / ``_opcode`` per command, then the
``smmuv3_write_mmio`` of CMDQ_PROD; VT-d: ``vtd_inv_qi_tail`` then a head / descriptor pair
per descriptor) never interleave with another doorbell's. Commands are consumed in producer
order whichever CPU wrote them or the PROD register (Linux's arm-smmu-v3 lets one CPU publish
the commands of several). What does come between an event's lines is the output of threads
that do not take the BQL for it (iothreads' DMA translations, other devices' trace events),
QEMU's own warnings, and, when the trace shares the terminal, the guest console.
"""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.importers.qemu_formats import Log
from tests.importers.test_qemu_versions import legacy_log, smmuv3_log, virtio_log
from viommud.importers import ImportLogError, ImportOptions
from viommud.importers.qemu_log import convert
from viommud.shell.cli import main

CAPTURES = Path(__file__).resolve().parents[2] / "fixtures" / "captures"

# Lines other threads and writers put into the log: another device's trace event, an event
# of the model's prefix this importer does not read (a DMA translation of an iothread), a
# QEMU warning, guest console output, a blank line.
NOISE = {
    "vtd": "vtd_iotlb_page_hit IOTLB page hit sid 0x100 iova 0xffffb000 slpte 0x3 domain 0x6",
    "smmuv3": "smmuv3_get_cd addr=0x48210000",
    "virtio": "virtio_iommu_translate_out phys_addr=0x80000 addr_mask=0xfff",
}
OTHERS = [
    "4242@1796303242.000001:virtio_blk_req_complete vdev 0x55d3 req 0x7f21 status 0",
    "qemu-system-x86_64: warning: TCG doesn't support requested feature: CPUID.01H:ECX.vmx",
    "[    3.141592] virtio_net virtio1 enp1s0: renamed from eth0",
    "",
]


def _with_noise(lines: list[str], model: str) -> list[str]:
    """Every line followed by the other writers' lines."""
    out = []
    for line in lines:
        out += [line, NOISE[model], *OTHERS]
    return out


def _threads(lines: list[str], tids: tuple[int, ...]) -> list[str]:
    """The ``PROGRAM(PID:TID):`` form newer qemu_log writes, the threads taking turns."""
    return [
        f"2026-12-03T13:00:00.{i:06d}Z qemu-system-x86_64(4242:{tids[i % len(tids)]}): {line}"
        for i, line in enumerate(lines)
    ]


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "t"} for r in records]

    assert strip(a) == strip(b)


@pytest.mark.parametrize("stamp", [True, False], ids=["stamped", "plain"])
def test_vtd_other_threads_between_the_lines_change_nothing(stamp: bool) -> None:
    log = legacy_log("7.2", stamp)
    clean_header, clean = convert(log.lines, ImportOptions())
    header, records = convert(_with_noise(log.lines, "vtd"), ImportOptions())
    _same(records, clean)
    assert header["notes"] == clean_header["notes"]
    if stamp:  # times are read from the trace lines only
        assert [r.get("t") for r in records] == [r.get("t") for r in clean]


def test_smmuv3_other_threads_between_the_lines_change_nothing() -> None:
    log, dump = smmuv3_log("10.0", True)
    _, clean = convert(log.lines, ImportOptions(), dump)
    _, records = convert(_with_noise(log.lines, "smmuv3"), ImportOptions(), dump)
    _same(records, clean)


def test_virtio_other_threads_between_the_lines_change_nothing() -> None:
    log = virtio_log("7.2", False)
    _, clean = convert(log.lines, ImportOptions())
    _, records = convert(_with_noise(log.lines, "virtio"), ImportOptions())
    _same(records, clean)


def test_vtd_two_vcpus_with_thread_ids() -> None:
    """Two vCPU threads' IQT writes (Linux serialises submissions with the queue's lock, QEMU
    processes each write under the BQL): the doorbells in log order, whichever thread."""
    log = legacy_log("10.0", False)
    _, clean = convert(log.lines, ImportOptions())
    _, records = convert(_threads(_with_noise(log.lines, "vtd"), (4250, 4251)), ImportOptions())
    _same(records, clean)
    assert [r["t"] for r in records if r["op"] == "cmds"] == sorted(
        r["t"] for r in records if r["op"] == "cmds"
    )


def _two_cpu_smmuv3_log() -> tuple[list[str], bytes, list[bytes]]:
    """An 8-entry queue. vCPU 1 (tid 4251) queues a TLBI + SYNC at 2-3 while vCPU 0 (tid 4250)
    queues a CFGI_STE + SYNC at 0-1; vCPU 0, the owner, writes PROD = 4 for both (Linux's
    arm_smmu_cmdq_issue_cmdlist); then vCPU 1 publishes 4-5 itself. QEMU consumes 0-3 in index
    order in vCPU 0's thread, then 4-5 in vCPU 1's."""
    cmds = [
        struct.pack("<QQ", 0x03 | 8 << 32, 1),  # CFGI_STE 8, vCPU 0
        struct.pack("<QQ", 0x46, 0),
        struct.pack("<QQ", 0x12 | 1 << 48, 0x1000),  # TLBI_NH_VA, vCPU 1
        struct.pack("<QQ", 0x46, 0),
        struct.pack("<QQ", 0x11 | 1 << 48, 0),  # TLBI_NH_ASID, vCPU 1
        struct.pack("<QQ", 0x46, 0),
    ]
    names = ["CFGI_STE", "SYNC", "TLBI_NH_VA", "SYNC", "TLBI_NH_ASID", "SYNC"]
    vcpu = [Log("10.0", stamp=False), Log("10.0", stamp=False)]
    lines: list[str] = []

    def emit(cpu: int, event: str, *args: object) -> None:
        vcpu[cpu].emit(event, *args)
        lines.append(f"qemu-system-aarch64(4242:{4250 + cpu}): {vcpu[cpu].lines[-1]}")

    emit(0, "smmuv3_write_mmio", 0x90, 0x4000000040000003, 8, 0)  # CMDQ_BASE, 2^3 entries
    emit(0, "smmuv3_write_mmio", 0x98, 0, 4, 0)
    for first, last, cpu in ((0, 4, 0), (4, 6, 1)):
        for i in range(first, last):
            emit(cpu, "smmuv3_cmdq_consume", last, i, 0, 0)
            lines.append(NOISE["smmuv3"])  # the other vCPU's translation, no BQL
            emit(cpu, "smmuv3_cmdq_opcode", f"SMMU_CMD_{names[i]}")
        emit(cpu, "smmuv3_write_mmio", 0x98, last, 4, 0)
    memory = b"".join(cmds) + bytes(16 * 2)
    return lines, memory, cmds


def test_smmuv3_two_vcpus_commands_in_producer_order() -> None:
    lines, dump, cmds = _two_cpu_smmuv3_log()
    header, records = convert(lines, ImportOptions(), dump)
    doorbells = [bytes.fromhex(r["data"]) for r in records if r["op"] == "cmds"]
    assert doorbells == [b"".join(cmds[:4]), b"".join(cmds[4:])]
    assert any("the opcodes of 6 dump entries agree" in n for n in header["notes"])


def test_an_event_after_other_text_on_its_line_is_read_and_noted() -> None:
    """A guest console sharing the log's file, without its newline: the event after it is
    read from its name on (with the PID@ stamp any event, without it a known one after a
    space), and the header says which lines."""
    log = legacy_log("7.2", True)
    _, clean = convert(log.lines, ImportOptions())
    spliced = list(log.lines)
    spliced[7] = "[    2.718281] random: crng init done" + spliced[7]
    plain = legacy_log("7.2", False).lines
    spliced_plain = list(plain)
    spliced_plain[8] = "login: " + plain[8]
    header, records = convert(spliced, ImportOptions())
    _same(records, clean)
    assert any(n.startswith("1 trace events came after other text") for n in header["notes"])
    assert any("(lines 8:" in n for n in header["notes"])
    header, records = convert(spliced_plain, ImportOptions())
    _same(records, convert(plain, ImportOptions())[1])
    assert any("(lines 9:" in n for n in header["notes"])


def test_text_glued_after_an_event_is_an_error_naming_the_line() -> None:
    log = legacy_log("7.2", True)
    lines = list(log.lines)
    index = next(i for i, line in enumerate(lines) if "vtd_inv_desc" in line)
    lines[index] += "Debian GNU/Linux 12 debian ttyS0"
    with pytest.raises(ImportLogError, match=rf"line {index + 1}: unreadable vtd_inv_desc: "):
        convert(lines, ImportOptions())


def test_an_unreadable_event_inside_other_text_is_not_taken_for_one() -> None:
    """Without the stamp, words that only look like an event name are left alone."""
    log = legacy_log("7.2", False)
    _, clean = convert(log.lines, ImportOptions())
    _, records = convert(
        ["grep: vtd_inv_desc no such file", "  smmuv3_write_mmio: see docs", *log.lines],
        ImportOptions(),
    )
    _same(records, clean)


# A QEMU whose format has a field more (a later version, or a distribution's patch): the
# events this importer reads are matched whole, so the line is refused by name; an event it
# does not read is skipped whatever its text.
@pytest.mark.parametrize(
    ("model", "line"),
    [
        ("vtd", "vtd_inv_desc invalidate desc type iotlb high 0x0 low 0x600f2 pasid 0x1"),
        ("vtd", "vtd_inv_qi_tail write tail 4 qi_enabled 1"),
        ("smmuv3", "smmuv3_cmdq_consume prod=2 cons=1 prod.wrap=0 cons.wrap=0 sec_sid=0"),
        ("virtio", "virtio_iommu_unmap domain=1 virt_start=0x1000 virt_end=0x1fff flags=0"),
        ("virtio", "virtio_iommu_attach domain=1 endpoint=8 flags=1"),
    ],
)
def test_a_format_with_a_field_more_is_an_error_naming_the_line(model: str, line: str) -> None:
    base = {
        "vtd": legacy_log("7.2", False).lines,
        "smmuv3": smmuv3_log("7.2", False)[0].lines,
        "virtio": virtio_log("7.2", False).lines,
    }[model]
    event = line.split(maxsplit=1)[0]
    with pytest.raises(ImportLogError) as caught:
        convert([*base[:3], line, *base[3:]], ImportOptions(), bytes(64))
    assert str(caught.value).startswith(f"line 4: unreadable {event}: ")
    assert "not the format of QEMU 7.2-10.x" in str(caught.value)


def test_a_changed_event_this_importer_does_not_read_is_skipped() -> None:
    log = legacy_log("7.2", False)
    _, clean = convert(log.lines, ImportOptions())
    extra = "vtd_inv_desc_cc_domain context invalidate domain 0x6 source 0x2 version 11"
    _, records = convert([extra, *log.lines], ImportOptions())
    _same(records, clean)


def test_cli_refuses_a_queue_dump_of_another_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The committed smmuv3-strict log with smmuv3-lazy's queue dump beside it: same base
    register, same queue size, other commands. The importer refuses it, naming the first
    opcode line QEMU traced that the dump contradicts."""
    (tmp_path / "trace.log.xz").write_bytes((CAPTURES / "smmuv3-strict/trace.log.xz").read_bytes())
    (tmp_path / "queue.bin.xz").write_bytes((CAPTURES / "smmuv3-lazy/queue.bin.xz").read_bytes())
    out = tmp_path / "o.jsonl"
    assert main(["import", "qemu-log", str(tmp_path / "trace.log.xz"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "line 110: QEMU consumed SMMU_CMD_TLBI_NH_VA (opcode 0x12) at command-queue index 22" in err
    )
    assert "holds opcode 0x11 there" in err
    assert "the dump is not this log's queue" in err
    assert "Traceback" not in err
    assert not out.exists()
    text = lzma.decompress((CAPTURES / "smmuv3-strict/trace.log.xz").read_bytes()).decode()
    assert "smmuv3_cmdq_opcode <--- SMMU_CMD_TLBI_NH_VA" in text.splitlines()[109]


def test_a_dump_taken_at_another_base_is_refused() -> None:
    """The queue read 16 bytes off (a wrong base): every entry is its neighbour."""
    log, dump = smmuv3_log("7.2", True)
    shifted = dump[16:] + dump[:16]
    with pytest.raises(ImportLogError, match=r"line \d+: QEMU consumed SMMU_CMD_\w+ .* is not"):
        convert(log.lines, ImportOptions(), shifted)


def test_a_dump_without_opcode_lines_to_check_it_says_so() -> None:
    log, dump = smmuv3_log("7.2", True)
    lines = [x for x in log.lines if "smmuv3_cmdq_" not in x]
    header, _ = convert(lines, ImportOptions(), dump)
    assert any("queue dump is not checked against the log" in n for n in header["notes"])


def test_the_committed_captures_pass_the_dump_check(tmp_path: Path) -> None:
    for name, commands in (("smmuv3-strict", 2105), ("smmuv3-lazy", 131)):
        log = lzma.decompress((CAPTURES / name / "trace.log.xz").read_bytes()).decode()
        dump = lzma.decompress((CAPTURES / name / "queue.bin.xz").read_bytes())
        header, _ = convert(log.splitlines(), ImportOptions(), dump)
        assert f"the opcodes of {commands} dump entries agree" in json.dumps(header["notes"])
