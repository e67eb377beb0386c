"""The verification oracle (DESIGN.md point 6; the model is written down in docs/oracle.md).

It watches a session from two sides and shares no code with what it checks: it reads the
guest's bytes through the construct declarations of ``protocols/`` and keeps its own model
of the architecture (tests/oracle/test_independence.py holds it to that).

* the guest side (``SmmuGuest``, ``VtdGuest``: one per vIOMMU) turns the guest's own
  commands into ``Need`` values: cache contents that must be gone when a given barrier
  completes;
* the host side (``SmmuHost``, ``VtdHost``) turns each backend call, as logged, into
  ``Removal`` values: what that call removed from the emulated hardware's caches.

At the end of every doorbell (when its barriers are reported complete) each need whose
barrier fell in that doorbell must be covered by removals issued after the need arose:
same cache and place, compatible tags, and an address range inside the union of theirs.
A need may also say that parts of its range became stale at different times (a VT-d
device-TLB need): each part then counts the removals issued since its own time. A need left
uncovered counts as ``missed``; a removal that served no need counts as ``over``.

Ordering: the entries of one host call are unordered (the kernel issues no sync between the
entries of one IOMMU_HWPT_INVALIDATE array). A need the guest ordered after others with a
barrier (``Ledger.need(after=...)``: an SMMUv3 TLB invalidation after a configuration one,
an ATC invalidation after a TLB one) only counts removals of a host call later than the call
that completed the cover of each of those.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Protocol

FULL = (0, 1 << 64)
GLOBAL = -1  # the tag of global (nG=0) TLB entries: they match every ASID (SMMUv3 §3.17.3)
IOTLB = "iotlb"
DEVTLB = "devtlb"
CONFIG = "config"


@dataclass(frozen=True, slots=True)
class Need:
    """Entries of ``cache`` at ``place`` that must be gone by the need's barrier.

    ``tag`` selects entries within the place (the ASID or PASID, ``GLOBAL`` the global
    entries; None = all of them); ``lo``/``hi`` is the byte range (FULL = everything); for
    TLBs ``leaf_only`` says only last-level entries must go, ``level`` which level (0 = any)
    and ``granule`` the translation granule of the entries, log2 bytes (0 = any)."""

    cache: str
    place: tuple[Any, ...]
    tag: int | None
    lo: int
    hi: int
    leaf_only: bool = False
    level: int = 0
    granule: int = 0
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
    granule: int = 0


def applies(removal: Removal, need: Need) -> bool:
    """Whether ``removal`` removes entries of the kind ``need`` asks to remove."""
    if removal.cache != need.cache or removal.place != need.place:
        return False
    if removal.tag is not None and removal.tag != need.tag:
        return False
    if removal.leaf_only and not need.leaf_only:
        return False
    # A level or granule hint that differs from the entries' may leave them (SMMUv3 §4.4.1,
    # TTL and TG: "the entries might not be invalidated").
    return removal.level in (0, need.level) and removal.granule in (0, need.granule)


def covered(
    need: Need, removals: list[Removal], lo: int | None = None, hi: int | None = None
) -> bool:
    """Whether the union of the applicable removals' ranges contains ``[lo, hi)`` (the
    need's whole range by default)."""
    lo = need.lo if lo is None else lo
    hi = need.hi if hi is None else hi
    spans = sorted((r.lo, r.hi) for r in removals if applies(r, need) and r.hi > lo)
    reach = lo
    for start, end in spans:
        if start > reach:
            break
        reach = max(reach, end)
        if reach >= hi:
            return True
    return reach >= hi


def overlaps(removal: Removal, need: Need) -> bool:
    return applies(removal, need) and removal.lo < need.hi and need.lo < removal.hi


Piece = tuple[int, int, int]  # (lo, hi, since): part of a need's range and when it went stale


@dataclass(slots=True, eq=False)
class Handle:
    """A raised need, as the guest model holds it: what later needs are ordered after."""

    need: Need
    pieces: tuple[Piece, ...]  # removals with a sequence number above ``since`` count
    after: tuple[Handle, ...] = ()  # needs a guest barrier ordered before this one
    ready: int | None = None  # once judged covered: the last sequence number of the call
    # that completed the cover (needs ordered after this one count only later calls)
    wanted: bool = False  # some need is ordered after this one: ``ready`` must be exact
    owner: str = ""  # the vIOMMU whose barrier the need waits for


KEEP_PER_PLACE = 1024  # removals remembered per cache place (needs look back this far)
KEEP_FULL = 16  # whole-space removals remembered per cache place, however old

_History = list[tuple[int, Removal, int]]  # (sequence number, removal, host call number)


