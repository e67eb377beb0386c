"""``viommud import qemu-log``: a QEMU trace log -> a v1 trace.

Lines are QEMU's ``log`` trace backend output, optionally with the ``-msg timestamp=on``
prefix ``PID@SEC.USEC:`` (which becomes the records' ``t``). Lines of other events and any
other text are skipped.

Intel VT-d (``-trace 'vtd_inv_*' -trace vtd_reg_write``, vtd.md §6.1):

* ``vtd_inv_desc invalidate desc type T high 0xQW1 low 0xQW0``: one descriptor, as QEMU
  processed it (qw2/qw3 are not printed; they must be zero);
* ``vtd_inv_qi_tail write tail N``: a guest IQT write, i.e. one ``cmds`` record for the
  descriptors that follow (``vtd_inv_qi_fetch`` splits them when the log has no tail events);
* ``vtd_reg_write addr 0x90 ... val 0xV``: an IQA write; its DW bit (11) gives the queue
  width, unless ``--dw`` says it. Without either, a PASID-based descriptor means 256 bits.

Descriptors QEMU refused are not in its trace events, so an imported trace holds only the
ones QEMU processed.

Arm SMMUv3 (``-trace smmuv3_write_mmio`` plus a dump of the command queue's memory):

* ``smmuv3_write_mmio addr: 0x90 val:0xV ...``: CMDQ_BASE (queue address, LOG2SIZE);
* ``smmuv3_write_mmio addr: 0x98 val:0xV ...``: CMDQ_PROD, i.e. one ``cmds`` record holding
  the entries from the previous producer index to this one, read from the dumped memory;
* dump lines as QEMU's monitor prints them (``xp /Ngx ADDR``): ``ADDR: 0xWORD 0xWORD ...``,
  little-endian words of 1, 2, 4 or 8 bytes (by their printed width). A dump line describes
  the memory from where it appears in the log on; the entries must be dumped before the
  CMDQ_PROD write that publishes them.

``--synthesize`` adds what the log cannot show and a replay needs, the way the bundled real
traces were made: for VT-d in legacy mode (128-bit queue) a context entry for each device
before its device-selective context-cache invalidation, with the DID of the guest's next
domain- or page-selective IOTLB invalidation (present, 48-bit, second-level table at
``0x20000000 + (SID << 12)``, TT=1 when the host device has ATS); for SMMUv3 a stage-1 STE
for each device before its first CMD_CFGI_STE (CD table at ``0x40000000 + (vSID << 12)``).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protocols.models import HostIommu, ViommuModel
from protocols.vtd import build_context_entry
from viommud.host import HostConfig, PhysicalDevice, PhysicalIommu
from viommud.importers.options import HostSpec, ImportLogError, ImportOptions

__all__ = ["Doorbell", "convert", "parse_smmuv3", "parse_vtd"]

_LINE = re.compile(
    r"^(?:\d{4}-\d\d-\d\dT[0-9:.]+Z?\s+)?"  # an ISO timestamp some builds put first
    r"(?:(?P<pid>\d+)@(?P<sec>\d+)\.(?P<usec>\d+):)?"  # -msg timestamp=on
    r"(?P<event>[a-z][a-z0-9_]*)(?:\s(?P<args>.*))?$"
)
_VTD_DESC = re.compile(
    r"invalidate desc type (?P<type>.+?) high 0x(?P<hi>[0-9a-fA-F]+) low 0x(?P<lo>[0-9a-fA-F]+)"
)
_VTD_REG = re.compile(r"addr 0x(?P<addr>[0-9a-fA-F]+) size \S+ val 0x(?P<val>[0-9a-fA-F]+)")
_SMMU_MMIO = re.compile(r"addr: 0x(?P<addr>[0-9a-fA-F]+) val:\s*0x(?P<val>[0-9a-fA-F]+)")
_DUMP = re.compile(r"^(?:0x)?(?P<addr>[0-9a-fA-F]+):(?P<words>(?:\s+0x[0-9a-fA-F]+)+)\s*$")

VTD_IQA = 0x90
VTD_IQA_DW = 1 << 11
SMMU_CMDQ_BASE = 0x90
SMMU_CMDQ_PROD = 0x98
_PASID_TYPES = (6, 7, 8)
U64 = (1 << 64) - 1

CONTEXT_COMMENT = (
    "synthetic context entry; DID inferred from the guest's own DSI after the "
    "device-selective context invalidation"
)
STE_COMMENT = "synthetic STE contents (the capture has the commands, not the STE)"


@dataclass(slots=True)
class Doorbell:
    """One guest doorbell: its raw queue entries and the log time it happened at."""

    t: float | None
    entries: list[bytes] = field(default_factory=list)


def _events(lines: Iterable[str]) -> Iterable[tuple[int, float | None, str, str]]:
    """``(line number, time, event, args)`` of every trace-event line."""
    for number, line in enumerate(lines, start=1):
        match = _LINE.match(line.strip())
        if match is None:
            continue
        t = None
        if match["sec"] is not None:
            t = int(match["sec"]) + int(match["usec"]) / 1e6
        yield number, t, match["event"], match["args"] or ""


# ---------------------------------------------------------------------------------------------
# Intel VT-d


@dataclass(slots=True)
class VtdLog:
    doorbells: list[Doorbell]
    dw: int | None  # from an IQA write


def parse_vtd(lines: Iterable[str]) -> VtdLog:
    """The descriptors of a QEMU intel-iommu trace log, grouped per IQT write (16 bytes each:
    qw0, qw1)."""
    doorbells: list[Doorbell] = []
    current: Doorbell | None = None
    dw: int | None = None
    for number, t, event, args in _events(lines):
        if event == "vtd_inv_qi_tail" or (
            event == "vtd_inv_qi_fetch" and (current is None or current.entries)
        ):
            current = Doorbell(t)
            doorbells.append(current)
        elif event == "vtd_inv_desc":
            match = _VTD_DESC.search(args)
            if match is None:
                raise ImportLogError(f"line {number}: unreadable vtd_inv_desc: {args!r}")
            if current is None:
                current = Doorbell(t)
                doorbells.append(current)
            qw0, qw1 = int(match["lo"], 16), int(match["hi"], 16)
            if qw0 > U64 or qw1 > U64:
                raise ImportLogError(f"line {number}: descriptor word wider than 64 bits")
            current.entries.append(struct.pack("<QQ", qw0, qw1))
        elif event == "vtd_reg_write":
            match = _VTD_REG.search(args)
            if match is not None and int(match["addr"], 16) == VTD_IQA and dw is None:
                dw = 256 if int(match["val"], 16) & VTD_IQA_DW else 128
    return VtdLog([d for d in doorbells if d.entries], dw)


def _vtd_records(log: VtdLog, options: ImportOptions, spec: HostSpec) -> list[dict[str, Any]]:
    dw = options.dw or log.dw
    if dw is None:
        pasid = any(e[0] & 0xF in _PASID_TYPES for d in log.doorbells for e in d.entries)
        dw = 256 if pasid else 128
    viommu = options.viommu or "vvtd0"
    iommus = [u.id for u in spec.host.iommus if u.model == HostIommu.INTEL_VTD]
    records: list[dict[str, Any]] = [
        {
            "op": "viommu_create",
            "viommu": viommu,
            "model": ViommuModel.VTD,
            "iommus": iommus,
            "options": {"dw": dw},
        },
    ]
    attach = _attachments(spec, iommus)
    records += [
        {"op": "device_attach", "viommu": viommu, "vid": vid, "device": device}
        for vid, device in attach
    ]
    ats = {vid: spec.host.device(device).ats for vid, device in attach}
    pad = bytes(16) if dw == 256 else b""
    t0 = next((d.t for d in log.doorbells if d.t is not None), None)
    written: dict[int, int] = {}  # sid -> DID of the context entry made up for it
    for number, doorbell in enumerate(log.doorbells):
        if options.synthesize and dw == 128:
            for sid in _device_selective_cc(doorbell):
                did = _next_domain(log.doorbells, number)
                if sid not in ats or did is None or written.get(sid) == did:
                    continue
                written[sid] = did
                data = build_context_entry(
                    p=1, tt=1 if ats[sid] else 0, aw=2, did=did, slptptr=0x20000 + sid
                )
                records.append(
                    {
                        "op": "context_entry",
                        "viommu": viommu,
                        "sid": sid,
                        "data": data.hex(),
                        "comment": CONTEXT_COMMENT,
                    }
                )
        record: dict[str, Any] = {
            "op": "cmds",
            "viommu": viommu,
            "data": b"".join(e + pad for e in doorbell.entries).hex(),
        }
        if doorbell.t is not None and t0 is not None:
            record["t"] = round(doorbell.t - t0, 6)
        records.append(record)
    return records


def _device_selective_cc(doorbell: Doorbell) -> list[int]:
    out = []
    for entry in doorbell.entries:
        (qw0,) = struct.unpack_from("<Q", entry)
        if qw0 & 0xE0F == 0x1 and (qw0 >> 4) & 3 == 3 and (qw0 >> 48) & 3 == 0:
            out.append((qw0 >> 32) & 0xFFFF)
    return out


def _next_domain(doorbells: list[Doorbell], start: int) -> int | None:
    """The DID of the first domain- or page-selective IOTLB invalidation from ``start`` on."""
    for doorbell in doorbells[start:]:
        for entry in doorbell.entries:
            qw0: int = struct.unpack_from("<Q", entry)[0]
            if qw0 & 0xE0F == 0x2 and (qw0 >> 4) & 3 in (2, 3):
                return (qw0 >> 16) & 0xFFFF
    return None


# ---------------------------------------------------------------------------------------------
# Arm SMMUv3


def parse_smmuv3(lines: Iterable[str]) -> list[Doorbell]:
    """The command-queue doorbells of a QEMU smmuv3 log with a dump of the queue memory."""
    memory: dict[int, int] = {}  # byte address -> byte
    base = log2size = 0
    have_base = False
    prod = 0
    doorbells: list[Doorbell] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        dump = _DUMP.match(line)
        if dump is not None:
            addr = int(dump["addr"], 16)
            for token in dump["words"].split():
                size = max(1, (len(token) - 2) // 2)
                value = int(token, 16)
                for i in range(size):
                    memory[addr + i] = (value >> (8 * i)) & 0xFF
                addr += size
            continue
        match = _LINE.match(line)
        if match is None or match["event"] != "smmuv3_write_mmio":
            continue
        mmio = _SMMU_MMIO.search(match["args"] or "")
        if mmio is None:
            raise ImportLogError(f"line {number}: unreadable smmuv3_write_mmio")
        offset, value = int(mmio["addr"], 16), int(mmio["val"], 16)
        if offset == SMMU_CMDQ_BASE:
            base, log2size, have_base = value & 0x000F_FFFF_FFFF_FFE0, value & 0x1F, True
        elif offset == SMMU_CMDQ_BASE + 4:  # the upper half written on its own
            base = (base & 0xFFFF_FFFF) | (value & 0xFFFFF) << 32
        elif offset == SMMU_CMDQ_PROD:
            if not have_base:
                raise ImportLogError(f"line {number}: CMDQ_PROD written before CMDQ_BASE")
            span = 1 << (log2size + 1)
            count = (value - prod) % span
            t = None
            if match["sec"] is not None:
                t = int(match["sec"]) + int(match["usec"]) / 1e6
            doorbell = Doorbell(t)
            for i in range(count):
                slot = base + 16 * ((prod + i) % (1 << log2size))
                try:
                    doorbell.entries.append(bytes(memory[slot + k] for k in range(16)))
                except KeyError:
                    raise ImportLogError(
                        f"line {number}: queue entry at 0x{slot:x} is not in the dump"
                    ) from None
            prod = value % span
            if doorbell.entries:
                doorbells.append(doorbell)
    return doorbells


def _smmuv3_records(
    doorbells: list[Doorbell], options: ImportOptions, spec: HostSpec
) -> list[dict[str, Any]]:
    viommu = options.viommu or "vsmmu0"
    iommus = [u.id for u in spec.host.iommus if u.model == HostIommu.ARM_SMMUV3]
    records: list[dict[str, Any]] = [
        {"op": "viommu_create", "viommu": viommu, "model": ViommuModel.SMMUV3, "iommus": iommus}
    ]
    attach = _attachments(spec, iommus)
    records += [
        {"op": "device_attach", "viommu": viommu, "vid": vid, "device": device}
        for vid, device in attach
    ]
    attached = {vid for vid, _ in attach}
    written: set[int] = set()
    t0 = next((d.t for d in doorbells if d.t is not None), None)
    for doorbell in doorbells:
        if options.synthesize:
            for entry in doorbell.entries:
                w0, _w1 = struct.unpack("<QQ", entry)
                vsid = w0 >> 32
                if w0 & 0xFF == 0x03 and vsid in attached and vsid not in written:
                    written.add(vsid)
                    ste = struct.pack(
                        "<8Q", 0xB | (0x40000000 + (vsid << 12)), 0xD6, 0, 0, 0, 0, 0, 0
                    )
                    records.append(
                        {
                            "op": "ste",
                            "viommu": viommu,
                            "vsid": vsid,
                            "data": ste.hex(),
                            "comment": STE_COMMENT,
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


# ---------------------------------------------------------------------------------------------
# Both


def _attachments(spec: HostSpec, iommus: list[str]) -> list[tuple[int, str]]:
    if spec.attach:
        return list(spec.attach)
    return [(d.sid, d.id) for d in spec.host.devices if d.iommu in iommus]


def _host_spec(options: ImportOptions, model: str) -> HostSpec:
    """The host file's host (plus --attach), or a host made up from --attach alone."""
    unit_model, unit = (
        (HostIommu.INTEL_VTD, "dmar0")
        if model == ViommuModel.VTD
        else (HostIommu.ARM_SMMUV3, "smmu0")
    )
    spec = options.spec
    extra = options.extra_attach
    if spec is None:
        if not extra:
            raise ImportLogError("give the host: --host FILE, or --attach VID=DEVICE")
        devices = tuple(PhysicalDevice(device, unit, vid, options.ats) for vid, device in extra)
        return HostSpec(HostConfig((PhysicalIommu(unit, unit_model),), devices), tuple(extra))
    attach = (*spec.attach, *extra)
    for _vid, device in attach:
        try:
            spec.host.device(device)
        except KeyError:
            raise ImportLogError(f"device {device!r} is not in the host") from None
    if not any(u.model == unit_model for u in spec.host.iommus):
        raise ImportLogError(f"the host has no {unit_model} unit")
    return HostSpec(spec.host, attach)


def convert(
    lines: Iterable[str], options: ImportOptions
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and records of the trace a QEMU log describes."""
    text = list(lines)
    model = options.model
    if model is None:
        if any("vtd_inv_desc" in line for line in text):
            model = ViommuModel.VTD
        elif any("smmuv3_write_mmio" in line for line in text):
            model = ViommuModel.SMMUV3
        else:
            raise ImportLogError("no vtd_inv_desc or smmuv3_write_mmio event in the log")
    spec = _host_spec(options, model)
    if model == ViommuModel.VTD:
        log = parse_vtd(text)
        if not log.doorbells:
            raise ImportLogError("no vtd_inv_desc event in the log")
        records = _vtd_records(log, options, spec)
    else:
        doorbells = parse_smmuv3(text)
        if not doorbells:
            raise ImportLogError("no CMDQ_PROD write with queue entries in the log")
        records = _smmuv3_records(doorbells, options, spec)
    header = {
        "format": "viommud-trace",
        "version": 1,
        "name": options.name,
        "host": spec.host.to_json(),
    }
    return header, records
