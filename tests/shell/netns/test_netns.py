"""`serve --listen tcp://... --netns NAME`: the daemon serves inside a VMM's network namespace.

Two namespaces joined by a veth pair (made with pyroute2 through viommud.shell.netlink): the
daemon's TCP listener lives in the "vmm" one, replay clients run in the "guest" one. The
namespaces (and with them the veth pair) are removed even when a test fails. Needs root;
skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from viommud.shell import netlink

REASON = netlink.can_manage_namespaces()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

PORT = 7070
TRACES = [FIXTURES / "smmuv3-every-opcode.jsonl", FIXTURES / "smmuv3-guest-errors.jsonl"]

# Runs a viommud command with its main thread inside a namespace (like `ip netns exec`).
IN_NAMESPACE = """
import sys
from viommud.shell import netlink
netlink.enter_namespace(sys.argv[1])
from viommud.shell.cli import main
raise SystemExit(main(sys.argv[2:]))
"""
CLIENT = (sys.executable, "-c", IN_NAMESPACE)


@dataclass
class Topology:
    vmm: str
    guest: str
    daemon_address: str
    client_address: str


@pytest.fixture
def topology() -> Iterator[Topology]:
    _remove_leftovers()
    tag = secrets.token_hex(3)
    octet = int(tag[:2], 16) % 250 + 1
    pid = os.getpid()
    topo = Topology(
        f"vmd-vmm-{pid}-{tag}", f"vmd-guest-{pid}-{tag}", f"10.231.{octet}.1", f"10.231.{octet}.2"
    )
    made: list[str] = []
    try:
        for name in (topo.vmm, topo.guest):
            try:
                netlink.create_namespace(name)
            except OSError as exc:
                if not made:
                    pytest.skip(f"cannot create network namespaces here: {exc}")
                raise
            made.append(name)
        netlink.veth_pair(
            (topo.vmm, f"vd{tag}", topo.daemon_address),
            (topo.guest, f"vc{tag}", topo.client_address),
        )
        yield topo
    finally:
        for name in made:
            netlink.remove_namespace(name)
        assert not {topo.vmm, topo.guest} & set(netlink.namespaces())


def _remove_leftovers() -> None:
    """Namespaces of earlier runs that were killed before their teardown could run."""
    for name in netlink.namespaces():
        match = re.fullmatch(r"vmd-(?:vmm|guest)-(\d+)-[0-9a-f]+", name)
        if match and not Path(f"/proc/{match[1]}").exists():
            netlink.remove_namespace(name)


def in_namespace(
    namespace: str, *argv: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLIENT, namespace, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def listening_ports(namespace: str | None) -> set[int]:
    """TCP ports in LISTEN state as seen from ``namespace`` (None: this thread's own)."""
    found: list[set[int]] = []

    def read() -> None:
        if namespace is not None:
            netlink.enter_namespace(namespace)
        ports = set()
        for line in Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        found.append(ports)

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    return found[0]


@dataclass
class Daemon:
    topology: Topology
    token: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def daemon(topology: Topology, tmp_path: Path) -> Iterator[Daemon]:
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16) + "\n")
    token.chmod(0o600)
    notify_path = tmp_path / "notify.sock"
    log = tmp_path / "daemon.log"
    argv = [sys.executable, "-m", "viommud", "--log-format", "json", "serve"]
    argv += ["--socket", str(tmp_path / "viommud.sock"), "--token-file", str(token)]
    argv += ["--listen", f"tcp://{topology.daemon_address}:{PORT}", "--netns", topology.vmm]
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        log.open("w") as stderr,  # a file, not a pipe: nobody has to drain it
    ):
        notify.bind(str(notify_path))
        notify.settimeout(30)
        proc = subprocess.Popen(
            argv, env={**os.environ, "NOTIFY_SOCKET": str(notify_path)}, stderr=stderr
        )
        try:
            ready = notify.recv(4096).decode()
            assert ready.startswith("READY=1"), ready
            yield Daemon(topology, token, proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def test_replay_clients_in_another_namespace(daemon: Daemon) -> None:
    topology, token = daemon.topology, str(daemon.token)
    target = f"tcp://{topology.daemon_address}:{PORT}"
    # The listener is in the VMM's namespace, not in ours nor in the guest's.
    assert PORT in listening_ports(topology.vmm)
    assert PORT not in listening_ports(None)
    assert PORT not in listening_ports(topology.guest)
    # Two clients at once, from the guest's namespace, over the veth pair.
    client_options = ["--socket", target, "--token-file", token, "--json"]
    clients = [
        subprocess.Popen(
            [*CLIENT, topology.guest, "replay", str(trace), *client_options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for trace in TRACES
    ]
    try:
        outputs = [client.communicate(timeout=180) for client in clients]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.communicate()
    for trace, client, (out, err) in zip(TRACES, clients, outputs, strict=True):
        assert client.returncode == 0, err
        local = subprocess.run(
            [sys.executable, "-m", "viommud", "replay", str(trace), "--json"],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        assert without_timing(json.loads(out)) == without_timing(json.loads(local.stdout))
    # Without the token the daemon refuses the client.
    refused = in_namespace(topology.guest, "replay", str(TRACES[1]), "--socket", target)
    assert refused.returncode == 2
    assert "needs the daemon's token" in refused.stderr
    # Status, asked from the guest's side, shows the listener in the VMM's namespace.
    status = in_namespace(
        topology.guest, "status", "--socket", target, "--token-file", token, "--json"
    )
    assert status.returncode == 0, status.stderr
    reply = json.loads(status.stdout)
    address = f"{topology.daemon_address}:{PORT}"
    assert {"kind": "tcp", "address": address, "netns": topology.vmm} in reply["listeners"]
    assert reply["sessions"]["closed"] == len(TRACES)
    # SIGTERM: a clean shutdown.
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    events = daemon.events()
    started = [e for e in events if e["event"] == "listener_started"]
    assert started == [{**started[0], "kind": "tcp", "address": address, "netns": topology.vmm}]
    assert sum(e["event"] == "auth_failed" for e in events) == 1
    assert events[-1]["event"] == "shutdown_complete"


def without_timing(report: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in report.items() if k not in ("elapsed_s", "commands_per_s")}


def test_the_namespace_must_exist(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "viommud",
            "serve",
            "--socket",
            str(tmp_path / "s.sock"),
            "--listen",
            "tcp://10.231.0.1:7070",
            "--netns",
            "vmd-absent",
            "--token-file",
            str(token),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "network namespace 'vmd-absent' does not exist" in result.stderr
