"""Dispatchers: per-barrier plans of backend calls (DESIGN.md point 4), one module per model.

``DispatchStats`` is shared by every dispatcher of a session, so the replay report's totals
(barriers, baseline) run across all of its vIOMMUs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class DispatchStats:
    """Running totals of a session's dispatchers, for the replay report."""

    barriers: int = 0
    forwarded: int = 0  # guest commands that needed host work
    dropped: int = 0  # device-scoped commands whose device is unknown
    baseline_invalidate_calls: int = 0  # what a one-command-per-call VMM would issue
