"""Host events pushed while the client is idle (docs/protocol.md §10, "Push").

After each reply the ``Connection`` already sends what the session's event queues hold.
``EventPush`` covers the time in between: it watches the queues as a VMM's event loop
watches the queue fds, and when one becomes readable it reads them and writes the EVENT
frames at once, without waiting for the client's next frame.

* The emulated kernel calls ``backend.event_notifier`` when a vEVENTQ or FAULT object (or
  the device-fault source) gets a record; that is its EPOLLIN.
* On the real /dev/iommu the vEVENTQ and FAULT fds are pollable: ``loop.add_reader``.

Either way the wake-up only schedules a drain with ``loop.call_soon``: the drain runs
between two steps of the byte pump, never while a reply is half written, so an EVENT
never splits a reply; each queue is read oldest first, so its events stay in sequence
order. A client that does not read gets no more pushed once its unsent bytes pass
``HIGH_WATER``: the records stay in the kernel's queues (whose depth and lost-events rule
then apply) and go out after the next reply.

Also here: TEST frames with ``delay_ms`` (``Connection.deferred``) are scheduled with
``loop.call_later``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from viommud.shell.channel import Channel
from viommud.shell.connection import Connection
from viommud.shell.testframe import Deferred

HIGH_WATER = 1 << 20  # bytes waiting in the transport above which nothing is pushed


class EventPush:
    """Push of one connection's host events; ``sync`` after every chunk, ``close`` at end."""

    def __init__(self, connection: Connection, channel: Channel) -> None:
        self.connection = connection
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self._backend: Any = None  # the backend whose notifier points here
        self._fds: set[int] = set()  # fds with a reader on this loop
        self._scheduled = False
        self._reader_woke = False
        self._timers: list[asyncio.TimerHandle] = []
        self.pushed = 0  # EVENT bytes written by the push (for tests and logs)

    def sync(self) -> None:
        """Follow the session (it may have been created, rebuilt or ended) and its queues.

        Call it right after each ``Connection.receive``, before the loop runs anything else:
        a queue fd the session closed in there may only have been reused by the session
        itself, so removing and adding the readers cannot touch another connection's fd."""
        connection = self.connection
        if self._timers:  # forget the ones that have fired
            now = self.loop.time()
            self._timers = [t for t in self._timers if t.when() > now]
        for deferred in connection.deferred:
            self._timers.append(self.loop.call_later(deferred.delay, self._fire, deferred))
        connection.deferred.clear()
        session = connection.session
        backend = None if session is None or connection.closing else session.backend
        if backend is not self._backend:
            self._unhook()
            if backend is not None and hasattr(backend, "event_notifier"):
                backend.event_notifier = self._wake
                self._backend = backend
        fds: set[int] = set()
        if session is not None and backend is not None and self._backend is None:
            fds = set(session.event_fds())
        # Registered afresh each time: a queue closed and another opened during the chunk
        # may have the same fd number, and epoll forgot the closed one by itself.
        for fd in self._fds:
            self.loop.remove_reader(fd)
        for fd in fds:
            self.loop.add_reader(fd, self._readable)
        self._fds = fds

    def close(self) -> None:
        """Stop watching: no push after this."""
        self._unhook()
        for fd in self._fds:
            self.loop.remove_reader(fd)
        self._fds = set()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _unhook(self) -> None:
        if self._backend is not None:
            if getattr(self._backend, "event_notifier", None) == self._wake:
                self._backend.event_notifier = None
            self._backend = None

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _readable(self) -> None:
        """A queue fd is readable (level-triggered): stop watching it until the drain."""
        for fd in self._fds:
            self.loop.remove_reader(fd)
        self._fds = set()
        self._reader_woke = True
        self._wake()

    def _flush(self) -> None:
        self._scheduled = False
        from_reader, self._reader_woke = self._reader_woke, False
        channel, connection = self.channel, self.connection
        if channel.is_closing() or connection.session is None:
            return
        buffered = channel.buffered()
        if buffered > HIGH_WATER:
            connection.log.info("event_push_paused", buffered=buffered)
            return  # the records wait in their queues; the next reply takes them
        out = connection.push_events()
        if out:
            channel.write(out)
            self.pushed += len(out)
        if from_reader and out:
            self.sync()  # watch the fds again; after a read that gave nothing (a failed
            # read leaves its record readable) only the client's next frame re-arms them

    def _fire(self, deferred: Deferred) -> None:
        with contextlib.suppress(Exception):  # the session may have ended meanwhile
            if self.connection.session is not None and not self.connection.closing:
                deferred.run()
