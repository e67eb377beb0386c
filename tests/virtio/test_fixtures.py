"""The bundled virtio-iommu traces: up to date with their generator, and the realistic guest
session's replay report (the figures quoted in the README)."""

from __future__ import annotations

from tests.conftest import FIXTURES, Daemon
from tests.virtio.replaying import GEN, replay_file


def test_virtio_fixtures_are_up_to_date() -> None:
    assert GEN.main(["--check"]) == 0, "run: python fixtures/generate_virtio.py"


async def test_linux_session_report(daemon: Daemon) -> None:
    replayed = await replay_file(daemon, FIXTURES / "virtio-linux-session.jsonl.xz")
    report = replayed.report
    assert report["trace"] == "virtio-linux-session"
    kinds = report["commands"]["by_kind"]
    assert kinds == {
        "virtio:ATTACH": 2,
        "virtio:DETACH": 2,
        "virtio:MAP": 4690,
        "virtio:PROBE": 2,
        "virtio:UNMAP": 4000,
    }
    assert report["records"] == 8702
    assert report["errors"] == {"total": 0, "by_code": {}}
    assert report["barriers"] == report["commands"]["total"] == 8696
    calls = report["backend"]["calls"]
    # every MAP is one IOAS_MAP; every UNMAP one IOAS_UNMAP, scatter-gather lists included
    assert calls["IOMMU_IOAS_MAP"] == kinds["virtio:MAP"]
    assert calls["IOMMU_IOAS_UNMAP"] == kinds["virtio:UNMAP"]
    assert calls["IOMMU_IOAS_ALLOC"] == calls["IOMMU_HWPT_ALLOC"] == 2  # one domain per device
    assert "IOMMU_HWPT_INVALIDATE" not in calls  # the kernel flushes on IOAS_UNMAP
    assert report["backend"]["errnos"] == {}
    unmaps = replayed.ioctls("IOMMU_IOAS_UNMAP")
    assert all(c["out"]["length"] == c["args"]["length"] for c in unmaps)
    multi = [c for c in unmaps if c["args"]["length"] > 0x1000]
    assert multi  # larger buffers and scatter-gather lists
    probes = [r for r in replayed.requests() if r["used"] == 516]
    assert len(probes) == 2
    [backend] = daemon.backends
    assert backend.live_objects() == []
