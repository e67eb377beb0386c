"""The coalescing rules of smmuv3_coalesce, vectorised for TLB-only work (group commit).

A group commit sends the TLB invalidations of many plain doorbells (viommud.frontends.smmuv3
.bulk) as one ``IOMMU_HWPT_INVALIDATE`` array. Those are thousands of commands at a time, so
the rules run as numpy operations over a (commands, 2) array of (W0, W1) words instead of
per ``Entry``. Same rules, same set semantics (the entries of one call are unordered), in
the order that lets the cheap ones spare the costly ones:

* ``TLBI_NH_ALL`` / ``TLBI_NSNH_ALL`` covers every other TLBI: it alone is sent;
* when the TLBI_NH_VA work of one ASID asks for more than ``flood_pages`` pages, one
  VMID-wide ``TLBI_NH_ALL`` replaces every TLBI (pages counted as asked for: the one
  difference from the per-doorbell rule, which counts them after merging). Never
  ``TLBI_NH_ASID``: it spares global entries, which NH_VA removes;
* byte-identical commands are sent once;
* range TLBIs (TG != 0) of one ASID/VMID word, leaf, TTL and granule whose page ranges
  overlap or touch become one span, re-encoded as RIL commands when that is shorter.

No origin is tracked here: when a group call fails, the dispatcher works out which guest
command each sent entry stands for (``dispatcher.smmuv3_coalesce.plain_entries``).
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
_NH_ALL, _NH_VA, _NH_VAA, _NSNH_ALL = (
    np.uint64(op)
    for op in (
        Opcode.TLBI_NH_ALL,
        Opcode.TLBI_NH_VA,
        Opcode.TLBI_NH_VAA,
        Opcode.TLBI_NSNH_ALL,
    )
)
_OP_MASK = np.uint64(0xFF)


def coalesce_tlb(words: U64, *, flood_pages: int = DEFAULT_FLOOD_PAGES) -> U64:
    """The commands to send for a set of valid TLB invalidations (shape (n, 2)). Other
    commands (the runs' CMD_SYNCs) pass through every rule untouched but for duplicates."""
    if len(words) < 2:
        return words
    ops = words[:, 0] & _OP_MASK
    wide = np.flatnonzero((ops == _NH_ALL) | (ops == _NSNH_ALL))
    if len(wide):
        return words[wide[:1]]
    flood = _flood(words, flood_pages)
    if flood is not None:
        return flood
    return _merge_ranges(_unique(words))


def _flood(words: U64, threshold: int) -> U64 | None:
    """One TLBI_NH_ALL of the VM (the VMID field of the first flooded command) when the
    TLBI_NH_VA work of some ASID asks for more than ``threshold`` pages, else None. Pages
    count as the guest asked for them (a page asked twice counts twice, as operations count
    in Linux's own cut-over), so floods are found before the costlier rules run."""
    w0, w1 = words[:, 0], words[:, 1]
    va = (w0 & _OP_MASK) == _NH_VA
    if not va.any():
        return None
    asids = (w0[va] >> np.uint64(48)).astype(np.intp)
    ranged = ((w1[va] >> np.uint64(10)) & np.uint64(3)) != 0
    _tg, first, end = _range_fields(words[va])
    pages = np.where(ranged, end - first, np.uint64(1)).astype(np.float64)
    is_flooded = np.bincount(asids, weights=pages) > threshold  # indexed by ASID
    if not is_flooded.any():
        return None
    row = int(np.flatnonzero(va)[np.flatnonzero(is_flooded[asids])[0]])
    vmid = int(w0[row]) & (0xFFFF << 32)
    return np.array([(Opcode.TLBI_NH_ALL | vmid, 0)], dtype=np.uint64)


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


def _merge_ranges(words: U64) -> U64:
    """Range TLBIs (TG != 0) of one W0 key (opcode, ASID, VMID) and W1 key (leaf, TTL, TG)
    whose pages overlap or touch become one span, re-encoded as RIL commands when that is
    shorter; a span keeps the guest's own commands otherwise."""
    w0, w1 = words[:, 0], words[:, 1]
    ops = w0 & _OP_MASK
    ranged = ((ops == _NH_VA) | (ops == _NH_VAA)) & ((w1 >> np.uint64(10)) & np.uint64(3) != 0)
    if np.count_nonzero(ranged) < 2:
        return words
    rows = words[ranged]
    key0 = rows[:, 0] & ~_NUM_SCALE
    key1 = rows[:, 1] & np.uint64(0xFFF)
    tg, first, end = _range_fields(rows)
    order = np.lexsort((first, key1, key0))
    key0, key1, tg, first, end, rows = (a[order] for a in (key0, key1, tg, first, end, rows))
    new_key = np.ones(len(rows), dtype=np.bool_)
    new_key[1:] = (key0[1:] != key0[:-1]) | (key1[1:] != key1[:-1])
    starts = _span_starts(new_key, first, end)
    if len(starts) == len(rows):
        return words  # nothing overlaps or touches
    members = np.diff(np.append(starts, len(rows)))
    span_end = np.maximum.reduceat(end, starts)
    several = np.flatnonzero(members > 1)
    own = members == 1
    encoded_all: list[tuple[int, int]] = []
    for span, k0, k1, granule, lo, stop, n in zip(
        several.tolist(),
        key0[starts[several]].tolist(),
        key1[starts[several]].tolist(),
        tg[starts[several]].tolist(),
        first[starts[several]].tolist(),
        span_end[several].tolist(),
        members[several].tolist(),
        strict=True,
    ):
        encoded = encode_range(k0, k1, lo, stop - lo, granule)
        if len(encoded) < n:
            encoded_all += encoded
        else:
            own[span] = True
    return np.concatenate(
        (
            words[~ranged],
            rows[np.repeat(own, members)],
            np.array(encoded_all, dtype=np.uint64).reshape(-1, 2),
        )
    )


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
