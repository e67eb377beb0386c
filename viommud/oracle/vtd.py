"""The oracle's VT-d models: what the guest asked for, and what a host call removed.

The guest side reads descriptors, context entries and PASID entries through the construct
declarations of ``protocols.vtd`` and keeps its own model of the vIOMMU that docs/vtd.md
specifies (VT-d §6.5 queued invalidation, §9.3/§9.4 context entries, §9.6 PASID entries;
QEMU's rules where the specification leaves room, reference vtd.md §1, §4.2). Nothing of the
daemon's decoders, frontend or topology is used.

Guest side (``VtdGuest``, one per VT-d vIOMMU):

* Descriptors: the oracle decides itself which ones are malformed (unknown type, PASID-based
  type in a 128-bit queue, non-zero qw2/qw3, a reserved bit, a reserved encoding). Reserved
  bits are the bits no declared field covers, plus the declared fields this vIOMMU does not
  implement (PFSID: no ECAP.DIT; the wait's PD without ECAP.PDS). A malformed descriptor,
  like one the daemon refused, asks for nothing: the guest was told it did not complete.
* Context cache (per source ID): the context entry the hardware read at the last
  context-cache invalidation covering the device (global and domain-selective: every
  device; device-selective: the source IDs equal under the function mask), and with a
  scalable-mode entry the PASID entry of its RID_PASID. An entry the trace never wrote leaves
  the device as it was; before any is read the device is untranslated (GPA = IOVA).
* PASID cache: refreshed by PASID-cache invalidations for devices whose cached context entry
  is scalable and valid: an entry gone (missing or P=0) is dropped whatever the granularity;
  otherwise domain-/PASID-selective ones need the DID of the cached entry (of the new one if
  none is cached) and the PASID to be the device's RID_PASID.
* Translation (``Translation``): scalable PGTT=1 (FLPM=0) entries give a nested stage 1
  tagged with their DID and RID_PASID; TT=2 / PGTT=4 give pass-through; legacy TT=0/1
  (second-level tables, never nested: docs/vtd.md "Legacy mode") and anything the hardware
  would fault on block the device.

Per descriptor:

* IOTLB (global, domain, page with AM/IH) and P_IOTLB (PASID, page): the IOTLB entries of
  every device whose translation is nested in that domain (and, for P_IOTLB, tagged with that
  PASID) must go, by the next wait descriptor;
* device-TLB and PASID device-TLB (G=1, or the PASID of the device's translation): the
  device's ATC (host device with ATS, nested translation). Per the guest model an ATC entry
  can only be stale since its address last went stale for that device: the latest
  IOTLB-class need of the device that covered the address, or the last change of the
  device's translation (table, width, flags, mode), whichever is later. Each part of the
  range counts the removals issued since its own time (``StaleSince``).

Host side (``VtdHost``): devices bound and attached (VFIO calls in the log); an
``IOMMU_HWPT_INVALIDATE`` of a VT-d nested HWPT removes, for each entry the kernel handled
(``entry_num``), the IOTLB and device-TLB entries of the range for every device attached to
that HWPT (iommufd.md §4.3).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any

from protocols.iommufd import IOMMU_VTD_INV_FLAGS_LEAF, HwptVtdS1Invalidate, decode
from protocols.vtd import (
    PASID_ENTRY_SIZE,
    DescType,
    build_context_entry,
    build_descriptor,
    build_scalable_context_entry,
    parse_context_entry,
    parse_descriptor,
    parse_pasid_entry,
)
from viommud.host import HostConfig
from viommud.oracle import DEVTLB, FULL, IOTLB, Ledger, Need, Piece, Removal

U64 = (1 << 64) - 1
PAGE_SHIFT = 12
ADDR_BITS = 52  # a mask or size of 2^52 pages or more is the whole address space

# What this vIOMMU advertises (docs/vtd.md; reference vtd.md §2.3).
MAMV = 18  # CAP.MAMV: page-selective IOTLB invalidations take AM <= 18
PGTT_FIRST_STAGE = 1  # the only translating PGTT: ECAP.FSTS without SSTS
PGTT_PASS_THROUGH = 4
FIRST_STAGE_WIDTH = 48  # FLPM=0, 4-level; 5-level first stage is not supported
TT_PASS_THROUGH = 2

TYPE_BITS = 0xE0F  # qw0[3:0] and qw0[11:9]: the 7-bit descriptor type
_PASID_TYPES = (DescType.P_IOTLB_INV, DescType.PC_INV, DescType.P_DEV_TLB_INV)
_CACHE_LIMIT = 1 << 14  # decoded descriptors remembered (a guest reuses few distinct ones)


# ---------------------------------------------------------------------------------------------
# Reserved bits, from the declarations: what no declared field covers.


def _words(raw: bytes) -> tuple[int, int]:
    return int.from_bytes(raw[0:8], "little"), int.from_bytes(raw[8:16], "little")


def _all_ones(kind: DescType) -> dict[str, int]:
    """Every declared field of ``kind`` at its largest value."""
    qw0 = U64 & ~TYPE_BITS | (kind & 0xF) | (kind >> 4) << 9  # all ones but the type
    fields = parse_descriptor(qw0.to_bytes(8, "little") + bytes([0xFF]) * 8)
    del fields["type"]
    return fields


def _bits_of(kind: DescType, fields: dict[str, int]) -> tuple[int, int]:
    """The qw0 and qw1 bits that ``fields`` occupy (the type bits left out)."""
    qw0, qw1 = _words(build_descriptor(kind, **fields))
    return qw0 & ~TYPE_BITS, qw1


def _reserved(kind: DescType) -> tuple[int, int]:
    fields = _all_ones(kind)
    used0, used1 = _bits_of(kind, fields)
    rsvd0, rsvd1 = U64 & ~used0 & ~TYPE_BITS, U64 & ~used1
    # PFSID is declared, but this vIOMMU has no ECAP.DIT: the field is reserved (VT-d §6.5.2.5).
    unimplemented = {k: v for k, v in fields.items() if k.startswith("pfsid")}
    if unimplemented:
        extra0, extra1 = _bits_of(kind, unimplemented)
        rsvd0, rsvd1 = rsvd0 | extra0, rsvd1 | extra1
    return rsvd0, rsvd1


RESERVED: dict[int, tuple[int, int]] = {int(kind): _reserved(kind) for kind in DescType}
WAIT_PD = _bits_of(DescType.INV_WAIT, {"pd": 1})[0]  # reserved unless ECAP.PDS


def _entry_reserved(parse: Any, build: Any, size: int) -> int:
    """The bits of a ``size``-byte entry no declared field covers."""
    used = int.from_bytes(build(**parse(bytes([0xFF]) * size)), "little")
    return ((1 << 8 * size) - 1) & ~used


LEGACY_RESERVED = _entry_reserved(parse_context_entry, build_context_entry, 16)
SCALABLE_RESERVED = _entry_reserved(parse_context_entry, build_scalable_context_entry, 32)


# ---------------------------------------------------------------------------------------------
# What a descriptor asks for


@dataclass(frozen=True, slots=True)
class Malformed:
    """The hardware answers IQE: the descriptor does nothing."""

    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    """An invalidation wait (VT-d §6.5.2.8): the barrier."""


@dataclass(frozen=True, slots=True)
class NoCacheEffect:
    """A well-formed descriptor that touches no translation cache (IEC, page response)."""


@dataclass(frozen=True, slots=True)
class ContextInvalidation:
    """Context-cache invalidation (VT-d §6.5.2.1) of the source IDs ``s`` with
    ``s & keep == sid & keep`` (``keep`` 0: every source ID)."""

    sid: int
    keep: int


@dataclass(frozen=True, slots=True)
class PasidInvalidation:
    """PASID-cache invalidation (VT-d §6.5.2.2): a domain (``did``), a PASID of it, or all."""

    did: int | None
    pasid: int | None


@dataclass(frozen=True, slots=True)
class TlbInvalidation:
    """IOTLB / P_IOTLB invalidation (VT-d §6.5.2.3, §6.5.2.4) of ``[lo, hi)`` in a domain
    (None: all) and PASID (None: any); ``leaf``: IH, only leaf entries changed."""

    did: int | None
    pasid: int | None
    lo: int
    hi: int
    leaf: bool


@dataclass(frozen=True, slots=True)
class DeviceTlbInvalidation:
    """Device-TLB / P_DEVTLB invalidation (VT-d §6.5.2.5, §6.5.2.6) of ``[lo, hi)`` in the
    device ``sid``'s ATC, for one PASID or (None) its requests without PASID / all PASIDs."""

    sid: int
    pasid: int | None
    lo: int
    hi: int


