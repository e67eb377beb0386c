"""VT-d nested-HWPT invalidations of a group commit, coalesced with numpy.

A group commit sends what a run of plain doorbells (viommud.group_commit.vtd_screen) asks of one
nested HWPT — its IOTLB-class invalidations and the device-TLB invalidations the elision rule
keeps — as one ``IOMMU_HWPT_INVALIDATE`` array. The kernel carries the entries out one after
the other, each as an IOTLB flush of its range followed by the device TLBs of every ATS device
on the HWPT (``cache_tag_flush_range``, iommufd.md §4.3), and the call returns before any wait
of the run is reported complete; so within the array the entries form a set. On page spans
``[start, end)`` (``FULL_PAGES`` = the whole space):

* a whole-space entry without LEAF covers every other one: it alone is sent;
* an entry whose span lies inside another's is dropped where the other has no LEAF or both
  have it (duplicates: one stays) — the per-doorbell path's folding (docs/vtd.md);
* spans of one LEAF class that overlap or touch become their union, written as the fewest
  naturally aligned power-of-two blocks, when that takes fewer entries than the spans it
  replaces. The kernel turns each entry into the smallest naturally aligned block covering
  it (``calculate_psi_aligned_address``, vtd.md §5.3, iommufd.md §4.3), so an aligned block
  is flushed exactly; and the guest's spans are aligned blocks themselves (PSI ADDR/AM,
  vtd.md §1.4 and §1.8; the PCIe ATS size encoding, §1.5): the host flushes the same pages
  as before, in fewer entries. (The union as one entry would be rounded up to a block that
  can be far larger: two 16-page blocks on either side of a 512-page boundary.)

Spans are in 4 KiB pages; ``pack`` lays the result out as ``iommu_hwpt_vtd_s1_invalidate``
entries.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protocols.vtd import IOMMU_VTD_INV_FLAGS_LEAF, VTD_INV_ALL_PAGES, VTD_S1_SIZE
from viommud.group_commit.vtd_screen import FULL_PAGES

I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Spans = tuple[I64, I64, Bools]  # start, end, leaf

_ALL_PAGES = np.uint64(VTD_INV_ALL_PAGES)
_WORDS = 3  # an entry as u64 words: addr, npages, then flags and __reserved as one word
assert VTD_S1_SIZE == _WORDS * 8


def coalesce(start: I64, end: I64, leaf: Bools) -> Spans:
    """The entries to send for a set of spans (each with its LEAF flag)."""
    if len(start) < 2:
        return start, end, leaf
    whole = np.flatnonzero((start == 0) & (end >= FULL_PAGES) & ~leaf)
    if len(whole):
        return start[whole[:1]], end[whole[:1]], leaf[whole[:1]]
    start, end, leaf = _drop_covered(start, end, leaf)
    return _merge(start, end, leaf)


def _drop_covered(start: I64, end: I64, leaf: Bools) -> Spans:
    """Without the spans that lie inside another (an entry without LEAF covers both kinds, a
    LEAF one only LEAF spans). Sorted by start, then longest first, then without LEAF first,
    a span is covered exactly when an earlier one that may cover it reaches its end."""
    order = np.lexsort((leaf, -end, start))
    start, end, leaf = start[order], end[order], leaf[order]
    reach_any = np.maximum.accumulate(end)
    reach_full = np.maximum.accumulate(np.where(leaf, -1, end))
    covered = np.zeros(len(start), dtype=np.bool_)
    covered[1:] = np.where(leaf[1:], reach_any[:-1] >= end[1:], reach_full[:-1] >= end[1:])
    keep = ~covered
    return start[keep], end[keep], leaf[keep]


def _merge(start: I64, end: I64, leaf: Bools) -> Spans:
    """Touching or overlapping spans of one LEAF class as aligned blocks, when fewer."""
    order = np.lexsort((start, leaf))
    start, end, leaf = start[order], end[order], leaf[order]
    # Within a class no span lies inside another, so ends rise with starts: a span joins the
    # one before it when it starts no later than that one ends.
    new = np.ones(len(start), dtype=np.bool_)
    new[1:] = (leaf[1:] != leaf[:-1]) | (start[1:] > end[:-1])
    first = np.flatnonzero(new)
    members = np.diff(np.append(first, len(start)))
    several = np.flatnonzero(members > 1)
    if not len(several):
        return start, end, leaf
    keep = np.ones(len(start), dtype=np.bool_)
    blocks: list[tuple[int, int, bool]] = []
    for at, n in zip(first[several].tolist(), members[several].tolist(), strict=True):
        union = aligned_blocks(int(start[at]), int(end[at + n - 1]))
        if len(union) < n:
            keep[at : at + n] = False
            flag = bool(leaf[at])
            blocks += [(lo, hi, flag) for lo, hi in union]
    if not blocks:
        return start, end, leaf
    added = np.array(blocks, dtype=np.int64).reshape(-1, 3)
    return (
        np.concatenate((start[keep], added[:, 0])),
        np.concatenate((end[keep], added[:, 1])),
        np.concatenate((leaf[keep], added[:, 2] != 0)),
    )


def aligned_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` (pages) as the fewest naturally aligned power-of-two blocks."""
    out = []
    while start < end:
        size = start & -start if start else FULL_PAGES
        while size > end - start:
            size >>= 1
        out.append((start, start + size))
        start += size
    return out


def pack(start: I64, end: I64, leaf: Bools) -> bytes:
    """``iommu_hwpt_vtd_s1_invalidate`` entries (iommufd.md §4.2): ``addr``, ``npages``,
    then ``flags`` (LEAF) and ``__reserved`` (0) as one little-endian word (the layout of
    ``protocols.vtd.IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT``); the whole space is ``addr 0,
    npages VTD_INV_ALL_PAGES``."""
    entries = np.empty((len(start), _WORDS), dtype="<u8")
    whole = (start == 0) & (end >= FULL_PAGES)
    first = start.astype(np.uint64)
    entries[:, 0] = first << np.uint64(12)
    entries[:, 1] = np.where(whole, _ALL_PAGES, end.astype(np.uint64) - first)
    entries[:, 2] = np.where(leaf, IOMMU_VTD_INV_FLAGS_LEAF, 0)
    return entries.tobytes()
