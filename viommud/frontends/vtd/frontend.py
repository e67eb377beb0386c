"""The VT-d queued-invalidation frontend: a sans-I/O state machine (h11 style).

``receive_data(doorbell)`` takes the descriptors the guest published with one IQT write
(16 or 32 bytes each, by the queue width ``dw``); ``next_event()`` returns the
intermediate-form events (viommud.events) one by one, then ``NEED_DATA``. The frontend never
calls a backend and never logs. It applies the guest-visible rules of QEMU's intel-iommu
(vtd.md §2.3, §4) and keeps the guest-visible state: the context and PASID-table entries the
guest wrote (decoded by viommud.guest.vtd, and lent to the events of context- and
PASID-cache invalidations as read-only snapshots), per-type and per-error counters. A host
failure reaches it through one call, ``host_failed``; plain doorbells a group commit carried
out without it, through ``took_in_bulk``.

Guest-visible rules (IQE = invalidation queue error, at the descriptor's index):
* an unknown type (the 7-bit ``qw0[3:0] | qw0[11:9] << 4``): IQE;
* a PASID-based type (P_IOTLB, PASID-cache, P_DEVTLB) in a 128-bit queue: IQE;
* in a 256-bit queue, a non-zero qw2 or qw3 (except the page group response, whose upper
  words QEMU does not check): IQE;
* a reserved bit under QEMU's masks (vtd.md §1): IQE. This vIOMMU has no ECAP.DIT (PFSID is
  reserved) and ECAP.PDS only with ``options.pds`` (else the wait's PD bit is reserved);
* a reserved encoding: context-cache G=0, IOTLB G=0, IOTLB page-selective AM > MAMV (18),
  P_IOTLB G=0/1, PASID-cache G=2, a wait with none of SW/IF/FN (PD with PDS), a page group
  response without PASID (PP=0): IQE.
Under ``compat: "qemu"`` (docs/vtd.md, "Compatibility policy") the rules are QEMU 10.0's
(``vtd_process_inv_desc``) where they differ: a page group response is an unknown type, a
PASID-cache invalidation is accepted in either queue width with any reserved bits, upper
words or granularity (QEMU 10.0 does nothing with it; here it re-reads as the cleaned
descriptor, G=2 as global), and a wait with neither SW nor IF (FN alone) is an IQE.
After an IQE the bad descriptor is skipped and the rest of the doorbell runs, as a Linux guest
does when it overwrites the bad slot with its wait descriptor and clears FSTS.IQE
(docs/trace-format.md §2.5). ITE and ICE are never raised: every device-TLB invalidation the host
performs completes
synchronously (QEMU never raises them either).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar, Final

from protocols.vtd import CONTEXT_ENTRY_SIZES, ICE, IQE, ITE, PASID_ENTRY_SIZE, DescType
from viommud.events import (
    Barrier,
    Cache,
    CompletionInterrupt,
    ContextCacheInvalidated,
    DomainInvalidation,
    GuestError,
    Invalidation,
    PageResponse,
    PasidCacheInvalidated,
    Scope,
    StatusWrite,
    VtdEvent,
)
from viommud.frontends.compat import ARCHITECTURE, QEMU, compat_option
from viommud.guest.vtd import (
    PasidEntry,
    VtdContext,
    decode_context_entry,
    decode_pasid_entry,
    descriptor_type,
    kind_name,
)

__all__ = [
    "CONTEXT_ENTRY_SIZES",
    "ICE",
    "IQE",
    "ITE",
    "NEED_DATA",
    "PASID_ENTRY_SIZE",
    "DoorbellSummary",
    "FrameError",
    "VtdEvent",
    "VtdFeatures",
    "VtdFrontend",
    "device_tlb_span",
    "iotlb_span",
]

NEED_DATA: Final = None  # what next_event() returns once the doorbell is fully consumed

PAGE_SHIFT = 12
MAMV = 18  # CAP.MAMV as QEMU advertises it: page-selective IOTLB AM <= 18
ADDR_BITS = 52  # an address field / mask of 52 bits or more covers the whole 64-bit space
U64 = (1 << 64) - 1

_ALL = U64

_PASID_TYPES = frozenset({DescType.P_IOTLB_INV, DescType.PC_INV, DescType.P_DEV_TLB_INV})
WAIT_PD = 1 << 7  # the wait descriptor's PD bit, qw0[7] (valid with ECAP.PDS only)

#: QEMU's reserved-bit masks per type: (qw0, qw1) (vtd.md §1.3-§1.11). The wait descriptor's
#: PD bit (qw0[7]) is added unless the vIOMMU advertises ECAP.PDS.
RESERVED: Final[dict[int, tuple[int, int]]] = {
    DescType.CC_INV: (0xFFFC_0000_0000_F1C0, _ALL),
    DescType.IOTLB_INV: (0xFFFF_FFFF_0000_F100, 0xF80),
    DescType.DEV_TLB_INV: (0xFFFF_0000_FFE0_F1F0, 0xFFE),
    DescType.IEC_INV: (0xFFFF_0000_07FF_F1E0, _ALL),
    DescType.INV_WAIT: (0xFFFF_F100, 0x3),
    DescType.P_IOTLB_INV: (0xFFF0_0000_0000_F1C0, 0xF80),
    DescType.PC_INV: (0xFFF0_0000_0000_F1C0, _ALL),
    DescType.P_DEV_TLB_INV: (0xFFF0_0000_0000_F000, 0x7FE),
    DescType.PGRP_RESP: (0xFFF0_0000_0000_01E0, 0xFFFF_FFFF_FFFF_F003),
}
# Under the qemu policy: QEMU 10.0 checks nothing of a PASID-cache invalidation (its case
# is "if scalable mode: break"), and the 256-bit-only rule and upper-word check skip it too.
QEMU_RESERVED: Final[dict[int, tuple[int, int]]] = {**RESERVED, DescType.PC_INV: (0, 0)}
QEMU_HAW = 48  # QEMU 10.0's default aw-bits (host address width); 39 in 7.2
_QEMU_PASID_TYPES = _PASID_TYPES - {DescType.PC_INV}
_UPPER_UNCHECKED = frozenset({DescType.PGRP_RESP})  # QEMU checks only its qw0 and qw1
_QEMU_UPPER_UNCHECKED = frozenset({DescType.PC_INV})


class FrameError(ValueError):
    """The doorbell itself is malformed (not a whole number of descriptors)."""

    def __init__(self, message: str, data: bytes) -> None:
        super().__init__(message)
        self.data = data


@dataclass(frozen=True, slots=True)
class VtdFeatures:
    """What this vIOMMU advertises (IQA.DW as the guest programmed it, ECAP.PDS)."""

    dw: int = 128  # descriptor width in bits: 128 or 256 (256 implies ECAP.SMTS)
    pds: bool = False  # ECAP.PDS: the wait descriptor's page-request drain bit is valid
    # ECAP.PRS: page requests of the host devices reach the guest's page request queue
    # (with HELLO ``events``; docs/vtd.md, "Page requests")
    prs: bool = False
    # How descriptors the architecture and QEMU read differently are treated (docs/vtd.md,
    # "Compatibility policy"): "architecture" or "qemu" (as QEMU 10.0 does).
    compat: str = ARCHITECTURE

    @property
    def desc_size(self) -> int:
        return self.dw // 8

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> VtdFeatures:
        unknown = set(options) - {"dw", "pds", "prs", "compat"}
        if unknown:
            raise ValueError(f"unknown vtd options: {', '.join(sorted(unknown))}")
        dw = options.get("dw", 128)
        if isinstance(dw, bool) or dw not in (128, 256):
            raise ValueError("vtd option 'dw' must be 128 or 256")
        pds = options.get("pds", False)
        if not isinstance(pds, bool):
            raise ValueError("vtd option 'pds' must be a boolean")
        prs = options.get("prs", False)
        if not isinstance(prs, bool):
            raise ValueError("vtd option 'prs' must be a boolean")
        compat = compat_option(options, "vtd")
        if prs and compat == QEMU:
            # QEMU 10.0 has no page requests: its page group response is an unknown type
            raise ValueError("vtd option 'prs' needs compat 'architecture' (QEMU 10.0 has no PRS)")
        return cls(dw=dw, pds=pds, prs=prs, compat=compat)


@dataclass(slots=True)
class DoorbellSummary:
    """What the last doorbell did: descriptors consumed and wait descriptors completed."""

    consumed: int = 0
    syncs: int = 0


def iotlb_span(addr_field: int, am: int) -> tuple[int, int]:
    """``(addr, size)`` in bytes of a page-selective (P_)IOTLB invalidation: 2^AM pages from
    ADDR aligned down to that size. ``size == 0`` is the whole address space (AM >= 52)."""
    if am >= ADDR_BITS:
        return 0, 0
    size = 1 << (PAGE_SHIFT + am)
    return (addr_field << PAGE_SHIFT) & ~(size - 1) & U64, size


def device_tlb_span(addr_field: int, s: int) -> tuple[int, int]:
    """``(addr, size)`` of a (P_)DEVTLB invalidation in the PCIe ATS encoding (vtd.md §1.5).

    S=0: the one 4 KiB page at ADDR. S=1: the lowest 0 bit of ADDR[63:12] at position k gives
    2^(k+1) pages, ADDR aligned down to that size. ``size == 0`` is the whole device TLB (the
    all-ones encoding ``0x7FFF_FFFF_FFFF_F``, where QEMU's 64-bit shift wraps)."""
    if not s:
        return (addr_field << PAGE_SHIFT) & U64, 1 << PAGE_SHIFT
    ones = (~addr_field & (addr_field + 1)).bit_length() - 1  # trailing one bits
    if ones + 1 >= ADDR_BITS:
        return 0, 0
    size = 1 << (PAGE_SHIFT + ones + 1)
    return (addr_field << PAGE_SHIFT) & ~(size - 1) & U64, size


def _bits(word: int, lo: int, width: int) -> int:
    return (word >> lo) & ((1 << width) - 1)


@dataclass(slots=True)
class VtdFrontend:
    """One vIOMMU's invalidation queue, as the guest sees it."""

    features: VtdFeatures = field(default_factory=VtdFeatures)
    # Guest memory the VMM reads at context- and PASID-cache invalidations, as written.
    context_table: dict[int, bytes] = field(default_factory=dict)  # source ID -> entry
    pasid_table: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (sid, pasid)
    # Descriptors seen per type (all of them, good or bad) and errors per code.
    type_counts: list[int] = field(default_factory=lambda: [0] * 128)
    error_counts: dict[str, int] = field(default_factory=dict)
    barriers: int = 0
    last: DoorbellSummary = field(default_factory=DoorbellSummary)
    _events: deque[VtdEvent] = field(default_factory=deque)
    # The two tables decoded. Once an event holds a view of one (``_lent_*``), the next
    # write copies it first, so what an event holds never changes (copy on write).
    _contexts: dict[int, VtdContext] = field(default_factory=dict)
    _pasids: dict[tuple[int, int], PasidEntry] = field(default_factory=dict)
    _lent_contexts: Mapping[int, VtdContext] | None = None
    _lent_pasids: Mapping[tuple[int, int], PasidEntry] | None = None

    model: ClassVar[str] = "vtd"

    # -- guest memory -------------------------------------------------------------------
    def write_context_entry(self, sid: int, data: bytes) -> None:
        """The guest wrote ``data`` as the context entry of source ID ``sid``."""
        if len(data) not in CONTEXT_ENTRY_SIZES:
            raise FrameError(f"a context entry is 16 or 32 bytes, got {len(data)}", data)
        self.context_table[sid] = bytes(data)
        if self._lent_contexts is not None:
            self._contexts, self._lent_contexts = dict(self._contexts), None
        context = decode_context_entry(data)
        if self.features.compat == QEMU and not context.reserved:
            # QEMU's context-entry reserved masks also hold qw0's bits at and above the host
            # address width (aw-bits, 48 by default in 10.0): such an entry faults there.
            qw0 = int.from_bytes(data[:8], "little")
            if qw0 >> QEMU_HAW:
                context = replace(context, reserved=True)
        self._contexts[sid] = context

    def write_pasid_entry(self, sid: int, pasid: int, data: bytes) -> None:
        """The guest wrote ``data`` as the PASID-table entry of ``(sid, pasid)``."""
        if len(data) != PASID_ENTRY_SIZE:
            raise FrameError(f"a PASID entry is {PASID_ENTRY_SIZE} bytes, got {len(data)}", data)
        self.pasid_table[(sid, pasid)] = bytes(data)
        if self._lent_pasids is not None:
            self._pasids, self._lent_pasids = dict(self._pasids), None
        self._pasids[(sid, pasid)] = decode_pasid_entry(data)

    def _context_snapshot(self) -> Mapping[int, VtdContext]:
        lent = self._lent_contexts
        if lent is None:
            lent = self._lent_contexts = MappingProxyType(self._contexts)
        return lent

    def _pasid_snapshot(self) -> Mapping[tuple[int, int], PasidEntry]:
        lent = self._lent_pasids
        if lent is None:
            lent = self._lent_pasids = MappingProxyType(self._pasids)
        return lent

    # -- sans-I/O verbs -----------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Consume one doorbell's descriptors; events become available from next_event()."""
        size = self.features.desc_size
        if len(data) % size:
            raise FrameError(
                f"a {self.features.dw}-bit invalidation queue takes whole {size}-byte "
                f"descriptors, got {len(data)} bytes",
                bytes(data),
            )
        summary = DoorbellSummary()
        counts = self.type_counts
        handlers, reserved = _HANDLERS, RESERVED
        pasid_types, upper_unchecked = _PASID_TYPES, _UPPER_UNCHECKED
        if self.features.compat == QEMU:
            handlers, reserved = _QEMU_HANDLERS, QEMU_RESERVED
            pasid_types, upper_unchecked = _QEMU_PASID_TYPES, _QEMU_UPPER_UNCHECKED
        wide = size == 32
        words = struct.iter_unpack("<QQQQ" if wide else "<QQ", data)
        for index, desc in enumerate(words):
            qw0, qw1 = desc[0], desc[1]
            kind = descriptor_type(qw0)
            counts[kind] += 1
            summary.consumed += 1
            handler = handlers.get(kind)
            raw = data[index * size : (index + 1) * size]
            if handler is None:
                self._iqe(index, raw, f"unknown descriptor type 0x{kind:02x}")
                continue
            if not wide and kind in pasid_types:
                self._iqe(index, raw, f"256-bit {kind_name(kind)} descriptor in a 128-bit queue")
                continue
            if wide and kind not in upper_unchecked and (desc[2] or desc[3]):
                self._iqe(index, raw, "reserved upper words qw2/qw3 are not zero")
                continue
            m0, m1 = reserved[kind]
            if kind == DescType.INV_WAIT and not self.features.pds:
                m0 |= WAIT_PD
            if qw0 & m0 or qw1 & m1:
                self._iqe(
                    index,
                    raw,
                    f"reserved bits set: qw0 0x{qw0 & m0:016x} qw1 0x{qw1 & m1:016x}",
                )
                continue
            if handler(self, index, qw0, qw1, raw):
                summary.syncs += 1
        self.last = summary

    def next_event(self) -> VtdEvent | None:
        """The next event of the doorbell, or NEED_DATA when it is fully consumed."""
        events = self._events
        return events.popleft() if events else NEED_DATA

    def events(self) -> list[VtdEvent]:
        """Drain every pending event at once (the dispatcher plans per doorbell)."""
        out = list(self._events)
        self._events.clear()
        return out

    def host_failed(self, errors: Iterable[GuestError]) -> None:
        """Count the guest-visible errors the host caused (``Outcome.host_errors``: IQE at
        the descriptor whose host call failed); the reply carries them to the guest."""
        counts = self.error_counts
        for error in errors:
            counts[error.code] = counts.get(error.code, 0) + 1

    def took_in_bulk(
        self, kind_counts: Mapping[int, int], waits: int, last: DoorbellSummary
    ) -> None:
        """Plain doorbells a group commit carried out without this frontend
        (viommud.group_commit.vtd_screen decoded them): count their descriptors per type
        (``kind_counts``) and their ``waits`` as ``receive_data`` would have, and keep
        ``last``, the summary of the last of them."""
        counts = self.type_counts
        for kind, count in kind_counts.items():
            counts[kind] += count
        self.barriers += waits
        self.last = last

    def kind_counts(self) -> dict[str, int]:
        """Descriptors seen, keyed ``vtd:NAME`` as the replay report wants."""
        return {f"vtd:{kind_name(t)}": n for t, n in enumerate(self.type_counts) if n}

    # -- per-type rules (each returns True for a completed wait) -------------------------
    def _iqe(self, index: int, raw: bytes, reason: str) -> bool:
        self.error_counts[IQE] = self.error_counts.get(IQE, 0) + 1
        self._events.append(GuestError(index, IQE, reason, bytes(raw)))
        return False

    def _on_cc(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        g = _bits(qw0, 4, 2)
        if g == 0:
            return self._iqe(index, raw, "context-cache invalidation with granularity 0")
        if g == 3:  # device-selective: SID under the function mask FM
            ignored = (0, 0b100, 0b110, 0b111)[_bits(qw0, 48, 2)]
            sid, mask, domain = _bits(qw0, 32, 16), 0xFFFF & ~ignored, None
        else:  # global, or domain-selective (handled as global, as QEMU does)
            sid, mask, domain = 0, 0, _bits(qw0, 16, 16) if g == 2 else None
        self._events.append(
            ContextCacheInvalidated(
                index,
                sid,
                mask,
                domain,
                bytes(raw),
                self._context_snapshot(),
                self._pasid_snapshot(),
            )
        )
        return False

    def _on_iotlb(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        g = _bits(qw0, 4, 2)
        if g == 0:
            return self._iqe(index, raw, "IOTLB invalidation with granularity 0")
        if g == 1:
            event = DomainInvalidation(index, None, raw=bytes(raw))
        elif g == 2:
            event = DomainInvalidation(index, _bits(qw0, 16, 16), raw=bytes(raw))
        else:
            am = qw1 & 0x3F
            if am > MAMV:
                return self._iqe(index, raw, f"page-selective IOTLB AM {am} > MAMV {MAMV}")
            addr, size = iotlb_span(qw1 >> PAGE_SHIFT, am)
            event = DomainInvalidation(
                index, _bits(qw0, 16, 16), None, addr, size, bool(qw1 & 0x40), bytes(raw)
            )
        self._events.append(event)
        return False

    def _on_dev_tlb(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        addr, size = device_tlb_span(qw1 >> PAGE_SHIFT, qw1 & 1)
        self._events.append(
            Invalidation(
                index,
                Cache.DEVICE_TLB,
                Scope.DEVICE,
                device=_bits(qw0, 32, 16),
                asid=None,  # requests without PASID
                addr=addr,
                size=size,
                raw=bytes(raw),
            )
        )
        return False

    def _on_iec(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        # Interrupt remapping has no iommufd counterpart (QEMU refreshes KVM MSI routes).
        return False

    def _on_wait(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        sw, if_, fn = qw0 & 0x20, qw0 & 0x10, qw0 & 0x40
        pd = qw0 & WAIT_PD  # reserved (checked above) unless the vIOMMU has ECAP.PDS
        if not (sw or if_ or fn or pd):
            return self._iqe(index, raw, "wait descriptor with none of SW, IF, FN")
        self.barriers += 1
        self._events.append(Barrier(index))
        if sw:
            self._events.append(StatusWrite(index, qw1 & ~0x3, qw0 >> 32))
        if if_:
            self._events.append(CompletionInterrupt(index))
        return True

    def _on_p_iotlb(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        g = _bits(qw0, 4, 2)
        did, pasid = _bits(qw0, 16, 16), _bits(qw0, 32, 20)
        if g < 2:
            return self._iqe(index, raw, f"P_IOTLB invalidation with granularity {g}")
        if g == 2:
            event = DomainInvalidation(index, did, pasid, raw=bytes(raw))
        else:
            addr, size = iotlb_span(qw1 >> PAGE_SHIFT, qw1 & 0x3F)
            event = DomainInvalidation(index, did, pasid, addr, size, bool(qw1 & 0x40), bytes(raw))
        self._events.append(event)
        return False

    def _on_pc(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        g = _bits(qw0, 4, 2)
        did, pasid = _bits(qw0, 16, 16), _bits(qw0, 32, 20)
        if g == 2:
            return self._iqe(index, raw, "PASID-cache invalidation with granularity 2")
        pasids = self._pasid_snapshot()
        if g == 3:
            event = PasidCacheInvalidated(index, None, None, bytes(raw), pasids)
        else:
            event = PasidCacheInvalidated(index, did, pasid if g == 1 else None, bytes(raw), pasids)
        self._events.append(event)
        return False

    def _on_p_dev_tlb(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        addr, size = device_tlb_span(qw1 >> PAGE_SHIFT, (qw1 >> 11) & 1)
        every_pasid = bool(qw1 & 1)
        self._events.append(
            Invalidation(
                index,
                Cache.DEVICE_TLB,
                Scope.DEVICE,
                device=_bits(qw0, 16, 16),
                asid=None if every_pasid else _bits(qw0, 32, 20),
                addr=addr,
                size=size,
                raw=bytes(raw),
            )
        )
        return False

    def _on_wait_qemu(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        # QEMU <= 10.1 (vtd_process_wait_desc): neither SW nor IF is "unknown type", FN alone
        # included (accepted from 10.2). SW and IF together: QEMU <= 10.0 asserts; both here.
        if not qw0 & 0x30:
            return self._iqe(index, raw, "wait descriptor with neither SW nor IF (QEMU)")
        return self._on_wait(index, qw0, qw1, raw)

    def _on_pc_qemu(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        # QEMU 10.0 accepts every PASID-cache invalidation and does nothing with it. Doing
        # nothing could leave a stale binding on the host, so it is carried out as the
        # architecture reads it, with G=2 (reserved) read as global: a superset.
        if _bits(qw0, 4, 2) == 2:
            qw0 |= 0x30
        return self._on_pc(index, qw0, qw1, raw)

    def _on_pgrp_resp(self, index: int, qw0: int, qw1: int, raw: bytes) -> bool:
        if not qw0 & 0x10:
            return self._iqe(index, raw, "page group response without PASID (PP=0)")
        if self.features.prs:  # the vIOMMU forwards it to the host (docs/vtd.md)
            self._events.append(
                PageResponse(
                    index,
                    _bits(qw0, 16, 16),
                    _bits(qw0, 32, 20),
                    _bits(qw1, 3, 9),
                    _bits(qw0, 12, 4),
                    bool(qw1 & 0x4),
                )
            )
        # Without ECAP.PRS no page request reached the guest: nothing to answer.
        return False


_Handler = Any  # Callable[[VtdFrontend, int, int, int, bytes], bool]

_HANDLERS: Final[dict[int, _Handler]] = {
    DescType.CC_INV: VtdFrontend._on_cc,
    DescType.IOTLB_INV: VtdFrontend._on_iotlb,
    DescType.DEV_TLB_INV: VtdFrontend._on_dev_tlb,
    DescType.IEC_INV: VtdFrontend._on_iec,
    DescType.INV_WAIT: VtdFrontend._on_wait,
    DescType.P_IOTLB_INV: VtdFrontend._on_p_iotlb,
    DescType.PC_INV: VtdFrontend._on_pc,
    DescType.P_DEV_TLB_INV: VtdFrontend._on_p_dev_tlb,
    DescType.PGRP_RESP: VtdFrontend._on_pgrp_resp,
}
#: Under the qemu policy (QEMU 10.0): no page group response (an unknown type until 2026),
#: FN alone is no wait, every PASID-cache invalidation is taken.
_QEMU_HANDLERS: Final[dict[int, _Handler]] = {
    **{kind: h for kind, h in _HANDLERS.items() if kind != DescType.PGRP_RESP},
    DescType.INV_WAIT: VtdFrontend._on_wait_qemu,
    DescType.PC_INV: VtdFrontend._on_pc_qemu,
}
