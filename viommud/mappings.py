"""The mappings of one virtio-iommu domain: disjoint inclusive intervals, O(log n) each way.

A core value module: the frontend keeps each domain's ``MappingStore`` (the guest-visible
state), and the topology replays a store into a new IOAS, so both layers import it.

A *mapping* is the region one MAP request created (virtio-iommu.md §2.5): ``[start, end]``
(inclusive, as on the wire) translating to ``phys + (addr - start)`` with the MAP flags.
Mappings of a domain never overlap, so sorting them by ``start`` also sorts them by ``end``
and every question is a bisection:

* ``add`` refuses a mapping that overlaps any other (MAP: INVAL, §3.2 MAP rule 2): the only
  candidate is the last mapping starting at or before the new ``end``;
* ``remove_range`` implements UNMAP atomically: every mapping inside ``[start, end]`` goes,
  unless one of them straddles a boundary, in which case nothing goes (RANGE, §3.2 UNMAP
  rule 4 and §2.5 example 4);
* ``lookup`` finds the mapping holding one address (the translation a fault check needs).

Storage is columnar, as a domain may hold a million mappings (issue 7: 100 bytes each at
most): ``start``, ``end``, ``phys`` (u64) and ``flags`` (u32), the widths of the MAP request
(§2.4), are ``array`` columns, 28 bytes a mapping where a ``Mapping`` object and its boxed
ints took ~180. The columns are cut into blocks of at most ``2 * _load`` consecutive
mappings (the leaf level of a B+-tree, as in sortedcontainers) and ``_firsts`` holds each
block's first ``start``: a change is a bisection in ``_firsts``, one in the block and a
memmove inside the block's arrays. A fill in address order leaves blocks 3/4 full, so that
later MAPs in their middle (a guest re-using freed IOVAs) split a block only after
``_load // 2`` of them. ``Mapping`` values are built only where a method returns
one; they compare by value, so callers see the same answers as with stored objects.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

__all__ = ["Mapping", "MappingStore", "SplitError"]

if TYPE_CHECKING:
    from typing import TypeAlias

    _Column: TypeAlias = list[array[int]]  # one array per block

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Mapping:
    """One MAP request's region: ``[start, end]`` inclusive -> ``phys``."""

    start: int
    end: int
    phys: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def translate(self, addr: int) -> int:
        return self.phys + (addr - self.start)


class SplitError(Exception):
    """UNMAP would split ``mapping`` (it crosses the start or the end of the range)."""

    def __init__(self, mapping: Mapping) -> None:
        super().__init__(f"[{mapping.start:#x}, {mapping.end:#x}] would be split")
        self.mapping = mapping


def _invalid(mapping: Mapping) -> ValueError:
    if mapping.end < mapping.start:
        return ValueError(f"empty interval {mapping}")
    return ValueError(f"{mapping}: addresses and phys are u64, flags u32 (§2.4)")