@dataclass(slots=True)
class Ledger:
    """Needs waiting for their barrier, removals since, and the running verdict.

    Removals are kept per (cache, place): the last ``KEEP_PER_PLACE`` of each, and the last
    ``KEEP_FULL`` whole-space ones however old. A need may look back to before its own
    doorbell (a VT-d device-TLB need counts removals since its range last went stale)."""

    missed: int = 0
    over: int = 0
    missed_needs: list[Need] = field(default_factory=list)
    _open: list[Handle] = field(default_factory=list)  # needs whose barrier has not come
    _due: list[Handle] = field(default_factory=list)  # needs whose barrier is this doorbell
    _by_place: dict[tuple[str, tuple[Any, ...]], _History] = field(default_factory=dict)
    _full: dict[tuple[str, tuple[Any, ...]], _History] = field(default_factory=dict)
    _fresh: list[tuple[Removal, int]] = field(default_factory=list)  # this doorbell's
    _seq: int = 0
    _call: int = 0  # host calls seen
    _call_end: dict[int, int] = field(default_factory=dict)  # call -> its last sequence number

    def call(self) -> None:
        """A host call begins: its entries are unordered among themselves, ordered after
        every earlier call's."""
        self._call += 1
        self._call_end[self._call] = self._seq
        if len(self._call_end) > 2 * KEEP_PER_PLACE:
            for old in sorted(self._call_end)[:KEEP_PER_PLACE]:
                del self._call_end[old]

    def remove(self, removal: Removal, entry: int | None = None) -> None:
        """Record what a backend entry removed; one entry may remove several things (pass
        the same ``entry`` from ``new_entry()``): it is ``over`` only if none served."""
        self._seq += 1
        self._call_end[self._call] = self._seq
        key = (removal.cache, removal.place)
        item = (self._seq, removal, self._call)
        history = self._by_place.setdefault(key, [])
        history.append(item)
        if len(history) > 2 * KEEP_PER_PLACE:
            del history[:KEEP_PER_PLACE]
        if removal.lo == 0 and removal.hi >= FULL[1]:
            fulls = self._full.setdefault(key, [])
            fulls.append(item)
            if len(fulls) > KEEP_FULL:
                del fulls[0]
        self._fresh.append((removal, self._seq if entry is None else entry))

    def new_entry(self) -> int:
        self._seq += 1
        return self._seq

    def begin(self) -> int:
        """A doorbell starts: needs raised from now on see only removals issued after."""
        return self._seq

    def need(
        self,
        need: Need,
        since: int,
        *,
        due: bool,
        pieces: tuple[Piece, ...] = (),
        after: tuple[Handle, ...] = (),
        owner: str = "",
    ) -> Handle:
        """Raise ``need``: removals after ``since`` count, or per part of its range after
        the part's own time when ``pieces`` (which then cover the need's range) are given;
        with ``after``, only removals of calls later than those that covered them. Unless
        ``due``, it waits for a barrier of ``owner``."""
        item = Handle(need, pieces or ((need.lo, need.hi, since),), after, owner=owner)
        for earlier in after:
            earlier.wanted = True
        (self._due if due else self._open).append(item)
        return item

    def barrier_reached(self, owner: str = "") -> None:
        """A barrier of vIOMMU ``owner`` (a sync later in the same doorbell): the barrier
        of every need that vIOMMU raised has come; other vIOMMUs' needs wait for their own."""
        self._due += [item for item in self._open if item.owner == owner]
        self._open = [item for item in self._open if item.owner != owner]

    def settle(self) -> None:
        """The doorbell's barriers are reported complete: judge what was due (in the order
        the needs were raised, so a need's predecessors are judged before it)."""
        for item in self._due:
            item.ready = self._judge(item)
            if item.ready is None:
                self.missed += 1
                if len(self.missed_needs) < 100:
                    self.missed_needs.append(item.need)
        live: dict[tuple[str, tuple[Any, ...]], list[Need]] = {}
        for item in (*self._due, *self._open):  # a removal only serves needs of its place
            live.setdefault((item.need.cache, item.need.place), []).append(item.need)
        useless: dict[int, bool] = {}
        for removal, entry in self._fresh:
            here = live.get((removal.cache, removal.place), ())
            served = any(overlaps(removal, need) for need in here)
            useless[entry] = useless.get(entry, True) and not served
        self.over += sum(useless.values())
        self._due = []
        self._fresh = []

    def _judge(self, item: Handle) -> int | None:
        """None if ``item`` is not covered; else the last sequence number of the host call
        that completed its cover."""
        need = item.need
        key = (need.cache, need.place)
        history = self._by_place.get(key, [])
        fulls = self._full.get(key, [])
        floor = max((p.ready for p in item.after if p.ready is not None), default=0)
        done = 0
        for lo, hi, stale in item.pieces:
            since = max(stale, floor)
            # History is in sequence order: only its tail is newer than the piece.
            window = history[bisect_right(history, since, key=_seq) :]
            window += [f for f in fulls if f[0] > since]
            if not covered(need, [r for _, r, _ in window], lo, hi):
                return None
            if not item.wanted or lo >= hi:
                continue
            window.sort(key=_seq)
            applicable = [(r, call) for _, r, call in window if applies(r, need)]
            # The shortest prefix that covers: its last removal's call completed the cover.
            low, high = 1, len(applicable)
            while low < high:
                mid = (low + high) // 2
                if covered(need, [r for r, _ in applicable[:mid]], lo, hi):
                    high = mid
                else:
                    low = mid + 1
            call = applicable[low - 1][1]
            done = max(done, self._call_end.get(call, self._seq))
        return done if item.wanted else self._seq


def _seq(item: tuple[int, Removal, int]) -> int:
    return item[0]


class CallObserver(Protocol):
    def __call__(self, ioctl: str, err: int, call: dict[str, Any], iommu: str | None) -> None: ...
