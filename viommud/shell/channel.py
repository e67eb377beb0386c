"""A client connection's bytes, and on a Unix socket the fds that come with them.

asyncio's streams read with ``recv``: the kernel closes file descriptors a peer passed with
SCM_RIGHTS when the read has no room for them. ``UnixChannel`` therefore reads a Unix socket
itself, with ``recvmsg`` on the raw non-blocking socket (``loop.add_reader``), and writes it
with ``send`` (``loop.add_writer`` while the peer does not read); ``StreamChannel`` wraps
asyncio's streams for TCP, where no fd can travel. The pump (viommud.shell.stream) serves
either; ``read`` returns one ``recvmsg``'s bytes, its fds (owned by the caller from then on)
and whether the kernel dropped some (MSG_CTRUNC).

``grab`` is the protocol of a Unix listener: it takes the accepted socket from its transport
before the transport reads a byte (docs/protocol.md §12) and hands it to a coroutine.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

from viommud.guest_memory import close_all
from viommud.shell.passed import MAX_FDS_PER_MESSAGE

READ_CHUNK = 256 * 1024
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
_NO_FDS: list[int] = []

Chunk = tuple[bytes, list[int], bool]  # bytes (b"": end of stream), fds, some fds lost


class UnixChannel:
    """A connected Unix stream socket, read with recvmsg."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[Chunk] | None = None
        self._watching = False  # our reader is registered (removed when a chunk waits)
        self._ahead: Chunk | OSError | None = None  # read while nobody waited
        self._out = bytearray()  # written, not yet taken by the kernel
        self._closed = False

    async def read(self) -> Chunk:
        """One recvmsg's worth. The loop's reader callback does the recvmsg itself (as
        asyncio's transports do: no second trip through the selector per wakeup); when
        nobody waits it keeps one chunk aside and stops watching the socket until that chunk
        is taken (a client that sends while its replies drain is read one chunk ahead)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if isinstance(ahead, OSError):
                raise ahead
            return ahead
        if not self._watching:
            try:
                return self._recv()
            except (BlockingIOError, InterruptedError):
                self._loop.add_reader(self._fd, self._ready)
                self._watching = True
        waiter: asyncio.Future[Chunk] = self._loop.create_future()
        self._waiter = waiter
        try:
            return await waiter
        except asyncio.CancelledError:  # a deadline: what the callback read is kept
            if waiter.done() and not waiter.cancelled():
                exc = waiter.exception()
                self._ahead = exc if isinstance(exc, OSError) else waiter.result()
            raise
        finally:
            self._waiter = None

    def _recv(self) -> Chunk:
        data, ancdata, flags, _ = self.sock.recvmsg(READ_CHUNK, _ANCILLARY)
        if not ancdata:
            return data, _NO_FDS, bool(flags & socket.MSG_CTRUNC)
        return data, _fds(ancdata), bool(flags & socket.MSG_CTRUNC)

    def _ready(self) -> None:
        waiter = self._waiter
        idle = waiter is None or waiter.done()
        if idle and self._ahead is not None:  # a chunk waits already: stop watching
            self._loop.remove_reader(self._fd)
            self._watching = False
            return
        try:
            chunk: Chunk | OSError = self._recv()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            chunk = exc
        if idle or waiter is None:
            self._ahead = chunk
        elif isinstance(chunk, OSError):
            waiter.set_exception(chunk)
        else:
            waiter.set_result(chunk)

    def write(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            self._out += data[sent:]

    def is_closing(self) -> bool:
        return self._closed

    def buffered(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return len(self._out)

    async def drain(self) -> None:
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent:
                del self._out[:sent]
                continue
            writable = self._loop.create_future()
            self._loop.add_writer(self._fd, _wake, writable)
            try:
                await writable
            finally:
                self._loop.remove_writer(self._fd)

    def detach(self) -> tuple[int, bytes]:
        """A duplicate of the socket's fd and the bytes read and not yet handed out (none:
        every byte read went to the caller); this channel is closed."""
        fd = os.dup(self._fd)
        self.close()
        return fd, b""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False
        self._out.clear()
        ahead, self._ahead = self._ahead, None
        if isinstance(ahead, tuple):
            close_all(ahead[1])
        self.sock.close()

    async def wait_closed(self) -> None:
        return

    def forget(self) -> None:
        """Nothing to forget: this channel keeps no exception."""


class StreamChannel:
    """asyncio's streams (TCP): bytes only."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sock = writer.get_extra_info("socket")

    async def read(self) -> Chunk:
        return await self.reader.read(READ_CHUNK), _NO_FDS, False

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    def buffered(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    def detach(self) -> tuple[int, bytes]:
        transport = cast("asyncio.Transport", self.writer.transport)
        transport.pause_reading()
        # What the stream read and has not handed out yet goes along.
        leftover = bytes(getattr(self.reader, "_buffer", b""))
        fd = os.dup(self.sock.fileno())
        transport.abort()  # the transport only; the socket lives on in the duplicate
        return fd, leftover

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await self.writer.wait_closed()

    def forget(self) -> None:
        forget_error(self.reader)


Channel = UnixChannel | StreamChannel


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return fds.tolist()


class grab(asyncio.Protocol):  # noqa: N801 - used as a protocol factory, like a function
    """A Unix listener's protocol: takes the accepted socket (a duplicate fd) from the
    transport in ``connection_made``, before the transport reads anything, closes the
    transport and runs ``serve`` on a ``UnixChannel`` in a task of its own."""

    def __init__(self, serve: Callable[[UnixChannel], Coroutine[Any, Any, None]]) -> None:
        self.serve = serve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        sock: Any = transport.get_extra_info("socket")
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            transport.abort()  # out of fds: the client sees its connection closed
            return
        transport.abort()  # closes the transport's fd before it ever reads
        try:
            channel = UnixChannel(socket.socket(fileno=fd))
        except OSError:
            close_all([fd])
            return
        asyncio.get_running_loop().create_task(self.serve(channel))


def forget_error(reader: asyncio.StreamReader) -> None:
    """Drop the traceback of the error that ended the connection (a reset, a broken pipe).

    The stream keeps that exception, its traceback keeps the frames that were writing
    (``pump``'s among them), and those frames keep the stream and the ``Connection``: a
    cycle only the cycle collector would free, holding a closed session's memory until then.
    """
    exc: BaseException | None = reader.exception()
    seen = 0
    while exc is not None and seen < 8:
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__
        seen += 1
