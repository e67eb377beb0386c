"""Group commit: doorbells that reach the daemon together share host calls.

A model that can do it implements ``GroupCommit`` (``screen`` and ``commit``) and says so
with ``group_commit = True`` on its class (the ``Viommu`` protocol declares the flag; a
Protocol ``isinstance`` check would cost microseconds per doorbell). ``run`` is the whole
mode: it splits the waiting doorbells into runs of *plain* ones (TLB-class invalidations and
barriers only, none in error), commits each run with shared host calls, and sends the
others down the per-doorbell path. A host failure inside a run is handled by the run's own
dispatcher exactly as the per-doorbell path handles one (the guest command that produced the
entry the kernel names gets the error, the rest is re-sent), so it reaches the guest in the
reply of the doorbell holding that command. Screens and bulk coalescers per model:
``smmuv3_screen``, ``smmuv3_coalesce``, ``vtd_screen``, ``vtd_coalesce``.
docs/coalescing.md, "Group commit".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from viommud.replies import DoorbellReply


class Screened(Protocol):
    """The result of ``GroupCommit.screen``: which doorbells are plain."""

    @property
    def plain(self) -> list[bool]: ...


class GroupCommit(Protocol):
    """A vIOMMU model that can run consecutive plain doorbells with shared host calls."""

    group_commit: ClassVar[bool]

    def screen(self, doorbells: list[bytes]) -> Screened:
        """Which doorbells are plain; pass it back to ``commit``."""
        ...

    def commit(self, screen: Any, first: int, stop: int) -> list[DoorbellReply]:
        """Doorbells ``first`` to ``stop - 1`` (all plain) at once: their replies, built once
        every host call of the run (re-sends after a failure included) has returned."""
        ...


Answer = DoorbellReply | Exception
OneByOne = Callable[[bytes], Answer]
"""The per-doorbell path: a reply, or the RecordRefused it raised."""


def run(
    model: GroupCommit,
    doorbells: list[bytes],
    one: OneByOne,
    *,
    before: Callable[[list[bytes]], None] | None = None,
    after: Callable[[list[DoorbellReply]], None] | None = None,
) -> list[Answer]:
    """Every doorbell's answer, in order. ``one`` answers a doorbell that is not plain; ``before``
    and ``after`` bracket each committed run (the oracle sees a run as one doorbell whose
    barriers complete when its calls return)."""
    screen = model.screen(doorbells)
    plain = screen.plain
    out: list[Answer] = []
    first, count = 0, len(doorbells)
    while first < count:
        if not plain[first]:
            out.append(one(doorbells[first]))
            first += 1
            continue
        stop = first + 1
        while stop < count and plain[stop]:
            stop += 1
        batch = doorbells[first:stop]
        if before is not None:
            before(batch)
        replies = model.commit(screen, first, stop)
        if after is not None:
            after(replies)
        out += replies
        first = stop
    return out