Effect = (
    Malformed
    | Wait
    | NoCacheEffect
    | ContextInvalidation
    | PasidInvalidation
    | TlbInvalidation
    | DeviceTlbInvalidation
)

_FM_IGNORES = (0, 0b100, 0b110, 0b111)  # context-cache FM: SID bits left out of the match


def page_span(addr: int, am: int) -> tuple[int, int]:
    """2^AM pages holding page ``addr``, aligned to that size (VT-d §6.5.2.3 ADDR/AM)."""
    if am >= ADDR_BITS:
        return FULL
    size = 1 << (PAGE_SHIFT + am)
    lo = (addr << PAGE_SHIFT) & ~(size - 1) & U64
    return lo, lo + size


def ats_span(addr: int, s: int) -> tuple[int, int]:
    """The PCIe ATS size encoding (VT-d §6.5.2.5): S=0 one page; S=1 2^(k+1) pages when the
    lowest 0 bit of ADDR[63:12] is bit k, aligned to that size; all ones: everything."""
    if not s:
        lo = (addr << PAGE_SHIFT) & U64
        return lo, lo + (1 << PAGE_SHIFT)
    k = 0
    while (addr >> k) & 1:
        k += 1
    if k + 1 >= ADDR_BITS:
        return FULL
    size = 1 << (PAGE_SHIFT + k + 1)
    lo = (addr << PAGE_SHIFT) & ~(size - 1) & U64
    return lo, lo + size


