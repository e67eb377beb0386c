"""The asyncio shell: a Unix-socket server, one session per connection.

Each connection speaks the frame protocol (viommud.wire); its frames are handed to a
``Connection`` (synchronous, one per client) whose replies are written back in order, with a
drain after every batch read. A client that sends garbage gets an ERROR frame and is
disconnected; its session is closed, which frees everything it held on the backend; other
clients are not affected. SIGTERM/SIGINT (or an injected trigger) stop the server
gracefully: no new connections, running ones get ``grace`` seconds, then are cancelled.

The Unix socket is never taken from a daemon that still answers on it (``AlreadyServingError``);
a stale one is replaced, and a bind failure names its path or address (docs/operations.md §1).

Listeners: the Unix socket (always, unless systemd hands sockets over: viommud.shell.systemd), TCP
addresses when asked for (each needs the shared token in HELLO; created inside a named
network namespace through viommud.shell.netlink when asked). A STATUS frame is answered without
a session (viommud.shell.status); ``--metrics`` serves Prometheus metrics (viommud.shell.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from protocols.frames import PROTOCOL_VERSION
from viommud import __version__
from viommud.backend.select import emulated_backend
from viommud.host import HostConfig
from viommud.shell.connection import BackendFactory, Connection
from viommud.shell.endpoints import TcpAddress, bind_tcp
from viommud.shell.statedir import StateDir
from viommud.shell.status import Snapshot, Totals, backend_objects, count_kinds
from viommud.shell.systemd import ListenSocket

if TYPE_CHECKING:
    from viommud.shell.metrics import Metrics  # imported when --metrics asks for it

READ_CHUNK = 256 * 1024


class AlreadyServingError(OSError):
    """Another daemon answers on the Unix socket path this one was asked to serve on."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.EADDRINUSE, f"another viommud is serving on {path}")
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


