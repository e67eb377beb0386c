"""Screening many VT-d doorbells at once, for group commit (docs/coalescing.md, "Group commit").

``screen(doorbells, features)`` decodes the descriptors of a list of doorbells (one IQT write
each) with a few numpy operations over all of them, and marks a doorbell *plain* when

* every descriptor is an IOTLB (type 2) or PASID-based IOTLB (6) invalidation, a device-TLB
  (3) or PASID-based device-TLB (8) invalidation, or an invalidation wait (5), and
* none of them is one ``VtdFrontend`` answers with an IQE (vtd.md §1, QEMU's rules): a
  PASID-based type in a 128-bit queue, qw2/qw3 not zero in a 256-bit queue, a reserved bit
  under ``frontend.RESERVED`` (the wait's PD without ECAP.PDS), IOTLB G=0 or page-selective
  AM > MAMV, P_IOTLB G=0/1, a wait with none of SW, IF, FN (PD with PDS).

Why these: a plain doorbell re-reads no guest entry (no context-cache or PASID-cache
invalidation), so every device keeps its binding, HWPT and join time while a run of plain
doorbells is carried out, and none of its descriptors can raise an IQE by itself. Its only
effects are IOTLB-class and device-TLB work on nested HWPTs and completed waits with their
status writes, all decided by the descriptors and that unchanging topology, so consecutive
plain doorbells can share host calls. Interrupt-entry-cache invalidations and page group
responses forward nothing; a doorbell holding one simply goes the per-doorbell way, with the
configuration ones. This module only decides — the frontend words every error — and a test
holds it to the frontend on random doorbells of both widths.

The screen also decodes, as arrays, what the frontend's events would carry for each
invalidation (domain, PASID, page span, IH; device, PASID, span): ``plain_work`` hands a run's
share to ``vtd_plan.plan_run``; ``status_writes`` gives the completions of its waits.

numpy's fixed cost per operation outweighs its speed on a handful of descriptors, and a
socket read often brings only one or two doorbells: below ``SMALL`` descriptors a scratch
``VtdFrontend`` screens them instead — the frontend itself, so exact by construction — and
its events are the run's work (``Screen.events``).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from protocols.vtd import DescType
from viommud.events import CompletionInterrupt, GuestError, StatusWrite, VtdEvent
from viommud.frontends.compat import QEMU
from viommud.frontends.vtd.frontend import (
    MAMV,
    RESERVED,
    WAIT_PD,
    FrameError,
    VtdFeatures,
    VtdFrontend,
)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

#: The descriptor types a plain doorbell may hold.
PLAIN_TYPES = (
    DescType.IOTLB_INV,
    DescType.DEV_TLB_INV,
    DescType.INV_WAIT,
    DescType.P_IOTLB_INV,
    DescType.P_DEV_TLB_INV,
)
SMALL = 96  # descriptors: fewer are screened by a scratch frontend, not numpy
FULL_PAGES = 1 << 52  # end page (exclusive) of the whole 64-bit space: topology FULL_END >> 12
NO_ID = -1  # "None" in the domain / PASID arrays
_ADDR_BITS = 52  # an address mask of 52 bits or more is the whole space (frontend.ADDR_BITS)
_IOTLB, _DEVTLB, _WAIT = int(DescType.IOTLB_INV), int(DescType.DEV_TLB_INV), int(DescType.INV_WAIT)
_P_IOTLB, _P_DEVTLB = int(DescType.P_IOTLB_INV), int(DescType.P_DEV_TLB_INV)
_ALL = 0xFFFF_FFFF_FFFF_FFFF
_PLAIN_SET = frozenset(int(kind) for kind in PLAIN_TYPES)


@lru_cache(maxsize=4)
def _tables(wide: bool, pds: bool) -> tuple[Bools, U64, U64]:
    """Per 7-bit type: plain in this queue width, and the reserved bits of qw0 and qw1."""
    plain = np.zeros(128, dtype=np.bool_)
    reserved0 = np.full(128, _ALL, dtype=np.uint64)
    reserved1 = np.full(128, _ALL, dtype=np.uint64)
    for kind in PLAIN_TYPES:
        if not wide and kind in (DescType.P_IOTLB_INV, DescType.P_DEV_TLB_INV):
            continue  # a PASID-based type in a 128-bit queue is an IQE
        m0, m1 = RESERVED[kind]
        if kind == DescType.INV_WAIT and not pds:
            m0 |= WAIT_PD
        plain[kind] = True
        reserved0[kind], reserved1[kind] = m0, m1
    return plain, reserved0, reserved1


@dataclass(frozen=True, slots=True)
class TlbWork:
    """IOTLB and PASID-IOTLB invalidations (``DomainInvalidation`` events), guest order.
    Spans are in 4 KiB pages, end exclusive; ``start 0, end FULL_PAGES`` is the whole space."""

    row: I64  # descriptor (row of the screen)
    domain: I64  # DID; NO_ID: every domain (global)
    pasid: I64  # NO_ID: every PASID of the domain (type 2)
    start: I64
    end: I64
    leaf: Bools  # IH of a page-selective invalidation

    def rows(self, lo: int, hi: int) -> TlbWork:
        """Those of rows ``lo`` to ``hi - 1``."""
        a, b = np.searchsorted(self.row, (lo, hi)).tolist()
        return TlbWork(
            self.row[a:b],
            self.domain[a:b],
            self.pasid[a:b],
            self.start[a:b],
            self.end[a:b],
            self.leaf[a:b],
        )


@dataclass(frozen=True, slots=True)
class DeviceTlbWork:
    """Device-TLB and PASID device-TLB invalidations (``Invalidation`` events), guest order."""

    row: I64
    device: I64  # source ID
    pasid: I64  # NO_ID: requests without PASID (type 3), or every PASID (P_DEVTLB G=1)
    start: I64
    end: I64

    def rows(self, lo: int, hi: int) -> DeviceTlbWork:
        """Those of rows ``lo`` to ``hi - 1``."""
        a, b = np.searchsorted(self.row, (lo, hi)).tolist()
        return DeviceTlbWork(
            self.row[a:b], self.device[a:b], self.pasid[a:b], self.start[a:b], self.end[a:b]
        )


@dataclass(frozen=True, slots=True)
class PlainWork:
    """The forwarding work of a run of plain doorbells."""

    doorbell: I64  # per row of the screen: its doorbell
    tlb: TlbWork
    device_tlb: DeviceTlbWork


@dataclass(frozen=True, slots=True)
class Bulk:
    """A large screen's descriptors as arrays: ``words`` (qw0, qw1 per row; the upper words of
    a 256-bit descriptor hold no field), their types, and what their invalidations carry
    (meaningful for plain doorbells only)."""

    words: U64  # shape (descriptors, 2)
    kinds: npt.NDArray[np.intp]
    work: PlainWork


@dataclass(frozen=True, slots=True)
class Screen:
    """The decoded descriptors of a list of doorbells and which of them are plain.

    Doorbell ``k`` owns rows ``starts[k]:starts[k + 1]``; a doorbell that is empty or not a
    whole number of descriptors owns no rows and is never plain (the frontend refuses or
    answers it). A large screen holds its rows as arrays (``bulk``), a small one the events
    the frontend gave for each plain doorbell (``events``; empty for the others)."""

    doorbells: list[bytes]
    features: VtdFeatures
    starts: list[int]
    plain: list[bool]
    syncs: list[int]  # waits per doorbell, all completing (meaningful for plain ones)
    bulk: Bulk | None
    events: list[list[VtdEvent]] | None

    @property
    def desc_size(self) -> int:
        return self.features.desc_size

    def rows(self, first: int, stop: int) -> tuple[int, int]:
        """The row span of doorbells ``first`` to ``stop - 1``."""
        return self.starts[first], self.starts[stop]

    def descriptor(self, row: int) -> bytes:
        """The bytes of the descriptor at ``row``."""
        k = bisect_right(self.starts, row) - 1
        size = self.desc_size
        at = (row - self.starts[k]) * size
        return self.doorbells[k][at : at + size]

    def kinds(self, k: int) -> list[int]:
        """The descriptor types of doorbell ``k`` (none when it owns no rows)."""
        lo, hi = self.starts[k], self.starts[k + 1]
        if self.bulk is not None:
            kinds: list[int] = self.bulk.kinds[lo:hi].tolist()
            return kinds
        data, size = self.doorbells[k], self.desc_size
        return [_kind(data, i) for i in range(0, (hi - lo) * size, size)]

    def kind_counts(self, first: int, stop: int) -> dict[int, int]:
        """Descriptors per type in doorbells ``first`` to ``stop - 1``."""
        if self.bulk is None:
            counts: dict[int, int] = {}
            for k in range(first, stop):
                for kind in self.kinds(k):
                    counts[kind] = counts.get(kind, 0) + 1
            return counts
        lo, hi = self.rows(first, stop)
        found = np.bincount(self.bulk.kinds[lo:hi], minlength=128)
        return {kind: int(found[kind]) for kind in np.flatnonzero(found).tolist()}


def screen(doorbells: list[bytes], features: VtdFeatures, *, small: int = SMALL) -> Screen:
    """Decode ``doorbells`` (each one IQT write of a queue with ``features``) and mark the
    plain ones: the frontend's checks of §1.1-§1.10, vectorised over every descriptor (or,
    below ``small`` descriptors, the frontend's own)."""
    size = features.desc_size
    whole = [bool(d) and len(d) % size == 0 for d in doorbells]
    starts = [0]
    for data, ok in zip(doorbells, whole, strict=True):
        starts.append(starts[-1] + (len(data) // size if ok else 0))
    if starts[-1] < small:
        return _screen_each(doorbells, features, starts)
    blob = b"".join(d for d, ok in zip(doorbells, whole, strict=True) if ok)
    qws = np.frombuffer(blob, dtype="<u8").reshape(-1, size // 8)
    qw0, qw1 = qws[:, 0], qws[:, 1]
    kinds = ((qw0 & 0xF) | ((qw0 >> 5) & 0x70)).astype(np.intp)  # qw0[3:0] | qw0[11:9] << 4
    plain_types, reserved0, reserved1 = _tables(size == 32, features.pds)
    good = plain_types[kinds]
    if size == 32:
        good &= (qws[:, 2] | qws[:, 3]) == 0
    good &= ((qw0 & reserved0[kinds]) | (qw1 & reserved1[kinds])) == 0
    g = (qw0 >> 4) & 3
    page_am = qw1 & 0x3F
    good &= ~((kinds == _IOTLB) & ((g == 0) | ((g == 3) & (page_am > MAMV))))
    good &= ~((kinds == _P_IOTLB) & (g < 2))
    is_wait = kinds == _WAIT
    good &= ~(is_wait & ((qw0 & 0xF0) == 0))  # none of IF, SW, FN, PD (PD reserved sans PDS)
    if features.compat == QEMU:
        good &= ~(is_wait & ((qw0 & 0x30) == 0))  # QEMU 10.0: neither SW nor IF is an IQE
    bounds = np.asarray(starts, dtype=np.intp)
    bad = np.concatenate(([0], np.cumsum(~good)))[bounds]
    waits = np.concatenate(([0], np.cumsum(is_wait)))[bounds]
    plain = (np.asarray(whole, dtype=np.bool_) & (bad[1:] == bad[:-1])).tolist()
    syncs = (waits[1:] - waits[:-1]).tolist()
    doorbell = np.repeat(np.arange(len(doorbells), dtype=np.int64), np.diff(bounds))
    words = np.ascontiguousarray(qws[:, :2])
    work = PlainWork(doorbell, _tlb_work(words, kinds), _device_tlb_work(words, kinds))
    return Screen(doorbells, features, starts, plain, syncs, Bulk(words, kinds, work), None)


def _screen_each(doorbells: list[bytes], features: VtdFeatures, starts: list[int]) -> Screen:
    """A few descriptors: a scratch frontend decodes each doorbell; plain are those it takes
    whole, without an IQE, holding only ``PLAIN_TYPES``."""
    frontend = VtdFrontend(features)
    plain: list[bool] = []
    syncs: list[int] = []
    events: list[list[VtdEvent]] = []
    for k, data in enumerate(doorbells):
        try:
            frontend.receive_data(data)
        except FrameError:
            plain.append(False)
            syncs.append(0)
            events.append([])
            continue
        found = frontend.events()
        ok = starts[k + 1] > starts[k] and not any(type(e) is GuestError for e in found)
        if ok:
            size = features.desc_size
            ok = all(_kind(data, i) in _PLAIN_SET for i in range(0, len(data), size))
        plain.append(ok)
        syncs.append(frontend.last.syncs)
        events.append(found if ok else [])
    return Screen(doorbells, features, starts, plain, syncs, None, events)


def _kind(data: bytes, at: int) -> int:
    """The 7-bit type of the descriptor at byte ``at``: qw0[3:0] | qw0[11:9] << 4."""
    return (data[at] & 0xF) | (data[at + 1] & 0xE) << 3


def nothing_plain(doorbells: list[bytes], features: VtdFeatures) -> Screen:
    """A screen leaving every doorbell to the per-doorbell path (a lone doorbell has nothing
    to share)."""
    count = len(doorbells)
    nothing: list[list[VtdEvent]] = [[] for _ in doorbells]
    return Screen(
        doorbells, features, [0] * (count + 1), [False] * count, [0] * count, None, nothing
    )


def plain_work(
    screen: Screen, first: int, stop: int, *, small: int = SMALL
) -> PlainWork | list[list[VtdEvent]]:
    """What the frontend's events carry for plain doorbells ``first`` to ``stop - 1``: as
    arrays, or for fewer than ``small`` descriptors the events themselves (one list per
    doorbell; a large screen's short run is decoded by a scratch frontend)."""
    lo, hi = screen.rows(first, stop)
    if screen.events is not None:
        return screen.events[first:stop]
    assert screen.bulk is not None
    if hi - lo < small:
        frontend = VtdFrontend(screen.features)
        runs = []
        for data in screen.doorbells[first:stop]:
            frontend.receive_data(data)
            runs.append(frontend.events())
        return runs
    work = screen.bulk.work
    return PlainWork(work.doorbell, work.tlb.rows(lo, hi), work.device_tlb.rows(lo, hi))


def _tlb_work(words: U64, kinds: npt.NDArray[np.intp]) -> TlbWork:
    rows = np.flatnonzero((kinds == _IOTLB) | (kinds == _P_IOTLB))
    qw0, qw1, pasid_form = words[rows, 0], words[rows, 1], kinds[rows] == _P_IOTLB
    g = (qw0 >> 4) & 3
    domain = np.where(~pasid_form & (g == 1), NO_ID, ((qw0 >> 16) & 0xFFFF).astype(np.int64))
    pasid = np.where(pasid_form, ((qw0 >> 32) & 0xFFFFF).astype(np.int64), NO_ID)
    # Page-selective (G=3): 2^AM pages from ADDR aligned down (frontend.iotlb_span); AM >= 52
    # (P_IOTLB, no MAMV check) and the other granularities are the whole space.
    am = (qw1 & 0x3F).astype(np.int64)
    span = (g == 3) & (am < _ADDR_BITS)
    size = np.left_shift(np.int64(1), np.where(span, am, 0))
    start = np.where(span, (qw1 >> 12).astype(np.int64) & ~(size - 1), 0)
    end = np.where(span, start + size, FULL_PAGES)
    leaf = (g == 3) & ((qw1 & 0x40) != 0)
    return TlbWork(rows.astype(np.int64), domain, pasid, start, end, leaf)


def _device_tlb_work(words: U64, kinds: npt.NDArray[np.intp]) -> DeviceTlbWork:
    rows = np.flatnonzero((kinds == _DEVTLB) | (kinds == _P_DEVTLB))
    qw0, qw1, pasid_form = words[rows, 0], words[rows, 1], kinds[rows] == _P_DEVTLB
    device = np.where(pasid_form, (qw0 >> 16) & 0xFFFF, (qw0 >> 32) & 0xFFFF).astype(np.int64)
    every_pasid = ~pasid_form | ((qw1 & 1) != 0)  # type 3, or P_DEVTLB G=1
    pasid = np.where(every_pasid, NO_ID, ((qw0 >> 32) & 0xFFFFF).astype(np.int64))
    # PCIe ATS size encoding (frontend.device_tlb_span): S=1 gives 2^(k+1) pages for k
    # trailing one bits of ADDR[63:12]; from 52 bits on, the whole device TLB.
    s = np.where(pasid_form, (qw1 >> 11) & 1, qw1 & 1) != 0
    addr = (qw1 >> 12).astype(np.int64)
    ones = np.bitwise_count((~addr & (addr + 1)) - 1).astype(np.int64)
    whole = s & (ones + 1 >= _ADDR_BITS)
    size = np.left_shift(np.int64(1), np.where(s & ~whole, ones + 1, 0))
    start = np.where(whole, 0, addr & ~(size - 1))
    end = np.where(whole, FULL_PAGES, start + size)
    return DeviceTlbWork(rows.astype(np.int64), device, pasid, start, end)


def status_writes(screen: Screen, first: int, stop: int) -> list[list[tuple[int, int, int]]]:
    """Per doorbell ``first`` to ``stop - 1`` (all plain): ``(index, addr, data)`` of each
    wait with SW=1, in order — the dword-aligned status address qw1[63:2] and the status
    data qw0[63:32] (vtd.md §1.7)."""
    if screen.bulk is None:
        assert screen.events is not None
        return [
            [(e.index, e.addr, e.data) for e in events if type(e) is StatusWrite]
            for events in screen.events[first:stop]
        ]
    lo, hi = screen.rows(first, stop)
    words, kinds = screen.bulk.words[lo:hi], screen.bulk.kinds[lo:hi]
    rows = np.flatnonzero((kinds == _WAIT) & ((words[:, 0] & 0x20) != 0))
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(stop - first)]
    if not len(rows):
        return out
    starts = np.asarray(screen.starts[first:stop], dtype=np.int64) - lo
    doorbell = np.searchsorted(starts, rows, side="right") - 1
    index = rows - starts[doorbell]
    addr = words[rows, 1] & ~np.uint64(3)
    data = words[rows, 0] >> 32
    for k, i, a, d in zip(
        doorbell.tolist(), index.tolist(), addr.tolist(), data.tolist(), strict=True
    ):
        out[k].append((i, a, d))
    return out


def interrupts(screen: Screen, first: int, stop: int) -> list[list[int]]:
    """Per doorbell ``first`` to ``stop - 1`` (all plain): the index of each wait with IF=1
    (qw0 bit 4), in order — the completion interrupts its reply reports (VT-d §6.5.2.8)."""
    if screen.bulk is None:
        assert screen.events is not None
        return [
            [e.index for e in events if type(e) is CompletionInterrupt]
            for events in screen.events[first:stop]
        ]
    lo, hi = screen.rows(first, stop)
    words, kinds = screen.bulk.words[lo:hi], screen.bulk.kinds[lo:hi]
    rows = np.flatnonzero((kinds == _WAIT) & ((words[:, 0] & 0x10) != 0))
    out: list[list[int]] = [[] for _ in range(stop - first)]
    if not len(rows):
        return out
    starts = np.asarray(screen.starts[first:stop], dtype=np.int64) - lo
    doorbell = np.searchsorted(starts, rows, side="right") - 1
    for k, i in zip(doorbell.tolist(), (rows - starts[doorbell]).tolist(), strict=True):
        out[k].append(i)
    return out
