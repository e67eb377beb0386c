"""Arm SMMUv3: a QEMU smmuv3 trace log plus the command queue's memory -> smmuv3 records.

QEMU's trace names each command's opcode, not the command (``smmuv3_cmdq_opcode``); the
commands themselves come from the queue's memory:

* ``smmuv3_write_mmio addr: 0x90 val:0xV``: CMDQ_BASE (queue address [51:5], LOG2SIZE [4:0]);
  0x94 alone is its upper half;
* ``smmuv3_write_mmio addr: 0x98 val:0xV``: CMDQ_PROD, i.e. one ``cmds`` record holding the
  entries from the previous producer index to this one (index and wrap bit: the low
  LOG2SIZE + 1 bits);
* the memory: a raw little-endian dump of the queue from its base (``--cmdq-dump FILE``,
  e.g. the monitor's ``pmemsave BASE SIZE FILE`` at the end of the run; ``.xz`` read
  directly), or ``xp /Ngx`` lines in the log (``ADDR: 0xWORD …``, words of 1-8 bytes by
  their printed width) placed before the CMDQ_PROD write that publishes them.

A dump taken at the end holds only the last 2^LOG2SIZE commands published under the last
CMDQ_BASE: a doorbell whose commands were overwritten, or published under an earlier base,
is left out and counted in the header's notes.

Synthesis (on by default): an STE for each attached device before the doorbell of its first
CMD_CFGI_STE, and again before a CFGI_STE after which QEMU's translations of the device
changed kind (``smmuv3_translate_success`` stage 1, ``smmuv3_translate_bypass`` bypass,
``smmuv3_translate_abort`` abort): stage 1 (CD table at ``0x40000000 + (vSID << 12)``),
bypass (Config 0b100) or abort (Config 0b000).
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.models import HostIommu, ViommuModel
from protocols.smmuv3 import Opcode
from viommud.importers.options import HostSpec, ImportLogError, ImportOptions
from viommud.importers.qemu_events import DUMP_LINE, Event, events, stream_id
from viommud.importers.qemu_vtd import attachments

SMMU_CMDQ_BASE = 0x90
SMMU_CMDQ_PROD = 0x98
CMD_SIZE = 16
OP_CFGI_STE = 0x03
OP_ATC_INV = 0x40

STE_COMMENT = "synthetic STE contents (the capture has the commands, not the STE)"
STE_KINDS = {
    "smmuv3_translate_success": "stage1",
    "smmuv3_translate_bypass": "bypass",
    "smmuv3_translate_abort": "abort",
}


@dataclass(slots=True)
class Doorbell:
    """One CMDQ_PROD write: its queue entries once known, where they are, and its line."""

    t: float | None
    line: int = 0
    entries: list[bytes] = field(default_factory=list)
    epoch: int = 0  # which CMDQ_BASE write it was published under
    first: int = 0  # producer index (with wrap bit) of its first entry
    count: int = 0
    position: int = 0  # commands published in its epoch before it


@dataclass(slots=True)
class Smmuv3Log:
    doorbells: list[Doorbell]
    base: int = 0  # of the last CMDQ_BASE write
    log2size: int = 0
    epochs: int = 0
    # (line, SID, kind) of QEMU's translations: what the STE it used said
    translations: list[tuple[int, int, str]] = field(default_factory=list)
    missing: int = 0  # doorbells left out: their commands are not in the memory given
    missing_commands: int = 0
    # The last CMDQ_BASE's queue as QEMU consumed it: index with wrap bit -> (line, opcode
    # name) of the last ``smmuv3_cmdq_opcode`` after a ``smmuv3_cmdq_consume`` naming it.
    consumed: dict[int, tuple[int, str]] = field(default_factory=dict)
    checked: int = 0  # dump entries whose opcode agreed with the one QEMU traced
    from_dump: int = 0  # entries read from the raw dump


def parse_smmuv3(
    lines: Iterable[str] | Iterable[Event], dump: bytes | None = None, dump_name: str = "dump"
) -> list[Doorbell]:
    """The command-queue doorbells of a QEMU smmuv3 log with the queue memory."""
    return read_smmuv3(lines, dump, dump_name).doorbells


def read_smmuv3(
    lines: Iterable[str] | Iterable[Event], dump: bytes | None = None, dump_name: str = "dump"
) -> Smmuv3Log:
    memory: dict[int, int] = {}  # byte address -> byte, from xp lines
    base = log2size = 0
    have_base = False
    prod = 0
    epoch = -1
    published = 0
    log = Smmuv3Log([])
    items = list(lines)
    stream: list[Event] = (
        [e for e in items if isinstance(e, Event)]
        if items and isinstance(items[0], Event)
        else list(events([str(x) for x in items], dumps=True))
    )
    cons: int | None = None  # the entry QEMU is consuming (smmuv3_cmdq_consume)
    for ev in stream:
        if ev.name == "dump":
            _load_dump_line(ev.text, memory)
            continue
        if ev.name == "smmuv3_cmdq_consume":
            cons = int(ev.fields["cons"]) | int(ev.fields["cwrap"]) << log2size
            continue
        if ev.name == "smmuv3_cmdq_opcode":
            if cons is not None:
                log.consumed[cons] = (ev.line, ev.fields["op"])
                cons = None
            continue
        if ev.name in STE_KINDS:
            log.translations.append((ev.line, stream_id(ev), STE_KINDS[ev.name]))
            continue
        if ev.name != "smmuv3_write_mmio":
            continue
        offset, value = int(ev.fields["addr"], 16), int(ev.fields["val"], 16)
        if offset == SMMU_CMDQ_BASE:
            base, log2size, have_base = value & 0x000F_FFFF_FFFF_FFE0, value & 0x1F, True
            epoch, published, prod = epoch + 1, 0, 0
            log.consumed.clear()
        elif offset == SMMU_CMDQ_BASE + 4:  # the upper half written on its own
            base = (base & 0xFFFF_FFFF) | (value & 0xFFFFF) << 32
        elif offset == SMMU_CMDQ_PROD:
            if not have_base:
                raise ImportLogError(f"line {ev.line}: CMDQ_PROD written before CMDQ_BASE")
            span = 1 << (log2size + 1)
            count = (value - prod) % span
            doorbell = Doorbell(ev.t, ev.line, [], epoch, prod, count, published)
            for i in range(count):
                slot = base + CMD_SIZE * ((prod + i) % (1 << log2size))
                try:
                    doorbell.entries.append(bytes(memory[slot + k] for k in range(CMD_SIZE)))
                except KeyError:
                    doorbell.entries = []
                    break
            prod = value % span
            published += count
            if count:
                log.doorbells.append(doorbell)
    log.base, log.log2size, log.epochs = base, log2size, epoch + 1
    _from_dump(log, dump, dump_name, published)
    return log


def _load_dump_line(text: str, memory: dict[int, int]) -> None:
    dump = DUMP_LINE.match(text)
    assert dump is not None
    addr = int(dump["addr"], 16)
    for token in dump["words"].split():
        size = max(1, (len(token) - 2) // 2)
        value = int(token, 16)
        for i in range(size):
            memory[addr + i] = (value >> (8 * i)) & 0xFF
        addr += size


def _from_dump(log: Smmuv3Log, dump: bytes | None, name: str, published: int) -> None:
    """Fill the doorbells the xp lines did not cover from the raw dump of the last queue."""
    entries = 1 << log.log2size
    if dump is not None and log.epochs and len(dump) < entries * CMD_SIZE:
        raise ImportLogError(
            f"{name}: {len(dump)} bytes, shorter than the command queue at 0x{log.base:x} "
            f"(2^{log.log2size} entries of {CMD_SIZE} bytes = {entries * CMD_SIZE} bytes): "
            f"the queue's end at offset {entries * CMD_SIZE} is not in the dump"
        )
    kept: list[Doorbell] = []
    for doorbell in log.doorbells:
        if doorbell.entries:
            kept.append(doorbell)
            continue
        fresh = doorbell.epoch == log.epochs - 1 and doorbell.position >= published - entries
        if dump is None or not fresh:
            if dump is None:
                slot = log.base + CMD_SIZE * (doorbell.first % entries)
                raise ImportLogError(
                    f"line {doorbell.line}: queue entry at 0x{slot:x} is not in the dump: "
                    "give the queue's memory with --cmdq-dump FILE (a raw dump from the "
                    "CMDQ base, e.g. the monitor's pmemsave)"
                )
            log.missing += 1
            log.missing_commands += doorbell.count
            continue
        for i in range(doorbell.count):
            offset = CMD_SIZE * ((doorbell.first + i) % entries)
            doorbell.entries.append(dump[offset : offset + CMD_SIZE])
            _check_opcode(log, doorbell, i, name)
        log.from_dump += doorbell.count
        kept.append(doorbell)
    log.doorbells = kept


def _opcode(name: str) -> int | None:
    """The opcode of QEMU's name for it (``SMMU_CMD_TLBI_NH_VA``, ``SMMU_CMD_SYNC``)."""
    bare = name.removeprefix("SMMU_CMD_")
    member = Opcode.__members__.get(bare) or Opcode.__members__.get("CMD_" + bare)
    return None if member is None else int(member)


