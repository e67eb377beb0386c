"""QEMU trace-log lines: reading the file, splitting lines into events, reading their fields.

QEMU's ``log`` trace backend (``-trace EVENT -D FILE``) writes one line per event: the
event's name, a space, then the text of its format string (``hw/*/trace-events``). With
``-msg timestamp=on`` each line starts ``PID@SEC.USEC:`` (scripts/tracetool/backend/log.py,
QEMU 7.2 to 10.x alike); that time becomes the records' ``t``. Lines of other events, and
any other text, are skipped. The formats this importer reads, as QEMU 7.2 and 10.0 print
them (``PRIx64`` is ``lx``):

=========================================  ===================================================
event                                      text after the name
=========================================  ===================================================
``vtd_inv_desc``                           ``invalidate desc type %s high 0x%lx low 0x%lx``
``vtd_inv_qi_head``                        ``read head %d``
``vtd_inv_qi_tail``                        ``write tail %d``
``vtd_inv_qi_fetch``                       (nothing)
``vtd_reg_write``                          ``addr 0x%lx size 0x%lx value 0x%lx``
``vtd_dmar_enable``                        ``enable %d``
``vtd_switch_address_space``               ``Device %02x:%02x.%x switching address space
                                           (iommu enabled=%d)``
``vtd_iotlb_cc_update``                    ``IOTLB context update bus 0x%x devfn 0x%x high
                                           0x%lx low 0x%lx gen %u -> gen %u``
``smmuv3_write_mmio``                      ``addr: 0x%lx val:0x%lx size: 0x%x(%d)``
``smmuv3_cmdq_cfgi_ste``                   ``streamid= 0x%x`` (older: ``streamid =%d``)
``smmuv3_cmdq_consume``                    ``prod=%d cons=%d prod.wrap=%d cons.wrap=%d``
``smmuv3_cmdq_opcode``                     ``<--- %s`` (``SMMU_CMD_TLBI_NH_VA``, …)
``smmuv3_translate_success``               ``%s sid=0x%x iova=0x%lx translated=0x%lx perm=0x%x``
                                           (10.x: `` stage=%d`` more)
``smmuv3_translate_bypass`` / ``_abort``   ``%s sid=0x%x STE bypass iova:…`` / ``%s sid=0x%x
                                           abort on iova:…``
``virtio_iommu_attach`` / ``_detach``      ``domain=%d endpoint=%d``
``virtio_iommu_map``                       ``domain=%d virt_start=0x%lx virt_end=0x%lx
                                           phys_start=0x%lx flags=%d``
``virtio_iommu_unmap``                     ``domain=%d virt_start=0x%lx virt_end=0x%lx``
``virtio_iommu_fill_resv_property``        ``dev= %d, type=%d start=0x%lx end=0x%lx``
``virtio_iommu_get_config``                ``page_size_mask=0x%lx input range start=0x%lx input
                                           range end=0x%lx domain range start=%d domain range
                                           end=%d probe_size=0x%x bypass=0x%x`` (10.x: ``%u``)
``virtio_iommu_set_config``                ``bypass=0x%x``
``virtio_iommu_switch_address_space``      as ``vtd_switch_address_space``
=========================================  ===================================================
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from viommud.importers.options import ImportLogError

_LINE = re.compile(
    r"^(?:(?P<iso>\d{4}-\d\d-\d\dT[0-9:.]+Z?)\s+)?"  # an ISO timestamp some builds put first
    r"(?:[\w.-]+\(\d+(?::\d+)?\):\s+)?"  # and a program(pid:tid): prefix
    r"(?:(?P<pid>\d+)@(?P<sec>\d+)\.(?P<usec>\d+):)?"  # -msg timestamp=on
    r"(?P<event>[a-z][a-z0-9_]*)(?:\s(?P<args>.*))?$"
)
# The events this importer reads: a line naming one of them must parse (a malformed one is
# an error naming its line); every other line is skipped.
PREFIXES = ("vtd_", "smmuv3_", "virtio_iommu_")

_NUM = r"(0x[0-9a-fA-F]+|\d+)"
FORMATS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern)
    for name, pattern in {
        "vtd_inv_desc": r"^invalidate desc type (?P<type>.+?) high 0x(?P<hi>[0-9a-fA-F]+) "
        r"low 0x(?P<lo>[0-9a-fA-F]+)\s*$",
        "vtd_inv_qi_head": r"^read head (?P<head>\d+)\s*$",
        "vtd_inv_qi_tail": r"^write tail (?P<tail>\d+)\s*$",
        "vtd_reg_write": r"^addr 0x(?P<addr>[0-9a-fA-F]+) size (?:0x)?[0-9a-fA-F]+ "
        r"val(?:ue)? 0x(?P<val>[0-9a-fA-F]+)\s*$",
        "vtd_dmar_enable": r"^enable (?P<en>[01])\s*$",
        "vtd_switch_address_space": r"^Device (?P<bus>[0-9a-fA-F]+):(?P<slot>[0-9a-fA-F]+)\."
        r"(?P<fn>[0-9a-fA-F]+) switching address space \(iommu enabled=(?P<on>[01])\)\s*$",
        "vtd_iotlb_cc_update": r"^IOTLB context update bus 0x(?P<bus>[0-9a-fA-F]+) devfn "
        r"0x(?P<devfn>[0-9a-fA-F]+) high 0x(?P<hi>[0-9a-fA-F]+) low 0x(?P<lo>[0-9a-fA-F]+) ",
        "smmuv3_write_mmio": r"^addr: 0x(?P<addr>[0-9a-fA-F]+) val:\s*0x(?P<val>[0-9a-fA-F]+)"
        r"(?: size: .*)?$",
        "smmuv3_cmdq_cfgi_ste": rf"^streamid\s*=\s*{_NUM}\s*$",
        "smmuv3_cmdq_consume": r"^prod=(?P<prod>\d+) cons=(?P<cons>\d+) prod\.wrap=(?P<pwrap>[01]) "
        r"cons\.wrap=(?P<cwrap>[01])\s*$",
        "smmuv3_cmdq_opcode": r"^<--- (?P<op>\S+)\s*$",
        "smmuv3_translate_success": rf"^\S* ?sid={_NUM} iova=",
        "smmuv3_translate_bypass": rf"^\S* ?sid={_NUM} STE bypass",
        "smmuv3_translate_abort": rf"^\S* ?sid={_NUM} abort on",
        "virtio_iommu_attach": r"^domain=(?P<domain>-?\d+) endpoint=(?P<ep>-?\d+)\s*$",
        "virtio_iommu_detach": r"^domain=(?P<domain>-?\d+) endpoint=(?P<ep>-?\d+)\s*$",
        "virtio_iommu_map": r"^domain=(?P<domain>-?\d+) virt_start=0x(?P<start>[0-9a-fA-F]+) "
        r"virt_end=0x(?P<end>[0-9a-fA-F]+) phys_start=0x(?P<phys>[0-9a-fA-F]+) "
        r"flags=(?P<flags>\d+)\s*$",
        "virtio_iommu_unmap": r"^domain=(?P<domain>-?\d+) virt_start=0x(?P<start>[0-9a-fA-F]+) "
        r"virt_end=0x(?P<end>[0-9a-fA-F]+)\s*$",
        "virtio_iommu_fill_resv_property": r"^dev= ?(?P<ep>\d+), type=(?P<subtype>\d+) "
        r"start=0x(?P<start>[0-9a-fA-F]+) end=0x(?P<end>[0-9a-fA-F]+)\s*$",
        "virtio_iommu_get_config": r"^page_size_mask=0x(?P<mask>[0-9a-fA-F]+) input range "
        r"start=0x(?P<istart>[0-9a-fA-F]+) input range end=0x(?P<iend>[0-9a-fA-F]+) domain "
        r"range start=(?P<dstart>-?\d+) domain range end=(?P<dend>-?\d+) "
        r"probe_size=0x(?P<probe>[0-9a-fA-F]+) bypass=0x(?P<bypass>[0-9a-fA-F]+)\s*$",
        "virtio_iommu_set_config": r"^bypass=0x(?P<bypass>[0-9a-fA-F]+)\s*$",
        "virtio_iommu_switch_address_space": r"^Device (?P<bus>[0-9a-fA-F]+):"
        r"(?P<slot>[0-9a-fA-F]+)\.(?P<fn>[0-9a-fA-F]+) switching address space "
        r"\(iommu enabled=(?P<on>[01])\)\s*$",
    }.items()
}
# A trace event after other text on the same line: another writer's output without its
# newline (a guest console or QEMU's own messages sharing the log's file). With the
# ``PID@SEC.USEC:`` stamp any event of ours; without it, only the events of FORMATS, after a
# space.
_EMBEDDED = re.compile(
    r"(?:\d+@\d+\.\d+:(?=(?:vtd_|smmuv3_|virtio_iommu_))|(?<=\s)(?=(?:"
    + "|".join(sorted(FORMATS, key=len, reverse=True))
    + r")\s))"
)
# xp /Ngx lines of QEMU's monitor: ADDR: 0xWORD 0xWORD ... (the old way to dump the CMDQ)
DUMP_LINE = re.compile(r"^(?:0x)?(?P<addr>[0-9a-fA-F]+):(?P<words>(?:\s+0x[0-9a-fA-F]+)+)\s*$")
U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Event:
    """One trace-event line: its line number, time (``-msg timestamp=on``), name and the
    named fields of its format (empty for events read by name only)."""

    line: int
    t: float | None
    name: str
    fields: dict[str, str]
    text: str = ""  # the line, stripped (dump lines)
    after: str = ""  # other text before the event on its line (_EMBEDDED)


def _iso_seconds(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def number(text: str) -> int:
    """A ``%d`` or ``0x%x`` field."""
    return int(text, 0) if text.startswith("0x") else int(text)


def u32(text: str) -> int:
    """A ``uint32_t`` QEMU printed with ``%d`` (7.2: ``domain range end=-1``)."""
    return int(text) % (1 << 32)


def read_lines(path: Path) -> Iterator[str]:
    """The log's lines; ``.xz``, ``.gz`` and ``.bz2`` are read directly. A truncated or
    corrupt file stops with an error naming the last line read and the byte offset."""
    openers: dict[str, Callable[..., Any]] = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
    opener = openers.get(path.suffix)
    number_ = 0
    offset = 0
    try:
        handle: IO[bytes] = path.open("rb") if opener is None else opener(path, "rb")
    except OSError as exc:
        raise ImportLogError(f"cannot read {path}: {exc}") from None
    try:
        with handle:
            for number_, raw in enumerate(handle, start=1):  # noqa: B007 - kept for the error
                offset += len(raw)
                yield raw.decode("utf-8", errors="replace")
    except (EOFError, lzma.LZMAError, OSError, zlib.error) as exc:
        what = "truncated" if isinstance(exc, EOFError) else "unreadable"
        raise ImportLogError(
            f"{path}: {what} {path.suffix or 'file'} after line {number_} "
            f"(uncompressed byte offset {offset}): {exc}"
        ) from None


def events(lines: Iterable[str], *, dumps: bool = False) -> Iterator[Event]:
    """The trace events of the lines this importer reads (``PREFIXES``), their fields parsed;
    with ``dumps`` also ``xp`` dump lines (name ``"dump"``). A known event whose text does
    not fit its format is an error naming the line."""
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if dumps and DUMP_LINE.match(line):
            yield Event(line_no, None, "dump", {}, line)
            continue
        match = _LINE.match(line)
        after = ""
        if match is None or not match["event"].startswith(PREFIXES):
            embedded = _EMBEDDED.search(line, 1)
            if embedded is None:
                continue
            after, line = line[: embedded.start()], line[embedded.start() :]
            match = _LINE.match(line)
            if match is None:
                continue
        name = match["event"]
        t = None
        if match["sec"] is not None:
            t = int(match["sec"]) + int(match["usec"]) / 1e6
        elif match["iso"] is not None:
            t = _iso_seconds(match["iso"])
        args = match["args"] or ""
        pattern = FORMATS.get(name)
        fields: dict[str, str] = {}
        if pattern is not None:
            found = pattern.search(args)
            if found is None and after and match["pid"] is None:
                continue  # words in other text that only look like an event
            if found is None:
                raise ImportLogError(
                    f"line {line_no}: unreadable {name}: {args!r} (not the format of QEMU "
                    "7.2-10.x: another version's, or a line cut short)"
                )
            fields = {k: v for k, v in found.groupdict().items() if v is not None}
            if not fields and found.groups():
                fields = {"value": found.group(1)}
        yield Event(line_no, t, name, fields, line, after)


def spliced_note(stream: Iterable[Event]) -> list[str]:
    """The note for events read after other text on their line (``Event.after``)."""
    lines = [ev.line for ev in stream if ev.after]
    if not lines:
        return []
    shown = ", ".join(str(n) for n in lines[:5]) + (", …" if len(lines) > 5 else "")
    return [
        f"{len(lines)} trace events came after other text on their line (lines {shown}: "
        "another writer's output without its newline, e.g. a guest console sharing the "
        "log's file): read from the event's name on; give QEMU's trace a file of its own "
        "(-D FILE)"
    ]


def device_id(vid: int) -> str:
    """The host device a made-up host gives guest ID ``vid`` (a PCI requester ID)."""
    return f"0000:{vid >> 8 & 0xFF:02x}:{vid >> 3 & 0x1F:02x}.{vid & 7:x}"


def rid(event: Event) -> int:
    """The requester ID of a ``*_switch_address_space`` event's ``BB:DD.F``."""
    bus, slot, fn = (int(event.fields[k], 16) for k in ("bus", "slot", "fn"))
    if bus > 0xFF or slot > 0x1F or fn > 7:
        raise ImportLogError(
            f"line {event.line}: {event.name}: no PCI device {bus:x}:{slot:x}.{fn:x}"
        )
    return bus << 8 | slot << 3 | fn


def stream_id(event: Event) -> int:
    """The ``sid=`` of an smmuv3 event: a 32-bit StreamID."""
    sid = number(event.fields["value"])
    if sid >= 1 << 32:
        raise ImportLogError(f"line {event.line}: {event.name}: StreamID 0x{sid:x} is over 32 bits")
    return sid
