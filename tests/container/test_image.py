"""The daemon's image, built and run with podman: replays from the host and from a second
container through the bind-mounted socket, health check, SIGTERM and a clean shutdown.

Marker ``container`` (not in the default run): ``pytest -m container``. Skips with the
reason only where podman cannot run containers at all.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.container import podman as pm
from tests.container.podman import IMAGE, ULIMITS, podman

pytestmark = pytest.mark.container

FIXTURES = pm.ROOT / "fixtures"
TRACES = sorted(p for p in FIXTURES.iterdir() if ".jsonl" in p.name)
UID = 999  # the image's user (Dockerfile)


@dataclass
class Outcome:
    """A replay's exit status and report (without timings), or its error."""

    code: int
    report: dict[str, Any] | None
    error: str

    @classmethod
    def of(cls, result: subprocess.CompletedProcess[str]) -> Outcome:
        report = json.loads(result.stdout) if result.stdout.strip() else None
        if report is not None:
            for key in ("elapsed_s", "commands_per_s"):
                report.pop(key)
        errors = [line for line in result.stderr.splitlines() if line.startswith("viommud:")]
        return cls(result.returncode, report, "\n".join(errors))


@dataclass
class Daemon:
    name: str
    sockdir: Path

    @property
    def socket(self) -> Path:
        return self.sockdir / "viommud.sock"


@pytest.fixture(scope="session")
def image() -> str:
    reason = pm.why_podman_cannot_run()
    if reason is not None:
        pytest.skip(f"container tier: {reason}")
    base_seconds = pm.ensure_base_image()
    probe = podman("run", "--rm", *ULIMITS, "--network=none", pm.BASE_IMAGE, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"container tier: podman cannot run a container here: {probe.stderr[-500:]}")
    build_seconds = pm.build_image()
    print(f"\nbase image {base_seconds:.1f} s (0: reused), image build {build_seconds:.1f} s")
    return IMAGE


@pytest.fixture(scope="module")
def daemon(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    sockdir = tmp_path_factory.mktemp("run-viommud")
    os.chown(sockdir, UID, UID)
    sockdir.chmod(0o750)
    name = f"viommud-test-{secrets.token_hex(4)}"
    podman("run", "-d", "--name", name, *ULIMITS, "--network=none",
           "-v", f"{sockdir}:/run/viommud", image)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (sockdir / "viommud.sock").is_socket():
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr
            time.sleep(0.1)
        yield Daemon(name, sockdir)
    finally:
        podman("rm", "--force", "--time", "2", name, check=False)


def host_replay(trace: Path, *socket: str) -> Outcome:
    command = [sys.executable, "-m", "viommud", "replay", str(trace), "--json", *socket]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    return Outcome.of(result)


@pytest.fixture(scope="module")
def embedded() -> dict[str, Outcome]:
    """Each trace replayed on an embedded daemon: what the containerised one must match."""
    return {trace.name: host_replay(trace) for trace in TRACES}


def test_image_is_what_the_dockerfile_promises(image: str) -> None:
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"] == "viommud"
    assert config["Entrypoint"] == ["viommud", "serve"]
    assert "/run/viommud" in config["Volumes"]
    healthcheck = config.get("Healthcheck") or inspected["Healthcheck"]  # docker | podman 4
    assert healthcheck["Test"] == ["CMD", "viommud", "health", "--timeout", "2"]
    assert config["StopSignal"] == "SIGTERM"
    listing = podman("run", "--rm", *ULIMITS, "--network=none", "--no-healthcheck",
                     "--entrypoint", "id", image).stdout  # fmt: skip
    assert listing.startswith(f"uid={UID}(viommud)")
    assert len(TRACES) >= 5


def test_health_check(daemon: Daemon) -> None:
    result = podman("healthcheck", "run", daemon.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads(podman("inspect", daemon.name).stdout)[0]["State"]
    health = state.get("Health") or state.get("Healthcheck")
    assert health["Status"] == "healthy"
    # The same check from the host, through the bind-mounted socket.
    command = [sys.executable, "-m", "viommud", "health", "--socket", str(daemon.socket)]
    assert subprocess.run(command, capture_output=True, timeout=60, check=False).returncode == 0


@pytest.mark.parametrize("trace", TRACES, ids=[t.name for t in TRACES])
def test_replay_from_the_host(daemon: Daemon, embedded: dict[str, Outcome], trace: Path) -> None:
    outcome = host_replay(trace, "--socket", str(daemon.socket))
    assert outcome == embedded[trace.name]


@pytest.mark.parametrize("trace", TRACES, ids=[t.name for t in TRACES])
def test_replay_from_a_second_container(
    daemon: Daemon, embedded: dict[str, Outcome], trace: Path
) -> None:
    result = podman(
        "run", "--rm", *ULIMITS, "--network=none", "--no-healthcheck",
        "-v", f"{daemon.sockdir}:/run/viommud", "-v", f"{FIXTURES}:/fixtures:ro",
        "--entrypoint", "viommud", IMAGE,
        "replay", f"/fixtures/{trace.name}", "--socket", "/run/viommud/viommud.sock", "--json",
        check=False, timeout=300,
    )  # fmt: skip
    expected = embedded[trace.name]
    outcome = Outcome.of(result)
    assert (outcome.code, outcome.report) == (expected.code, expected.report), result.stderr
    assert outcome.error.replace("/fixtures/", "") == expected.error.replace(f"{FIXTURES}/", "")


def test_status_sees_the_sessions(daemon: Daemon) -> None:
    command = [sys.executable, "-m", "viommud", "status", "--socket", str(daemon.socket), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["listeners"] == [{"kind": "unix", "address": "/run/viommud/viommud.sock"}]
    assert status["clients"] == []
    assert status["objects"] == {}  # every session's backend objects were freed


def test_sigterm_shuts_down_cleanly(daemon: Daemon) -> None:
    podman("kill", "--signal", "TERM", daemon.name)
    code = podman("wait", daemon.name, timeout=60).stdout.strip()
    logs = podman("logs", daemon.name).stderr.splitlines()
    events = [json.loads(line) for line in logs if line.startswith("{")]
    assert code == "0", logs[-5:]
    assert events[0]["event"] == "server_started"
    assert events[-2]["event"] == "shutdown_started"
    assert events[-1]["event"] == "shutdown_complete"
    assert not any(e["level"] in ("error", "critical") for e in events)
    assert not daemon.socket.exists()  # the daemon removed its socket
