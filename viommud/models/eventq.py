"""A queue of host events for the guest that the daemon keeps itself (docs/protocol.md §10).

SMMUv3 events come from the kernel's vEVENTQ with its sequence numbers and lost-events
header. VT-d page requests (a FAULT object) and virtio-iommu faults have no such header
in the kernel; the daemon queues them here under the same rules, so that a client reads
every EVENT frame alike:

* at most ``depth`` records wait; a record that finds the queue full is dropped, and a
  lost-events header (no record) sits at the tail instead, as ``iommufd_vevent_handler``
  places it: one header however many were dropped, carrying the sequence number of the
  latest drop;
* every record and every (re)placed header takes the next sequence number, 0 .. 2^31 - 1,
  then 0 again (``INT_MAX`` wrap, as ``veventq->sequence``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SEQUENCE_MASK = (1 << 31) - 1


@dataclass(slots=True)
class GuestEventQueue:
    """Records (``source``: the physical IOMMU, ``record``: the guest's bytes) until read."""

    depth: int
    sequence: int = 0
    lost: int = 0  # records dropped since the queue was created
    _items: deque[tuple[str, int, bool, bytes]] = field(default_factory=deque)
    _records: int = 0  # records (not headers) queued

    def report(self, source: str, record: bytes) -> bool:
        """Queue ``record``; False when the queue was full and it was dropped."""
        items = self._items
        if items and items[-1][2]:
            items.pop()  # the lost-events header only ever sits at the tail
        kept = self._records < self.depth
        if kept:
            items.append((source, self.sequence, False, record))
            self._records += 1
        else:
            items.append((source, self.sequence, True, b""))
            self.lost += 1
        self.sequence = (self.sequence + 1) & SEQUENCE_MASK
        return kept

    def drain(self) -> list[tuple[str, int, bool, bytes]]:
        """Everything queued, oldest first: ``(source, sequence, lost, record)``."""
        out = list(self._items)
        self._items.clear()
        self._records = 0
        return out

    def __len__(self) -> int:
        return len(self._items)
