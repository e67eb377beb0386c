"""Coalescing rules for the SMMUv3 commands bound for one iommufd vIOMMU object.

Everything handed to ``coalesce`` goes into one ``IOMMU_HWPT_INVALIDATE`` call: the kernel
issues the array on the host queue without a CMD_SYNC between entries (except every 63), so
the entries of one call are unordered with respect to each other. The dispatcher guarantees
that by splitting calls wherever a later command depends on an earlier one across a guest
CMD_SYNC (config -> TLB -> device TLB). Within a call, set semantics hold and each rule below
may drop or rewrite entries as long as the union of what they invalidate does not shrink.

Each rule is a small function from entries to entries (DESIGN.md point 4):

* ``drop_duplicates``: byte-identical commands.
* ``drop_covered_by_vm_wide``: TLBI_NH_ALL / TLBI_NSNH_ALL (both become NH_ALL with the
  vIOMMU's VMID in the kernel) make every other TLBI of the call redundant.
* ``drop_covered_by_device_wide``: CFGI_CD_ALL(sid) covers CFGI_CD(sid, *); an ATC_INV of a
  whole ATC without PASID (SSV=0, Size=52) covers every ATC_INV of that stream.
* ``merge_ranges``: range TLBIs (TG != 0) of the same ASID, leaf, granule and TTL whose page
  ranges overlap or touch become one range, re-encoded as RIL commands.
* ``merge_atc``: ATC_INVs of one (stream, substream) whose aligned blocks overlap or touch
  become the fewest aligned blocks covering exactly their union, when that is fewer.
* ``promote_floods``: when the TLBI_NH_VA work of one ASID spans more than ``threshold``
  pages, one VMID-wide TLBI_NH_ALL replaces the call's TLBIs (docs/coalescing.md discusses
  the threshold).

What no rule does: TLBI_NH_ASID(a) does not cover TLBI_NH_VA(a, va). An ASID invalidation
spares global entries (nG=0, SMMUv3 §3.17.3 / Arm ARM "TLBI ASIDE1"), which a VA invalidation
removes whatever their ASID; so NH_VA is kept beside NH_ASID, and a flood is widened to the
VMID-wide NH_ALL (global entries included), never narrowed to NH_ASID.
* ``order_by_class``: config, then TLB, then device-TLB work; device work sorted by stream
  and substream so it collapses per device.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from protocols.smmuv3 import CFGI_CD_OPS, TLBI_OPS, TLBI_RANGE_OPS, TLBI_VM_WIDE_OPS, Opcode

_CMD = struct.Struct("<QQ")
_T = TypeVar("_T")  # what a spliced list holds: entries or (w0, w1) words
# TLBI_NH_VA ops of one ASID beyond which a single TLBI_NH_ASID is cheaper: Linux's own
# cut-over for SVA without RIL (CMDQ_MAX_TLBI_OPS = 1 << (PAGE_SHIFT - 3) = 512 for 4 KiB).
DEFAULT_FLOOD_PAGES = 512

_ADDR_MASK = 0xFFFFFFFFFFFFF000
_VMID_FIELD = 0xFFFF << 32
# opcodes as plain ints for the per-entry loops (an enum comparison costs more)
_TLBI_NH_VA = int(Opcode.TLBI_NH_VA)
_CFGI_CD_ALL = int(Opcode.CFGI_CD_ALL)
_ATC_INV = int(Opcode.ATC_INV)


@dataclass(slots=True)
class Entry:
    """One host entry: the 16-byte command and the guest command it stands for."""

    raw: bytes
    origin: int  # index of the (first) guest command in its doorbell
    _words: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    @property
    def words(self) -> tuple[int, int]:
        """(W0, W1), decoded on first use (most calls carry one entry and never ask)."""
        words = self._words
        if words is None:
            words = self._words = _CMD.unpack(self.raw)
        return words

    @property
    def opcode(self) -> int:
        return self.raw[0]


def class_rank(opcode: int) -> int:
    """0 config, 1 TLB, 2 device TLB: the order a guest's dependent steps must keep."""
    if opcode in CFGI_CD_OPS:
        return 0
    if opcode in TLBI_OPS:
        return 1
    return 2


