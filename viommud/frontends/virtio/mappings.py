"""The mappings of one virtio-iommu domain: disjoint inclusive intervals, O(log n) each way.

A *mapping* is the region one MAP request created (virtio-iommu.md §2.5): ``[start, end]``
(inclusive, as on the wire) translating to ``phys + (addr - start)`` with the MAP flags.
Mappings of a domain never overlap, so sorting them by ``start`` also sorts them by ``end``
and every question is a bisection in ``sortedcontainers.SortedKeyList`` (a B+-tree-like list
of lists: O(log n) insert, delete and search):

* ``add`` refuses a mapping that overlaps any other (MAP: INVAL): the only candidate is the
  last mapping starting at or before the new ``end``;
* ``remove_range`` implements UNMAP atomically: every mapping inside ``[start, end]`` goes,
  unless one of them straddles a boundary, in which case nothing goes (RANGE, §2.5 rule 4);
* ``lookup`` finds the mapping holding one address (the translation a fault check needs).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sortedcontainers import SortedKeyList  # type: ignore[import-untyped]

__all__ = ["Mapping", "MappingStore", "SplitError"]


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


def _start(mapping: Mapping) -> int:
    return mapping.start


class SplitError(Exception):
    """UNMAP would split ``mapping`` (it crosses the start or the end of the range)."""

    def __init__(self, mapping: Mapping) -> None:
        super().__init__(f"[{mapping.start:#x}, {mapping.end:#x}] would be split")
        self.mapping = mapping


class MappingStore:
    """The disjoint mappings of one domain, ordered by start address."""

    __slots__ = ("_items",)

    def __init__(self, mappings: list[Mapping] | None = None) -> None:
        self._items: SortedKeyList = SortedKeyList(key=_start)
        for mapping in mappings or ():
            if not self.add(mapping):
                raise ValueError(f"overlapping mapping {mapping}")

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def overlaps(self, start: int, end: int) -> bool:
        """True when some mapping shares at least one address with ``[start, end]``."""
        items = self._items
        index = items.bisect_key_right(end) - 1  # last mapping starting at or before end
        if index < 0:
            return False
        last: Mapping = items[index]
        return last.end >= start

    def add(self, mapping: Mapping) -> bool:
        """Insert ``mapping``; False (and nothing changed) when it overlaps another one."""
        if mapping.end < mapping.start:
            raise ValueError(f"empty interval {mapping}")
        if self.overlaps(mapping.start, mapping.end):
            return False
        self._items.add(mapping)
        return True

    def intersecting(self, start: int, end: int) -> list[Mapping]:
        """Every mapping sharing an address with ``[start, end]``, in address order."""
        first, stop = self._span(start, end)
        return list(self._items[first:stop])

    def remove_range(self, start: int, end: int) -> list[Mapping]:
        """UNMAP ``[start, end]``: remove and return every mapping it covers, in order.

        Raises ``SplitError`` (and removes nothing) when a mapping crosses ``start`` or
        ``end``. Unmapped space inside the range is fine: it is simply not in the result.
        """
        items = self._items
        first, stop = self._span(start, end)
        if first == stop:
            return []
        head, tail = items[first], items[stop - 1]
        if head.start < start:
            raise SplitError(head)
        if tail.end > end:
            raise SplitError(tail)
        removed = list(items[first:stop])
        del items[first:stop]
        return removed

    def discard(self, mapping: Mapping) -> None:
        """Remove exactly ``mapping`` (rollback of a MAP the host refused)."""
        self._items.remove(mapping)

    def lookup(self, addr: int) -> Mapping | None:
        """The mapping holding ``addr``, if any."""
        items = self._items
        index = items.bisect_key_right(addr) - 1
        if index < 0:
            return None
        mapping: Mapping = items[index]
        return mapping if mapping.end >= addr else None

    def clear(self) -> list[Mapping]:
        out = list(self._items)
        self._items.clear()
        return out

    def _span(self, start: int, end: int) -> tuple[int, int]:
        """Index range ``[first, stop)`` of the mappings intersecting ``[start, end]``."""
        items = self._items
        first = items.bisect_key_right(start) - 1
        if first < 0 or items[first].end < start:
            first += 1
        stop = items.bisect_key_right(end)
        return first, max(first, stop)