def _check_opcode(log: Smmuv3Log, doorbell: Doorbell, i: int, name: str) -> None:
    """A dump entry must hold the opcode QEMU traced when it consumed that entry: otherwise
    the dump is not this run's queue (another capture's, or memory from another base)."""
    span = 2 << log.log2size
    traced = log.consumed.get((doorbell.first + i) % span)
    if traced is None or doorbell.epoch != log.epochs - 1:
        return
    line, op_name = traced
    expected = _opcode(op_name)
    if expected is None:
        return  # QEMU's "UNKNOWN" or a name of a later architecture version
    got = doorbell.entries[i][0]
    if got != expected:
        index = (doorbell.first + i) % (1 << log.log2size)
        raise ImportLogError(
            f"line {line}: QEMU consumed {op_name} (opcode 0x{expected:02x}) at command-queue "
            f"index {index}, but {name} holds opcode 0x{got:02x} there (the entry published "
            f"by the CMDQ_PROD write of line {doorbell.line}): the dump is not this log's "
            f"queue (another capture's, or taken at another base than 0x{log.base:x})"
        )
    log.checked += 1


def read_dump(path: Path) -> bytes:
    """A raw queue dump; ``.xz`` read directly."""
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except EOFError:
        raise ImportLogError(f"{path}: truncated .xz") from None
    except (OSError, lzma.LZMAError) as exc:
        raise ImportLogError(f"cannot read {path}: {exc}") from None


