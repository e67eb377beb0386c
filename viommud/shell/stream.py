"""One connection's byte pump: socket -> ``Connection`` -> socket, with its deadlines.

Shared by the in-process server and the session processes (viommud.shell.worker). The pump
reads a chunk (on a Unix socket with the fds that came with it: viommud.shell.channel), lets
the sans-I/O ``Connection`` answer every whole frame in it, writes the replies and waits for
them to drain before reading again, so a client that does not read its replies stops being
read (its buffered bytes stay bounded by one chunk's replies).

Deadlines (docs/operations.md §10): a connection has ``handshake_timeout`` seconds to get a
HELLO accepted, a session may stay silent ``idle_timeout`` seconds (0: forever); either ends
with a fatal ERROR. Shutdown cancels the pump's task: the frames the client already sent are
answered, then it gets a fatal ERROR ``shutting down`` (seq 0) and the connection closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from viommud.shell.channel import Channel
from viommud.shell.connection import Connection
from viommud.shell.limits import Limits
from viommud.shell.push import EventPush
from viommud.shell.replies import encode_error

SHUTTING_DOWN = "shutting down"
QUIET = 0.05  # seconds without input after which a stopping session is told goodbye


async def pump(
    channel: Channel,
    connection: Connection,
    limits: Limits,
    *,
    stopping: Callable[[], bool],
    tick: Callable[[], None] | None = None,
) -> str:
    """Serve ``connection`` until it ends; returns why: ``eof``, ``closed`` (a fatal ERROR
    was sent), ``handoff`` (HELLO accepted by a listener that hands sessions over),
    ``timeout`` or ``shutdown``. ``tick`` is called after every chunk."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = EventPush(connection, channel)  # host events pushed between replies
    events.sync()
    try:
        while True:
            if connection.closing:
                return "closed"
            if connection.handed_off is not None:
                return "handoff"
            limit, why = _deadline(connection, limits, started, loop.time())
            if limit is None:
                data, fds, lost = await channel.read()
            else:
                try:
                    async with asyncio.timeout(max(limit, 0.0)):
                        data, fds, lost = await channel.read()
                except TimeoutError:
                    connection.log.info("client_timed_out", reason=why)
                    events.close()  # nothing after the last word
                    channel.write(encode_error(0, why, fatal=True))
                    await channel.drain()
                    return "timeout"
            if fds or lost:
                out = connection.receive(data, fds, truncated=lost)
            else:
                out = connection.receive(data)
            if tick is not None:
                tick()
            if out:
                channel.write(out)
            events.sync()
            if out:
                await channel.drain()
            if not data:
                return "eof"
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not stopping() or task is None:
            raise
        task.uncancel()  # this cancel asked for a goodbye; a second one ends it at once
        events.close()
        await _goodbye(channel, connection)
        return "shutdown"
    finally:
        events.close()


def _deadline(
    connection: Connection, limits: Limits, started: float, now: float
) -> tuple[float | None, str]:
    if connection.session is None and limits.handshake_timeout > 0:
        return started + limits.handshake_timeout - now, (
            f"no HELLO accepted within {limits.handshake_timeout:g} s"
        )
    if connection.session is not None and limits.idle_timeout > 0:
        return limits.idle_timeout, f"idle for {limits.idle_timeout:g} s"
    return None, ""


async def _goodbye(channel: Channel, connection: Connection) -> None:
    """Answer what the client already sent (until it is quiet for ``QUIET`` seconds), then
    send the fatal ERROR ``shutting down``."""
    while not connection.closing:
        try:
            async with asyncio.timeout(QUIET):
                data, fds, lost = await channel.read()
        except TimeoutError:
            break
        out = connection.receive(data, fds, truncated=lost)
        if out:
            channel.write(out)
            await channel.drain()
        if not data:
            return
    if not connection.closing:
        channel.write(encode_error(0, SHUTTING_DOWN, fatal=True))
        await channel.drain()
