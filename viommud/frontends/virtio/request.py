"""One virtio-iommu request in flight: its undo log, its refusal and the device's reply.

A request's handlers record how to undo each state change they make (``Pending.undo``), so
that a refusal, by the frontend's own checks (``Refused``) or by the host (``complete`` with
a status), leaves the guest-visible state as it was (virtio-iommu.md §3: a failed request
has no effect).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from protocols.virtio_iommu import Status

__all__ = ["Pending", "Refused", "Reply", "RequestPendingError"]


class RequestPendingError(RuntimeError):
    """``receive_request`` was called before the previous request was completed."""


class Refused(Exception):  # noqa: N818 - control flow: the request fails with ``status``
    """A guest-visible check failed: the request's reply is ``status``."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Pending:
    """The request being handled: what the device will write back, and the undo log."""

    request_type: int
    status: Status | None  # None: nothing to write (used length 0)
    writable: int
    reason: str = ""
    properties: bytes = b""  # PROBE: the properties area
    undo: list[Callable[[], None]] = field(default_factory=list)

    def rollback(self) -> None:
        """Undo every state change of the request, newest first."""
        undo = self.undo
        while undo:
            undo.pop()()

    def refuse(self, refused: Refused) -> None:
        """The request failed a check: undo its changes and answer ``refused.status``."""
        self.rollback()
        self.status = refused.status
        self.reason = refused.reason


@dataclass(frozen=True, slots=True)
class Reply:
    """What the device wrote for one request.

    ``data`` is the whole device-writable part as written, tail included; empty when the
    device wrote nothing (used length 0, which a driver takes as IOERR).
    """

    request_type: int
    status: Status | None
    data: bytes
    reason: str = ""

    @property
    def used(self) -> int:
        return len(self.data)

    @property
    def code(self) -> str:
        """The status name a report counts: ``IOERR`` for a used length of 0."""
        return "IOERR" if self.status is None else self.status.name
