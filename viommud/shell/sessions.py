"""The listener's side of session processes (viommud.shell.worker).

``Spawner`` keeps a pool of spare session processes started (Python and viommud already
imported; by default one per CPU the daemon may use, ``serve --spares``), so clients whose
HELLOs are accepted together do not wait for interpreters to start. ``Handed``
is one session handed over: it follows the control link (device claims, status pushes, the
final report) and, when the process dies without its final report (a crash, a kill), sends
the client a fatal ERROR on the listener's copy of the socket and logs ``session_failed``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import signal
import socket
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from viommud.guest_memory import close_all
from viommud.shell.claims import Registry
from viommud.shell.progress import Histogram
from viommud.shell.replies import encode_error

CONTROL_LINE_LIMIT = 64 * 1024 * 1024  # a status push describes every vIOMMU of a session
SPARE_NICE = 19  # a waiting spare's nice value, when it can be given back (setpriority(2))
CAP_SYS_NICE = 23  # capability(7) bit


class Spare:
    def __init__(self, process: asyncio.subprocess.Process, control: socket.socket) -> None:
        self.process = process
        self.control = control


def default_spares() -> int:
    """As many spares as the CPUs this process may run on (at least 1): a burst of that many
    HELLOs is handed over at once, and that many sessions could start working together."""
    return max(1, len(os.sched_getaffinity(0)))


def can_renice(
    status: str | None = None, rlimit: int | None = None, nice: int | None = None
) -> bool:
    """Whether this process may give a child its own nice value back after raising it:
    setpriority(2) lowers a nice value only with CAP_SYS_NICE or within RLIMIT_NICE
    (``20 - nice`` at most), which children inherit. ``status`` (/proc/self/status),
    ``rlimit`` (RLIMIT_NICE's soft limit) and ``nice`` default to this process's."""
    if nice is None:
        nice = os.getpriority(os.PRIO_PROCESS, 0)
    if rlimit is None:
        rlimit = resource.getrlimit(resource.RLIMIT_NICE)[0]
    if rlimit == resource.RLIM_INFINITY or rlimit >= 20 - nice:
        return True
    if status is None:
        try:
            with open("/proc/self/status", encoding="ascii") as file:
                status = file.read()
        except OSError:
            return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    return False


class Spawner:
    """Keeps ``spares`` session processes started (at least 1). ``backend``: the sessions'
    backend by name (``emulated`` or ``iommufd``); a spare imports what that one needs
    before a client waits on it (the emulated kernel: ~80 ms).

    ``take`` hands over the oldest spare (the one most likely done with its imports) and
    starts its replacement in the background, so a take never waits while a spare is
    there; only when more HELLOs come at once than there are spares does one wait for a
    process to start (~0.6 s of CPU each: an interpreter and viommud's imports).

    Where the daemon can give it back (``can_renice``), a spare waits at nice
    ``SPARE_NICE``: the replacement started when a session takes a spare then uses only CPU
    that running sessions leave idle, and ``take`` gives the spare the daemon's own nice
    value before it serves. ``lower=False`` keeps spares at the daemon's."""

    def __init__(
        self, backend: str = "emulated", spares: int = 1, *, lower: bool | None = None
    ) -> None:
        if spares < 1:
            raise ValueError(f"a spawner keeps at least 1 spare session process, got {spares}")
        self._pool: deque[asyncio.Task[Spare]] = deque()
        self._closed = False
        self.backend = backend
        self.spares = spares
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.lower = can_renice() if lower is None else lower

    def prepare(self) -> None:
        """Start spares until ``spares`` are ready or on their way."""
        nice = SPARE_NICE if self.lower else None
        while len(self._pool) < self.spares and not self._closed:
            self._pool.append(asyncio.create_task(_spawn(self.backend, nice)))

    @property
    def pids(self) -> list[int]:
        """The process ids of the spares started (not those still being spawned)."""
        return [
            task.result().process.pid
            for task in self._pool
            if task.done() and not task.cancelled() and task.exception() is None
        ]

    async def take(self) -> Spare:
        """The oldest spare; one found dead (killed while it waited) is passed over once,
        for the next one."""
        taken = await self._next()
        if not _waiting(taken):
            taken.control.close()
            taken = await self._next()
        if self.lower:
            try:
                os.setpriority(os.PRIO_PROCESS, taken.process.pid, self.nice)
            except ProcessLookupError:  # it died just now: its session will say so
                pass
            except PermissionError:  # can_renice was wrong: later spares keep the daemon's
                self.lower = False
        return taken

    async def _next(self) -> Spare:
        if self._closed:
            raise RuntimeError("the daemon is stopping: no new session process")
        self.prepare()
        task = self._pool.popleft()
        self.prepare()  # its replacement starts now, whether this one serves or not
        return await task

    async def close(self) -> None:
        """Let every spare go (each exits when its link closes) and wait for them."""
        self._closed = True
        pool, self._pool = self._pool, deque()
        for task in pool:
            try:
                got = await task
            except OSError:
                continue
            got.control.close()
        for task in pool:
            if task.done() and not task.cancelled() and task.exception() is None:
                with contextlib.suppress(ProcessLookupError):
                    await task.result().process.wait()


def _waiting(spare: Spare) -> bool:
    """Whether the spare still waits for its session: a process that exited has closed its
    end of the link (seen at once, before the event loop learns its exit status)."""
    if spare.process.returncode is not None:
        return False
    try:
        return spare.control.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


async def _spawn(backend: str, nice: int | None = None) -> Spare:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "viommud.shell.worker",
            str(child.fileno()),
            backend,
            pass_fds=(child.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    if nice is not None:
        with contextlib.suppress(OSError):  # it may have exited already
            os.setpriority(os.PRIO_PROCESS, process.pid, nice)
    return Spare(process, parent)


class Handed:
    """One session running in its own process."""

    def __init__(
        self, spare: Spare, client_id: int, fd: int, registry: Registry, *, who: str, log: Any
    ) -> None:
        self.process = spare.process
        self.control = spare.control
        self.client_id = client_id
        self.fd = fd  # the listener's copy of the client's socket (for a last ERROR)
        self.registry = registry
        self.who = who
        self.log = log
        self.status: dict[str, Any] | None = None  # the last push
        self.latency: dict[str, Histogram] = {}
        self.report: dict[str, Any] | None = None  # set by the final message
        self.ended = False
        self.terminated = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(
        self, setup: dict[str, Any], data: bytes, passed: Sequence[tuple[int, list[int]]] = ()
    ) -> None:
        """Send the setup, the client's socket and the fds the client passed that wait for
        their frames (``passed``: batches placed in ``data``); the listener's copies of
        those fds are closed, whether they went or not."""
        fds = [fd for _, batch in passed for fd in batch]
        setup = {
            **setup,
            "data": base64.b64encode(data).decode(),
            "fds": [[position, len(batch)] for position, batch in passed],
        }
        line = json.dumps(setup, separators=(",", ":")).encode() + b"\n"
        try:
            self.control.setblocking(True)
            socket.send_fds(self.control, [line[:4096]], [self.fd, *fds])
        finally:
            close_all(fds)
        if len(line) > 4096:
            self.control.sendall(line[4096:])

    async def follow(self) -> int:
        """Serve the control link until the process ends; returns its exit status."""
        self.control.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(
            sock=self.control, limit=CONTROL_LINE_LIMIT
        )
        try:
            while line := await reader.readline():
                self._message(json.loads(line), writer)
        except (ConnectionError, ValueError) as exc:
            self.log.warning("session_link_failed", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return await self.process.wait()

    def _message(self, message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if "claim" in message:
            holder = self.registry.claim(self.client_id, self.who, str(message["claim"]))
            writer.write(json.dumps({"holder": holder}).encode() + b"\n")
        elif "release" in message:
            self.registry.release(self.client_id, str(message["release"]))
        elif "status" in message:
            self.status = message["status"]
            self.latency = _histograms(message.get("latency"))
        elif "end" in message:
            self.report = message["end"]
            self.latency = _histograms(message.get("latency"))
            self.ended = True

    def terminate(self) -> None:
        """Ask the session to finish (SIGTERM: it answers what it has, then says goodbye)."""
        self.terminated = True
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def finish(self, reason: str | None) -> None:
        """After the process ended: release its devices, tell the client why if the
        process could not, close the listener's copy of the socket."""
        self.registry.release_all(self.client_id)
        if reason is not None and not self.ended:
            _last_word(self.fd, reason)
        with contextlib.suppress(OSError):
            socket.close(self.fd)

    @staticmethod
    def died(returncode: int | None) -> str:
        if returncode is None:
            return "its session process is still running"
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            return f"session process killed by {name}"
        return f"session process exited with status {returncode}"


def _histograms(obj: Any) -> dict[str, Histogram]:
    if not isinstance(obj, dict):
        return {}
    try:
        return {str(frame): Histogram.from_json(h) for frame, h in obj.items()}
    except (KeyError, TypeError, ValueError):
        return {}


def _last_word(fd: int, reason: str) -> None:
    """Best effort: a fatal ERROR (seq 0) on the client's socket, never blocking."""
    try:
        sock = socket.socket(fileno=socket.dup(fd))
    except OSError:
        return
    try:
        sock.setblocking(False)
        sock.send(encode_error(0, reason, fatal=True))
    except OSError:
        pass
    finally:
        sock.close()