def drop_duplicates(entries: Iterable[Entry]) -> list[Entry]:
    seen: set[bytes] = set()
    out = []
    for entry in entries:
        if entry.raw not in seen:
            seen.add(entry.raw)
            out.append(entry)
    return out


def drop_covered_by_vm_wide(entries: list[Entry]) -> list[Entry]:
    wide = next((e for e in entries if e.raw[0] in TLBI_VM_WIDE_OPS), None)
    if wide is None:
        return entries
    return [e for e in entries if e.raw[0] not in TLBI_OPS or e is wide]


def drop_covered_by_device_wide(entries: list[Entry]) -> list[Entry]:
    opcodes = {e.raw[0] for e in entries}
    if _CFGI_CD_ALL not in opcodes and _ATC_INV not in opcodes:
        return entries  # nothing device-wide (the common case: TLB work only)
    cd_all = {e.words[0] >> 32 for e in entries if e.raw[0] == _CFGI_CD_ALL}
    atc_all = set()
    for e in entries:
        if e.raw[0] == _ATC_INV:
            w0, w1 = e.words
            if not w0 & (1 << 11) and w1 & 0x3F == 52:
                atc_all.add(w0 >> 32)
    if not cd_all and not atc_all:
        return entries
    out = []
    kept_atc: set[int] = set()
    for e in entries:
        w0, w1 = e.words
        sid = w0 >> 32
        if e.opcode == Opcode.CFGI_CD and sid in cd_all:
            continue
        if e.opcode == Opcode.ATC_INV and sid in atc_all:
            if sid in kept_atc or w0 & (1 << 11) or w1 & 0x3F != 52:
                continue
            kept_atc.add(sid)
        out.append(e)
    return out


def encode_range(
    w0_base: int, w1_base: int, first_page: int, pages: int, tg: int
) -> list[tuple[int, int]]:
    """RIL encoding of ``pages`` granules from ``first_page`` (SMMUv3 §4.4.1.1): each
    command covers (NUM+1) << SCALE granules, taken from the lowest set bit of what remains,
    as Linux's encoder does. Returns the (W0, W1) words of each command."""
    granule_log2 = tg * 2 + 10
    ttl = (w1_base >> 8) & 3
    words: list[tuple[int, int]] = []
    page = first_page
    remaining = pages
    while remaining:
        scale = (remaining & -remaining).bit_length() - 1
        num = (remaining >> scale) & 31
        step = num << scale
        if ttl == 0 and num == 1 and scale == 0:
            num, step = 2, 2  # TTL=NUM=SCALE=0 is reserved: cover one more granule
        w0 = w0_base | (num - 1) << 12 | scale << 20
        w1 = w1_base | ((page << granule_log2) & _ADDR_MASK)
        words.append((w0, w1))
        page += step
        remaining = max(0, remaining - step)
    return words


def _range_key(e: Entry) -> tuple[int, int, int] | None:
    """(W0 without NUM/SCALE, W1 without the address) for a range TLBI with TG != 0."""
    raw = e.raw
    if raw[0] not in TLBI_RANGE_OPS or not (raw[9] >> 2) & 3:  # W1[11:10] is TG
        return None
    w0, w1 = e.words
    if not (w1 >> 10) & 3:
        return None
    return w0 & ~(0x1F << 12 | 0x1F << 20), w1 & 0xFFF, (w1 >> 10) & 3


def _pages(e: Entry) -> tuple[int, int]:
    """(first page, page count) of a range TLBI, in granules."""
    w0, w1 = e.words
    tg = (w1 >> 10) & 3
    granule_log2 = tg * 2 + 10
    count = (((w0 >> 12) & 0x1F) + 1) << ((w0 >> 20) & 0x1F)
    return (w1 & _ADDR_MASK) >> granule_log2, count


