"""`serve --metrics`: Prometheus metrics agree with the replay reports and live state."""

from __future__ import annotations

import asyncio
import math
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FIXTURES
from tests.shell.conftest import loopback, running
from tests.shell.test_status import hold_a_session
from viommud.shell.metrics import Metrics
from viommud.shell.replay import replay
from viommud.shell.status import Snapshot, Totals

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Samples:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read()).decode()

    text = await asyncio.to_thread(fetch)
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {
        dict(labels)[label]: value
        for (sample, labels), value in samples.items()
        if sample == name and value
    }


async def test_metrics_match_the_reports(tmp_path: Path) -> None:
    traces = [FIXTURES / "smmuv3-every-opcode.jsonl", FIXTURES / "smmuv3-guest-errors.jsonl"]
    async with running(tmp_path, metrics=loopback()) as server:
        assert server.metrics is not None
        assert server.metrics.address is not None
        url = f"http://{server.metrics.address}/metrics"
        reports = []
        for trace in traces:
            result = await replay(trace, server.socket_path)
            assert result.report is not None
            reports.append(result.report)
        await server.wait_idle()
        idle = await scrape(url)
        holder = await hold_a_session(server.socket_path, vm="live")
        try:
            live = await scrape(url)
        finally:
            await holder.close()
    totals = Totals()
    for report in reports:
        totals.add(report)
    assert by_label(idle, "viommud_commands_total", "kind") == totals.commands
    assert by_label(idle, "viommud_guest_errors_total", "code") == {"CERROR_ILL": 21}
    assert by_label(idle, "viommud_backend_errnos_total", "errno") == {"EIO": 2}
    calls = by_label(idle, "viommud_backend_calls_total", "ioctl")
    # The reports are taken before each session ends; the daemon also counts its teardown.
    assert {k: v for k, v in calls.items() if k != "IOMMU_DESTROY"} == {
        k: v for k, v in totals.calls.items() if k != "IOMMU_DESTROY"
    }
    assert idle[("viommud_barriers_total", ())] == totals.barriers
    assert idle[("viommud_invalidation_entries_total", ())] == totals.invalidation_entries
    baseline = idle[("viommud_baseline_invalidate_calls_total", ())]
    assert baseline == totals.baseline_invalidate_calls
    ratio = idle[("viommud_coalescing_ratio", ())]
    assert math.isclose(ratio, baseline / calls["IOMMU_HWPT_INVALIDATE"])
    assert idle[("viommud_sessions_total", ())] == 2
    assert idle[("viommud_connected_clients", ())] == 0
    assert by_label(idle, "viommud_backend_objects", "kind") == {}
    doorbells = sum(1 for t in traces for line in t.read_text().splitlines() if '"cmds"' in line)
    assert idle[("viommud_batch_seconds_count", (("frame", "cmds"),))] == doorbells
    assert idle[("viommud_batch_seconds_bucket", (("frame", "cmds"), ("le", "+Inf")))] == doorbells
    # With a client holding a session: it is connected and its objects are live.
    assert live[("viommud_connected_clients", ())] == 1
    assert live[("viommud_live_sessions", ())] == 1
    objects = by_label(live, "viommud_backend_objects", "kind")
    assert objects["VDEVICE"] == 2
    assert objects["VIOMMU"] == 1
    assert live[("viommud_build_info", (("version", "0.1.0"),))] == 1


async def test_a_scrape_on_the_loop_thread_does_not_wait_for_itself() -> None:
    calls = []

    def snapshot() -> Snapshot:
        calls.append(1)
        return Snapshot(clients=3)

    metrics = Metrics(snapshot)
    metrics.bind_loop()
    assert metrics.snapshot().clients == 3  # taken directly, no hop through the loop
    other = await asyncio.to_thread(metrics.snapshot)  # taken on the loop, from a thread
    assert other.clients == 3
    assert len(calls) == 2


def test_before_the_first_invalidation_the_ratio_is_nan() -> None:
    metrics = Metrics(Snapshot)
    names = {m.name: m for m in metrics.registry.collect()}
    (sample,) = names["viommud_coalescing_ratio"].samples
    assert math.isnan(sample.value)
