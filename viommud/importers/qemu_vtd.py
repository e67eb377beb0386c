"""Intel VT-d: a QEMU intel-iommu trace log -> the records of a vtd trace (vtd.md §6.1).

* ``vtd_inv_desc``: one descriptor as QEMU processed it (qw1, qw0). qw2/qw3 of a 256-bit
  descriptor are not printed: they are written as zero, and the header says so.
* ``vtd_inv_qi_head``: QEMU is about to process the descriptor at HEAD. A head with no
  ``vtd_inv_desc`` after it is a descriptor QEMU does not trace (PASID-cache invalidations
  in 7.2-10.x, PASID-based IOTLB invalidations in 7.2): it is left out, and counted in the
  header's notes.
* ``vtd_inv_qi_tail``: a guest IQT write, i.e. one ``cmds`` record for the descriptors that
  follow (``vtd_inv_qi_fetch`` splits them when the log has no tail events).
* ``vtd_reg_write`` to IQA (0x90): bit 11 (DW) gives the queue width; 256 bits is scalable
  mode (QEMU accepts DW=1 only then).
* ``vtd_switch_address_space`` (``iommu enabled=0|1``), while translation is on
  (``vtd_dmar_enable``): whether the context entry (PASID entry in scalable mode) QEMU read
  for a device is pass-through or translating.

Synthesis (on by default): a context entry for each device before its device-selective
context-cache invalidation, with the DID of the guest's next domain- or page-selective
(PASID-based) IOTLB invalidation, re-written when the DID or the kind changes. Legacy mode:
present, 48-bit, second-level table at ``0x20000000 + (SID << 12)``, TT=1 when the host
device has ATS, TT=2 where the log shows pass-through. Scalable mode: a scalable context
entry (PASID directory at ``0x30000000 + (SID << 12)``, RID_PASID 0) and the PASID entry of
PASID 0: first stage (PGTT=1, table at ``0x20000000 + (SID << 12)``) when the guest
invalidates with PASID-based IOTLB descriptors, second stage (PGTT=2, the same table as
SLPTPTR) when it invalidates with (domain/page-selective) IOTLB descriptors — QEMU before
10.1 offers only second-stage translation, and viommud blocks such devices, as it does legacy
ones (docs/vtd.md "Legacy mode") — or pass-through (PGTT=4). The kind is the guest's, never
a guess that would hand a second-stage table over as a first stage.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protocols.models import HostIommu, ViommuModel
from protocols.vtd import (
    PGTT_FIRST_STAGE,
    PGTT_PASS_THROUGH,
    PGTT_SECOND_STAGE,
    build_context_entry,
    build_pasid_entry,
    build_scalable_context_entry,
)
from viommud.importers.options import HostSpec, ImportLogError, ImportOptions
from viommud.importers.qemu_events import U64, Event, events, rid

# A global PASID-cache invalidation (type 7, G=3), the stand-in for a descriptor QEMU did not
# trace in a scalable-mode log.
PC_GLOBAL = struct.pack("<QQ", 0x7 | 3 << 4, 0)
VTD_IQA = 0x90
VTD_IQA_DW = 1 << 11
_PASID_TYPES = (6, 7, 8)

CONTEXT_COMMENT = (
    "synthetic context entry; DID inferred from the guest's own DSI after the "
    "device-selective context invalidation"
)
PT_COMMENT = "synthetic pass-through entry: QEMU switched the device out of translation here"
EARLY_COMMENT = (
    "synthetic entry written without a context-cache invalidation of the device (no caching "
    "mode); DID of the IOTLB invalidation its first device-TLB invalidation follows"
)
READ_COMMENT = "the guest's context entry, as QEMU read it (vtd_iotlb_cc_update)"
PASID_COMMENT = (
    "synthetic PASID entry of RID_PASID 0; DID inferred from the guest's next IOTLB invalidation"
)
PASID_SECOND_STAGE_COMMENT = (
    "synthetic second-stage (PGTT=2) PASID entry of RID_PASID 0: the guest invalidates with "
    "IOTLB descriptors; DID inferred from its next IOTLB invalidation"
)


@dataclass(slots=True)
class Doorbell:
    """One guest doorbell: its raw queue entries, the log line of each, and the time."""

    t: float | None
    entries: list[bytes] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    # descriptors QEMU processed without tracing them: (position among entries, head line)
    gaps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def untraced(self) -> int:
        return len(self.gaps)


@dataclass(slots=True)
class VtdLog:
    doorbells: list[Doorbell]
    dw: int | None  # from an IQA write
    # (line, SID, pass-through?) of address-space switches QEMU made while translating
    switches: list[tuple[int, int, bool]] = field(default_factory=list)
    devices: set[int] = field(default_factory=set)  # every SID the log names
    dmar_traced: bool = False  # the log has vtd_dmar_enable events
    # (line, SID, entry) of the context entries QEMU read (vtd_iotlb_cc_update): qw0, qw1
    contexts: list[tuple[int, int, bytes]] = field(default_factory=list)

    @property
    def untraced(self) -> int:
        return sum(d.untraced for d in self.doorbells)


def parse_vtd(lines: Iterable[str] | Iterable[Event]) -> VtdLog:
    """The descriptors of a QEMU intel-iommu trace log, grouped per IQT write (16 bytes each:
    qw0, qw1)."""
    doorbells: list[Doorbell] = []
    current: Doorbell | None = None
    dw: int | None = None
    pending = 0  # line of a vtd_inv_qi_head without its vtd_inv_desc yet
    dmar: bool | None = None
    log = VtdLog(doorbells, None)
    stream = _as_events(lines)
    log.dmar_traced = any(ev.name == "vtd_dmar_enable" for ev in stream)
    if log.dmar_traced:
        dmar = False  # translation is off until the log says it is on
    for ev in stream:
        name = ev.name
        if name in ("vtd_inv_qi_head", "vtd_inv_qi_tail", "vtd_inv_qi_fetch") and pending:
            assert current is not None
            current.gaps.append((len(current.entries), pending))
            pending = 0
        if name == "vtd_inv_qi_tail" or (
            name == "vtd_inv_qi_fetch" and (current is None or current.entries or current.untraced)
        ):
            current = Doorbell(ev.t)
            doorbells.append(current)
        elif name == "vtd_inv_qi_head":
            if current is None:
                current = Doorbell(ev.t)
                doorbells.append(current)
            pending = ev.line
        elif name == "vtd_inv_desc":
            pending = 0
            if current is None:
                current = Doorbell(ev.t)
                doorbells.append(current)
            qw0, qw1 = int(ev.fields["lo"], 16), int(ev.fields["hi"], 16)
            if qw0 > U64 or qw1 > U64:
                raise ImportLogError(f"line {ev.line}: descriptor word wider than 64 bits")
            current.entries.append(struct.pack("<QQ", qw0, qw1))
            current.lines.append(ev.line)
        elif name == "vtd_reg_write":
            if int(ev.fields["addr"], 16) == VTD_IQA and dw is None:
                dw = 256 if int(ev.fields["val"], 16) & VTD_IQA_DW else 128
        elif name == "vtd_dmar_enable":
            dmar = ev.fields["en"] == "1"
        elif name == "vtd_switch_address_space":
            sid = rid(ev)
            log.devices.add(sid)
            if dmar is not False:  # informative only while translation is on
                log.switches.append((ev.line, sid, ev.fields["on"] == "0"))
        elif name == "vtd_iotlb_cc_update":
            bus, devfn = int(ev.fields["bus"], 16), int(ev.fields["devfn"], 16)
            if bus > 0xFF or devfn > 0xFF:
                raise ImportLogError(f"line {ev.line}: {name}: no PCI device {bus:x}/{devfn:x}")
            sid = bus << 8 | devfn
            lo, hi = int(ev.fields["lo"], 16), int(ev.fields["hi"], 16)
            if lo > U64 or hi > U64:
                raise ImportLogError(f"line {ev.line}: context entry word wider than 64 bits")
            entry = struct.pack("<QQ", lo, hi)
            log.devices.add(sid)
            log.contexts.append((ev.line, sid, entry))
    if pending and current is not None:
        current.gaps.append((len(current.entries), pending))
    log.doorbells = [d for d in doorbells if d.entries or d.untraced]
    log.dw = dw
    return log


def _as_events(lines: Iterable[str] | Iterable[Event]) -> list[Event]:
    items = list(lines)
    if items and isinstance(items[0], Event):
        return [e for e in items if isinstance(e, Event)]
    return list(events([str(x) for x in items]))


def _descriptors(doorbell: Doorbell) -> Iterable[tuple[int, int]]:
    """``(qw0, line)`` of each descriptor."""
    lines = doorbell.lines or [0] * len(doorbell.entries)
    for entry, line in zip(doorbell.entries, lines, strict=True):
        yield struct.unpack_from("<Q", entry)[0], line


def device_selective_cc(doorbell: Doorbell) -> list[tuple[int, int]]:
    """``(SID, line)`` of the device-selective context-cache invalidations (FM = 0)."""
    return [
        ((qw0 >> 32) & 0xFFFF, line)
        for qw0, line in _descriptors(doorbell)
        if qw0 & 0xE0F == 0x1 and (qw0 >> 4) & 3 == 3 and (qw0 >> 48) & 3 == 0
    ]


def _devtlb_sid(qw0: int) -> int | None:
    """The SID of a device-TLB (qw0[47:32]) or PASID-based device-TLB (qw0[31:16])
    invalidation; None for other descriptors."""
    kind = qw0 & 0xE0F
    if kind == 0x3:
        return (qw0 >> 32) & 0xFFFF
    if kind == 0x8:
        return (qw0 >> 16) & 0xFFFF
    return None


def device_tlb_sids(log: VtdLog) -> set[int]:
    """SIDs named by (PASID-based) device-TLB invalidations: devices with an ATC."""
    sids = {_devtlb_sid(qw0) for doorbell in log.doorbells for qw0, _ in _descriptors(doorbell)}
    return {sid for sid in sids if sid is not None}


def _next_domain(doorbells: list[Doorbell], start: int) -> int | None:
    """The DID of the first domain- or page-selective IOTLB invalidation, or PASID-based
    IOTLB invalidation, from ``start`` on."""
    for doorbell in doorbells[start:]:
        for qw0, _ in _descriptors(doorbell):
            if (qw0 & 0xE0F == 0x2 and (qw0 >> 4) & 3 in (2, 3)) or qw0 & 0xE0F == 0x6:
                return (qw0 >> 16) & 0xFFFF
    return None


def log_sids(log: VtdLog) -> set[int]:
    """Every device the log shows: configured, invalidated or switched."""
    sids = set(log.devices) | device_tlb_sids(log)
    for doorbell in log.doorbells:
        sids |= {sid for sid, _ in device_selective_cc(doorbell)}
    return sids


def queue_width(log: VtdLog, options: ImportOptions) -> int:
    dw = options.dw or log.dw
    if dw is None:
        pasid = any(e[0] & 0xF in _PASID_TYPES for d in log.doorbells for e in d.entries)
        dw = 256 if pasid else 128
    return dw


def notes(log: VtdLog, options: ImportOptions) -> list[str]:
    """What the log cannot show, in words."""
    out: list[str] = []
    dw = queue_width(log, options)
    if log.untraced:
        fate = (
            "replayed as global PASID-cache invalidations (their content is not in the log)"
            if dw == 256
            else "left out"
        )
        out.append(
            f"{log.untraced} descriptors QEMU processed without tracing them (heads with no "
            "vtd_inv_desc: PASID-cache invalidations, and PASID-based IOTLB invalidations in "
            f"QEMU 7.2): {fate}"
        )
    if dw == 256 and options.synthesize and _second_stage(log):
        out.append(
            "the guest invalidates with (domain/page-selective) IOTLB descriptors, i.e. its "
            "tables are second-stage: their PASID entries are written as second stage "
            "(PGTT=2), which viommud does not nest (the devices are blocked)"
        )
    if dw == 256:
        out.append(
            "the upper 128 bits of each 256-bit descriptor are not in the log: written as zero"
        )
    if log.contexts and dw == 128:
        out.append(
            "context entries of devices QEMU read (vtd_iotlb_cc_update) are the guest's own, "
            "each put before the context-cache invalidation that preceded the read"
        )
    if options.synthesize and log.switches and not log.dmar_traced:
        out.append(
            "no vtd_dmar_enable event: every address-space switch is taken as made while "
            "translation was on"
        )
    return out


def vtd_records(log: VtdLog, options: ImportOptions, spec: HostSpec) -> list[dict[str, Any]]:
    dw = queue_width(log, options)
    scalable = dw == 256
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
    attach = attachments(spec, iommus)
    records += [
        {"op": "device_attach", "viommu": viommu, "vid": vid, "device": device}
        for vid, device in attach
    ]
    ats = {vid: spec.host.device(device).ats for vid, device in attach}
    pad = bytes(16) if scalable else b""
    t0 = next((d.t for d in log.doorbells if d.t is not None), None)
    cc_points: dict[int, list[int]] = {}  # sid -> lines of its device-selective invalidations
    for doorbell in log.doorbells:
        for sid, line in device_selective_cc(doorbell):
            cc_points.setdefault(sid, []).append(line)
    # Scalable mode: a descriptor QEMU did not trace is (most likely) a PASID-cache
    # invalidation; it is replayed as a global one, and is where a PASID entry may change.
    gap_lines = sorted(g for d in log.doorbells for _, g in d.gaps) if scalable else []
    points = {
        sid: sorted([*cc_points.get(sid, []), *gap_lines]) for sid in set(ats) | set(cc_points)
    }
    written: dict[int, tuple[bool, int | None]] = {}  # sid -> (pass-through, DID) written
    contexts: set[int] = set()  # scalable: SIDs whose context entry is written
    read = {} if scalable else read_entries(log, ats)  # doorbell -> the guest's own entries
    second = scalable and _second_stage(log)  # PGTT=2 rather than 1 for translating entries
    for sid in {sid for entries in read.values() for sid, _ in entries}:
        ats.pop(sid)  # their entries are the guest's, not synthesized
    early = early_devices(log, cc_points) if options.synthesize else {}
    early_at = _first_cc_doorbell(log)
    for number, doorbell in enumerate(log.doorbells):
        records += [
            {"op": "context_entry", "viommu": viommu, "sid": sid, "data": data.hex(),
             "comment": READ_COMMENT}
            for sid, data in read.get(number, [])
        ]  # fmt: skip
        if options.synthesize and number == early_at:
            for sid, first_did in sorted(early.items()):
                if sid in ats:
                    written[sid] = (False, first_did)
                    kind = (False, first_did, ats[sid], scalable)
                    made = _entries(viommu, sid, kind, contexts, second_stage=second)
                    made[-1]["comment"] = EARLY_COMMENT
                    records += made
        if options.synthesize:
            changes = [(sid, line, False) for sid, line in device_selective_cc(doorbell)]
            if scalable:
                changes += [(sid, g, True) for _, g in doorbell.gaps for sid in sorted(ats)]
            for sid, line, gap in sorted(changes, key=lambda c: c[1]):
                if sid not in ats:
                    continue
                did = _next_domain(log.doorbells, number)
                entry = _decide(log, points[sid], written.get(sid), (sid, line, gap), did)
                if entry is not None:
                    written[sid] = entry
                    pt, did = entry
                    kind = (pt, did or 0, ats[sid], scalable)
                    records += _entries(viommu, sid, kind, contexts, second_stage=second)
        entries = list(doorbell.entries)
        if scalable:
            for at, _ in reversed(doorbell.gaps):
                entries.insert(at, PC_GLOBAL)
        record: dict[str, Any] = {
            "op": "cmds",
            "viommu": viommu,
            "data": b"".join(e + pad for e in entries).hex(),
        }
        if doorbell.t is not None and t0 is not None:
            record["t"] = round(doorbell.t - t0, 6)
        if entries:
            records.append(record)
    return records


def _decide(
    log: VtdLog,
    points: list[int],
    before: tuple[bool, int | None] | None,
    point: tuple[int, int, bool],
    did: int | None,
) -> tuple[bool, int | None] | None:
    """The (pass-through, DID) entry to write at a configuration point ``(SID, line, gap)``
    of a device whose last written entry is ``before``; None to write nothing. A gap (an
    untraced descriptor) shows only a change of kind QEMU's switches make visible, of a
    device whose entries are already known."""
    sid, line, gap = point
    pt = _observed(log, points, sid, line)
    if gap:
        if pt is None or before is None or before[0] == pt:
            return None
    elif pt is None:
        pt = before[0] if before is not None else False
    if (did is None and not pt) or before == (pt, did):
        return None
    return pt, did


def _observed(log: VtdLog, points: list[int], sid: int, line: int) -> bool | None:
    """Pass-through or not, by the last informative switch of ``sid`` after ``line`` and
    before the device's next device-selective invalidation; None when the log shows none.
    The last, because a guest without caching mode writes the new entry after invalidating
    the old one, and QEMU picks it up at the device's next DMA (vtd_pt_enable_fast_path)."""
    later = [p for p in points if p > line]
    end = later[0] if later else float("inf")
    seen = [pt for at, switched, pt in log.switches if switched == sid and line < at < end]
    return seen[-1] if seen else None