class Server:
    """viommud's listener. ``start()`` binds, ``run()`` serves until the trigger fires."""

    def __init__(
        self,
        socket_path: str | Path,
        *,
        factory: BackendFactory = emulated_backend,
        fixed_host: HostConfig | None = None,
        mode: int = 0o600,
        grace: float = 5.0,
        tcp: Sequence[TcpAddress] = (),
        netns: str | None = None,
        token: str | None = None,
        activated: Sequence[ListenSocket] = (),
        metrics: TcpAddress | None = None,
        notify: Callable[[str], object] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """``tcp``: extra TCP listeners (inside network namespace ``netns`` when given), each
        needing ``token`` in HELLO. ``activated``: sockets from the service manager, served
        instead of binding ``socket_path``. ``metrics``: where to serve Prometheus metrics.
        ``notify``: called with sd_notify states (``READY=1`` once listening)."""
        if not token and (tcp or any(not listen.is_unix for listen in activated)):
            raise ValueError("TCP listeners need a token (--token-file)")
        self.socket_path = Path(socket_path)
        self.factory = factory
        self.fixed_host = fixed_host
        self.mode = mode
        self.grace = grace
        self.tcp = tuple(tcp)
        self.netns = netns
        self.token = token
        self.activated = tuple(activated)
        self.metrics_address = metrics
        self.notify = notify
        # serve --state-dir: sessions kept on disk for clients that resume them
        self.state_dir = StateDir(Path(state_dir)) if state_dir is not None else None
        self.log = structlog.get_logger("viommud")
        self._servers: list[asyncio.Server] = []
        self._started = False
        self._bound_unix = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self.clients = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.listeners: list[dict[str, Any]] = []
        self.retired = Totals()  # counters of the sessions that have ended
        self.metrics: Metrics | None = None
        self.started_at = time.monotonic()

    async def start(self) -> None:
        """Bind every listener (and the metrics endpoint), then report READY=1.

        If one cannot be bound, those already bound are closed again before the error
        propagates."""
        try:
            if self.activated:
                for listen in self.activated:
                    await self._serve_activated(listen)
            else:
                await self._start_unix()
            for address in self.tcp:
                await self._start_tcp(address)
            if self.metrics_address is not None:
                from viommud.shell.metrics import Metrics  # noqa: PLC0415 - only when asked for

                metrics = Metrics(self.snapshot)
                bound = await asyncio.to_thread(metrics.serve, self.metrics_address)
                metrics.bind_loop()
                self.metrics = metrics
                self.log.info("metrics_started", address=str(bound))
        except BaseException:
            await self._unbind()
            raise
        self._started = True
        self._notify(
            "READY=1\nSTATUS=serving on "
            + ", ".join(f"{listener['kind']} {listener['address']}" for listener in self.listeners)
        )

    async def _start_unix(self) -> None:
        path = self.socket_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                if _answers(path):
                    raise AlreadyServingError(path)  # never take a live daemon's socket away
                path.unlink(missing_ok=True)  # a stale socket from a previous run
            old_umask = os.umask(0o177)
            try:
                server = await asyncio.start_unix_server(self._accept, path=str(path))
            finally:
                os.umask(old_umask)
            self._servers.append(server)
            self._bound_unix = True
            path.chmod(self.mode)
        except AlreadyServingError:
            raise
        except OSError as exc:
            raise _naming(exc, path) from None
        self.listeners.append({"kind": "unix", "address": str(path)})
        self.log.info("server_started", socket=str(path), mode=oct(self.mode))
        if self.mode & 0o002:
            self.log.warning("socket_world_writable", path=str(path), mode=oct(self.mode))

    async def _start_tcp(self, address: TcpAddress) -> None:
        if self.netns is None:
            try:
                sock = bind_tcp(address)
            except OSError as exc:
                raise _naming(exc, f"tcp://{address}") from None
        else:
            from viommud.shell import netlink  # noqa: PLC0415 - pyroute2 only when asked for

            sock = await asyncio.to_thread(netlink.tcp_listener, address, self.netns)
        try:
            server = await asyncio.start_server(
                functools.partial(self._accept, transport="tcp"), sock=sock
            )
        except OSError:
            sock.close()
            raise
        self._servers.append(server)
        bound = _sockname(sock)
        self.listeners.append({"kind": "tcp", "address": bound, "netns": self.netns})
        self.log.info("listener_started", kind="tcp", address=bound, netns=self.netns)

    async def _serve_activated(self, listen: ListenSocket) -> None:
        sock = listen.sock
        if listen.is_unix:
            server = await asyncio.start_unix_server(self._accept, sock=sock)
            kind = "unix"
        else:
            server = await asyncio.start_server(
                functools.partial(self._accept, transport="tcp"), sock=sock
            )
            kind = "tcp"
        self._servers.append(server)
        bound = _sockname(sock)
        self.listeners.append({"kind": kind, "address": bound, "activated": True})
        self.log.info("listener_started", kind=kind, address=bound, activated=True)

    def _notify(self, state: str) -> None:
        if self.notify is None:
            return
        try:
            self.notify(state)
        except OSError as exc:
            self.log.warning("notify_failed", state=state.partition("\n")[0], error=str(exc))

    @property
    def tcp_addresses(self) -> list[str]:
        """``ADDR:PORT`` of each TCP listener, as bound (port 0 becomes the real port)."""
        return [listener["address"] for listener in self.listeners if listener["kind"] == "tcp"]

    async def run(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None = None) -> None:
        if not self._started:
            await self.start()
        if shutdown_trigger is None:
            shutdown_trigger = _signal_trigger()
        try:
            await shutdown_trigger()
        finally:
            await self.close()

    async def close(self) -> None:
        self.log.info("shutdown_started", clients=len(self._tasks))
        self._notify("STOPPING=1")
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=self.grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._unbind()
        self._started = False
        self.log.info("shutdown_complete")

    async def _unbind(self) -> None:
        """Close the listeners and the metrics endpoint; remove the socket the daemon made."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        self.listeners = []
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None
        if self._bound_unix:  # a socket-activated one belongs to the service manager
            self._bound_unix = False
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    # -- what the daemon holds (STATUS frames, metrics) ---------------------------------
    def snapshot(self) -> Snapshot:
        """Counters of every session, ended and live, plus what is live now."""
        live = Totals()
        objects: dict[str, int] = {}
        sessions = 0
        for connection in self._connections.values():
            session = connection.session
            if session is None:
                continue
            sessions += 1
            live.add(session.report())
            held = backend_objects(session.backend)
            for kind, count in count_kinds(held or []).items():
                objects[kind] = objects.get(kind, 0) + count
        return Snapshot(self.retired.merged(live), self.clients, sessions, objects)

    def status(self, asker: int = 0) -> dict[str, Any]:
        """The STATUS reply: listeners, clients (but the asker) with their vIOMMUs, totals."""
        snap = self.snapshot()
        metrics = self.metrics
        return {
            "server": f"viommud/{__version__}",
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "listeners": self.listeners,
            "metrics": str(metrics.address) if metrics and metrics.address else None,
            "connected_clients": sum(1 for cid in self._connections if cid != asker),
            "sessions": {"active": snap.sessions, "closed": self.retired.sessions},
            "clients": [
                connection.describe()
                for cid, connection in sorted(self._connections.items())
                if cid != asker
            ],
            "objects": snap.objects,
            "totals": snap.totals.to_json(),
        }

    async def wait_idle(self) -> None:
        """Return once no client is connected (their sessions are closed by then)."""
        await self._idle.wait()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: str = "unix"
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        client_id = next(self._ids)
        log = self.log.bind(client=client_id)
        peer = _peername(writer) if transport == "tcp" else ""
        connection = Connection(
            client_id,
            self.factory,
            self.fixed_host,
            log,
            transport=transport,
            peer=peer,
            token=self.token if transport == "tcp" else None,
            status=self.status,
            metrics=self.metrics,
            state_dir=self.state_dir,
        )
        self._connections[client_id] = connection
        self.clients += 1
        self._idle.clear()
        log.info("client_connected", transport=transport, peer=peer)
        try:
            while not connection.closing:
                data = await reader.read(READ_CHUNK)
                out = connection.receive(data)
                if out:
                    writer.write(out)
                    await writer.drain()
                if not data:
                    break
        except (ConnectionResetError, BrokenPipeError) as exc:
            connection.log.info("client_lost", error=str(exc))
        except asyncio.CancelledError:
            connection.log.warning("client_cancelled")
            raise
        except Exception:
            connection.log.exception("client_failed")
        finally:
            try:
                report = connection.close()
            finally:
                del self._connections[client_id]
            if report is not None:
                self.retired.add(report)
            self.clients -= 1
            if not self.clients:
                self._idle.set()
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            connection.log.info("client_disconnected")  # with the session's vm, if it had one


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``; False for a stale
    socket file (connection refused) or one that vanished. Never blocks: a listener whose
    backlog is full counts as alive."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        probe.close()
    return True


def _naming(exc: OSError, where: str | Path) -> OSError:
    """``exc`` with the path or address it is about, when it does not name one already."""
    if exc.filename is not None or str(where) in str(exc):
        return exc
    if exc.errno is None:  # e.g. "AF_UNIX path too long"
        return OSError(f"{exc}: {str(where)!r}")
    return type(exc)(exc.errno, exc.strerror, str(where))


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return str(TcpAddress(str(name[0]), int(name[1])))
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _peername(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return str(TcpAddress(str(name[0]), int(name[1])))
    return ""


def _signal_trigger() -> Callable[[], Awaitable[Any]]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop.wait
