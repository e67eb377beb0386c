"""Driving podman the way that works on these machines (docs/operations.md §3).

Rootful podman with the runc runtime and explicit ulimits on every build and run; the
image's base is a local Debian image made with debootstrap (no registry needed), kept
between runs as ``localhost/debbase:bookworm``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("VIOMMUD_TEST_BASE_IMAGE", "localhost/debbase:bookworm")
IMAGE = "localhost/viommud:test"
DEBIAN_MIRROR = os.environ.get("VIOMMUD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
RUNTIMES = ("/usr/sbin/runc", "/usr/bin/runc")


class PodmanError(RuntimeError):
    pass


def runtime() -> str | None:
    return next((r for r in RUNTIMES if Path(r).exists()), None)


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``podman --runtime runc ARGS``; raises PodmanError with its stderr on failure."""
    command = ["podman"]
    found = runtime()
    if found is not None:
        command += ["--runtime", found]
    result = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise PodmanError(
            f"podman {' '.join(args[:3])} … exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


def why_podman_cannot_run() -> str | None:
    """None when podman can run containers here; otherwise the reason it cannot."""
    if shutil.which("podman") is None:
        return "podman is not installed (`apt-get install podman runc debootstrap`; .ci/run does)"
    if runtime() is None:
        return "the runc runtime is not installed (`apt-get install runc`)"
    if os.geteuid() != 0:
        return "this tier runs rootful podman: run it as root"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman does not answer: {exc}"
    if info.returncode != 0:
        return f"`podman info` fails here: {info.stderr.strip()[-500:]}"
    return None


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def ensure_base_image() -> float:
    """Make BASE_IMAGE with debootstrap unless it exists; returns the seconds it took."""
    if image_exists(BASE_IMAGE):
        return 0.0
    if shutil.which("debootstrap") is None:
        raise PodmanError(
            f"{BASE_IMAGE} is missing and debootstrap is not installed to make it "
            "(`apt-get install debootstrap`)"
        )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="viommud-debbase-") as tmp:
        root = Path(tmp) / "root"
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv",
                "bookworm",
                str(root),
                DEBIAN_MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        if result.returncode != 0:
            raise PodmanError(
                f"debootstrap failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
            command = ["podman", "import", "-", BASE_IMAGE]
            imported = subprocess.run(
                command, stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False
            )
        if imported.returncode != 0 or tar.returncode != 0:
            raise PodmanError(f"podman import failed: {imported.stderr[-2000:]}")
    return time.monotonic() - started


def build_image() -> float:
    """Build the daemon's image from the working tree; returns the seconds it took."""
    started = time.monotonic()
    args = ["build", *ULIMITS, "--format", "docker", "--network=host"]
    if CA_BUNDLE.exists():  # pip in the build trusts what the host trusts
        args += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    args += ["--build-arg", f"BASE={BASE_IMAGE}", "-t", IMAGE, str(ROOT)]
    podman(*args, timeout=1800)
    return time.monotonic() - started
