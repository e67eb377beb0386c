"""The Dockerfile and the systemd units say what docs/operations.md says they do."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

from viommud.shell.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_with_an_overridable_base() -> None:
    steps = instructions()
    assert steps[0][0] == "ARG"
    assert steps[0][1].startswith("BASE=")
    froms = [args for word, args in steps if word == "FROM"]
    assert froms == ["${BASE} AS builder", "${BASE}"]
    assert any(word == "COPY" and args.startswith("--from=builder") for word, args in steps)


def test_runtime_stage_is_unprivileged_with_exec_form_commands() -> None:
    steps = instructions()
    runtime = steps[[w for w, _ in steps].index("FROM", 2) :]  # after the second FROM
    runtime_words = [w for w, _ in runtime]
    (user,) = [a for w, a in runtime if w == "USER"]
    assert user == "viommud"
    assert runtime_words.index("USER") < runtime_words.index("ENTRYPOINT")
    (entrypoint,) = [a for w, a in runtime if w == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["viommud", "serve"]
    (healthcheck,) = [a for w, a in runtime if w == "HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert "--interval=" in options
    assert json.loads(command)[:2] == ["viommud", "health"]
    (volume,) = [a for w, a in runtime if w == "VOLUME"]
    assert json.loads(volume) == ["/run/viommud"]
    env = " ".join(a for w, a in runtime if w == "ENV")
    assert "VIOMMUD_SOCKET=/run/viommud/viommud.sock" in env
    assert ("STOPSIGNAL", "SIGTERM") in runtime


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    kept = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            copied.update(shlex.split(args)[:-1])
    assert copied <= kept
    assert all((ROOT / name).exists() for name in copied)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    parser.read(UNITS / name)
    return parser


def test_service_is_socket_activated_and_notifies() -> None:
    service, sock = unit("viommud.service"), unit("viommud.socket")
    assert service["Service"]["Type"] == "notify"
    assert service["Service"]["NotifyAccess"] == "main"
    assert service["Unit"]["Requires"] == "viommud.socket"
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[0].endswith("/viommud")
    assert argv[1] == "serve"
    assert argv[argv.index("--socket") + 1] == sock["Socket"]["ListenStream"]
    assert sock["Socket"]["Service"] == "viommud.service"
    assert sock["Install"]["WantedBy"] == "sockets.target"
    assert service["Service"]["User"] == "viommud"


def test_stop_timeout_exceeds_the_daemons_grace() -> None:
    service = unit("viommud.service")
    args = _parser().parse_args(["serve"])
    assert int(service["Service"]["TimeoutStopSec"]) > args.grace
    assert service["Service"]["KillSignal"] == "SIGTERM"
    # the listener stops its session processes itself (docs/operations.md §10)
    assert service["Service"]["KillMode"] == "mixed"


def test_sysusers_creates_the_account() -> None:
    line = (UNITS / "viommud.sysusers").read_text().splitlines()[-1]
    assert shlex.split(line)[:2] == ["u", "viommud"]
