"""Dispatchers: per-barrier plans of backend calls (DESIGN.md point 4), one module per model.

Every dispatcher takes events (``viommud.events``) and its model's topology, and returns one
``Outcome``; it never holds or touches a frontend. ``DispatchStats`` is shared by every
dispatcher of a session, so the replay report's totals (barriers, baseline) run across all
of its vIOMMUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from viommud.events import GuestError, StatusWrite


@dataclass(slots=True)
class DispatchStats:
    """Running totals of a session's dispatchers, for the replay report."""

    barriers: int = 0
    forwarded: int = 0  # guest commands that needed host work
    dropped: int = 0  # device-scoped commands whose device is unknown
    baseline_invalidate_calls: int = 0  # what a one-command-per-call VMM would issue


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one dispatch did, as the guest must see it.

    ``errors``: the guest commands that failed, in command order — those the frontend
    already refused (passed through) and those the host refused (``host_errors``, the part
    the frontend has not counted yet and learns through its one ``host_failed`` call).
    ``status_writes``: completions the guest observes in memory (VT-d wait descriptors with
    SW=1), in order; ``interrupts``: the indices of the VT-d wait descriptors with IF=1
    that completed (each a completion interrupt, ``events.CompletionInterrupt``). A
    virtio-iommu request that failed on the host has one error at index 0 whose ``code`` is
    the virtio status name.
    """

    errors: tuple[GuestError, ...] = ()
    host_errors: tuple[GuestError, ...] = ()
    status_writes: tuple[StatusWrite, ...] = ()
    interrupts: tuple[int, ...] = ()


NOTHING = Outcome()