class MappingStore:
    """The disjoint mappings of one domain, ordered by start address.

    Iterating while the store changes is not supported (as with a dict).
    """

    __slots__ = ("_ends", "_firsts", "_flags", "_len", "_phys", "_starts")
    # Mappings per block: at most 2 * _load (8 KiB per u64 column to move at most); a block
    # left with fewer than _load // 2 after removals is merged into a neighbour.
    _load: ClassVar[int] = 512

    def __init__(self, mappings: Iterable[Mapping] | None = None) -> None:
        self._firsts: list[int] = []  # _starts[b][0] for every block b
        self._starts: _Column = []
        self._ends: _Column = []
        self._phys: _Column = []
        self._flags: _Column = []
        self._len = 0
        for mapping in mappings or ():
            if not self.add(mapping):
                raise ValueError(f"overlapping mapping {mapping}")

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Mapping]:
        for columns in zip(self._starts, self._ends, self._phys, self._flags, strict=True):
            yield from map(Mapping, *columns)

    def __bool__(self) -> bool:
        return self._len > 0

    def overlaps(self, start: int, end: int) -> bool:
        """True when some mapping shares at least one address with ``[start, end]``."""
        block = bisect_right(self._firsts, end) - 1  # last mapping starting at or before end
        if block < 0:
            return False
        index = bisect_right(self._starts[block], end) - 1
        return self._ends[block][index] >= start

    def add(self, mapping: Mapping) -> bool:
        """Insert ``mapping``; False (and nothing changed) when it overlaps another one."""
        start, end, phys, flags = mapping.start, mapping.end, mapping.phys, mapping.flags
        if not (0 <= start <= end <= U64_MAX and 0 <= phys <= U64_MAX and 0 <= flags <= U32_MAX):
            raise _invalid(mapping)
        firsts = self._firsts
        block = bisect_right(firsts, end) - 1
        if block >= 0:
            starts = self._starts[block]
            index = bisect_right(starts, end)  # the last start <= end is at index - 1
            if self._ends[block][index - 1] >= start:
                return False
        elif firsts:  # before every mapping
            block = index = 0
            starts = self._starts[0]
            firsts[0] = start
        else:
            firsts.append(start)
            self._starts.append(array("Q", (start,)))
            self._ends.append(array("Q", (end,)))
            self._phys.append(array("Q", (phys,)))
            self._flags.append(array("I", (flags,)))
            self._len = 1
            return True
        starts.insert(index, start)
        self._ends[block].insert(index, end)
        self._phys[block].insert(index, phys)
        self._flags[block].insert(index, flags)
        self._len += 1
        size = len(starts)
        if size > 2 * self._load:
            # An insertion at either end of the whole store leaves the block 3/4 full
            # (3 * _load // 2) and moves the rest on: filling the space in address order
            # (upwards, or downwards as Linux allocates IOVAs) leaves blocks with room for
            # _load // 2 later MAPs in the middle before a split (a split costs ~10 µs at
            # 10^6 mappings), where halves would stay half empty.
            keep = 3 * self._load // 2
            if index == size - 1 and block == len(firsts) - 1:
                self._split(block, keep)
            elif not index and not block:
                self._split(block, size - keep)
            else:
                self._split(block, size >> 1)
        return True

    def intersecting(self, start: int, end: int) -> list[Mapping]:
        """Every mapping sharing an address with ``[start, end]``, in address order."""
        span = self._span(start, end)
        return [] if span is None else self._rows(*span)

    def remove_range(self, start: int, end: int) -> list[Mapping]:
        """UNMAP ``[start, end]``: remove and return every mapping it covers, in order.

        Raises ``SplitError`` (and removes nothing) when a mapping crosses ``start`` or
        ``end`` (§3.2 UNMAP rule 4). Unmapped space inside the range is fine: it is simply
        not in the result (§3.2 UNMAP rule 5).
        """
        span = self._span(start, end)
        if span is None:
            return []
        first, head, last, tail = span
        if self._starts[first][head] < start:
            raise SplitError(self._row(first, head))
        if self._ends[last][tail] > end:
            raise SplitError(self._row(last, tail))
        if first != last or head != tail:
            removed = self._rows(first, head, last, tail)
            self._delete(first, head, last, tail)
            self._len -= len(removed)
            return removed
        # the usual UNMAP, one mapping: inline, as long as its block stays large enough
        starts, ends = self._starts[first], self._ends[first]
        phys, flags = self._phys[first], self._flags[first]
        mapping = Mapping(starts[head], ends[head], phys[head], flags[head])
        del starts[head], ends[head], phys[head], flags[head]
        self._len -= 1
        if len(starts) < self._load // 2:
            self._settle(first)
        elif not head:
            self._firsts[first] = starts[0]
        return [mapping]

    def discard(self, mapping: Mapping) -> None:
        """Remove exactly ``mapping`` (rollback of a MAP the host refused)."""
        block = bisect_right(self._firsts, mapping.start) - 1
        if block >= 0:
            index = bisect_right(self._starts[block], mapping.start) - 1
            if self._row(block, index) == mapping:
                self._delete(block, index, block, index)
                self._len -= 1
                return
        raise ValueError(f"{mapping} is not in the store")

    def lookup(self, addr: int) -> Mapping | None:
        """The mapping holding ``addr``, if any."""
        block = bisect_right(self._firsts, addr) - 1
        if block < 0:
            return None
        index = bisect_right(self._starts[block], addr) - 1
        if self._ends[block][index] < addr:
            return None
        return self._row(block, index)

    def clear(self) -> list[Mapping]:
        out = list(self)
        for column in (self._firsts, self._starts, self._ends, self._phys, self._flags):
            column.clear()
        self._len = 0
        return out

    # -- blocks -----------------------------------------------------------------------------
    def _row(self, block: int, index: int) -> Mapping:
        return Mapping(
            self._starts[block][index],
            self._ends[block][index],
            self._phys[block][index],
            self._flags[block][index],
        )

    def _rows(self, first: int, head: int, last: int, tail: int) -> list[Mapping]:
        """The mappings from ``(first, head)`` to ``(last, tail)`` inclusive (block, index)."""
        out: list[Mapping] = []
        for block in range(first, last + 1):
            lo = head if block == first else 0
            hi = tail + 1 if block == last else len(self._starts[block])
            out += map(
                Mapping,
                self._starts[block][lo:hi],
                self._ends[block][lo:hi],
                self._phys[block][lo:hi],
                self._flags[block][lo:hi],
            )
        return out

    def _span(self, start: int, end: int) -> tuple[int, int, int, int] | None:
        """``(first, head, last, tail)``: the first and the last mapping intersecting
        ``[start, end]`` as (block, index) pairs; None when there is none."""
        firsts = self._firsts
        last = bisect_right(firsts, end) - 1
        if last < 0:
            return None
        tail = bisect_right(self._starts[last], end) - 1  # the last start <= end
        first = bisect_right(firsts, start, 0, last + 1) - 1
        if first < 0:
            first = head = 0  # the first mapping starts inside the range
        else:
            head = bisect_right(self._starts[first], start) - 1  # the last start <= start
            if self._ends[first][head] < start:  # it ends before the range: the next one
                head += 1
                if head == len(self._starts[first]):
                    first, head = first + 1, 0
        if first > last or (first == last and head > tail):
            return None
        return first, head, last, tail

    def _split(self, block: int, at: int) -> None:
        """Cut a block in two before its ``at``-th mapping (both halves copied: an array
        keeps its allocation when it shrinks)."""
        for column in (self._starts, self._ends, self._phys, self._flags):
            items = column[block]
            column.insert(block + 1, items[at:])
            column[block] = items[:at]
        self._firsts.insert(block + 1, self._starts[block + 1][0])

    def _delete(self, first: int, head: int, last: int, tail: int) -> None:
        """Remove the mappings from ``(first, head)`` to ``(last, tail)`` inclusive."""
        columns = (self._starts, self._ends, self._phys, self._flags)
        if first == last:
            for column in columns:
                del column[first][head : tail + 1]
        else:
            for column in columns:
                del column[last][: tail + 1]
                del column[first][head:]
                del column[first + 1 : last]
            del self._firsts[first + 1 : last]
            self._settle(first + 1)
        self._settle(first)

    def _settle(self, block: int) -> None:
        """After removals from ``block``: drop it when empty, else refresh its first start
        and merge it into a neighbour when it fell under ``_load // 2`` mappings."""
        size = len(self._starts[block])
        columns = (self._starts, self._ends, self._phys, self._flags)
        if not size:
            for column in columns:
                del column[block]
            del self._firsts[block]
            return
        self._firsts[block] = self._starts[block][0]
        if size >= self._load // 2 or len(self._firsts) == 1:
            return
        into = block - 1 if block else 0  # the previous block; the first takes the second
        merged = into + 1
        for column in columns:
            column[into] += column[merged]
            del column[merged]
        del self._firsts[merged]
        size = len(self._starts[into])
        if size > 2 * self._load:
            self._split(into, size >> 1)
