"""File descriptors a client passes with its frames (SCM_RIGHTS), sans-I/O: ints in, ints out.

Association (docs/protocol.md §12): the fds of one ``recvmsg`` are tagged with the stream
position of the last byte that ``recvmsg`` returned. The kernel hands a message's fds to
the read that returns bytes of that message and ends such a read inside it, so when a client
sends a frame and its fds in one ``sendmsg`` the tag falls inside that frame. A frame owns
every queued batch tagged before its end: MEMORY and DEVICES use them, any other frame's are
closed unread. At most ``MAX_QUEUED_FDS`` wait for their frame; more end the connection.

``parse_memory`` / ``parse_devices`` check a MEMORY / DEVICES payload against the fds that
came with it; on any refusal every one of those fds is closed.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Sequence
from typing import Any

from protocols.frames import FrameType
from viommud.guest_memory import GuestResourceError, RamRegion, close_all
from viommud.session import Session

MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD: the kernel's bound on one sendmsg's fds
# fds received and not yet taken by their frame, per connection: at a handoff they travel in
# one message with the client's socket (viommud.shell.sessions.Handed.start)
MAX_QUEUED_FDS = MAX_FDS_PER_MESSAGE - 1


class PassedFdError(GuestResourceError):
    """A MEMORY / DEVICES frame refused before the session saw it (its fds are closed)."""


class FdQueue:
    """Received fds waiting for the frame they came with, oldest first."""

    __slots__ = ("_batches", "count", "limit")

    def __init__(self, limit: int = MAX_QUEUED_FDS) -> None:
        self._batches: deque[tuple[int, list[int]]] = deque()
        self.count = 0
        self.limit = limit

    def add(self, position: int, fds: Sequence[int]) -> bool:
        """Queue ``fds`` that came with the stream byte at ``position``; False (and every
        queued fd closed) when that makes more than ``limit``."""
        self._batches.append((position, list(fds)))
        self.count += len(fds)
        if self.count > self.limit:
            self.close()
            return False
        return True

    def take(self, end: int) -> list[int]:
        """The fds of the frame whose bytes end at stream position ``end`` (exclusive)."""
        out: list[int] = []
        batches = self._batches
        while batches and batches[0][0] < end:
            out += batches.popleft()[1]
        self.count -= len(out)
        return out

    def export(self, base: int) -> list[tuple[int, list[int]]]:
        """Every queued batch, positions made relative to ``base``; the queue forgets them
        (the caller owns the fds: a session process takes them over)."""
        out = [(position - base, fds) for position, fds in self._batches]
        self._batches.clear()
        self.count = 0
        return out

    def close(self) -> None:
        for _, fds in self._batches:
            close_all(fds)
        self._batches.clear()
        self.count = 0


# -- MEMORY and DEVICES payloads (docs/protocol.md §12) -----------------------------------
def _uint(obj: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PassedFdError(errno.EINVAL, f"{where}: '{key}' must be a non-negative integer")
    return value


def _index(value: Any, where: str, fds: Sequence[int], used: set[int]) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PassedFdError(errno.EINVAL, f"{where}: 'fd' must be an integer index")
    if not 0 <= value < len(fds):
        raise PassedFdError(
            errno.EBADF,
            f"{where}: fd index {value} out of range (the frame came with {len(fds)} fds)",
        )
    if value in used:
        raise PassedFdError(errno.EINVAL, f"{where}: fd index {value} is used twice")
    used.add(value)
    return value


def _all_used(kind: str, used: set[int], fds: Sequence[int]) -> None:
    unused = [i for i in range(len(fds)) if i not in used]
    if unused:
        raise PassedFdError(
            errno.EINVAL, f"{kind}: the frame came with fds it does not use (indexes {unused})"
        )


def parse_memory(body: Any, fds: Sequence[int]) -> list[RamRegion]:
    """``{"regions": [{"gpa", "size", "fd", "offset"?}]}`` with ``fds``; PassedFdError (every fd
    closed) when it does not match."""
    try:
        if not isinstance(body, dict) or not isinstance(body.get("regions"), list):
            raise PassedFdError(errno.EINVAL, 'MEMORY: payload must be {"regions": [...]}')
        items = body["regions"]
        if not items:
            raise PassedFdError(errno.EINVAL, "MEMORY: no region")
        used: set[int] = set()
        regions = []
        for i, item in enumerate(items):
            where = f"MEMORY region {i}"
            if not isinstance(item, dict):
                raise PassedFdError(errno.EINVAL, f"{where}: must be an object")
            gpa, size = _uint(item, "gpa", where), _uint(item, "size", where)
            offset = _uint(item, "offset", where, 0)
            k = _index(item.get("fd"), where, fds, used)
            regions.append(RamRegion(gpa, size, fds[k], offset))
        _all_used("MEMORY", used, fds)
    except PassedFdError:
        close_all(fds)
        raise
    return regions


def parse_devices(body: Any, fds: Sequence[int]) -> list[tuple[str, int]]:
    """``{"devices": {name: fd index}}`` with ``fds``, as (device, fd) pairs; PassedFdError (every
    fd closed) when it does not match."""
    try:
        if not isinstance(body, dict) or not isinstance(body.get("devices"), dict):
            raise PassedFdError(errno.EINVAL, 'DEVICES: payload must be {"devices": {...}}')
        items = body["devices"]
        if not items:
            raise PassedFdError(errno.EINVAL, "DEVICES: no device")
        used: set[int] = set()
        pairs = [
            (str(name), fds[_index(k, f"DEVICES {name!r}", fds, used)]) for name, k in items.items()
        ]
        _all_used("DEVICES", used, fds)
    except PassedFdError:
        close_all(fds)
        raise
    return pairs


def give(
    frame_type: int, session: Session, body: Any, fds: Sequence[int], *, attached: set[str]
) -> dict[str, Any]:
    """Hand a MEMORY / DEVICES frame's fds to ``session.resources``; the RESPONSE body.
    PassedFdError or GuestResourceError (both ValueErrors, text errno name first) with every fd
    closed. ``attached``: the devices a vIOMMU of the session has attached now."""
    resources = session.resources
    if frame_type == FrameType.MEMORY:
        if session.viommus:
            close_all(fds)
            raise PassedFdError(errno.EBUSY, "MEMORY must come before the session's first vIOMMU")
        regions = parse_memory(body, fds)
        resources.set_memory(regions)
        return {"ok": True, "regions": len(regions), "bytes": sum(r.size for r in regions)}
    pairs = parse_devices(body, fds)
    try:
        for device, _ in pairs:
            try:
                session.backend.host.device(device)
            except KeyError:
                why = f"DEVICES: the host has no device {device!r}"
                raise PassedFdError(errno.ENODEV, why) from None
            if device in attached:
                raise PassedFdError(
                    errno.EBUSY, f"DEVICES: {device!r} is already attached: pass its fd before"
                )
            if device in resources.devices:
                raise PassedFdError(errno.EEXIST, f"DEVICES: {device!r} was already given an fd")
    except PassedFdError:
        close_all(fds)
        raise
    for device, fd in pairs:
        resources.add_device(device, fd)
    return {"ok": True, "devices": [device for device, _ in pairs]}


def split(data: bytes, batches: list[tuple[int, list[int]]]) -> list[tuple[bytes, list[int]]]:
    """``data`` cut after the byte each batch of fds is tagged with: the ``receive`` calls
    that place every batch where it was (a session process takes over a connection)."""
    out: list[tuple[bytes, list[int]]] = []
    at, early = 0, list[int]()
    for position, fds in batches:
        end = min(max(position + 1, at), len(data))
        if end > at:
            out.append((data[at:end], [*early, *fds]))
            at, early = end, []
        elif out:
            out[-1][1].extend(fds)
        else:
            early += fds
    if at < len(data):
        out.append((data[at:], early))
    elif out:
        out[-1][1].extend(early)
    else:
        close_all(early)  # no byte to place them with (data is empty)
    return out
