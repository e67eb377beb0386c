"""The verification oracle (DESIGN.md point 6; the model is written down in docs/oracle.md).

It watches a session from two sides and never looks at the dispatcher's plan:

* the guest side (one ``GuestModel`` per vIOMMU, per model) turns the guest's own commands
  into ``Need`` values: cache contents that must be gone when a given barrier completes;
* the host side (``HostModel``, per model) turns each backend call, as logged, into
  ``Removal`` values: what that call removed from the emulated hardware's caches.

At the end of every doorbell (when its barriers are reported complete) each need whose
barrier fell in that doorbell must be covered by removals issued after the need arose:
same cache and place, compatible tags, and an address range inside the union of theirs.
A need left uncovered counts as ``missed``; a removal that served no need counts as
``over``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

FULL = (0, 1 << 64)
IOTLB = "iotlb"
DEVTLB = "devtlb"
CONFIG = "config"


@dataclass(frozen=True, slots=True)
class Need:
    """Entries of ``cache`` at ``place`` that must be gone by the need's barrier.

    ``tag`` selects entries within the place (the ASID or PASID; None = all of them);
    ``lo``/``hi`` is the byte range (FULL = everything); for TLBs ``leaf_only`` says only
    last-level entries must go and ``level`` which level (0 = any)."""

    cache: str
    place: tuple[Any, ...]
    tag: int | None
    lo: int
    hi: int
    leaf_only: bool = False
    level: int = 0
    origin: str = ""  # for reports: which guest command asked for it


@dataclass(frozen=True, slots=True)
class Removal:
    """What one backend invalidation entry removed (same fields as Need)."""

    cache: str
    place: tuple[Any, ...]
    tag: int | None
    lo: int
    hi: int
    leaf_only: bool = False
    level: int = 0


def applies(removal: Removal, need: Need) -> bool:
    """Whether ``removal`` removes entries of the kind ``need`` asks to remove."""
    if removal.cache != need.cache or removal.place != need.place:
        return False
    if removal.tag is not None and removal.tag != need.tag:
        return False
    if removal.leaf_only and not need.leaf_only:
        return False
    return removal.level in (0, need.level)


def covered(need: Need, removals: list[Removal]) -> bool:
    """Whether the union of the applicable removals' ranges contains the need's range."""
    spans = sorted((r.lo, r.hi) for r in removals if applies(r, need) and r.hi > need.lo)
    reach = need.lo
    for lo, hi in spans:
        if lo > reach:
            break
        reach = max(reach, hi)
        if reach >= need.hi:
            return True
    return reach >= need.hi


def overlaps(removal: Removal, need: Need) -> bool:
    return applies(removal, need) and removal.lo < need.hi and need.lo < removal.hi


@dataclass(slots=True)
class _Open:
    need: Need
    since: int  # removals with a sequence number above this one count


@dataclass(slots=True)
class Ledger:
    """Needs waiting for their barrier, removals since, and the running verdict."""

    missed: int = 0
    over: int = 0
    missed_needs: list[Need] = field(default_factory=list)
    _open: list[_Open] = field(default_factory=list)  # needs whose barrier has not come
    _due: list[_Open] = field(default_factory=list)  # needs whose barrier is this doorbell
    _removals: list[tuple[int, Removal]] = field(default_factory=list)
    _fresh: int = 0  # index into _removals of the first removal of this doorbell
    _seq: int = 0

    def remove(self, removal: Removal) -> None:
        self._seq += 1
        self._removals.append((self._seq, removal))

    def begin(self) -> int:
        """A doorbell starts: needs raised from now on see only removals issued after."""
        self._fresh = len(self._removals)
        return self._seq

    def need(self, need: Need, since: int, *, due: bool) -> None:
        (self._due if due else self._open).append(_Open(need, since))

    def barrier_reached(self) -> None:
        """Every open need's barrier has come (a sync later in the same doorbell)."""
        self._due += self._open
        self._open = []

    def settle(self) -> None:
        """The doorbell's barriers are reported complete: judge what was due."""
        for item in self._due:
            window = [r for seq, r in self._removals if seq > item.since]
            if not covered(item.need, window):
                self.missed += 1
                if len(self.missed_needs) < 100:
                    self.missed_needs.append(item.need)
        live = [item.need for item in self._due] + [item.need for item in self._open]
        for _seq, removal in self._removals[self._fresh :]:
            if not any(overlaps(removal, need) for need in live):
                self.over += 1
        self._due = []
        # Removals older than every open need can no longer matter.
        oldest = min((item.since for item in self._open), default=self._seq)
        self._removals = [(s, r) for s, r in self._removals if s > oldest]
        self._fresh = len(self._removals)


class CallObserver(Protocol):
    def __call__(self, ioctl: str, err: int, call: dict[str, Any], iommu: str | None) -> None: ...