def read_entries(log: VtdLog, devices: dict[int, bool]) -> dict[int, list[tuple[int, bytes]]]:
    """Legacy mode: the context entries QEMU read from guest memory (``vtd_iotlb_cc_update``),
    each change put before the last doorbell with a context-cache invalidation that covers
    the device before QEMU read it (the first such doorbell when none came before: an entry
    written without one), keyed by doorbell index."""
    covering: list[tuple[int, int, int | None]] = []  # (line, doorbell, SID or None = all)
    for number, doorbell in enumerate(log.doorbells):
        for qw0, line in _descriptors(doorbell):
            if qw0 & 0xE0F == 0x1:
                device = (qw0 >> 32) & 0xFFFF if (qw0 >> 4) & 3 == 3 else None
                covering.append((line, number, device))
    out: dict[int, list[tuple[int, bytes]]] = {}
    last: dict[int, bytes] = {}
    for line, sid, entry in log.contexts:
        if sid not in devices or last.get(sid) == entry:
            continue
        last[sid] = entry
        before = [n for at, n, d in covering if at < line and d in (None, sid)]
        first = next((n for _, n, d in covering if d in (None, sid)), 0)
        out.setdefault(before[-1] if before else first, []).append((sid, entry))
    return out


def early_devices(log: VtdLog, points: dict[int, list[int]]) -> dict[int, int]:
    """Devices the guest invalidates before any device-selective context-cache invalidation
    of theirs (a guest without caching mode writes a new context entry without one), with
    the DID of the IOTLB invalidation their first device-TLB invalidation follows."""
    out: dict[int, int] = {}
    did: int | None = None
    for doorbell in log.doorbells:
        for qw0, line in _descriptors(doorbell):
            kind = qw0 & 0xE0F
            if (kind == 0x2 and (qw0 >> 4) & 3 in (2, 3)) or kind == 0x6:
                did = (qw0 >> 16) & 0xFFFF
            elif (sid := _devtlb_sid(qw0)) is not None and did is not None:
                first_cc = points.get(sid, [float("inf")])[0]
                if sid not in out and line < first_cc:
                    out[sid] = did
    return out