def _union(spans: list[tuple[int, int, int]]) -> list[list[int]]:
    """Sorted (first, count, origin) spans as [first, end, origin] runs, overlapping or
    touching spans joined (a run keeps the lowest origin of its spans)."""
    merged: list[list[int]] = []
    for first, count, origin in spans:
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], first + count)
            merged[-1][2] = min(merged[-1][2], origin)
        else:
            merged.append([first, first + count, origin])
    return merged


def _splice(
    entries: list[Entry], replaced: dict[int, list[Entry]], dropped: set[int]
) -> list[Entry]:
    """``entries`` with each replaced group's new entries where its first entry stood and
    the rest of the group dropped."""
    out: list[Entry] = []
    for e in entries:
        if id(e) in replaced:
            out += replaced[id(e)]
        elif id(e) not in dropped:
            out.append(e)
    return out


def _splice_at(items: list[_T], replaced: dict[int, list[_T]], dropped: set[int]) -> list[_T]:
    """``items`` with each replaced group's new items at the index ``replaced`` names for
    it and every other index in ``dropped`` left out (``replaced``'s keys are in
    ``dropped``)."""
    out: list[_T] = []
    for index, item in enumerate(items):
        if index in dropped:
            out += replaced.get(index, ())
        else:
            out.append(item)
    return out


def merge_ranges(entries: list[Entry]) -> list[Entry]:
    groups: dict[tuple[int, int, int], list[Entry]] = {}
    for e in entries:
        key = _range_key(e)
        if key is not None:
            groups.setdefault(key, []).append(e)
    if all(len(g) < 2 for g in groups.values()):
        return entries
    replaced: dict[int, list[Entry]] = {}  # id of the group's first entry -> new entries
    dropped: set[int] = set()
    for (w0_base, w1_low, tg), group in groups.items():
        if len(group) < 2:
            continue
        spans = sorted((*_pages(e), e.origin) for e in group)
        merged = _union(spans)
        new = _range_entries(w0_base, w1_low, tg, merged)
        if len(new) >= len(group):
            continue  # the union encodes no shorter: keep the guest's own commands
        replaced[id(group[0])] = new
        dropped.update(id(e) for e in group)
    return _splice(entries, replaced, dropped)


def promote_floods(entries: list[Entry], threshold: int = DEFAULT_FLOOD_PAGES) -> list[Entry]:
    """More than ``threshold`` pages of TLBI_NH_VA for one ASID: the call's TLBIs become one
    TLBI_NH_ALL of the VM (with the VMID field of the first flooded command; the kernel
    rewrites it anyway). Not NH_ASID: that would spare the global entries NH_VA removes."""
    pages: dict[int, int] = {}
    for e in entries:
        raw = e.raw
        if raw[0] == _TLBI_NH_VA:
            asid = raw[6] | raw[7] << 8  # W0[63:48]
            pages[asid] = pages.get(asid, 0) + (_pages(e)[1] if (raw[9] >> 2) & 3 else 1)
    flooded = {asid for asid, n in pages.items() if n > threshold}
    if not flooded:
        return entries
    first = next(
        e for e in entries if e.opcode == Opcode.TLBI_NH_VA and e.words[0] >> 48 in flooded
    )
    origin = min(e.origin for e in entries if e.opcode in TLBI_OPS)
    wide = Entry(_CMD.pack(Opcode.TLBI_NH_ALL | (first.words[0] & _VMID_FIELD), 0), origin)
    return [wide, *(e for e in entries if e.opcode not in TLBI_OPS)]


def _atc_block(e: Entry) -> tuple[tuple[int, int], int, int]:
    """((W0 without opcode bits kept: SID, SSID, SSV, Global), first page, page count) of an
    ATC_INV: 2**Size pages aligned at Address (SMMUv3 §4.5.1)."""
    w0, w1 = e.words
    size = w1 & 0x3F
    pages = 1 << min(size, 52)
    first = ((w1 & _ADDR_MASK) >> 12) & ~(pages - 1)
    return (w0, w1 & 0xFFF & ~0x3F), first, pages


