"""Boots every capture-kit configuration: a Debian kernel under QEMU (TCG) behind each vIOMMU,
the initramfs workload, the trace and queue dump, then import and replay with the oracle.

Marker ``guest`` (not in the default run): ``pytest -m guest``. Needs
qemu-system-aarch64 and qemu-system-x86_64 (installed with apt-get when run as root), and the
Debian kernel packages, fetched once into the kit's cache (``$VIOMMUD_CAPTURE_CACHE``,
default ~/.cache/viommud-capture). Skips with the reason where QEMU is missing and cannot be
installed. Each boot has the kit's own deadline; see docs/capture.md for the timings.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from capture.assets import QEMU_BINARY, default_cache
from capture.configs import CONFIGS
from capture.initramfs import Workload
from capture.kit import capture
from tests.capture.expectations import check_booted, check_replayed, replay_marks

pytestmark = [pytest.mark.guest, pytest.mark.timeout(1200)]

BOOT_TIMEOUT = 300.0
_done: dict[str, dict[str, Any]] = {}


def _can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("captures")


def _capture(name: str, out_dir: Path) -> dict[str, Any]:
    """The kit's manifest for ``name``, booting it on first use."""
    if name not in _done:
        config = CONFIGS[name]
        binary = QEMU_BINARY[config.arch]
        if shutil.which(binary) is None and not _can_install():
            pytest.skip(f"{binary} is not installed (apt-get install needs root)")
        cache = default_cache()
        log = io.StringIO()
        _done[name] = capture(
            config,
            out_dir,
            cache,
            Workload(),
            timeout=BOOT_TIMEOUT,
            install=True,
            memory_mib=512,
            replay=True,
            log=log,
        )
        print(log.getvalue())
    return _done[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_guest_boots_and_runs_the_workload(name: str, out_dir: Path) -> None:
    manifest = _capture(name, out_dir)
    check_booted(manifest)
    assert (out_dir / name / "trace.log.xz").stat().st_size > 0
    if manifest["queue"]:
        assert (out_dir / name / "queue.bin.xz").exists()


@pytest.mark.parametrize("name", [pytest.param(name, marks=replay_marks(name)) for name in CONFIGS])
def test_capture_imports_and_replays(name: str, out_dir: Path) -> None:
    check_replayed(_capture(name, out_dir)["result"])
