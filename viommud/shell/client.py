"""An asyncio client of the frame protocol: hello, pipelined requests, replies in order.

A target is a Unix socket path or ``tcp://ADDR:PORT`` (viommud.shell.endpoints); TCP listeners
need the daemon's token, which the client presents in HELLO and STATUS.

Connecting and the HELLO exchange are bounded in time (``timeout``; the CLI's ``--timeout``),
so a socket that accepts and never answers — something that is not viommud — is an error
naming the target, never a hang. Every error names the target.

A VMM passes its guest RAM and its VFIO device fds over the Unix socket (docs/protocol.md
§12) after HELLO and before its first vIOMMU::

    client = await Client.connect("/run/viommud.sock")
    await client.hello(host=host)
    await client.send_memory([RamRegion(gpa=0, size=ram_size, fd=memfd)])
    await client.send_devices({"0000:01:00.0": vfio_cdev_fd})

Each sends one frame and its fds in one ``sendmsg`` (SCM_RIGHTS) and returns the RESPONSE
body; a refusal raises ``ClientError`` with the daemon's words (errno name first). The
caller keeps its own fds (the daemon gets copies) and may close them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from protocols.frames import PROTOCOL_VERSION, FrameType
from viommud import __version__, wire
from viommud.guest_memory import RamRegion
from viommud.shell.endpoints import EndpointError, is_tcp, parse_tcp

DEFAULT_TIMEOUT = 10.0  # seconds to connect, and again to get the HELLO answered

_timeout: ContextVar[float] = ContextVar("viommud_client_timeout", default=DEFAULT_TIMEOUT)


@contextlib.contextmanager
def timeouts(seconds: float) -> Iterator[None]:
    """Clients connected inside this block (and the tasks it starts) wait at most
    ``seconds`` to connect and to get their HELLO answered (the CLI's ``--timeout``)."""
    token = _timeout.set(seconds)
    try:
        yield
    finally:
        _timeout.reset(token)


class ClientError(Exception):
    """The daemon refused us or the connection broke."""


class Client:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        token: str | None = None,
        *,
        target: str = "the daemon",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = wire.FrameDecoder()
        self._seq = 0
        self.token = token
        self.target = target  # the path or tcp:// address, for error messages
        self.timeout = timeout

    @classmethod
    async def connect(
        cls, socket_path: str | Path, *, token: str | None = None, wait: float | None = None
    ) -> Client:
        """Connect to a Unix socket path or a ``tcp://ADDR:PORT`` target within ``wait``
        seconds (default: the enclosing ``timeouts()`` block's, else ``DEFAULT_TIMEOUT``);
        the client's HELLO gets as long again."""
        target = str(socket_path)
        if wait is None:
            wait = _timeout.get()
        try:
            async with asyncio.timeout(wait):
                if is_tcp(target):
                    address = parse_tcp(target)
                    reader, writer = await asyncio.open_connection(address.host, address.port)
                else:
                    reader, writer = await asyncio.open_unix_connection(target)
        except EndpointError as exc:
            raise ClientError(str(exc)) from None
        except TimeoutError:
            raise ClientError(f"cannot connect to {target}: no answer within {wait:g} s") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {target}: {exc.strerror or exc}") from None
        return cls(reader, writer, token, target=target, timeout=wait)

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def send(self, frame: bytes) -> None:
        self._writer.write(frame)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise ClientError(f"connection to {self.target} lost: {exc}") from None

    async def receive(self) -> wire.Frame:
        """The next reply frame."""
        while True:
            try:
                frame = self._decoder.next_frame()
            except wire.WireError as exc:
                raise ClientError(f"bad reply from {self.target}: {exc}") from None
            if frame is not None:
                if frame.type == FrameType.ERROR and frame.seq == 0:
                    # the daemon's last word, answering no request: a broken stream, a
                    # deadline, its shutdown (docs/protocol.md §8)
                    body = _body(frame, self.target)
                    if isinstance(body, dict) and body.get("fatal"):
                        raise ClientError(f"{self.target} ended the session: {body.get('error')}")
                return frame
            try:
                data = await self._reader.read(256 * 1024)
            except ConnectionError as exc:
                raise ClientError(f"connection to {self.target} lost: {exc}") from None
            if not data:
                raise ClientError(f"{self.target} closed the connection")
            self._decoder.receive_data(data)

    async def request(self, frame_type: int, obj: Any) -> wire.Frame:
        seq = self.next_seq()
        self.send(wire.encode_json(frame_type, seq, obj))
        await self.drain()
        return await self.receive()

    async def hello(self, **fields: Any) -> dict[str, Any]:
        """Exchange HELLO; ClientError when it is refused or not answered within
        ``self.timeout`` seconds."""
        if self.token is not None:
            fields.setdefault("token", self.token)
        hello = {"protocol": PROTOCOL_VERSION, "client": f"viommud-client/{__version__}", **fields}
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self.request(FrameType.HELLO, hello)
        except TimeoutError:
            raise ClientError(
                f"no answer to HELLO from {self.target} within {self.timeout:g} s "
                "(is a viommud serving there?)"
            ) from None
        body = _body(reply, self.target)
        if reply.type == FrameType.ERROR and isinstance(body, dict):
            raise ClientError(f"{self.target} refused the session: {body.get('error')}")
        if reply.type != FrameType.HELLO_OK or not isinstance(body, dict):
            raise ClientError(f"unexpected reply 0x{reply.type:02x} to HELLO from {self.target}")
        return body

    async def stats(self) -> dict[str, Any]:
        reply = await self.request(FrameType.STATS, {})
        body = _body(reply, self.target)
        if reply.type != FrameType.STATS_OK or not isinstance(body, dict):
            raise ClientError(f"unexpected reply to STATS from {self.target}: {body}")
        return body

    async def status(self) -> dict[str, Any]:
        """The daemon's STATUS reply (no session needed)."""
        reply = await self.request(
            FrameType.STATUS, {"token": self.token} if self.token is not None else {}
        )
        body = _body(reply, self.target)
        if reply.type == FrameType.ERROR and isinstance(body, dict):
            raise ClientError(f"{self.target} refused STATUS: {body.get('error')}")
        if reply.type != FrameType.STATUS_OK or not isinstance(body, dict):
            raise ClientError(f"unexpected reply 0x{reply.type:02x} to STATUS from {self.target}")
        return body

    async def state_save(self) -> bytes:
        """The session's state document (STATE_SAVE, docs/state-format.md)."""
        seq = self.next_seq()
        self.send(wire.encode(FrameType.STATE_SAVE, seq))
        await self.drain()
        reply = await self.receive()
        if reply.type != FrameType.STATE:
            body = _body(reply, self.target)
            raise ClientError(f"{self.target} refused STATE_SAVE: {_error_of(body)}")
        return reply.payload

    async def state_load(self, document: bytes) -> dict[str, Any]:
        """Rebuild the session from a state document (STATE_LOAD); the STATE_LOADED body."""
        seq = self.next_seq()
        self.send(wire.encode(FrameType.STATE_LOAD, seq, document))
        await self.drain()
        reply = await self.receive()
        body = _body(reply, self.target)
        if reply.type != FrameType.STATE_LOADED or not isinstance(body, dict):
            raise ClientError(f"{self.target} refused STATE_LOAD: {_error_of(body)}")
        return body

    async def send_memory(self, regions: Iterable[RamRegion]) -> dict[str, Any]:
        """MEMORY: the guest RAM layout, each region's fd passed with the frame (one fd per
        region, also when regions share a file). The RESPONSE body (``regions``, ``bytes``)."""
        items = list(regions)
        body = {
            "regions": [
                {"gpa": r.gpa, "size": r.size, "fd": i, "offset": r.offset}
                for i, r in enumerate(items)
            ]
        }
        return await self._give(FrameType.MEMORY, body, [r.fd for r in items])

    async def send_devices(self, devices: Mapping[str, int]) -> dict[str, Any]:
        """DEVICES: the VFIO cdev fd of each host device (name -> fd), passed with the
        frame. The RESPONSE body (``devices``)."""
        names = list(devices)
        body = {"devices": {name: i for i, name in enumerate(names)}}
        return await self._give(FrameType.DEVICES, body, [devices[n] for n in names])

    async def _give(self, frame_type: int, body: Any, fds: Sequence[int]) -> dict[str, Any]:
        seq = self.next_seq()
        await self.send_fds(wire.encode_json(frame_type, seq, body), fds)
        reply = await self.receive()
        answer = _body(reply, self.target)
        name = FrameType(frame_type).name
        if reply.type != FrameType.RESPONSE or not isinstance(answer, dict):
            raise ClientError(f"{self.target} refused {name}: {_error_of(answer)}")
        return answer

    async def send_fds(self, frame: bytes, fds: Sequence[int]) -> None:
        """Send ``frame`` (whole) with ``fds`` in one sendmsg, after every byte written
        before it; the daemon reads the fds as the frame's (docs/protocol.md §12)."""
        transport = self._writer.transport
        sock = self._writer.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            raise ClientError(f"cannot pass file descriptors to {self.target}: not a Unix socket")
        if transport.get_write_buffer_size():  # let what was written before go first
            transport.set_write_buffer_limits(high=0)
            try:
                await self.drain()
            finally:
                transport.set_write_buffer_limits()
        loop = asyncio.get_running_loop()
        own = socket.socket(fileno=os.dup(sock.fileno()))  # non-blocking, like the transport's
        try:
            await _sendmsg_all(loop, own, frame, list(fds))
        except OSError as exc:
            raise ClientError(f"cannot pass file descriptors to {self.target}: {exc}") from None
        finally:
            own.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


async def _sendmsg_all(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes, fds: list[int]
) -> None:
    """``data`` with ``fds`` (SCM_RIGHTS, attached to its first byte) on non-blocking
    ``sock``, waiting for room as needed."""
    view = memoryview(data)
    while view:
        try:
            if fds:
                sent = socket.send_fds(sock, [view], fds)
                fds = []
            else:
                sent = sock.send(view)
            view = view[sent:]
        except (BlockingIOError, InterruptedError):
            room: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), _wake, room)
            try:
                await room
            finally:
                loop.remove_writer(sock.fileno())


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _error_of(body: Any) -> Any:
    return body.get("error") if isinstance(body, dict) else body


def _body(reply: wire.Frame, target: str) -> Any:
    """A reply's JSON body; ClientError naming ``target`` when it is not JSON."""
    try:
        return reply.json()
    except wire.WireError as exc:
        raise ClientError(f"bad reply from {target}: {exc}") from None


async def health(socket_path: str | Path, wait: float = 2.0, *, token: str | None = None) -> str:
    """Connect and exchange HELLO (probe); returns the server's name or raises ClientError."""
    try:
        async with asyncio.timeout(wait):
            client = await Client.connect(socket_path, token=token, wait=wait)
            try:
                reply = await client.hello(probe=True, client="viommud-health")
            finally:
                await client.close()
    except TimeoutError:
        raise ClientError(f"no answer from {socket_path} within {wait} s") from None
    return str(reply.get("server", "?"))


async def status(
    socket_path: str | Path, wait: float = 5.0, *, token: str | None = None
) -> dict[str, Any]:
    """The STATUS of the daemon at ``socket_path``; raises ClientError."""
    try:
        async with asyncio.timeout(wait):
            client = await Client.connect(socket_path, token=token, wait=wait)
            try:
                return await client.status()
            finally:
                await client.close()
    except TimeoutError:
        raise ClientError(f"no answer from {socket_path} within {wait} s") from None
