"""Per-session activity: latency buckets and the once-a-second ``session_progress`` line.

At INFO the daemon writes no line per doorbell (those are DEBUG: ``batch_forwarded``,
``request_completed``); a session instead logs ``session_progress`` at most once per
second while it is busy: doorbells, commands, host calls, guest errors and the p50 / p99
batch latency of that second (docs/operations.md §5). The same buckets feed the Prometheus
histogram ``viommud_batch_seconds`` (they cross from a session process to the listener as
plain lists, so this module imports nothing but the standard library).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

# Batches take microseconds (one doorbell of a few commands) to tens of milliseconds
# (a large doorbell with STE installs).
LATENCY_BUCKETS = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    0.1,
    0.25,
    1.0,
)
FRAMES = ("cmds", "request")
PROGRESS_INTERVAL = 1.0  # seconds between two session_progress lines, at least


@dataclass(slots=True)
class Histogram:
    """Counts per latency bucket (the last one is +Inf) and the sum, for one frame kind."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def add(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty; the largest
        bucket bound for the +Inf bucket)."""
        n = sum(self.counts)
        if not n:
            return None
        rank, seen = q * n, 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return LATENCY_BUCKETS[min(i, len(LATENCY_BUCKETS) - 1)]
        return LATENCY_BUCKETS[-1]

    def to_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Histogram:
        counts = [int(n) for n in obj["counts"]]
        if len(counts) != len(LATENCY_BUCKETS) + 1:
            raise ValueError("histogram of another bucket layout")
        return cls(counts, float(obj["sum"]))


def merged(parts: list[dict[str, Histogram]]) -> dict[str, Histogram]:
    out = {frame: Histogram() for frame in FRAMES}
    for part in parts:
        for frame, hist in part.items():
            out[frame].add(hist)
    return out


class Progress:
    """One session's activity: cumulative latency histograms, and the window of the next
    ``session_progress`` line."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.latency = {frame: Histogram() for frame in FRAMES}
        self._clock = clock
        self._window = Histogram()
        self._last = clock()
        self.doorbells = 0
        self.requests = 0
        self.commands = 0
        self.errors = 0
        self.host_calls = 0

    def batch(
        self, frame: str, seconds: float, *, commands: int, errors: int, host_calls: int
    ) -> None:
        self.latency[frame].observe(seconds)
        self._window.observe(seconds)
        if frame == "cmds":
            self.doorbells += 1
        else:
            self.requests += 1
        self.commands += commands
        self.errors += errors
        self.host_calls += host_calls

    def doorbell(self, seconds: float, commands: int, errors: int, host_calls: int) -> None:
        """``batch("cmds", ...)`` in one step (the per-doorbell hot path): one bucket search
        for both histograms."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        hist = self.latency["cmds"]
        hist.counts[bucket] += 1
        hist.total += seconds
        window = self._window
        window.counts[bucket] += 1
        window.total += seconds
        self.doorbells += 1
        self.commands += commands
        self.errors += errors
        self.host_calls += host_calls

    def due(self) -> bool:
        """Whether a ``session_progress`` line is due (something happened and a second has
        passed since the last one)."""
        return bool(self.doorbells or self.requests) and (
            self._clock() - self._last >= PROGRESS_INTERVAL
        )

    def take(self) -> dict[str, Any]:
        """The window's keys for ``session_progress``; starts a new window."""
        p50, p99 = self._window.quantile(0.5), self._window.quantile(0.99)
        line = {
            "doorbells": self.doorbells,
            "requests": self.requests,
            "commands": self.commands,
            "host_calls": self.host_calls,
            "errors": self.errors,
            "p50_ms": None if p50 is None else p50 * 1e3,
            "p99_ms": None if p99 is None else p99 * 1e3,
        }
        self._window = Histogram()
        self._last = self._clock()
        self.doorbells = self.requests = self.commands = self.errors = self.host_calls = 0
        return line