def read_descriptor(raw: bytes, pds: bool) -> Effect:
    """What one descriptor (16 or 32 bytes, the queue's width) asks of the hardware."""
    qw0, qw1 = _words(raw)
    kind = (qw0 & 0xF) | ((qw0 >> 9) & 0x7) << 4
    if kind not in RESERVED:
        return Malformed(f"unknown descriptor type {kind:#x}")
    if len(raw) == 16 and kind in _PASID_TYPES:
        return Malformed("PASID-based descriptor in a 128-bit queue")
    if len(raw) == 32 and kind != DescType.PGRP_RESP and any(raw[16:]):
        return Malformed("qw2/qw3 are reserved")  # QEMU checks them for all but PGRP_RESP
    rsvd0, rsvd1 = RESERVED[kind]
    if kind == DescType.INV_WAIT and not pds:
        rsvd0 |= WAIT_PD
    if qw0 & rsvd0 or qw1 & rsvd1:
        return Malformed("reserved bit set")
    f = parse_descriptor(raw)
    if kind == DescType.CC_INV:
        if f["g"] == 0:
            return Malformed("context-cache G=0")
        if f["g"] == 3:  # device-selective under the function mask
            return ContextInvalidation(f["sid"], 0xFFFF & ~_FM_IGNORES[f["fm"]])
        return ContextInvalidation(0, 0)  # global; domain-selective handled as global
    if kind == DescType.IOTLB_INV:
        if f["g"] == 0:
            return Malformed("IOTLB G=0")
        if f["g"] == 1:
            return TlbInvalidation(None, None, *FULL, False)
        if f["g"] == 2:
            return TlbInvalidation(f["did"], None, *FULL, False)
        if f["am"] > MAMV:
            return Malformed("page-selective IOTLB AM above MAMV")
        return TlbInvalidation(f["did"], None, *page_span(f["addr"], f["am"]), bool(f["ih"]))
    if kind == DescType.P_IOTLB_INV:
        if f["g"] < 2:
            return Malformed("P_IOTLB G=0/1")
        if f["g"] == 2:
            return TlbInvalidation(f["did"], f["pasid"], *FULL, False)
        span = page_span(f["addr"], f["am"])  # AM is not checked against MAMV (QEMU)
        return TlbInvalidation(f["did"], f["pasid"], *span, bool(f["ih"]))
    if kind == DescType.DEV_TLB_INV:
        return DeviceTlbInvalidation(f["sid"], None, *ats_span(f["addr"], f["s"]))
    if kind == DescType.P_DEV_TLB_INV:
        pasid = None if f["g"] else f["pasid"]
        return DeviceTlbInvalidation(f["sid"], pasid, *ats_span(f["addr"], f["s"]))
    if kind == DescType.PC_INV:
        if f["g"] == 2:
            return Malformed("PASID-cache G=2")
        if f["g"] == 3:
            return PasidInvalidation(None, None)
        return PasidInvalidation(f["did"], f["pasid"] if f["g"] == 1 else None)
    if kind == DescType.INV_WAIT:
        if not (f["sw"] or f["if_"] or f["fn"] or f["pd"]):
            return Malformed("wait with none of SW, IF, FN, PD")
        return Wait()
    if kind == DescType.PGRP_RESP and not f["pp"]:
        return Malformed("page group response without PASID")
    return NoCacheEffect()  # IEC, page group response


