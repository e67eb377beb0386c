"""The committed real-guest captures (fixtures/captures/, made by ``python -m capture.kit``):
consistent with their manifests, and imported and replayed the way the kit does it, so the
importer is tested against real QEMU output without QEMU."""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from capture.kit import event_counts, import_and_replay
from tests.capture.expectations import check_booted, check_replayed, replay_marks

CAPTURES = Path(__file__).resolve().parents[2] / "fixtures" / "captures"
NAMES = sorted(p.parent.name for p in CAPTURES.glob("*/MANIFEST.json"))


def _manifest(name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((CAPTURES / name / "MANIFEST.json").read_text())
    return manifest


def test_every_configuration_has_a_committed_capture() -> None:
    assert NAMES == ["smmuv3-lazy", "smmuv3-strict", "virtio-iommu", "vtd-legacy", "vtd-scalable"]


@pytest.mark.parametrize("name", NAMES)
def test_capture_matches_its_manifest(name: str, tmp_path: Path) -> None:
    manifest = _manifest(name)
    assert manifest["config"] == name
    assert manifest["qemu"]["version"].startswith("7.2")
    assert manifest["kernel"]["release"] in manifest["markers"][0]
    check_booted(manifest)
    trace = tmp_path / "trace.log"
    trace.write_bytes(lzma.decompress((CAPTURES / name / "trace.log.xz").read_bytes()))
    assert event_counts(trace) == manifest["events"]
    dump = CAPTURES / name / "queue.bin.xz"
    if manifest["queue"]:
        assert len(lzma.decompress(dump.read_bytes())) == manifest["queue"]["size"]
    else:
        assert not dump.exists()


@pytest.mark.parametrize("name", [pytest.param(name, marks=replay_marks(name)) for name in NAMES])
def test_capture_imports_and_replays(name: str) -> None:
    check_replayed(import_and_replay(CAPTURES / name))