DUMP_NAMES = ("queue.bin", "cmdq.bin", "{stem}.cmdq", "{stem}.cmdq.bin", "{stem}.queue.bin")


def find_dump(log: Path) -> Path | None:
    """A queue dump beside the log, by the names captures use (``queue.bin[.xz]``,
    ``cmdq.bin``, ``LOG.cmdq[.bin]``, ``LOG.queue.bin``; LOG without its suffixes)."""
    stem = log.name.split(".")[0]
    for name in DUMP_NAMES:
        for suffix in ("", ".xz"):
            candidate = log.with_name(name.format(stem=stem) + suffix)
            if candidate.is_file():
                return candidate
    return None


def notes(log: Smmuv3Log) -> list[str]:
    out: list[str] = []
    if not log.translations:
        out.append(
            "the log has no smmuv3_translate_* events: what kind of STE QEMU used (stage 1, "
            "bypass, abort) is not visible, so every synthesized STE is stage 1"
        )
    if log.checked:
        out.append(
            f"the opcodes of {log.checked} dump entries agree with the smmuv3_cmdq_opcode "
            "lines QEMU traced when it consumed them"
        )
    elif log.from_dump:
        out.append(
            "the queue dump is not checked against the log: no smmuv3_cmdq_consume / "
            "smmuv3_cmdq_opcode lines for its entries"
        )
    if log.missing:
        out.append(
            f"{log.missing} doorbells ({log.missing_commands} commands) are not in the queue "
            "dump (overwritten after the queue wrapped, or published under an earlier "
            "CMDQ_BASE): left out"
        )
    return out