_decoded: dict[tuple[bytes, bool], Effect] = {}


def descriptor(raw: bytes, pds: bool) -> Effect:
    """``read_descriptor``, memoized."""
    key = (raw, pds)
    effect = _decoded.get(key)
    if effect is None:
        if len(_decoded) >= _CACHE_LIMIT:
            _decoded.clear()
        effect = _decoded[key] = read_descriptor(raw, pds)
    return effect


# ---------------------------------------------------------------------------------------------
# Which context / PASID entry gives which translation


UNTRANSLATED = "untranslated"  # no entry read yet: GPA = IOVA
BLOCKED = "blocked"
PASS_THROUGH = "pass-through"  # noqa: S105 - a mode, not a secret
NESTED = "nested"  # the guest's table as stage 1 over the VM's stage 2


@dataclass(frozen=True, slots=True)
class Translation:
    """What a device's requests go through per the guest's cached entries: ``mode``, the
    tags of its IOTLB entries (``did``; ``pasid``: RID_PASID in scalable mode, None in
    legacy mode) and ``walk``, what a stage-1 walk depends on (table, width, flags)."""

    mode: str
    did: int | None = None
    pasid: int | None = None
    walk: tuple[int, ...] = ()


def legacy_translation(raw: bytes) -> Translation:
    """A legacy-mode context entry (VT-d §9.3; docs/vtd.md)."""
    f = parse_context_entry(raw)
    if not f["p"] or int.from_bytes(raw, "little") & LEGACY_RESERVED:
        return Translation(BLOCKED)
    if f["tt"] == TT_PASS_THROUGH:
        return Translation(PASS_THROUGH, f["did"])
    # TT=0/1: a second-level table. It is never handed to the host as a first-stage table
    # (the formats differ, §9.8 vs §9.9) and there is no guest memory to shadow it, so the
    # VMM's promise (docs/vtd.md "Legacy mode") is that the device is blocked: it holds no
    # translation, so nothing of it can go stale.
    return Translation(BLOCKED)


def scalable_context_ok(raw: bytes) -> bool:
    """A scalable-mode context entry (VT-d §9.4) the hardware can use: present, no reserved
    bit set."""
    return bool(raw[0] & 1) and not int.from_bytes(raw, "little") & SCALABLE_RESERVED


