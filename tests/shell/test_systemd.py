"""systemd: socket activation (LISTEN_FDS) and readiness (NOTIFY_SOCKET), unit and end to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from viommud.shell import systemd

FREE_FD = 300  # far above anything pytest has open


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A fake service manager's notification socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        yield str(path), sock
    finally:
        sock.close()


def test_fd_numbers_follow_the_protocol() -> None:
    pid = 4242
    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:tcp"}
    assert systemd.listen_fd_numbers(env, pid) == [(3, "control"), (4, "tcp")]
    assert systemd.listen_fd_numbers({"LISTEN_PID": "4242", "LISTEN_FDS": "1"}, pid) == [
        (3, "unknown")
    ]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "1"},  # no LISTEN_PID: not socket-activated
        {"LISTEN_PID": "1", "LISTEN_FDS": "1"},  # meant for another process
    ],
)
def test_sockets_meant_for_someone_else_are_ignored(env: dict[str, str]) -> None:
    assert systemd.listen_fd_numbers(env, 4242) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, "not a number"),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "-1"}, "negative"),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, "1 names for 2"),
    ],
)
def test_malformed_activation(env: dict[str, str], message: str) -> None:
    with pytest.raises(systemd.SystemdError, match=message):
        systemd.listen_fd_numbers(env, 7)


def test_listen_sockets_takes_over_and_unsets(tmp_path: Path) -> None:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "s.sock"))
    unix.listen()
    tcp = socket.create_server(("127.0.0.1", 0))
    os.dup2(unix.fileno(), FREE_FD)
    os.dup2(tcp.fileno(), FREE_FD + 1)
    unix.close()
    tcp.close()
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:tcp"}
    taken = systemd.listen_sockets(env, start=FREE_FD)
    try:
        assert [(s.name, s.is_unix) for s in taken] == [("control", True), ("tcp", False)]
        assert env == {}  # children must not inherit them
        assert all(not s.sock.getblocking() and not s.sock.get_inheritable() for s in taken)
    finally:
        for s in taken:
            s.sock.close()


def test_a_non_listening_descriptor_is_refused() -> None:
    left, right = socket.socketpair()
    os.dup2(left.fileno(), FREE_FD)
    try:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        with pytest.raises(systemd.SystemdError, match="not a listening stream socket"):
            systemd.listen_sockets(env, start=FREE_FD)
    finally:
        os.close(FREE_FD)
        left.close()
        right.close()


def test_a_descriptor_that_is_not_a_socket_is_refused() -> None:
    read, write = os.pipe()
    os.dup2(read, FREE_FD)
    try:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        with pytest.raises(systemd.SystemdError, match="not a socket"):
            systemd.listen_sockets(env, start=FREE_FD)
    finally:
        for fd in (FREE_FD, read, write):
            os.close(fd)


def test_notify_sends_one_datagram(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    assert systemd.notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_to_an_abstract_socket() -> None:
    name = f"viommud-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(64) == b"READY=1"


def test_notify_without_a_manager_is_a_no_op(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", {}) is False
    with pytest.raises(OSError, match="neither a path"):
        systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative"})
    with pytest.raises(FileNotFoundError):
        systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


# A tiny service manager: put the socket at fd 3, set LISTEN_PID to our own pid, exec viommud
# (exec keeps the pid, as systemd does).
SHIM = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "viommud", *sys.argv[2:]])
"""


def test_socket_activated_daemon_notifies_and_serves(
    tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    notify_path, notify = notify_socket
    path = tmp_path / "run" / "viommud.sock"
    path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    env = {
        **os.environ,
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "control",
        "NOTIFY_SOCKET": notify_path,
        "VIOMMUD_LOG_FORMAT": "json",
    }
    daemon = subprocess.Popen(
        [sys.executable, "-c", SHIM, str(listener.fileno()), "serve", "--socket", str(path)],
        pass_fds=(listener.fileno(),),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()  # the daemon holds it now, as systemd keeps its own copy
    try:
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\n")
        assert f"unix {path}" in ready
        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "viommud",
                "replay",
                str(FIXTURES / "smmuv3-every-opcode.jsonl"),
                "--socket",
                str(path),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["commands"]["total"] == 25
        daemon.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        _out, err = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines()]
    started = next(e for e in events if e["event"] == "listener_started")
    assert started["activated"] is True
    assert started["kind"] == "unix"
    assert events[-1]["event"] == "shutdown_complete"
    assert path.is_socket()  # the service manager's socket is not the daemon's to remove
