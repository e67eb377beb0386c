"""Group commit: doorbells that reach the daemon together share host calls.

A model that can do it implements ``GroupCommit`` (``screen`` and ``commit``) and says so
with ``group_commit = True`` on its class (the ``Viommu`` protocol declares the flag; a
Protocol ``isinstance`` check would cost microseconds per doorbell). ``run`` is the whole
mode: it splits the waiting doorbells into runs of *plain* ones (TLB-class invalidations and
barriers only, none in error), commits each run with shared host calls, and sends the
others, and any run whose host call failed, down the per-doorbell path — so a failure
reaches the guest at its own command's index, exactly as without group commit.
Screens and bulk coalescers per model: ``smmuv3_screen``, ``smmuv3_coalesce``,
``vtd_screen``, ``vtd_coalesce``. docs/coalescing.md, "Group commit".
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

    def commit(self, screen: Any, first: int, stop: int) -> list[DoorbellReply] | None:
        """Doorbells ``first`` to ``stop - 1`` (all plain) at once: their replies, or None,
        with nothing counted, when a host call failed."""
        ...


Answer = DoorbellReply | Exception
OneByOne = Callable[[bytes], Answer]
"""The per-doorbell path: a reply, or the RecordRefused it raised."""


def run(
    model: GroupCommit,
    doorbells: list[bytes],
    one: OneByOne,
    *,
    single: Callable[[bytes], DoorbellReply],
    before: Callable[[list[bytes]], None] | None = None,
    after: Callable[[list[DoorbellReply]], None] | None = None,
) -> list[Answer]:
    """Every doorbell's answer, in order. ``one`` answers a doorbell that is not plain;
    ``single`` re-runs a plain doorbell alone when its run's shared call failed; ``before``
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
        if replies is None:  # a host call failed: one by one, for the guest's error index
            replies = [single(data) for data in batch]
        if after is not None:
            after(replies)
        out += replies
        first = stop
    return out