def pasid_translation(entry: dict[str, int] | None, rid_pasid: int) -> Translation:
    """The RID_PASID entry of a usable scalable-mode context (VT-d §9.6; docs/vtd.md)."""
    if entry is None:
        return Translation(BLOCKED)
    if entry["pgtt"] == PGTT_PASS_THROUGH:
        return Translation(PASS_THROUGH, entry["did"], rid_pasid)
    if entry["pgtt"] != PGTT_FIRST_STAGE or entry["flpm"] != 0:
        return Translation(BLOCKED)
    flags = entry["sre"] | entry["eafe"] << 1 | entry["wpe"] << 2
    walk = (entry["flptptr"] << PAGE_SHIFT, FIRST_STAGE_WIDTH, flags)
    return Translation(NESTED, entry["did"], rid_pasid, walk)


# ---------------------------------------------------------------------------------------------
# When each address of a device's ATC last went stale


@dataclass(slots=True)
class StaleSince:
    """Disjoint ranges ``[lo, hi)`` of one device, each with the ledger time its IOTLB-class
    need was raised (the latest one wins); addresses in no range went stale when the device's
    translation last changed (``base``)."""

    base: int = 0
    starts: list[int] = field(default_factory=list)
    spans: list[Piece] = field(default_factory=list)

    LIMIT = 4096  # ranges kept; past it the oldest are forgotten (they fall back to ``base``)

    def reset(self, when: int) -> None:
        self.base = when
        self.starts.clear()
        self.spans.clear()

    def mark(self, lo: int, hi: int, when: int) -> None:
        if lo <= 0 and hi >= FULL[1]:
            self.reset(self.base)
            self.starts.append(0)
            self.spans.append((0, hi, when))
            return
        first = bisect_right(self.starts, lo) - 1
        if first < 0 or self.spans[first][1] <= lo:
            first += 1
        last = bisect_left(self.starts, hi)  # spans[first:last] overlap [lo, hi)
        keep: list[Piece] = []
        if first < last and self.spans[first][0] < lo:
            keep.append((self.spans[first][0], lo, self.spans[first][2]))
        keep.append((lo, hi, when))
        if first < last and self.spans[last - 1][1] > hi:
            keep.append((hi, self.spans[last - 1][1], self.spans[last - 1][2]))
        self.spans[first:last] = keep
        self.starts[first:last] = [p[0] for p in keep]
        if len(self.spans) > self.LIMIT:
            newest = sorted(self.spans, key=lambda p: p[2])[len(self.spans) // 2 :]
            self.spans = sorted(newest)
            self.starts = [p[0] for p in self.spans]

    def pieces(self, lo: int, hi: int) -> tuple[Piece, ...]:
        """``[lo, hi)`` cut where the time it went stale changes."""
        out: list[Piece] = []
        at = lo
        first = max(bisect_right(self.starts, lo) - 1, 0)
        for start, end, when in self.spans[first:]:
            if start >= hi:
                break
            if end <= at:
                continue
            if start > at:
                out.append((at, start, self.base))
            out.append((max(start, at), min(end, hi), when))
            at = min(end, hi)
        if at < hi:
            out.append((at, hi, self.base))
        merged: list[Piece] = []
        for piece in out:
            if merged and merged[-1][2] == piece[2] and merged[-1][1] == piece[0]:
                merged[-1] = (merged[-1][0], piece[1], piece[2])
            else:
                merged.append(piece)
        return tuple(merged)


# ---------------------------------------------------------------------------------------------
# The guest side


@dataclass(slots=True)
class _Device:
    device: str  # host device id: the place of its caches
    ats: bool  # the host device has an ATC
    stale: StaleSince
    context: bytes | None = None  # the context entry as cached; None: never read
    pasid_entry: dict[str, int] | None = None  # the RID_PASID entry as cached (present only)
    translation: Translation = Translation(UNTRANSLATED)


@dataclass(slots=True)
class VtdGuest:
    """One VT-d vIOMMU as the guest sees it."""

    name: str
    host: HostConfig
    ledger: Ledger
    options: dict[str, Any]
    width: int = field(init=False)  # descriptor size in bytes (IQA.DW)
    pds: bool = field(init=False)  # ECAP.PDS
    contexts: dict[int, bytes] = field(default_factory=dict)  # guest memory, by source ID
    pasids: dict[tuple[int, int], bytes] = field(default_factory=dict)  # by (sid, PASID)
    devices: dict[int, _Device] = field(default_factory=dict)
    _doorbell: bytes = b""
    _since: int = 0

    def __post_init__(self) -> None:
        self.width = 32 if self.options.get("dw", 128) == 256 else 16
        self.pds = bool(self.options.get("pds", False))

    def attach(self, sid: int, device: str) -> None:
        stale = StaleSince(self.ledger.begin())
        self.devices[sid] = _Device(device, self.host.device(device).ats, stale)

    def detach(self, sid: int) -> None:
        self.devices.pop(sid, None)

    def context_entry(self, sid: int, data: bytes) -> None:
        self.contexts[sid] = bytes(data)

    def pasid_entry(self, sid: int, pasid: int, data: bytes) -> None:
        self.pasids[(sid, pasid)] = bytes(data)

    def begin(self, data: bytes) -> None:
        self._doorbell = bytes(data)
        self._since = self.ledger.begin()

    def end(self, refused: set[int]) -> None:
        ledger, data, size = self.ledger, self._doorbell, self.width
        for index in range(len(data) // size):
            effect = descriptor(data[index * size : (index + 1) * size], self.pds)
            if index in refused or isinstance(effect, Malformed):
                continue
            if isinstance(effect, Wait):
                ledger.barrier_reached(self.name)
            elif isinstance(effect, TlbInvalidation):
                self._iotlb(effect, f"{self.name}[{index}] iotlb")
            elif isinstance(effect, DeviceTlbInvalidation):
                self._device_tlb(effect, f"{self.name}[{index}] devtlb")
            elif isinstance(effect, ContextInvalidation):
                for sid in sorted(self.devices):
                    if sid & effect.keep == effect.sid & effect.keep:
                        self._read_context(sid)
            elif isinstance(effect, PasidInvalidation):
                for sid in sorted(self.devices):
                    self._read_pasid(sid, effect)
        ledger.settle()

    # -- the caches the hardware refreshes ------------------------------------------------
    def _read_context(self, sid: int) -> None:
        dev = self.devices[sid]
        raw = self.contexts.get(sid)
        if raw is None:
            return  # never written: the device is left as it was
        dev.context, dev.pasid_entry = raw, None
        if len(raw) == 16:
            self._translate(dev, legacy_translation(raw))
        elif len(raw) == 32 and scalable_context_ok(raw):
            rid_pasid = parse_context_entry(raw)["rid_pasid"]
            dev.pasid_entry = self._pasid_in_memory(sid, rid_pasid)
            self._translate(dev, pasid_translation(dev.pasid_entry, rid_pasid))
        else:
            self._translate(dev, Translation(BLOCKED))

    def _read_pasid(self, sid: int, inv: PasidInvalidation) -> None:
        dev = self.devices[sid]
        raw = dev.context
        if raw is None or len(raw) != 32 or not scalable_context_ok(raw):
            return  # PASID entries are reached through a usable scalable-mode context
        rid_pasid = parse_context_entry(raw)["rid_pasid"]
        new = self._pasid_in_memory(sid, rid_pasid)
        cached = dev.pasid_entry
        if new is None:
            if cached is None:
                return
        elif inv.did is not None:  # gone entries are dropped whatever the granularity
            if inv.pasid is not None and inv.pasid != rid_pasid:
                return
            if (cached if cached is not None else new)["did"] != inv.did:
                return
        dev.pasid_entry = new
        self._translate(dev, pasid_translation(new, rid_pasid))

    def _pasid_in_memory(self, sid: int, pasid: int) -> dict[str, int] | None:
        raw = self.pasids.get((sid, pasid))
        if raw is None or len(raw) != PASID_ENTRY_SIZE:
            return None  # never written: reads as not present
        entry = parse_pasid_entry(raw)
        return entry if entry["p"] else None

    def _translate(self, dev: _Device, translation: Translation) -> None:
        old = dev.translation
        if (translation.mode, translation.walk) != (old.mode, old.walk):
            dev.stale.reset(self._since)  # every ATC entry may be stale from here on
        dev.translation = translation

    # -- needs ----------------------------------------------------------------------------
    def _iotlb(self, inv: TlbInvalidation, origin: str) -> None:
        for dev in self.devices.values():
            t = dev.translation
            if t.mode != NESTED:
                continue
            if inv.did is not None and t.did != inv.did:
                continue
            if inv.pasid is not None and t.pasid != inv.pasid:
                continue
            need = Need(IOTLB, (dev.device,), None, inv.lo, inv.hi, inv.leaf, origin=origin)
            self.ledger.need(need, self._since, due=False, owner=self.name)
            dev.stale.mark(inv.lo, inv.hi, self._since)

    def _device_tlb(self, inv: DeviceTlbInvalidation, origin: str) -> None:
        dev = self.devices.get(inv.sid)
        if dev is None or not dev.ats or dev.translation.mode != NESTED:
            return
        if inv.pasid is not None and inv.pasid != dev.translation.pasid:
            return  # requests with another PASID are not translated on the host
        need = Need(DEVTLB, (dev.device,), None, inv.lo, inv.hi, origin=origin)
        self.ledger.need(
            need, 0, due=False, pieces=dev.stale.pieces(inv.lo, inv.hi), owner=self.name
        )


# ---------------------------------------------------------------------------------------------
# The host side


@dataclass(slots=True)
class VtdHost:
    """Devices bound and attached, and what VT-d nested invalidations removed."""

    ledger: Ledger
    host: HostConfig
    devids: dict[int, str] = field(default_factory=dict)
    attached: dict[str, int] = field(default_factory=dict)  # device -> pt_id

    def call(self, ioctl: str, err: int, call: dict[str, Any], iommu: str | None) -> None:
        if ioctl == "IOMMU_HWPT_INVALIDATE":
            if (
                call.get("data_type") == "HWPT_VTD_S1"
                and call.get("object", {}).get("kind") == "hwpt"
            ):
                self._invalidate(call)
            return
        if err:
            return
        args, out = call.get("args", {}), call.get("out", {})
        if ioctl == "VFIO_DEVICE_BIND_IOMMUFD":
            self.devids[out["out_devid"]] = args["device"]
        elif ioctl == "VFIO_DEVICE_ATTACH_IOMMUFD_PT":
            device = self.devids.get(args["dev_id"])
            if device is not None:
                self.attached[device] = args["pt_id"]
        elif ioctl == "VFIO_DEVICE_DETACH_IOMMUFD_PT":
            device = self.devids.get(args["dev_id"])
            if device is not None:
                self.attached.pop(device, None)

    def _invalidate(self, call: dict[str, Any]) -> None:
        hwpt = call["object"]["id"]
        devices = [d for d, pt in self.attached.items() if pt == hwpt]
        for raw in call["entries"][: call["entry_num"]]:
            entry = decode(HwptVtdS1Invalidate, bytes.fromhex(raw))
            leaf = bool(entry.flags & IOMMU_VTD_INV_FLAGS_LEAF)
            if entry.npages == U64:
                lo, hi = FULL
            else:
                lo, hi = entry.addr, entry.addr + (entry.npages << PAGE_SHIFT)
            removal = self.ledger.new_entry()
            for device in devices:
                self.ledger.remove(Removal(IOTLB, (device,), None, lo, hi, leaf), removal)
                if self.host.device(device).ats:
                    self.ledger.remove(Removal(DEVTLB, (device,), None, lo, hi), removal)
