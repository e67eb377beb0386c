"""A session process: one client's session, in a process of its own.

``viommud serve`` (unless ``--in-process``) keeps spare session processes waiting (``serve
--spares``, viommud.shell.sessions); when a client's HELLO has been accepted the listener
passes the client's socket to one (``socket.send_fds`` over a socketpair, with the bytes
already read: the HELLO frame and whatever followed it), starts its replacement, and this
process serves that one session to its end, then exits. A stalled, huge or crashing
session thus only ever holds its own process (the PostgreSQL backend-per-connection
model), and sessions use every core.

The socketpair stays open as the control link, one JSON object per line. The listener
sends the setup first (with the client's fd, then the fds the client passed that wait for
their frames: ``client``, ``transport``, ``peer``, ``cred``, ``data`` in base64, ``fds``
(``[[position in data, count], ...]``, docs/protocol.md §12), ``backend``, ``host``,
``limits``, ``log``); the session then sends
``{"claim": DEVICE}`` (answered ``{"holder": null}`` or who holds the device),
``{"release": DEVICE}``, ``{"status": ..., "latency": ...}`` (what STATUS and the metrics
show of it, at most once a second) and, just before exiting, ``{"end": REPORT, ...}``.

SIGTERM (sent by the listener when it stops): answer what the client already sent, send it
the fatal ERROR ``shutting down``, exit 0. SIGINT is ignored (a terminal's Ctrl-C reaches the
listener, which stops its sessions itself).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from viommud.backend.select import backend_factory, preload
from viommud.guest_memory import close_all
from viommud.host import HostConfig
from viommud.shell import logs
from viommud.shell.channel import Channel, StreamChannel, UnixChannel
from viommud.shell.connection import Connection
from viommud.shell.limits import Limits
from viommud.shell.passed import MAX_QUEUED_FDS, split
from viommud.shell.statedir import StateDir
from viommud.shell.stream import pump

SETUP_CHUNK = 1 << 20
PUSH_INTERVAL = 1.0


class Link:
    """The session's end of the control link (blocking: this process serves one session,
    and a device claim must be settled before its attach goes on)."""

    def __init__(self, control: socket.socket, rest: bytes = b"") -> None:
        self.control = control
        self._buffer = rest
        self._pushed = 0.0
        self._seen: tuple[int, int, int] | None = None  # what the last push counted

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self.control.recv(65536)
            if not chunk:
                raise ConnectionError("the listener went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    # -- Claims ---------------------------------------------------------------------------
    def claim(self, device: str) -> str | None:
        self.send({"claim": device})
        holder = self._line().get("holder")
        return None if holder is None else str(holder)

    def release(self, device: str) -> None:
        self.send({"release": device})

    def name(self, vm: str) -> None:
        """The listener named this session when it read the HELLO."""

    def push(self, connection: Connection, *, force: bool = False) -> None:
        """What STATUS shows of this session, at most once per ``PUSH_INTERVAL``, and only
        when it changed."""
        now = time.monotonic()
        session = connection.session
        if session is None or (not force and now - self._pushed < PUSH_INTERVAL):
            return
        batches = sum(sum(h.counts) for h in connection.progress.latency.values())
        seen = (batches, session.calls.seq, session.config_errors + len(session.viommus))
        if not force and seen == self._seen:
            return
        self._pushed, self._seen = now, seen
        self.send({"status": connection.describe(), "latency": _latency(connection)})

    async def keep_pushing(self, connection: Connection) -> None:
        """The last batches of a burst are reported even when nothing follows them."""
        while True:
            await asyncio.sleep(PUSH_INTERVAL)
            self.push(connection)
            if connection.session is not None:
                connection.log.flush()  # repeated warnings of a burst that has ended


def _latency(connection: Connection) -> dict[str, Any]:
    return {frame: hist.to_json() for frame, hist in connection.progress.latency.items()}


def receive_setup(
    control: socket.socket,
) -> tuple[dict[str, Any], list[int], bytes] | None:
    """The listener's setup message and its fds (the client's socket first, then the fds
    the client passed); None when the listener closed the link instead (a spare that is
    not needed)."""
    data, fds, _flags, _address = socket.recv_fds(control, SETUP_CHUNK, 1 + MAX_QUEUED_FDS)
    if not data:
        close_all(fds)
        return None
    while b"\n" not in data:
        chunk = control.recv(SETUP_CHUNK)
        if not chunk:
            close_all(fds)
            return None
        data += chunk
    line, rest = data.split(b"\n", 1)
    if not fds:
        raise RuntimeError("the setup message came without the client's socket")
    return json.loads(line), fds, rest


def _placed(setup: dict[str, Any], passed: list[int]) -> list[tuple[bytes, list[int]]]:
    """The handed-over bytes cut where the passed fds came with them (Connection.receive
    calls that put each batch back in its place)."""
    batches: list[tuple[int, list[int]]] = []
    at = 0
    for position, count in setup.get("fds") or []:
        batches.append((int(position), passed[at : at + int(count)]))
        at += int(count)
    close_all(passed[at:])
    return split(base64.b64decode(setup["data"]), batches)


async def serve(control: socket.socket, fds: list[int], setup: dict[str, Any], rest: bytes) -> None:
    fd, passed = fds[0], fds[1:]
    limits = Limits.from_json(setup["limits"])
    host = HostConfig.from_json(setup["host"]) if setup.get("host") is not None else None
    client_id = int(setup["client"])
    log = logs.get_logger(client=client_id)
    cred = setup.get("cred")
    if cred:
        log = log.bind(peer_uid=cred["uid"], peer_gid=cred["gid"], peer_pid=cred["pid"])
    link = Link(control, rest)
    connection = Connection(
        client_id,
        backend_factory(setup["backend"]),
        host,
        log,
        transport=setup["transport"],
        peer=setup["peer"],
        limits=limits,
        claims=link,
        state_dir=StateDir(Path(setup["state_dir"])) if setup.get("state_dir") else None,
        testing=bool(setup.get("testing")),
    )
    sock = socket.socket(fileno=fd)
    channel: Channel
    if setup["transport"] == "unix":
        channel = UnixChannel(sock)
    else:
        channel = StreamChannel(*await asyncio.open_connection(sock=sock))
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping and task is not None:
            stopping = True
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    pusher = asyncio.create_task(link.keep_pushing(connection))
    try:
        first = b"".join(connection.receive(data, fds) for data, fds in _placed(setup, passed))
        link.push(connection, force=True)
        if first:
            channel.write(first)
            await channel.drain()
        await pump(
            channel,
            connection,
            limits,
            stopping=lambda: stopping,
            tick=lambda: link.push(connection),
        )
    except (ConnectionResetError, BrokenPipeError) as exc:
        connection.log.info("client_lost", error=str(exc))
    finally:
        pusher.cancel()
        loop.remove_signal_handler(signal.SIGTERM)
        report = connection.close()
        with contextlib.suppress(OSError):
            link.send({"end": report, "latency": _latency(connection)})
        channel.close()
        await channel.wait_closed()
        channel.forget()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[0]))
    control.setblocking(True)
    if argv[1:]:
        preload(argv[1])  # while no client waits
    try:
        got = receive_setup(control)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"viommud session process: no setup: {exc}", file=sys.stderr)
        return 2
    if got is None:
        return 0
    setup, fds, rest = got
    log_options = setup.get("log", {})
    logs.configure(log_options.get("level"), log_options.get("format"))
    loop_factory = None
    if setup.get("loop") == "uvloop":
        import uvloop  # noqa: PLC0415 - optional extra, checked by the listener's CLI

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(control, fds, setup, rest))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
