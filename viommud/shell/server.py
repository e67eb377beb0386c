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
import itertools
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from protocols.frames import PROTOCOL_VERSION
from viommud import __version__
from viommud.backend.select import emulated_backend
from viommud.guest_memory import close_all
from viommud.host import HostConfig
from viommud.shell import logs
from viommud.shell.channel import Channel, StreamChannel, grab
from viommud.shell.claims import Registry
from viommud.shell.connection import BackendFactory, Connection
from viommud.shell.endpoints import TcpAddress, bind_tcp
from viommud.shell.limits import Limits
from viommud.shell.logs import clip
from viommud.shell.progress import merged
from viommud.shell.replies import encode_error
from viommud.shell.sessions import Handed, Spawner, default_spares
from viommud.shell.statedir import StateDir
from viommud.shell.status import Snapshot, Totals, backend_objects, count_kinds
from viommud.shell.stream import SHUTTING_DOWN, pump
from viommud.shell.systemd import ListenSocket

if TYPE_CHECKING:
    from viommud.shell.metrics import Metrics  # imported when --metrics asks for it

ACCEPT_LOG_INTERVAL = 10.0  # seconds between two accept_failed lines, at least


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
        limits: Limits | None = None,
        processes: bool = False,
        backend: str = "emulated",
        allow_uids: Sequence[int] = (),
        group: int | None = None,
        session_loop: str = "asyncio",
        state_dir: Path | None = None,
        watchdog: float | None = None,
        testing: bool = False,
        spares: int | None = None,
    ) -> None:
        """``tcp``: extra TCP listeners (inside network namespace ``netns`` when given), each
        needing ``token`` in HELLO. ``activated``: sockets from the service manager, served
        instead of binding ``socket_path``. ``metrics``: where to serve Prometheus metrics.
        ``notify``: called with sd_notify states (``READY=1`` once listening).
        ``limits``: frame sizes, deadlines, client cap, quotas, backlog.
        ``processes``: run each session in a process of its own (viommud.shell.worker),
        whose backend is ``backend`` by name (``factory`` serves in-process sessions), with
        ``spares`` of them started ahead (default: one per CPU, sessions.default_spares).
        ``allow_uids``: Unix peers allowed besides the daemon's own user (empty: any the
        socket's permissions let in). ``group``: the socket's group. ``session_loop``:
        the event loop of session processes (``asyncio`` or ``uvloop``). ``watchdog``:
        seconds between two ``WATCHDOG=1`` states sent through ``notify`` from the event
        loop (systemd.watchdog_interval: half of ``WatchdogSec=``); None sends none."""
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
        self.watchdog = watchdog
        self._watchdog_task: asyncio.Task[None] | None = None
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
        self._retired_latency = merged([])
        self.metrics: Metrics | None = None
        self.started_at = time.monotonic()
        self.limits = limits if limits is not None else Limits()
        self.processes = processes
        self.spares = spares if spares is not None else default_spares()
        self.testing = testing  # serve --testing: TEST frames (docs/protocol.md §11)
        self.backend = backend
        self.allow_uids = frozenset(allow_uids)
        self.group = group
        self.session_loop = session_loop
        self.registry = Registry()  # physical devices held by live sessions
        self._handed: dict[int, Handed] = {}
        self._spawner: Spawner | None = None  # started with the listeners
        self._stopping = False
        self._accept_errors = 0
        self._accept_logged = -ACCEPT_LOG_INTERVAL
        self._old_handler: Any = None

    async def start(self) -> None:
        """Bind every listener (and the metrics endpoint), then report READY=1.

        If one cannot be bound, those already bound are closed again before the error
        propagates."""
        loop = asyncio.get_running_loop()
        self._old_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
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
            loop.set_exception_handler(self._old_handler)
            raise
        if self.processes:
            self._spawner = Spawner(self.backend, self.spares)
            self._spawner.prepare()  # the spare session processes
        self._started = True
        self._notify(
            "READY=1\nSTATUS=serving on "
            + ", ".join(f"{listener['kind']} {listener['address']}" for listener in self.listeners)
        )
        if self.watchdog is not None and self.notify is not None:
            self._watchdog_task = asyncio.create_task(self._keep_alive(self.watchdog))

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
                server = await asyncio.get_running_loop().create_unix_server(
                    self._unix_protocol, path=str(path), backlog=self.limits.backlog
                )
            finally:
                os.umask(old_umask)
            self._servers.append(server)
            self._bound_unix = True
            if self.group is not None:
                os.chown(path, -1, self.group)
            path.chmod(self.mode)
        except AlreadyServingError:
            raise
        except OSError as exc:
            raise _naming(exc, path) from None
        self.listeners.append({"kind": "unix", "address": str(path)})
        self.log.info(
            "server_started",
            socket=str(path),
            mode=oct(self.mode),
            group=self.group,
            sessions="processes" if self.processes else "in-process",
            spares=self.spares if self.processes else None,
        )
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
                self._accept_tcp, sock=sock, backlog=self.limits.backlog
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
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(self._unix_protocol, sock=sock)
            kind = "unix"
        else:
            server = await asyncio.start_server(self._accept_tcp, sock=sock)
            kind = "tcp"
        self._servers.append(server)
        bound = _sockname(sock)
        self.listeners.append({"kind": kind, "address": bound, "activated": True})
        self.log.info("listener_started", kind=kind, address=bound, activated=True)

    async def _keep_alive(self, interval: float) -> None:
        """``WATCHDOG=1`` every ``interval`` seconds while the event loop runs: a listener
        whose loop is stuck stops sending it and the service manager restarts it. A failed
        ping is logged once, not once per ping, until one gets through again."""
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                if self.notify is not None:
                    self.notify("WATCHDOG=1")
                failing = False
            except OSError as exc:
                if not failing:
                    self.log.warning("notify_failed", state="WATCHDOG=1", error=str(exc))
                failing = True

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
        """Stop: no new connections; each client's frames already sent are answered, then it
        gets a fatal ERROR ``shutting down``; after ``grace`` seconds whatever still runs is
        ended (a session process is killed)."""
        self.log.info("shutdown_started", clients=len(self._tasks))
        self._notify("STOPPING=1")  # the watchdog goes on pinging through the drain
        self._stopping = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
        if self._spawner is not None:
            await self._spawner.close()
        if self._tasks:
            for task in list(self._tasks):
                task.cancel()  # a goodbye, not an end: see stream.pump and _follow
            _done, pending = await asyncio.wait(self._tasks, timeout=self.grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._unbind()
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None
        self._started = False
        self._stopping = False
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._old_handler)
        self.log.info("shutdown_complete")

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own error reports, as one structured line each: a failed accept (out
        of file descriptors: asyncio retries every second, and would log every time) at
        most once per ``ACCEPT_LOG_INTERVAL`` with the count of those not logged; anything
        else as ``loop_error`` without a traceback."""
        message = str(context.get("message", ""))
        exc = context.get("exception")
        if message.startswith("socket.accept() out of system resource"):
            self._accept_errors += 1
            now = time.monotonic()
            if now - self._accept_logged >= ACCEPT_LOG_INTERVAL:
                self._accept_logged = now
                self.log.warning(
                    "accept_failed",
                    error=str(exc) if exc is not None else message,
                    failures=self._accept_errors,
                )
                self._accept_errors = 0
            return
        self.log.warning(
            "loop_error", message=message, error=repr(exc) if exc is not None else None
        )

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
        """Counters of every session, ended and live, plus what is live now (a session
        process's as of its last report, at most a second old)."""
        live = Totals()
        objects: dict[str, int] = {}
        sessions = 0
        latency = [self._retired_latency]
        for connection in self._connections.values():
            session = connection.session
            if session is None:
                continue
            sessions += 1
            live.add(session.report())
            latency.append(connection.progress.latency)
            held = backend_objects(session.backend)
            for kind, count in count_kinds(held or []).items():
                objects[kind] = objects.get(kind, 0) + count
        for handed in self._handed.values():
            pushed = (handed.status or {}).get("session")
            if not pushed:
                continue
            sessions += 1
            live.add(pushed["counters"])
            latency.append(handed.latency)
            for kind, count in (pushed.get("objects") or {}).items():
                objects[kind] = objects.get(kind, 0) + int(count)
        return Snapshot(self.retired.merged(live), self.clients, sessions, objects, merged(latency))

    def status(self, asker: int = 0) -> dict[str, Any]:
        """The STATUS reply: listeners, clients (but the asker) with their vIOMMUs, totals."""
        snap = self.snapshot()
        metrics = self.metrics
        clients: dict[int, dict[str, Any]] = {
            cid: connection.describe() for cid, connection in self._connections.items()
        }
        for cid, handed in self._handed.items():
            described = clients.get(cid, {})
            described["session"] = (handed.status or {}).get("session")
            described["pid"] = handed.pid
            clients[cid] = described
        return {
            "server": f"viommud/{__version__}",
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "sessions_in": "processes" if self.processes else "in-process",
            "listeners": self.listeners,
            "metrics": str(metrics.address) if metrics and metrics.address else None,
            "connected_clients": sum(1 for cid in clients if cid != asker),
            "sessions": {"active": snap.sessions, "closed": self.retired.sessions},
            "clients": [clients[cid] for cid in sorted(clients) if cid != asker],
            "objects": snap.objects,
            "totals": snap.totals.to_json(),
        }

    async def wait_idle(self) -> None:
        """Return once no client is connected (their sessions are closed by then)."""
        await self._idle.wait()

    def _unix_protocol(self) -> asyncio.Protocol:
        """A Unix client's socket, taken from asyncio before it reads: fds may come with
        the bytes (viommud.shell.channel)."""
        return grab(self._accept)

    async def _accept_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._accept(StreamChannel(reader, writer), "tcp")

    async def _accept(self, channel: Channel, transport: str = "unix") -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        client_id = next(self._ids)
        log = self.log.bind(client=client_id)
        peer = _peername(channel.sock) if transport == "tcp" else ""
        cred = _peercred(channel.sock) if transport == "unix" else None
        if cred is not None:
            log = log.bind(peer_uid=cred["uid"], peer_gid=cred["gid"], peer_pid=cred["pid"])
        refusal = self._refusal(cred)
        if refusal is not None:
            log.warning("client_refused", transport=transport, peer=peer, reason=refusal)
            with contextlib.suppress(ConnectionError):
                channel.write(encode_error(0, refusal, fatal=True))
                await channel.drain()
            channel.close()
            await channel.wait_closed()
            return
        connection = Connection(
            client_id,
            self.factory,
            self.fixed_host,
            log,
            transport=transport,
            peer=peer,
            token=self.token if transport == "tcp" else None,
            status=self.status,
            limits=self.limits,
            claims=self.registry.owner(client_id, f"client {client_id}"),
            handoff=self.processes,
            state_dir=None if self.processes else self.state_dir,
            testing=self.testing,
        )
        self._connections[client_id] = connection
        self.clients += 1
        self._idle.clear()
        log.info("client_connected", transport=transport, peer=peer)
        handed: Handed | None = None
        try:
            ended = await pump(channel, connection, self.limits, stopping=self._stop_asked)
            if ended == "handoff":
                handed = await self._hand_over(connection, channel, cred)
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
                self._handed.pop(client_id, None)
            if handed is not None:  # a process that died: what it last reported
                report = handed.report or ((handed.status or {}).get("session") or {}).get(
                    "counters"
                )
                self._retired_latency = merged([self._retired_latency, handed.latency])
            else:
                self._retired_latency = merged([self._retired_latency, connection.progress.latency])
            if report is not None:
                self.retired.add(report)
            self.clients -= 1
            if not self.clients:
                self._idle.set()
            channel.close()
            await channel.wait_closed()
            connection.log.info("client_disconnected")  # with the session's vm, if it had one
            channel.forget()  # nothing of this connection may outlive it
            del connection, channel

    def _stop_asked(self) -> bool:
        return self._stopping

    def _refusal(self, cred: dict[str, int] | None) -> str | None:
        """Why a new connection is refused before it says anything, or None."""
        if self.clients >= self.limits.max_clients:
            return (
                f"too many clients: this daemon serves at most {self.limits.max_clients} "
                "at once (serve --max-clients)"
            )
        if cred is not None and self.allow_uids:
            uid = cred["uid"]
            if uid != os.getuid() and uid not in self.allow_uids:
                return f"uid {uid} may not use this daemon (serve --allow-uid)"
        return None

    async def _hand_over(
        self, connection: Connection, channel: Channel, cred: dict[str, int] | None
    ) -> Handed:
        """Pass the client's socket, what was read of it and the fds it passed that wait for
        their frames to a session process; follow that process until it ends (the caller's
        ``finally`` closes the listener's side)."""
        assert self._spawner is not None
        assert connection.handed_off is not None
        passed, connection.handed_fds = connection.handed_fds, []
        try:
            fd, leftover = channel.detach()
        except BaseException:
            close_all(fd for _, batch in passed for fd in batch)
            raise
        client_id = connection.client_id
        vm = clip(connection.vm)
        who = f"client {client_id}" + (f", vm {vm!r}" if vm else "")
        try:
            spare = await self._spawner.take()
        except BaseException:
            os.close(fd)
            close_all(fd for _, batch in passed for fd in batch)
            raise
        handed = Handed(spare, client_id, fd, self.registry, who=who, log=connection.log)
        self._handed[client_id] = handed
        setup = {
            "client": client_id,
            "transport": connection.transport,
            "peer": connection.peer,
            "cred": cred,
            "backend": self.backend,
            "host": self.fixed_host.to_json() if self.fixed_host is not None else None,
            "limits": self.limits.to_json(),
            "log": dict(logs.CONFIGURED),
            "loop": self.session_loop,
            # serve --state-dir: the session process keeps (and resumes) the session's state
            "state_dir": str(self.state_dir.path) if self.state_dir is not None else None,
            "testing": self.testing,
        }
        try:
            handed.start(setup, connection.handed_off + leftover, passed)
        except OSError as exc:  # the spare died before it got its session
            handed.kill()
            handed.finish(f"could not start a session process: {exc}")
            raise
        connection.log.info("session_handed_over", pid=handed.pid)
        await self._follow(handed)
        return handed

    async def _follow(self, handed: Handed) -> None:
        follow = asyncio.ensure_future(handed.follow())
        reason: str | None = None
        try:
            while True:
                try:
                    returncode = await asyncio.shield(follow)
                    break
                except asyncio.CancelledError:
                    if self._stopping and not handed.terminated:
                        handed.terminate()  # it answers what it has, then says goodbye
                        continue
                    handed.kill()
                    reason = SHUTTING_DOWN
                    raise
            if not handed.ended:
                reason = Handed.died(returncode)
                handed.log.error("session_failed", pid=handed.pid, error=reason)
        finally:
            if reason == SHUTTING_DOWN:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(follow, 5.0)
            handed.finish(reason)


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


def _peername(sock: Any) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return ""
    if isinstance(name, tuple) and len(name) >= 2:
        return str(TcpAddress(str(name[0]), int(name[1])))
    return ""


_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _peercred(sock: Any) -> dict[str, int] | None:
    """pid, uid and gid of a Unix socket's peer (SO_PEERCRED), when the kernel tells."""
    if sock is None or getattr(socket, "SO_PEERCRED", None) is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except OSError:
        return None
    pid, uid, gid = _CRED.unpack(raw)
    return {"uid": uid, "gid": gid, "pid": pid}


def _signal_trigger() -> Callable[[], Awaitable[Any]]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop.wait
