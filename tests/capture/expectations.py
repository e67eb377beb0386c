"""What a real-guest capture must show, shared by the committed-capture tests
(tests/capture/test_fixtures.py) and the tier that boots the guests (tests/realguest/)."""

from __future__ import annotations

from typing import Any

import pytest

# Configurations whose import or replay cannot meet the bar yet, and why. The tests that
# check them are strict xfails: they fail the day the gap closes, so this table gets updated.
KNOWN_GAPS: dict[str, str] = {}


def replay_marks(name: str) -> list[pytest.MarkDecorator]:
    reason = KNOWN_GAPS.get(name)
    return [] if reason is None else [pytest.mark.xfail(reason=reason, strict=True)]


def check_booted(manifest: dict[str, Any]) -> None:
    """The guest ran the whole workload and QEMU traced it."""
    markers = manifest["markers"]
    assert manifest["problems"] == []
    assert "workload-done" in markers
    assert markers[-1] == "poweroff"
    assert any(m.startswith("disk ok") for m in markers), markers
    assert any(m.startswith("tftp ok") for m in markers), markers
    assert manifest["trace_lines"] > 0
    if manifest["model"] == "smmuv3":
        assert manifest["events"]["smmuv3_write_mmio"] > 0
        assert manifest["queue"]["kind"] == "smmuv3-cmdq"
    elif manifest["model"] == "vtd":
        assert manifest["events"]["vtd_inv_desc"] > 0
        assert manifest["queue"]["kind"] == "vtd-iq"
    else:
        assert manifest["events"]["virtio_iommu_map"] > 0
        assert manifest["events"]["virtio_iommu_unmap"] > 0


def check_replayed(result: dict[str, Any]) -> None:
    """The import (no option) succeeded and the replay verified clean. SMMUv3 invalidations
    and virtio-iommu unmaps reach the host. QEMU 7.2's VT-d offers legacy and second-stage
    tables only, which viommud never nests (docs/vtd.md "Legacy mode"): nothing reaches the
    host, and the report must say why rather than look clean."""
    imported = result["import"]
    assert imported["ok"], imported.get("stderr") or imported.get("error")
    replay = result["replay"]
    assert replay["exit"] == 0, replay["stderr"]
    report = replay["report"]
    assert report["verify"] == {"enabled": True, "missed": 0, "over": report["verify"]["over"]}
    assert report["errors"]["total"] == 0
    calls = report["backend"]["calls"]
    if result["model"] == "vtd":
        assert report["commands"]["by_kind"].get("vtd:iotlb_inv", 0) > 0
        assert "IOMMU_HWPT_INVALIDATE" not in calls, calls
        assert any("legacy-mode or second-stage" in w for w in report["warnings"])
        return
    assert "warnings" not in report, report["warnings"]
    if result["model"] == "virtio-iommu":
        assert calls.get("IOMMU_IOAS_UNMAP", 0) > 0, calls
    else:
        assert calls.get("IOMMU_HWPT_INVALIDATE", 0) > 0, calls
