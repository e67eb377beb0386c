"""Physical-device ownership across sessions: one live session per device (EBUSY).

A physical device bound to one VM's iommufd cannot be bound to another's at the same time
(the kernel's VFIO cdev answers EBUSY). The daemon arbitrates the same rule across its
sessions, whatever process runs them: a session claims a device before its first
``device_attach`` of it, and gives it back on its last detach, on ``viommu_destroy`` and at
session end. ``Registry`` is the listener's table; a session sees it through ``Claims``
(in process: ``Registry.owner``; in a session process: a request to the listener).
"""

from __future__ import annotations

from typing import Protocol


class Claims(Protocol):
    def claim(self, device: str) -> str | None:
        """Take ``device``; None when taken, else who holds it (for the error)."""

    def release(self, device: str) -> None: ...

    def name(self, vm: str) -> None:
        """The session's VM, for the message another session gets."""


class Registry:
    """device -> (owner id, description of the owner)."""

    def __init__(self) -> None:
        self._owners: dict[str, tuple[int, str]] = {}

    def claim(self, owner: int, who: str, device: str) -> str | None:
        held = self._owners.get(device)
        if held is not None and held[0] != owner:
            return held[1]
        self._owners[device] = (owner, who)
        return None

    def release(self, owner: int, device: str) -> None:
        held = self._owners.get(device)
        if held is not None and held[0] == owner:
            del self._owners[device]

    def release_all(self, owner: int) -> None:
        for device in [d for d, (o, _) in self._owners.items() if o == owner]:
            del self._owners[device]

    def held(self) -> dict[str, int]:
        return {device: owner for device, (owner, _) in self._owners.items()}

    def owner(self, owner: int, who: str) -> OwnerClaims:
        return OwnerClaims(self, owner, who)


class OwnerClaims:
    """``Claims`` of one in-process session."""

    def __init__(self, registry: Registry, owner: int, who: str) -> None:
        self.registry = registry
        self.owner = owner
        self.who = who

    def claim(self, device: str) -> str | None:
        return self.registry.claim(self.owner, self.who, device)

    def release(self, device: str) -> None:
        self.registry.release(self.owner, device)

    def name(self, vm: str) -> None:
        self.who = f"client {self.owner}, vm {vm!r}" if vm else f"client {self.owner}"


def busy_message(device: str, holder: str) -> str:
    return f"EBUSY: device {device!r} is attached by another session ({holder})"