def _aligned_blocks(first: int, end: int) -> list[tuple[int, int]]:
    """The fewest aligned power-of-two blocks that cover exactly [first, end): (page, log2)."""
    out = []
    page = first
    while page < end:
        log2 = (page & -page).bit_length() - 1 if page else 52
        while log2 and page + (1 << log2) > end:
            log2 -= 1
        out.append((page, log2))
        page += 1 << log2
    return out


def merge_atc(entries: list[Entry]) -> list[Entry]:
    groups: dict[tuple[int, int], list[Entry]] = {}
    for e in entries:
        if e.opcode == Opcode.ATC_INV:
            groups.setdefault(_atc_block(e)[0], []).append(e)
    if all(len(g) < 2 for g in groups.values()):
        return entries
    replaced: dict[int, list[Entry]] = {}
    dropped: set[int] = set()
    for (w0, w1_low), group in groups.items():
        if len(group) < 2:
            continue
        spans = sorted((*_atc_block(e)[1:], e.origin) for e in group)
        merged = _union(spans)
        new = [
            Entry(_CMD.pack(w0, w1_low | (page << 12) & _ADDR_MASK | log2), origin)
            for first, end, origin in merged
            for page, log2 in _aligned_blocks(first, end)
        ]
        if len(new) >= len(group):
            continue  # no shorter: keep the guest's own commands
        replaced[id(group[0])] = new
        dropped.update(id(e) for e in group)
    return _splice(entries, replaced, dropped)


def order_by_class(entries: list[Entry]) -> list[Entry]:
    if all(e.raw[0] in TLBI_OPS for e in entries):
        return list(entries)  # one class, all keys equal: the stable sort keeps the order

    def key(e: Entry) -> tuple[int, int, int]:
        rank = class_rank(e.opcode)
        if rank == 1:
            return rank, 0, 0
        w0 = e.words[0]
        return rank, w0 >> 32, (w0 >> 12) & 0xFFFFF

    return sorted(entries, key=key)


def coalesce(entries: list[Entry], *, flood_pages: int = DEFAULT_FLOOD_PAGES) -> list[Entry]:
    """Every rule, in an order where each one sees the previous one's result."""
    if len(entries) < 2:
        return entries  # nothing to fold with, and one entry needs no order
    out = drop_duplicates(entries)
    out = drop_covered_by_vm_wide(out)
    out = drop_covered_by_device_wide(out)
    out = merge_ranges(out)
    out = merge_atc(out)
    out = promote_floods(out, flood_pages)
    return order_by_class(out)


def coalesce_tlb_only(
    entries: list[Entry], *, flood_pages: int = DEFAULT_FLOOD_PAGES
) -> list[Entry]:
    """``coalesce`` for entries that are all TLB invalidations (``TLBI_OPS``: one plain
    doorbell's work), with the same result: the device rules and the class order return
    such entries as they are, and each remaining rule is skipped when one pass over the
    distinct commands shows it would — no duplicate, no VM-wide TLBI, fewer than two range
    TLBIs with TG != 0 (nothing to merge), no ASID with more than ``flood_pages`` pages of
    TLBI_NH_VA (pages as ``promote_floods`` counts them; merging can only change that when
    ranges were merged, so then the rule runs)."""
    if len(entries) < 2:
        return entries
    raws = {e.raw for e in entries}
    out = entries if len(raws) == len(entries) else drop_duplicates(entries)
    wide = False
    ranged = 0
    pages: dict[int, int] = {}
    for raw in raws:
        op = raw[0]
        if op in TLBI_RANGE_OPS:
            tg = (raw[9] >> 2) & 3  # W1[11:10]
            if tg:
                ranged += 1
            if op == _TLBI_NH_VA:
                asid = raw[6] | raw[7] << 8  # W0[63:48]
                if tg:
                    w0 = int.from_bytes(raw[:4], "little")
                    count = (((w0 >> 12) & 0x1F) + 1) << ((w0 >> 20) & 0x1F)
                else:
                    count = 1
                pages[asid] = pages.get(asid, 0) + count
        elif op in TLBI_VM_WIDE_OPS:
            wide = True
    if wide:
        out = drop_covered_by_vm_wide(out)
    flood = any(n > flood_pages for n in pages.values())
    if ranged >= 2:
        out, merged = _merge_tlb_ranges(out)
        if merged:  # merged spans are counted anew
            flood = _nh_va_flood(out, flood_pages)
    if flood:
        out = promote_floods(out, flood_pages)
    return out