def _first_cc_doorbell(log: VtdLog) -> int:
    """The first doorbell with a context-cache invalidation (0 when none): where entries the
    guest wrote without one are put, so that it makes them take effect."""
    for number, doorbell in enumerate(log.doorbells):
        if any(qw0 & 0xE0F == 0x1 for qw0, _ in _descriptors(doorbell)):
            return number
    return 0


def _entries(
    viommu: str,
    sid: int,
    kind: tuple[bool, int, bool, bool],
    contexts: set[int],
    *,
    second_stage: bool = False,
) -> list[dict[str, Any]]:
    """The entries to write for ``sid``: ``kind`` is (pass-through, DID, ATS, scalable);
    ``second_stage``: a translating PASID entry is PGTT=2 (the guest's tables are)."""
    pt, did, ats, scalable = kind
    if not scalable:
        data = build_context_entry(
            p=1, tt=2 if pt else (1 if ats else 0), aw=2, did=did, slptptr=0x20000 + sid
        )
        comment = PT_COMMENT if pt else CONTEXT_COMMENT
        return [
            {"op": "context_entry", "viommu": viommu, "sid": sid, "data": data.hex(),
             "comment": comment}
        ]  # fmt: skip
    out: list[dict[str, Any]] = []
    if sid not in contexts:
        contexts.add(sid)
        context = build_scalable_context_entry(
            p=1, dte=1 if ats else 0, pasiddirptr=0x30000 + sid, rid_pasid=0
        )
        out.append(
            {"op": "context_entry", "viommu": viommu, "sid": sid, "data": context.hex(),
             "comment": "synthetic scalable-mode context entry (RID_PASID 0)"}
        )  # fmt: skip
    if pt:
        entry, comment = build_pasid_entry(p=1, pgtt=PGTT_PASS_THROUGH, aw=2, did=did), PT_COMMENT
    elif second_stage:
        entry = build_pasid_entry(p=1, pgtt=PGTT_SECOND_STAGE, aw=2, did=did, slptptr=0x20000 + sid)
        comment = PASID_SECOND_STAGE_COMMENT
    else:
        entry = build_pasid_entry(p=1, pgtt=PGTT_FIRST_STAGE, aw=2, did=did, flptptr=0x20000 + sid)
        comment = PASID_COMMENT
    out.append(
        {"op": "pasid_entry", "viommu": viommu, "sid": sid, "pasid": 0, "data": entry.hex(),
         "comment": comment}
    )  # fmt: skip
    return out


def _second_stage(log: VtdLog) -> bool:
    """Whether the guest invalidates with type-2 IOTLB descriptors (second-stage tables)."""
    return any(
        qw0 & 0xE0F == 0x2 and (qw0 >> 4) & 3 in (2, 3)
        for doorbell in log.doorbells
        for qw0, _ in _descriptors(doorbell)
    )


def attachments(spec: HostSpec, iommus: list[str]) -> list[tuple[int, str]]:
    if spec.attach:
        return list(spec.attach)
    return [(d.sid, d.id) for d in spec.host.devices if d.iommu in iommus]
