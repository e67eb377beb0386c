"""UnixChannel: recvmsg with the fds of each message, read-ahead, deadlines that lose nothing."""

from __future__ import annotations

import asyncio
import os
import socket

from tests.shell.conftest import Memfds
from viommud.shell.channel import UnixChannel


async def test_fds_come_with_the_bytes_of_their_message(memfds: Memfds) -> None:
    ours, theirs = socket.socketpair()
    channel = UnixChannel(ours)
    fd = memfds()
    theirs.sendall(b"abc")
    socket.send_fds(theirs, [b"def"], [fd, fd])
    theirs.sendall(b"ghi")
    data, fds, lost = await channel.read()
    assert (data, len(fds), lost) == (b"abcdef", 2, False)  # the read ends in their message
    assert {os.readlink(f"/proc/self/fd/{n}") for n in fds} == {os.readlink(f"/proc/self/fd/{fd}")}
    assert await channel.read() == (b"ghi", [], False)
    for n in [*fds, fd]:
        os.close(n)
    theirs.close()
    assert await channel.read() == (b"", [], False)
    channel.close()


async def test_a_chunk_read_while_nobody_waits_is_kept_in_order() -> None:
    ours, theirs = socket.socketpair()
    channel = UnixChannel(ours)
    waiting = asyncio.create_task(channel.read())
    await asyncio.sleep(0)  # the read waits: the callback reads from now on
    theirs.sendall(b"one")
    assert await waiting == (b"one", [], False)
    theirs.sendall(b"two")
    await asyncio.sleep(0.05)  # the callback reads "two" ahead, nobody waiting
    theirs.sendall(b"three")
    await asyncio.sleep(0.05)  # a chunk waits: the channel stops watching
    assert await channel.read() == (b"two", [], False)
    assert await channel.read() == (b"three", [], False)
    channel.close()
    theirs.close()


async def test_a_deadline_after_the_callback_read_loses_nothing() -> None:
    ours, theirs = socket.socketpair()
    channel = UnixChannel(ours)
    waiting = asyncio.create_task(channel.read())
    await asyncio.sleep(0)
    theirs.sendall(b"late")
    channel._ready()  # the loop's callback reads it for the waiting read ...
    waiting.cancel()  # ... and a deadline cancels that read before it resumes
    await asyncio.sleep(0.05)
    assert waiting.cancelled()
    async with asyncio.timeout(2):  # without the chunk kept, this read would wait forever
        assert await channel.read() == (b"late", [], False)
    channel.close()
    theirs.close()


async def test_close_closes_the_fds_of_a_chunk_read_ahead(memfds: Memfds) -> None:
    ours, theirs = socket.socketpair()
    channel = UnixChannel(ours)
    waiting = asyncio.create_task(channel.read())
    await asyncio.sleep(0)
    theirs.sendall(b"x")
    await waiting
    socket.send_fds(theirs, [b"y"], [memfds()])
    await asyncio.sleep(0.05)  # read ahead
    os.close(memfds.made[0][0])
    assert memfds.open_names() != set()
    channel.close()
    assert memfds.open_names() == set()
    theirs.close()
