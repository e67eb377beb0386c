"""What a session answers for each record: frozen values until the wire.

Every vIOMMU model returns one of these; the shell turns them into bytes with exactly one
encoder per frame type (``viommud.shell.replies``) and nothing recognises a reply by its
shape. The JSON forms are documented in docs/trace-format.md ("Responses").
"""

from __future__ import annotations

from dataclasses import dataclass

from viommud.events import StatusWrite


@dataclass(frozen=True, slots=True)
class CommandError:
    """A guest command the vIOMMU refused, at ``index`` in its doorbell, with the
    guest-visible ``code`` (e.g. ``CERROR_ILL``, ``IQE``) and why."""

    index: int
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class DoorbellReply:
    """The answer to a ``cmds`` record (one doorbell).

    ``consumed`` commands were taken off the queue, ``syncs`` barriers completed.
    ``status_writes`` is None for models whose barriers write nothing the guest reads
    (SMMUv3); for VT-d it lists the wait descriptors' status writes, in order (maybe none).
    ``interrupts`` (VT-d): the indices of the completed wait descriptors with IF=1, in
    order — each sets ICS.IWC and, when IWC was clear, raises the invalidation completion
    event (VT-d §6.5.2.8; docs/trace-format.md §4).
    """

    consumed: int
    syncs: int
    errors: tuple[CommandError, ...] = ()
    status_writes: tuple[StatusWrite, ...] | None = None
    interrupts: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestReply:
    """The answer to a virtio-iommu ``request`` record.

    ``status`` is the virtio status name (``OK``, ``INVAL``, …; ``IOERR`` when the device
    wrote nothing); ``reply`` the whole device-writable part, tail included; ``used`` the
    byte count the device reports in the used ring; ``reason`` why a request failed (None
    when its status is OK); ``faults`` fault records the device queued meanwhile.
    """

    status: str
    reply: bytes
    used: int
    reason: str | None = None
    faults: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigReply:
    """The answer to a configuration record (``viommu_create``, ``device_attach``, …)."""

    ok: bool
    error: str = ""


CONFIG_OK = ConfigReply(True)

Reply = DoorbellReply | RequestReply | ConfigReply


@dataclass(frozen=True, slots=True)
class GuestEvent:
    """One record read from a vEVENTQ of a vIOMMU (docs/protocol.md, EVENT): the kernel's
    ``sequence`` and lost-events flag, and the payload (for SMMUv3 the 32-byte event record
    with the vSID in place of the physical StreamID; empty for a lost-events header)."""

    viommu: str
    model: str
    iommu: str  # the physical IOMMU whose vIOMMU object's queue held it
    sequence: int
    lost: bool
    record: bytes = b""

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "viommu": self.viommu,
            "model": self.model,
            "iommu": self.iommu,
            "sequence": self.sequence,
            "lost": self.lost,
        }
        if self.record:
            body["record"] = self.record.hex()
        return body
