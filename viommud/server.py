"""The asyncio shell: a Unix-socket server, one session per connection.

Each connection speaks the frame protocol (viommud.wire); its frames are handed to a
``Connection`` (synchronous, one per client) whose replies are written back in order, with a
drain after every batch read. A client that sends garbage gets an ERROR frame and is
disconnected; its session is closed, which frees everything it held on the backend; other
clients are not affected. SIGTERM/SIGINT (or an injected trigger) stop the server
gracefully: no new connections, running ones get ``grace`` seconds, then are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from protocols.frames import PROTOCOL_VERSION, FrameType
from viommud import __version__, wire
from viommud.backend.base import Backend
from viommud.host import HostConfig, HostConfigError
from viommud.session import RecordRefused, Session
from viommud.trace import Request, TraceError, parse_record

READ_CHUNK = 256 * 1024
BackendFactory = Callable[[HostConfig], Backend]


def emulated_backend(host: HostConfig) -> Backend:
    from viommud.backend.emulated import EmulatedIommufd  # noqa: PLC0415 - keeps startup lean

    return EmulatedIommufd(host)


class _Fatal(Exception):  # noqa: N818 - control flow: reply with a fatal ERROR, then close
    pass


class Connection:
    """Protocol state of one client: hello, then records, each answered in order."""

    def __init__(
        self, client_id: int, factory: BackendFactory, fixed_host: HostConfig | None, log: Any
    ) -> None:
        self.client_id = client_id
        self.factory = factory
        self.fixed_host = fixed_host
        self.log = log
        self.session: Session | None = None
        self.decoder = wire.FrameDecoder()
        self.closing = False

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the peer; returns the reply bytes to send."""
        self.decoder.receive_data(data)
        out: list[bytes] = []
        while not self.closing:
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

    def _dispatch(self, frame: wire.Frame) -> bytes:
        kind = frame.type
        if kind == FrameType.HELLO:
            return self._hello(frame)
        session = self.session
        if session is None:
            raise _Fatal("the first frame must be HELLO")
        if kind == FrameType.CMDS:
            viommu, data = frame.guest_data()
            try:
                response = session.doorbell(viommu, data)
            except RecordRefused as exc:
                return _error(frame.seq, str(exc), fatal=False)
            return self._respond(frame.seq, response)
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
            viommu, data = frame.guest_data()
            try:
                response = session.handle(Request(0, viommu, data))
            except RecordRefused as exc:
                return _error(frame.seq, str(exc), fatal=False)
            return self._respond(frame.seq, response)
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
        self.session = Session(backend, keep_calls=bool(hello.get("calls")), log=self.log)
        self.log.info(
            "session_started",
            client_name=str(hello.get("client", "")),
            trace=str(hello.get("trace", "")),
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

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


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
    ) -> None:
        self.socket_path = Path(socket_path)
        self.factory = factory
        self.fixed_host = fixed_host
        self.mode = mode
        self.grace = grace
        self.log = structlog.get_logger("viommud")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self.clients = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # a stale socket from a previous run
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        finally:
            os.umask(old_umask)
        path.chmod(self.mode)
        self.log.info("server_started", socket=str(path), mode=oct(self.mode))

    async def run(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None = None) -> None:
        if self._server is None:
            await self.start()
        if shutdown_trigger is None:
            shutdown_trigger = _signal_trigger()
        try:
            await shutdown_trigger()
        finally:
            await self.close()

    async def close(self) -> None:
        self.log.info("shutdown_started", clients=len(self._tasks))
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=self.grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.log.info("shutdown_complete")

    async def wait_idle(self) -> None:
        """Return once no client is connected (their sessions are closed by then)."""
        await self._idle.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        client_id = next(self._ids)
        log = self.log.bind(client=client_id)
        connection = Connection(client_id, self.factory, self.fixed_host, log)
        self.clients += 1
        self._idle.clear()
        log.info("client_connected")
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
            connection.close()
            self.clients -= 1
            if not self.clients:
                self._idle.set()
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            log.info("client_disconnected")


def _signal_trigger() -> Callable[[], Awaitable[Any]]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop.wait