def _words(entry: bytes) -> tuple[int, int]:
    w0, w1 = struct.unpack("<QQ", entry)
    return w0, w1


def log_sids(log: Smmuv3Log) -> tuple[set[int], set[int]]:
    """StreamIDs the log names (CFGI_STE, ATC_INV, translations), and those with an ATC."""
    sids = {sid for _, sid, _ in log.translations}
    ats: set[int] = set()
    for doorbell in log.doorbells:
        for entry in doorbell.entries:
            w0, _ = _words(entry)
            if w0 & 0xFF in (OP_CFGI_STE, OP_ATC_INV):
                sids.add(w0 >> 32)
            if w0 & 0xFF == OP_ATC_INV:
                ats.add(w0 >> 32)
    return sids, ats


def _ste(kind: str, vsid: int) -> bytes:
    if kind == "bypass":
        return struct.pack("<8Q", 0x1 | 4 << 1, 0, 0, 0, 0, 0, 0, 0)
    if kind == "abort":
        return struct.pack("<8Q", 0x1, 0, 0, 0, 0, 0, 0, 0)
    return struct.pack("<8Q", 0xB | (0x40000000 + (vsid << 12)), 0xD6, 0, 0, 0, 0, 0, 0)


def smmuv3_records(log: Smmuv3Log, options: ImportOptions, spec: HostSpec) -> list[dict[str, Any]]:
    doorbells = log.doorbells
    viommu = options.viommu or "vsmmu0"
    iommus = [u.id for u in spec.host.iommus if u.model == HostIommu.ARM_SMMUV3]
    records: list[dict[str, Any]] = [
        {"op": "viommu_create", "viommu": viommu, "model": ViommuModel.SMMUV3, "iommus": iommus}
    ]
    attach = attachments(spec, iommus)
    records += [
        {"op": "device_attach", "viommu": viommu, "vid": vid, "device": device}
        for vid, device in attach
    ]
    attached = {vid for vid, _ in attach}
    points: dict[int, list[int]] = {}  # vsid -> lines of the doorbells invalidating its STE
    for doorbell in doorbells:
        for entry in doorbell.entries:
            w0, _ = _words(entry)
            if w0 & 0xFF == OP_CFGI_STE:
                points.setdefault(w0 >> 32, []).append(doorbell.line)
    written: dict[int, str] = {}
    t0 = next((d.t for d in doorbells if d.t is not None), None)
    for doorbell in doorbells:
        if options.synthesize:
            for entry in doorbell.entries:
                w0, _ = _words(entry)
                vsid = w0 >> 32
                if w0 & 0xFF != OP_CFGI_STE or vsid not in attached:
                    continue
                kind = _observed(log, points[vsid], vsid, doorbell.line)
                kind = kind or written.get(vsid, "stage1")
                if written.get(vsid) == kind:
                    continue
                written[vsid] = kind
                records.append(
                    {
                        "op": "ste",
                        "viommu": viommu,
                        "vsid": vsid,
                        "data": _ste(kind, vsid).hex(),
                        "comment": STE_COMMENT if kind == "stage1" else _kind_comment(kind),
                    }
                )
        record: dict[str, Any] = {
            "op": "cmds",
            "viommu": viommu,
            "data": b"".join(doorbell.entries).hex(),
        }
        if doorbell.t is not None and t0 is not None:
            record["t"] = round(doorbell.t - t0, 6)
        records.append(record)
    return records


def _kind_comment(kind: str) -> str:
    return f"synthetic {kind} STE: QEMU's translations of the device after this CFGI_STE"


def _observed(log: Smmuv3Log, points: list[int], vsid: int, line: int) -> str | None:
    """The kind of STE QEMU used for ``vsid`` first after ``line`` and before the device's
    next CFGI_STE doorbell."""
    later = [p for p in points if p > line]
    end = later[0] if later else float("inf")
    for at, sid, kind in log.translations:
        if sid == vsid and line < at < end:
            return kind
    return None
