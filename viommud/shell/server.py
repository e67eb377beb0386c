"""The asyncio shell: a Unix-socket server, one session per connection.

Each connection speaks the frame protocol (viommud.wire); its frames are handed to a
``Connection`` (synchronous, one per client) whose replies are written back in order, with a
drain after every batch read. A client that sends garbage gets an ERROR frame and is
disconnected; its session is closed, which frees everything it held on the backend; other
clients are not affected. SIGTERM/SIGINT (or an injected trigger) stop the server
gracefully: no new connections, running ones get ``grace`` seconds, then are cancelled.

Listeners: the Unix socket (always, unless systemd hands sockets over: viommud.shell.systemd), TCP
addresses when asked for (each needs the shared token in HELLO; created inside a named
network namespace through viommud.shell.netlink when asked). A STATUS frame is answered without
a session (viommud.shell.status); ``--metrics`` serves Prometheus metrics (viommud.shell.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from protocols.frames import PROTOCOL_VERSION, FrameType
from viommud import __version__, wire
from viommud.backend.base import Backend
from viommud.host import HostConfig, HostConfigError
from viommud.session import RecordRefused, Session
from viommud.shell.endpoints import TcpAddress, bind_tcp, token_matches
from viommud.shell.status import Snapshot, Totals, backend_objects, count_kinds, describe_viommu
from viommud.shell.systemd import ListenSocket
from viommud.trace import Request, TraceError, parse_record

if TYPE_CHECKING:
    from viommud.shell.metrics import Metrics  # imported when --metrics asks for it

READ_CHUNK = 256 * 1024
BackendFactory = Callable[[HostConfig], Backend]


def emulated_backend(host: HostConfig) -> Backend:
    from viommud.backend.emulator.kernel import EmulatedIommufd  # noqa: PLC0415 - keeps startup lean

    return EmulatedIommufd(host)


class _Fatal(Exception):  # noqa: N818 - control flow: reply with a fatal ERROR, then close
    pass


class Connection:
    """Protocol state of one client: hello, then records, each answered in order."""

    def __init__(
        self,
        client_id: int,
        factory: BackendFactory,
        fixed_host: HostConfig | None,
        log: Any,
        *,
        transport: str = "unix",
        peer: str = "",
        token: str | None = None,
        status: Callable[[int], dict[str, Any]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.client_id = client_id
        self.factory = factory
        self.fixed_host = fixed_host
        self.log = log
        self.compact = False
        self.compact_writes = False  # CMDS_OK_WRITES for clean VT-d doorbells
        self.group_commit = False
        self.session: Session | None = None
        self.decoder = wire.FrameDecoder()
        self.closing = False
        self.transport = transport  # "unix" or "tcp"
        self.peer = peer
        self.token = token  # required in HELLO / STATUS when set (TCP listeners)
        self.authenticated = token is None
        self.status = status
        self.metrics = metrics
        self.connected_at = time.monotonic()
        self.trace = ""
        self.vm = ""

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the peer; returns the reply bytes to send."""
        self.decoder.receive_data(data)
        out: list[bytes] = []
        while not self.closing:
            if self.group_commit:  # a run of doorbells waiting together: answered together
                run = self.decoder.take_guest_data(FrameType.CMDS)
                if run:
                    out.append(self._group(run))
                    continue
            try:
                frame = self.decoder.next_frame()
            except wire.WireError as exc:
                self.log.warning("protocol_error", error=str(exc), raw_hex=exc.raw.hex())
                out.append(_error(0, str(exc), fatal=True))
                self.closing = True
                break
            if frame is None:
                break
            try:
                out.append(self._dispatch(frame))
            except _Fatal as exc:
                self.log.warning("protocol_error", error=str(exc), seq=frame.seq)
                out.append(_error(frame.seq, str(exc), fatal=True))
                self.closing = True
            except wire.WireError as exc:
                out.append(_error(frame.seq, str(exc), fatal=False))
            except Exception as exc:  # a bug must not take the daemon or other clients down
                self.log.exception("internal_error", seq=frame.seq, frame_type=frame.type)
                out.append(_error(frame.seq, f"internal error: {exc!r}", fatal=False))
        return b"".join(out)

    def _group(self, run: list[tuple[int, str, bytes]]) -> bytes:
        """Group commit: the CMDS frames that were waiting together, answered in order after
        their work is done (Session.doorbells; docs/protocol.md, HELLO ``group_commit``)."""
        session = self.session
        assert session is not None  # group_commit is only set by HELLO
        started = time.perf_counter()
        replies: list[bytes | None] = [None] * len(run)
        by_viommu: dict[str, tuple[list[int], list[bytes]]] = {}
        for i, (_, name, data) in enumerate(run):
            slots, datas = by_viommu.setdefault(name, ([], []))
            slots.append(i)
            datas.append(data)
        try:
            for viommu, (slots, datas) in by_viommu.items():
                answers = session.doorbells(viommu, datas)
                for i, answer in zip(slots, answers, strict=True):
                    replies[i] = self._cmds_reply(run[i][0], answer)
        except Exception as exc:  # a bug must not take the daemon or other clients down
            self.log.exception("internal_error", seq=run[0][0], frame_type=FrameType.CMDS)
            for i, (seq, _, _) in enumerate(run):
                if replies[i] is None:
                    replies[i] = _error(seq, f"internal error: {exc!r}", fatal=False)
        metrics = self.metrics
        if metrics is not None:
            elapsed = time.perf_counter() - started
            for _ in run:
                metrics.observe_cmds(elapsed)
        return b"".join(r for r in replies if r is not None)

    def _cmds_reply(self, seq: int, answer: dict[str, Any] | Exception) -> bytes:
        if isinstance(answer, Exception):
            return _error(seq, str(answer), fatal=False)
        if self.compact and not answer["errors"]:
            if len(answer) == 3:
                return wire.encode_cmds_ok(seq, answer["consumed"], answer["syncs"])
            if self.compact_writes and len(answer) == 4 and "status_writes" in answer:
                writes = [
                    (w["index"], int(w["addr"], 16), int(w["data"], 16))
                    for w in answer["status_writes"]
                ]
                return wire.encode_cmds_ok_writes(seq, answer["consumed"], answer["syncs"], writes)
        return self._respond(seq, answer)

    def _dispatch(self, frame: wire.Frame) -> bytes:
        kind = frame.type
        if kind == FrameType.HELLO:
            return self._hello(frame)
        if kind == FrameType.STATUS:
            return self._status(frame)
        session = self.session
        if session is None:
            raise _Fatal("the first frame must be HELLO")
        if kind == FrameType.CMDS:
            metrics = self.metrics
            started = time.perf_counter() if metrics is not None else 0.0
            viommu, data = frame.guest_data()
            try:
                reply = self._cmds_reply(frame.seq, session.doorbell(viommu, data))
            except RecordRefused as exc:
                return _error(frame.seq, str(exc), fatal=False)
            if metrics is not None:
                metrics.observe_cmds(time.perf_counter() - started)
            return reply
        if kind == FrameType.RECORD:
            try:
                record = parse_record(0, frame.json())
                response = session.handle(record)
            except TraceError as exc:
                return _error(frame.seq, exc.message, fatal=False)
            except RecordRefused as exc:
                return _error(frame.seq, str(exc), fatal=False)
            return self._respond(frame.seq, response)
        if kind == FrameType.REQUEST:
            metrics = self.metrics
            started = time.perf_counter() if metrics is not None else 0.0
            viommu, data = frame.guest_data()
            try:
                response = session.handle(Request(0, viommu, data))
            except RecordRefused as exc:
                return _error(frame.seq, str(exc), fatal=False)
            reply = self._respond(frame.seq, response)
            if metrics is not None:
                metrics.observe_request(time.perf_counter() - started)
            return reply
        if kind == FrameType.STATS:
            return wire.encode_json(FrameType.STATS_OK, frame.seq, session.report())
        raise _Fatal(f"frame type 0x{kind:02x} is not a request")

    def _respond(self, seq: int, response: dict[str, Any]) -> bytes:
        session = self.session
        assert session is not None
        if session.calls.keep:
            response["calls"] = session.drain_calls()
        return wire.encode_json(FrameType.RESPONSE, seq, response)

    def _hello(self, frame: wire.Frame) -> bytes:
        if self.session is not None:
            raise _Fatal("HELLO was already exchanged")
        try:
            hello = frame.json()
        except wire.WireError as exc:
            raise _Fatal(f"bad HELLO: {exc}") from None
        if not isinstance(hello, dict):
            raise _Fatal("HELLO payload must be a JSON object")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise _Fatal(
                f"client speaks protocol {hello.get('protocol')!r}, this daemon {PROTOCOL_VERSION}"
            )
        self._authenticate(hello.get("token"))
        reply: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "server": f"viommud/{__version__}",
            "backend": "emulated",
        }
        if hello.get("probe"):
            self.closing = True  # health check: answer and hang up, no session
            return wire.encode_json(FrameType.HELLO_OK, frame.seq, reply)
        host = self._host_for(hello.get("host"))
        backend = self.factory(host)
        reply["backend"] = backend.name
        reply["host"] = host.to_json()
        self.trace = str(hello.get("trace", ""))
        # Every later line of this session names its VM (HELLO "vm", else the trace name).
        self.vm = str(hello.get("vm") or self.trace)
        self.log = self.log.bind(vm=self.vm)
        # Compact replies (CMDS_OK) only for clients that asked and need no call log.
        self.compact = bool(hello.get("compact")) and not hello.get("calls")
        self.compact_writes = self.compact and bool(hello.get("compact_writes"))
        # Group commit: consecutive waiting doorbells may share host calls (opt-in: the
        # call counts then depend on how the client's frames arrive).
        self.group_commit = bool(hello.get("group_commit"))
        self.session = Session(
            backend,
            keep_calls=bool(hello.get("calls")),
            verify=bool(hello.get("verify")),
            log=self.log,
        )
        self.session.calls.on_error = self._backend_error
        self.log.info(
            "session_started",
            client_name=str(hello.get("client", "")),
            trace=self.trace,
        )
        return wire.encode_json(FrameType.HELLO_OK, frame.seq, reply)

    def _host_for(self, requested: Any) -> HostConfig:
        wanted: HostConfig | None = None
        if requested is not None:
            try:
                wanted = HostConfig.from_json(requested)
            except HostConfigError as exc:
                raise _Fatal(f"bad host in HELLO: {exc}") from None
        if self.fixed_host is None:
            if wanted is None:
                raise _Fatal("this daemon has no host of its own: send one in HELLO")
            return wanted
        if wanted is not None:
            problems = wanted.missing_from(self.fixed_host)
            if problems:
                raise _Fatal(
                    "this daemon's host lacks what the client needs: " + "; ".join(problems)
                )
        return self.fixed_host

    def _backend_error(self, ioctl: str, errno_name: str, piommu: str | None) -> None:
        self.log.warning("backend_error", ioctl=ioctl, errno=errno_name, piommu=piommu)

    def _authenticate(self, presented: Any) -> None:
        if self.authenticated:
            return
        if self.token is None or not token_matches(self.token, presented):
            self.log.warning("auth_failed", transport=self.transport, peer=self.peer)
            raise _Fatal("this listener needs the daemon's token (docs/protocol.md §5)")
        self.authenticated = True

    def _status(self, frame: wire.Frame) -> bytes:
        if not self.authenticated:
            try:
                body = frame.json() if frame.payload else {}
            except wire.WireError as exc:
                raise _Fatal(f"bad STATUS: {exc}") from None
            self._authenticate(body.get("token") if isinstance(body, dict) else None)
        if self.status is None:
            return _error(frame.seq, "this daemon does not report its status", fatal=False)
        return wire.encode_json(FrameType.STATUS_OK, frame.seq, self.status(self.client_id))

    def describe(self) -> dict[str, Any]:
        """This client for STATUS: transport, peer, and its session's vIOMMUs and objects."""
        out: dict[str, Any] = {
            "client": self.client_id,
            "transport": self.transport,
            "peer": self.peer,
            "connected_s": round(time.monotonic() - self.connected_at, 3),
            "session": None,
        }
        session = self.session
        if session is not None:
            held = backend_objects(session.backend)
            out["session"] = {
                "vm": self.vm,
                "trace": self.trace,
                "backend": session.backend.name,
                "viommus": [describe_viommu(v) for _, v in sorted(session.viommus.items())],
                "objects": count_kinds(held) if held is not None else None,
                "counters": session.report(),
            }
        return out

    def close(self) -> dict[str, Any] | None:
        """End the session (freeing its backend objects); returns its final totals."""
        session = self.session
        if session is None:
            return None
        self.session = None
        report = session.report()  # commands and errors, while its vIOMMUs are still there
        session.close()
        report["backend"] = session.report()["backend"]  # with the teardown calls
        return report


def _error(seq: int, message: str, *, fatal: bool) -> bytes:
    return wire.encode_json(FrameType.ERROR, seq, {"error": message, "fatal": fatal})


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
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # a stale socket from a previous run
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._accept, path=str(path))
        finally:
            os.umask(old_umask)
        self._servers.append(server)
        self._bound_unix = True
        path.chmod(self.mode)
        self.listeners.append({"kind": "unix", "address": str(path)})
        self.log.info("server_started", socket=str(path), mode=oct(self.mode))

    async def _start_tcp(self, address: TcpAddress) -> None:
        if self.netns is None:
            sock = bind_tcp(address)
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
            log.info("client_lost", error=str(exc))
        except asyncio.CancelledError:
            log.warning("client_cancelled")
            raise
        except Exception:
            log.exception("client_failed")
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
            log.info("client_disconnected")


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
