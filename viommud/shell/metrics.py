"""Prometheus metrics (``viommud serve --metrics ADDR:PORT``), with prometheus_client.

Counters that sessions already keep (commands by kind, barriers, backend calls by ioctl,
guest errors by code, backend errnos, ...) are not counted twice: a collector reads them
from the daemon at scrape time — the totals of ended sessions plus the live ones — so the
hot path pays nothing for them. The batch latency histogram is kept by each session's
``Progress`` (viommud.shell.progress) and read at scrape time as well, session processes
included. prometheus_client serves HTTP from its own thread; the collector asks the event
loop for a snapshot (``loop.call_soon_threadsafe``) instead of reading session state from that
thread. Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from viommud import __version__
from viommud.shell.endpoints import TcpAddress
from viommud.shell.progress import LATENCY_BUCKETS
from viommud.shell.status import Snapshot

SNAPSHOT_TIMEOUT = 5.0


class Metrics:
    """The daemon's registry: one scrape-time collector."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        self._source = snapshot
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._last = Snapshot()
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.address: TcpAddress | None = None
        self.registry.register(_DaemonCollector(self.snapshot))

    def bind_loop(self) -> None:
        """Remember the running loop: snapshots are taken on its thread."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def snapshot(self) -> Snapshot:
        """A snapshot from the loop's thread (called from any thread)."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._last = self._source()
            return self._last
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(self._source())
            except BaseException as exc:  # handed to the scraping thread
                future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            self._last = future.result(timeout=SNAPSHOT_TIMEOUT)
        except (RuntimeError, TimeoutError):
            pass  # the loop is closing or busy: serve the last snapshot
        return self._last

    def serve(self, address: TcpAddress) -> TcpAddress:
        """Start the HTTP endpoint (its own thread); returns the bound address.

        Call ``bind_loop()`` from the event loop as well, so scrapes snapshot on it."""
        self._http, self._thread = start_http_server(
            address.port, addr=address.host, registry=self.registry
        )
        host, port = self._http.server_address[:2]
        self.address = TcpAddress(str(host), int(port))
        return self.address

    def stop(self) -> None:
        """Stop the HTTP endpoint (blocking: call it off the event loop)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=SNAPSHOT_TIMEOUT)
            self._thread = None


class _DaemonCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # no fixed description: collected only at scrape time

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        totals = snap.totals
        yield _gauge("viommud_build_info", "viommud version", {"version": __version__}, 1)
        yield _counter_by(
            "viommud_commands",
            "Guest commands decoded, by kind (model:NAME)",
            "kind",
            totals.commands,
        )
        yield _counter(
            "viommud_barriers",
            "Guest barriers (CMD_SYNC, wait descriptors) completed",
            totals.barriers,
        )
        yield _counter_by(
            "viommud_backend_calls", "Backend (iommufd) calls, by ioctl", "ioctl", totals.calls
        )
        yield _counter(
            "viommud_invalidation_entries",
            "Entries carried by IOMMU_HWPT_INVALIDATE calls",
            totals.invalidation_entries,
        )
        yield _counter(
            "viommud_baseline_invalidate_calls",
            "IOMMU_HWPT_INVALIDATE calls a one-command-per-call VMM would have made",
            totals.baseline_invalidate_calls,
        )
        ratio = totals.coalescing_ratio
        yield _gauge(
            "viommud_coalescing_ratio",
            "Baseline invalidate calls per invalidate call made (NaN before the first call)",
            {},
            ratio if ratio is not None else math.nan,
        )
        yield _counter_by(
            "viommud_guest_errors", "Guest-visible command errors, by code", "code", totals.errors
        )
        yield _counter_by(
            "viommud_backend_errnos", "Failed backend calls, by errno", "errno", totals.errnos
        )
        yield _counter(
            "viommud_config_errors", "Configuration records refused", totals.config_errors
        )
        yield _counter("viommud_sessions", "Sessions started (HELLO accepted)", totals.sessions)
        yield _gauge("viommud_connected_clients", "Clients connected now", {}, snap.clients)
        yield _gauge("viommud_live_sessions", "Sessions open now", {}, snap.sessions)
        objects = GaugeMetricFamily(
            "viommud_backend_objects", "Live backend (iommufd) objects, by kind", labels=["kind"]
        )
        for kind, count in sorted(snap.objects.items()):
            objects.add_metric([kind], count)
        yield objects
        batches = HistogramMetricFamily(
            "viommud_batch_seconds",
            "Time to handle one guest batch (a CMDS doorbell or a virtio REQUEST), "
            "from frame decoded to reply encoded",
            labels=["frame"],
        )
        for frame, hist in sorted(snap.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, math.inf), hist.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            batches.add_metric([frame], buckets, sum_value=hist.total)
        yield batches


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _counter_by(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family