_NOT_NUM_SCALE = ~(0x1F << 12 | 0x1F << 20)


def _merge_tlb_ranges(entries: list[Entry]) -> tuple[list[Entry], bool]:
    """``merge_ranges`` for ``coalesce_tlb_only`` in one pass over the commands' words
    (no ``Entry.words`` / ``_range_key`` / ``_pages`` call per entry), with the same result:
    the same groups (key of ``_range_key``, in order of first appearance), spans (first
    page, count, origin, sorted), runs (``_union``), RIL encoding and the same rule for
    keeping a group as written. Also says whether any group was replaced (else the result
    holds ``entries`` as they were). tests/models/test_smmuv3_fast_path.py holds it to
    ``coalesce``."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    spans: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
    unpack = _CMD.unpack
    for index, e in enumerate(entries):
        raw = e.raw
        tg = (raw[9] >> 2) & 3  # W1[11:10]
        if not tg or raw[0] not in TLBI_RANGE_OPS:
            continue
        w0, w1 = unpack(raw)
        key = (w0 & _NOT_NUM_SCALE, w1 & 0xFFF, tg)
        span = (
            (w1 & _ADDR_MASK) >> (tg * 2 + 10),
            (((w0 >> 12) & 0x1F) + 1) << ((w0 >> 20) & 0x1F),
            e.origin,
        )
        members = groups.get(key)
        if members is None:
            groups[key] = [index]
            spans[key] = [span]
        else:
            members.append(index)
            spans[key].append(span)
    replaced: dict[int, list[Entry]] = {}  # index of the group's first entry -> new entries
    dropped: set[int] = set()
    for key, members in groups.items():
        if len(members) < 2:
            continue
        runs = _union(sorted(spans[key]))
        if len(runs) >= len(members):
            continue  # nothing joined: each run encodes to one command or more, no shorter
        w0_base, w1_low, tg = key
        new = _range_entries(w0_base, w1_low, tg, runs)
        if len(new) >= len(members):
            continue  # the union encodes no shorter: keep the guest's own commands
        replaced[members[0]] = new
        dropped.update(members)
    if not replaced:
        return entries, False
    return _splice_at(entries, replaced, dropped), True


def _nh_va_flood(entries: list[Entry], threshold: int) -> bool:
    """Whether ``promote_floods`` would find an ASID with more than ``threshold`` pages of
    TLBI_NH_VA (counted as it counts them) among TLB-only ``entries``."""
    pages: dict[int, int] = {}
    for e in entries:
        raw = e.raw
        if raw[0] == _TLBI_NH_VA:
            asid = raw[6] | raw[7] << 8  # W0[63:48]
            if (raw[9] >> 2) & 3:
                w0 = int.from_bytes(raw[:4], "little")
                count = (((w0 >> 12) & 0x1F) + 1) << ((w0 >> 20) & 0x1F)
            else:
                count = 1
            pages[asid] = pages.get(asid, 0) + count
    return any(n > threshold for n in pages.values())


_NOT_VM_WIDE = bytes(op for op in range(256) if op not in TLBI_VM_WIDE_OPS)
_TG_ZERO = bytes(b for b in range(256) if not (b >> 2) & 3)  # W1 byte 1 with TG = 0
_NH_VA_BYTE = bytes([_TLBI_NH_VA])


def tlb_only_unchanged(array: bytes, flood_pages: int = DEFAULT_FLOOD_PAGES) -> bool:
    """True only when ``coalesce_tlb_only`` returns the entries of ``array`` (valid TLB
    invalidations, 16 bytes each, as a plain doorbell sends them) as they are, found with a
    few C-level operations over the whole array: no VM-wide TLBI, no range TLBI with TG !=
    0 (the other TLBIs have W1 = 0, so TG is 0 in every command), no more TLBI_NH_VA (one
    page each then) than ``flood_pages``, and no duplicate (distinct W1 words rule it out
    at once; else the rows are compared). False means "maybe changed": the caller
    coalesces."""
    ops = array[::16]
    if ops.translate(None, _NOT_VM_WIDE) or array[9::16].translate(None, _TG_ZERO):
        return False
    if ops.count(_NH_VA_BYTE) > flood_pages:
        return False
    rows = len(ops)
    if len(set(memoryview(array).cast("Q")[1::2])) == rows:
        return True
    return len({array[at : at + 16] for at in range(0, len(array), 16)}) == rows


def plain_entries(commands: bytes, array: bytes) -> tuple[list[Entry], list[Entry]]:
    """The entries of a group commit's call (``array``: the TLB commands of the run's
    ``commands``, maybe coalesced by the vectorised rules) with the origin the per-doorbell
    rules would give each — the row in ``commands`` of the guest command that produced it:
    a command sent as written is its own (first) row; a VMID-wide TLBI_NH_ALL that is no
    guest command (a promoted flood) the first TLB command's; a merged range the lowest row
    of the spans it joins — and the run's TLB commands as written, each with its row.
    Worked out only when a call fails."""
    rows = [commands[at : at + 16] for at in range(0, len(commands), 16)]
    written = [Entry(raw, row) for row, raw in enumerate(rows) if raw[0] != Opcode.CMD_SYNC]
    first: dict[bytes, int] = {}
    ranges: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
    for entry in written:
        first.setdefault(entry.raw, entry.origin)
        key = _range_key(entry)
        if key is not None:
            ranges.setdefault(key, []).append((*_pages(entry), entry.origin))
    lowest = written[0].origin if written else 0
    out: list[Entry] = []
    for at in range(0, len(array), 16):
        raw = array[at : at + 16]
        origin = first.get(raw)
        if origin is None:
            origin = lowest
            sent = Entry(raw, 0)
            key = _range_key(sent)
            if key is not None:
                page = _pages(sent)[0]
                for lo, end, low in _union(sorted(ranges.get(key, []))):
                    if lo <= page < end:
                        origin = low
                        break
        out.append(Entry(raw, origin))
    return out, written


_TG_SET = bytes(b for b in range(256) if (b >> 2) & 3)  # W1 byte 1 with TG != 0
_NH_ALL = int(Opcode.TLBI_NH_ALL)


def coalesce_tlb_array(array: bytes, flood_pages: int = DEFAULT_FLOOD_PAGES) -> bytes:
    """The commands ``coalesce_tlb_only`` returns for the entries of ``array`` (TLB
    invalidations, 16 bytes each, as a plain doorbell sends them), as one array, worked out
    on the (W0, W1) words without an ``Entry`` per command (the origins are needed only
    when the host refuses the call; the dispatcher then builds the entries). The same
    steps: duplicates dropped (first kept), a VM-wide TLBI leaves only the first one, range
    TLBIs grouped by ``_range_key`` and merged (``_union``, ``encode_range``, a group kept
    as written when its union encodes no shorter), TLBI_NH_VA pages counted per ASID (on
    the merged commands after a merge) and a flood promoted as ``promote_floods`` does.
    tests/models/test_smmuv3_array_coalesce.py holds it to ``coalesce``."""
    size = 16
    ops = array[::size]
    if len(ops) < 2:
        return array  # nothing to fold with
    if ops.translate(None, _NOT_VM_WIDE):  # the first VM-wide TLBI covers the rest
        for at, op in enumerate(ops):
            if op in TLBI_VM_WIDE_OPS:
                return array[at * size : at * size + size]
    words = list(_CMD.iter_unpack(array))
    distinct = list(dict.fromkeys(words))
    changed = len(distinct) != len(words)
    out = distinct
    pages: dict[int, int] = {}
    tgs = array[9::size]
    if len(tgs) - len(tgs.translate(None, _TG_SET)) >= 2:  # two range TLBIs could merge
        out, merged = _merge_words(distinct)
        changed = changed or merged
    for w0, w1 in out:
        if w0 & 0xFF == _TLBI_NH_VA:
            asid = w0 >> 48
            count = (((w0 >> 12) & 0x1F) + 1) << ((w0 >> 20) & 0x1F) if (w1 >> 10) & 3 else 1
            pages[asid] = pages.get(asid, 0) + count
    if pages and max(pages.values()) > flood_pages:
        flooded = {asid for asid, n in pages.items() if n > flood_pages}
        first = next(w0 for w0, _ in out if w0 & 0xFF == _TLBI_NH_VA and w0 >> 48 in flooded)
        return _CMD.pack(_NH_ALL | (first & _VMID_FIELD), 0)
    if not changed:
        return array
    pack = _CMD.pack
    return b"".join([pack(w0, w1) for w0, w1 in out])


def _merge_words(words: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], bool]:
    """``_merge_tlb_ranges`` on distinct (W0, W1) words, origins aside: the same groups
    (``_range_key``'s key; TG is in W1[11:0]), runs (``_union`` of the group's sorted
    spans), encoding and rule for keeping a group; whether any group was replaced. The
    range TLBIs are sorted once by (key, first page, count, index), so each group is a
    slice whose spans are in order."""
    ranged = [
        (
            w0 & _NOT_NUM_SCALE,
            w1 & 0xFFF,
            (w1 & _ADDR_MASK) >> ((w1 >> 10 & 3) * 2 + 10),
            ((w0 >> 12 & 0x1F) + 1) << (w0 >> 20 & 0x1F),
            index,
        )
        for index, (w0, w1) in enumerate(words)
        if w1 & 0xC00 and w0 & 0xFF in TLBI_RANGE_OPS
    ]
    total = len(ranged)
    if total < 2:
        return words, False
    ranged.sort()
    replaced: dict[int, list[tuple[int, int]]] = {}  # the group's first index -> new words
    dropped: set[int] = set()
    start = 0
    while start < total:
        w0_base, w1_low = ranged[start][0], ranged[start][1]
        stop = start + 1
        while stop < total and ranged[stop][1] == w1_low and ranged[stop][0] == w0_base:
            stop += 1
        n = stop - start
        if n < 2:
            start = stop
            continue
        group = ranged[start:stop]
        start = stop
        runs: list[list[int]] = []
        end = -1
        for _w0, _w1, first, count, _index in group:
            if first <= end:
                if first + count > end:
                    end = runs[-1][1] = first + count
            else:
                end = first + count
                runs.append([first, end])
        if len(runs) >= n:
            continue  # nothing joined: each run encodes to one command or more, no shorter
        tg = w1_low >> 10 & 3
        granule_log2 = tg * 2 + 10
        ttl = (w1_low >> 8) & 3
        new: list[tuple[int, int]] = []
        for first, end in runs:
            count = end - first
            scale = (count & -count).bit_length() - 1
            num = count >> scale
            if num < 32:  # one command (encode_range's first and only step)
                if num == 1 and not scale and not ttl:
                    num = 2  # TTL=NUM=SCALE=0 is reserved: cover one more granule
                new.append(
                    (
                        w0_base | (num - 1) << 12 | scale << 20,
                        w1_low | ((first << granule_log2) & _ADDR_MASK),
                    )
                )
            else:
                new += encode_range(w0_base, w1_low, first, count, tg)
            if len(new) >= n:
                break
        if len(new) >= n:
            continue  # the union encodes no shorter: keep the guest's own commands
        members = [row[4] for row in group]
        replaced[min(members)] = new
        dropped.update(members)
    if not replaced:
        return words, False
    return _splice_at(words, replaced, dropped), True


def _range_entries(w0_base: int, w1_low: int, tg: int, runs: list[list[int]]) -> list[Entry]:
    """The range TLBIs covering each merged run (first page, end page, origin), in order."""
    new: list[Entry] = []
    for first, end, origin in runs:
        words = encode_range(w0_base, w1_low, first, end - first, tg)
        new += [Entry(_CMD.pack(a, b), origin) for a, b in words]
    return new
