"""The coalescing rules of smmuv3_coalesce, vectorised for TLB-only work (group commit).

A group commit sends the TLB invalidations of many plain doorbells (viommud.frontends.smmuv3
.bulk) as one ``IOMMU_HWPT_INVALIDATE`` array. Those are thousands of commands at a time, so
the rules run as numpy operations over a (commands, 2) array of (W0, W1) words instead of
per ``Entry``. Same rules, same set semantics (the entries of one call are unordered):

* ``TLBI_NH_ALL`` / ``TLBI_NSNH_ALL`` covers every other TLBI: it alone is sent;
* byte-identical commands are sent once;
* ``TLBI_NH_ASID(a)`` covers ``TLBI_NH_VA(a, ...)``;
* range TLBIs (TG != 0) of one ASID/VMID word, leaf, TTL and granule whose page ranges
  overlap or touch become one span, re-encoded as RIL commands when that is shorter;
* when the TLBI_NH_VA work of one ASID spans more than ``flood_pages`` pages, one
  ``TLBI_NH_ASID`` replaces it.

No origin is tracked: when a group call fails, the doorbells are replayed one by one through
the per-doorbell dispatcher, which maps the failure to its guest command.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protocols.smmuv3 import Opcode
from viommud.dispatcher.smmuv3_coalesce import DEFAULT_FLOOD_PAGES, encode_range

U64 = npt.NDArray[np.uint64]
_ADDR_MASK = np.uint64(0xFFFFFFFFFFFFF000)
_NUM_SCALE = np.uint64(0x1F << 12 | 0x1F << 20)
# Opcodes as numpy scalars: comparing an array with an IntEnum member is much slower.
_NH_ALL, _NH_ASID, _NH_VA, _NH_VAA, _NSNH_ALL = (
    np.uint64(op)
    for op in (
        Opcode.TLBI_NH_ALL,
        Opcode.TLBI_NH_ASID,
        Opcode.TLBI_NH_VA,
        Opcode.TLBI_NH_VAA,
        Opcode.TLBI_NSNH_ALL,
    )
)
_OP_MASK = np.uint64(0xFF)


def coalesce_tlb(words: U64, *, flood_pages: int = DEFAULT_FLOOD_PAGES) -> U64:
    """The commands to send for a set of valid TLB invalidations (shape (n, 2))."""
    if len(words) < 2:
        return words
    ops = words[:, 0] & _OP_MASK
    wide = np.flatnonzero((ops == _NH_ALL) | (ops == _NSNH_ALL))
    if len(wide):
        return words[wide[:1]]
    words = _unique(words)
    words = _drop_covered_by_asid(words)
    return _merge_and_promote(words, flood_pages)


def _unique(words: U64) -> U64:
    """First occurrences of distinct (W0, W1) rows (a stable sort keeps the first first)."""
    w0, w1 = words[:, 0], words[:, 1]
    order = np.lexsort((w1, w0))
    s0, s1 = w0[order], w1[order]
    repeat = np.zeros(len(words), dtype=np.bool_)
    repeat[1:] = (s0[1:] == s0[:-1]) & (s1[1:] == s1[:-1])
    if not repeat.any():
        return words
    kept: U64 = words[np.sort(order[~repeat])]
    return kept


def _drop_covered_by_asid(words: U64) -> U64:
    w0 = words[:, 0]
    ops = w0 & _OP_MASK
    by_asid = ops == _NH_ASID
    if not by_asid.any():
        return words
    asids = w0[by_asid] >> np.uint64(48)
    covered: npt.NDArray[np.bool_] = np.isin(w0 >> np.uint64(48), asids)
    kept: U64 = words[~(covered & (ops == _NH_VA))]
    return kept


def _range_fields(words: U64) -> tuple[U64, U64, U64]:
    """(granule code TG, first granule, end granule) of range TLBIs."""
    w0, w1 = words[:, 0], words[:, 1]
    tg = (w1 >> np.uint64(10)) & np.uint64(3)
    shift = tg * np.uint64(2) + np.uint64(10)
    first = (w1 & _ADDR_MASK) >> shift
    count = (((w0 >> np.uint64(12)) & np.uint64(0x1F)) + np.uint64(1)) << (
        (w0 >> np.uint64(20)) & np.uint64(0x1F)
    )
    return tg, first, first + count


def _merge_and_promote(words: U64, threshold: int) -> U64:
    """Range merge, then flood promotion, in one pass: the spans of a flooded ASID are
    replaced anyway, so only the others are re-encoded."""
    w0, w1 = words[:, 0], words[:, 1]
    ops = w0 & _OP_MASK
    va = ops == _NH_VA
    ranged = (va | (ops == _NH_VAA)) & ((w1 >> np.uint64(10)) & np.uint64(3) != 0)
    if not ranged.any() and not va.any():
        return words
    rows = words[ranged]
    key0 = rows[:, 0] & ~_NUM_SCALE
    key1 = rows[:, 1] & np.uint64(0xFFF)
    tg, first, end = _range_fields(rows)
    order = np.lexsort((first, key1, key0))
    key0, key1, tg, first, end, rows = (a[order] for a in (key0, key1, tg, first, end, rows))
    new_key = np.ones(len(rows), dtype=np.bool_)
    new_key[1:] = (key0[1:] != key0[:-1]) | (key1[1:] != key1[:-1])
    starts = _span_starts(new_key, first, end) if len(rows) else np.zeros(0, dtype=np.intp)
    members = np.diff(np.append(starts, len(rows)))
    span_end = np.maximum.reduceat(end, starts) if len(rows) else end
    span_first = first[starts]
    span_key0 = key0[starts]
    # Flood promotion counts the TLBI_NH_VA pages of each ASID: merged spans, and one per
    # single-address TLBI (TG=0).
    span_va = (span_key0 & _OP_MASK) == _NH_VA
    span_asid = (span_key0 >> np.uint64(48)).astype(np.intp)
    single_va = va & ~ranged
    single_asid = (w0[single_va] >> np.uint64(48)).astype(np.intp)
    asids = np.concatenate((span_asid[span_va], single_asid))
    spans = (span_end - span_first)[span_va].astype(np.float64)
    weights = np.concatenate((spans, np.ones(len(single_asid))))
    flooded = np.flatnonzero(np.bincount(asids, weights=weights) > threshold)
    kept: list[U64] = []
    if len(flooded):
        drop_single = np.isin(w0 >> np.uint64(48), flooded.astype(np.uint64)) & single_va
        live = ~(span_va & np.isin(span_asid, flooded))
        kept.append(words[~ranged & ~drop_single])
        for asid in flooded.tolist():
            row = int(np.flatnonzero(va & ((w0 >> np.uint64(48)) == asid))[0])
            vmid = int(w0[row]) & (0xFFFF << 32)
            kept.append(np.array([[Opcode.TLBI_NH_ASID | vmid | asid << 48, 0]], dtype=np.uint64))
    else:
        live = np.ones(len(starts), dtype=np.bool_)
        kept.append(words[~ranged])
    # Spans of several commands are re-encoded when that is shorter; a span keeps the guest's
    # own commands otherwise (and always when it has one command).
    several = np.flatnonzero(live & (members > 1))
    own = live & (members == 1)
    encoded_all: list[tuple[int, int]] = []
    for span, k0, k1, granule, lo, stop, n in zip(
        several.tolist(),
        span_key0[several].tolist(),
        key1[starts[several]].tolist(),
        tg[starts[several]].tolist(),
        span_first[several].tolist(),
        span_end[several].tolist(),
        members[several].tolist(),
        strict=True,
    ):
        encoded = encode_range(k0, k1, lo, stop - lo, granule)
        if len(encoded) < n:
            encoded_all += encoded
        else:
            own[span] = True
    kept.append(rows[np.repeat(own, members)])
    kept.append(np.array(encoded_all, dtype=np.uint64).reshape(-1, 2))
    return np.concatenate(kept)


def _span_starts(new_key: npt.NDArray[np.bool_], first: U64, end: U64) -> npt.NDArray[np.intp]:
    """Row indices where a merged span starts, rows sorted by (key, first): a row starts a
    span when its key is new or it begins after every earlier row of its key has ended."""
    group = np.cumsum(new_key) - 1
    base = int(first.min())
    width = int(end.max()) - base + 1
    if (int(group[-1]) + 1) * width < 1 << 62:
        # Lay the key groups end to end on one axis so a running maximum never crosses
        # from one group into the next.
        offset = group.astype(np.uint64) * np.uint64(width) - np.uint64(base)
        lo, hi = first + offset, end + offset
        reach = np.maximum.accumulate(hi)
        starts = np.ones(len(lo), dtype=np.bool_)
        starts[1:] = lo[1:] > reach[:-1]
        return np.flatnonzero(starts | new_key)
    out: list[int] = []  # addresses too far apart for one axis: walk the rows
    reach_py = 0
    for i, (is_new, lo_py, hi_py) in enumerate(
        zip(new_key.tolist(), first.tolist(), end.tolist(), strict=True)
    ):
        if is_new or lo_py > reach_py:
            out.append(i)
            reach_py = hi_py
        else:
            reach_py = max(reach_py, hi_py)
    return np.array(out, dtype=np.intp)
