"""``EventPush`` on pollable fds, the real backend's way (docs/protocol.md §10, "Push"):
a queue fd that becomes readable is read and its EVENT frames written at once; a read
that yields nothing does not make the loop spin; closing stops every watch.

The session and backend are stand-ins: a pipe plays the vEVENTQ fd (the kernel's fd
polls readable while records are queued, and a read takes them)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocols.frames import FrameType
from tests.shell.conftest import replies
from viommud import wire
from viommud.shell.channel import StreamChannel
from viommud.shell.push import EventPush
from viommud.shell.testframe import Deferred


class RealLikeBackend:
    """No ``event_notifier``: the push must poll the fds."""

    name = "iommufd"


@dataclass
class StubSession:
    fd: int
    backend: RealLikeBackend = field(default_factory=RealLikeBackend)

    def event_fds(self) -> list[int]:
        return [self.fd]


@dataclass
class StubConnection:
    session: StubSession | None
    fail: bool = False  # the read gives nothing (and leaves the fd readable)
    closing: bool = False
    reads: int = 0
    deferred: list[Deferred] = field(default_factory=list)
    log: Any = field(default_factory=lambda: structlog.get_logger("viommud"))

    def push_events(self) -> bytes:
        self.reads += 1
        assert self.session is not None
        if self.fail:
            return b""
        data = os.read(self.session.fd, 4096)
        return b"".join(wire.encode_json(FrameType.EVENT, 0, {"record": byte}) for byte in data)


async def _pair() -> tuple[asyncio.StreamWriter, socket.socket]:
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    theirs.setblocking(False)
    return writer, theirs


async def _received(sock: socket.socket, frames: int) -> list[wire.Frame]:
    loop = asyncio.get_running_loop()
    data = b""
    out: list[wire.Frame] = []
    async with asyncio.timeout(5):
        while len(out) < frames:
            data += await loop.sock_recv(sock, 4096)
            out = replies(data)
    return out


async def test_a_readable_queue_fd_is_read_and_pushed() -> None:
    rfd, wfd = os.pipe()
    writer, peer = await _pair()
    connection = StubConnection(StubSession(rfd))
    push = EventPush(connection, StreamChannel(asyncio.StreamReader(), writer))  # type: ignore[arg-type]
    try:
        push.sync()
        os.write(wfd, b"\x07\x08")  # two records arrive while the client is idle
        frames = await _received(peer, 2)
        assert [f.json() for f in frames] == [{"record": 7}, {"record": 8}]
        assert push.pushed == sum(
            len(wire.encode_json(FrameType.EVENT, 0, f.json())) for f in frames
        )
        os.write(wfd, b"\x09")  # watched again after the drain
        (frame,) = await _received(peer, 1)
        assert frame.json() == {"record": 9}
    finally:
        push.close()
        writer.close()
        peer.close()
        os.close(rfd)
        os.close(wfd)


async def test_a_read_that_yields_nothing_does_not_spin_and_close_stops_watching() -> None:
    rfd, wfd = os.pipe()
    writer, peer = await _pair()
    connection = StubConnection(StubSession(rfd), fail=True)
    push = EventPush(connection, StreamChannel(asyncio.StreamReader(), writer))  # type: ignore[arg-type]
    try:
        push.sync()
        os.write(wfd, b"\x01")  # readable, but the read gives nothing
        await asyncio.sleep(0.2)
        assert connection.reads == 1  # not re-armed until the client's next frame
        push.sync()  # the pump after the next chunk: watched again
        await asyncio.sleep(0.2)
        assert connection.reads == 2
        push.close()
        await asyncio.sleep(0.1)
        assert connection.reads == 2
    finally:
        push.close()
        writer.close()
        peer.close()
        os.close(rfd)
        os.close(wfd)


async def test_a_closing_connection_or_no_session_gets_no_watch() -> None:
    rfd, wfd = os.pipe()
    writer, peer = await _pair()
    connection = StubConnection(StubSession(rfd), closing=True)
    push = EventPush(connection, StreamChannel(asyncio.StreamReader(), writer))  # type: ignore[arg-type]
    try:
        push.sync()
        os.write(wfd, b"\x01")
        await asyncio.sleep(0.1)
        assert connection.reads == 0
    finally:
        push.close()
        writer.close()
        peer.close()
        os.close(rfd)
        os.close(wfd)
