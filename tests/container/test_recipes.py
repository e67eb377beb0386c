"""The podman recipes of docs/operations.md, run exactly as written (container tier).

§3's block builds the image from the working tree, runs the daemon in a container named
``viommud`` with the host's /run/viommud mounted, checks its health, replays a capture
through the socket and stops it; §5's ``podman logs -f viommud | jq`` recipe then reads
that container's log. The block's one-time steps (installing podman, runc and debootstrap;
making the Debian base image) are skipped when what they make is already there, as the
docs say ("once and keep it"); every other line runs as written, in the repository root,
with the project's ``viommud`` first on PATH. The tier skips where podman cannot run, or
where a container named ``viommud`` or a live /run/viommud socket already exists (this
test would take them over).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.container import podman as pm

pytestmark = pytest.mark.container

DOC = pm.ROOT / "docs" / "operations.md"
RUN_DIR = Path("/run/viommud")


def commands(block: str) -> list[str]:
    """The block's shell commands, continuation lines joined, comments kept."""
    out, current = [], ""
    for line in block.splitlines():
        if not line.strip():
            continue
        current += line + "\n"
        if not line.rstrip().endswith("\\"):
            out.append(current)
            current = ""
    return out


def section_3_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"```sh\n(apt-get install -y podman.*?)```", text, re.S)
    assert match, "docs/operations.md §3 lost its podman recipe"
    return match.group(1)


def section_5_recipe() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"^(podman logs -f viommud .*)$", text, re.M)
    assert match, "docs/operations.md §5 lost its podman logs recipe"
    return match.group(1)


def _one_time(command: str) -> bool:
    """A step of the block that only makes what is already there."""
    if command.startswith("apt-get install"):
        return all(shutil.which(tool) for tool in ("podman", "runc", "debootstrap"))
    if command.startswith(("debootstrap ", "tar -C /tmp/debbase")):
        return pm.image_exists("localhost/debbase:bookworm")
    return False


def test_the_recipe_blocks_are_what_this_test_runs() -> None:
    steps = commands(section_3_block())
    assert steps[0].startswith("apt-get install")
    assert any(s.startswith("$P build") for s in steps)
    assert any("healthcheck run viommud" in s for s in steps)
    assert section_5_recipe().startswith("podman logs -f viommud 2>&1 | jq")


def test_the_documented_podman_recipes_run_as_written(tmp_path: Path) -> None:
    reason = pm.why_podman_cannot_run()
    if reason is not None:
        pytest.skip(f"container tier: {reason}")
    if pm.podman("container", "exists", "viommud", check=False).returncode == 0:
        pytest.skip("a container named viommud exists: the recipe would take it over")
    if (RUN_DIR / "viommud.sock").exists():
        pytest.skip("/run/viommud/viommud.sock exists: a daemon may be serving there")
    made_run_dir = not RUN_DIR.exists()
    if not pm.image_exists("localhost/debbase:bookworm") and shutil.which("debootstrap") is None:
        pytest.skip("no base image and no debootstrap to make it")
    script = tmp_path / "recipe.sh"
    steps = [c for c in commands(section_3_block()) if not _one_time(c)]
    script.write_text("set -euo pipefail\n" + "".join(steps))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        run = subprocess.run(
            ["bash", str(script)],
            cwd=pm.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
        lines = run.stdout.splitlines()
        assert "healthy" in lines, run.stdout[-3000:]
        assert any(line.startswith("commands") for line in lines), run.stdout[-3000:]
        # `$P logs viommud 2>&1 | tail -1` (podman logs keeps the daemon's stderr on stderr:
        # the recipe's `2>&1` is needed, found by this test)
        last = json.loads(lines[-1])
        assert last["event"] == "shutdown_complete"
        logs = subprocess.run(
            ["bash", "-o", "pipefail", "-c", section_5_recipe()],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert logs.returncode == 0, logs.stderr
        for line in logs.stdout.splitlines():  # only what is not at info level
            assert json.loads(line)["level"] != "info", line
    finally:
        pm.podman("rm", "--force", "--time", "2", "viommud", check=False)
        if made_run_dir:
            shutil.rmtree(RUN_DIR, ignore_errors=True)
