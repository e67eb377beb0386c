"""A spare session process imports its backend before a client waits on it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from viommud.shell.sessions import Spawner

ROOT = Path(__file__).resolve().parents[2]
KERNEL = "viommud.backend.emulator.kernel"


def _loaded_after(backend: str) -> bool:
    """Whether ``preload(backend)`` (what a spare runs before it waits) loads the emulated
    kernel. Asked of viommud.backend.select, not of the worker module: the worker also
    imports the kernel through viommud.shell.connection (its TEST frames, shell.testframe)
    whatever the backend."""
    code = (
        "import sys\n"
        "from viommud.backend.select import preload\n"
        f"assert {KERNEL!r} not in sys.modules\n"
        f"preload({backend!r})\n"
        f"print({KERNEL!r} in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


def test_a_spare_for_the_emulated_backend_has_the_emulated_kernel_loaded() -> None:
    assert _loaded_after("emulated")
    assert _loaded_after("auto") is not Path("/dev/iommu").exists()  # serve's default
    assert not _loaded_after("iommufd")
    assert not _loaded_after("nonsense")


def test_the_spawner_names_the_backend_to_its_spares() -> None:
    async def cmdline(spawner: Spawner) -> list[str]:
        spare = await spawner.take()
        try:
            with open(f"/proc/{spare.process.pid}/cmdline", "rb") as f:  # noqa: ASYNC230 - procfs
                return f.read().decode().split("\0")[:-1]
        finally:
            spare.control.close()
            await spare.process.wait()
            await spawner.close()

    assert asyncio.run(cmdline(Spawner()))[-1] == "emulated"
    assert asyncio.run(cmdline(Spawner("iommufd")))[-1] == "iommufd"
