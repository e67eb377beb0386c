"""Session glue of the oracle: feeds it records, doorbells, responses and backend calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from viommud.host import HostConfig
from viommud.oracle import Ledger
from viommud.oracle.smmuv3 import SmmuGuest, SmmuHost
from viommud.oracle.virtio import VirtioGuest, VirtioHost
from viommud.oracle.vtd import VtdGuest, VtdHost
from viommud.trace import (
    ContextEntry,
    DeviceAttach,
    DeviceDetach,
    PasidEntry,
    Record,
    Ste,
    ViommuCreate,
    ViommuDestroy,
)


@dataclass(slots=True)
class Verifier:
    """Watches one session; ``report()`` gives the report's ``verify`` object (docs/trace-format.md
    §3.4)."""

    host: HostConfig
    ledger: Ledger = field(default_factory=Ledger)
    guests: dict[str, SmmuGuest | VtdGuest | VirtioGuest] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # device -> vIOMMU name
    smmu_host: SmmuHost = field(init=False)
    vtd_host: VtdHost = field(init=False)
    virtio_host: VirtioHost = field(init=False)

    def __post_init__(self) -> None:
        self.smmu_host = SmmuHost(self.ledger, self.owner)
        self.vtd_host = VtdHost(self.ledger, self.host)
        self.virtio_host = VirtioHost(self.ledger)

    # -- inputs -------------------------------------------------------------------------
    def before(self, record: Record) -> None:
        """Called before the daemon handles ``record``."""
        if isinstance(record, DeviceAttach):
            self.owner[record.device] = record.viommu  # calls made while attaching need it

    def after(self, record: Record, ok: bool) -> None:
        """Called once the daemon handled a config record (``ok``: it accepted it)."""
        if not ok:
            return
        if isinstance(record, ViommuCreate):
            if record.model == "smmuv3":
                self.guests[record.viommu] = SmmuGuest(record.viommu, self.host, self.ledger)
            elif record.model == "vtd":
                self.guests[record.viommu] = VtdGuest(
                    record.viommu, self.host, self.ledger, record.options
                )
            elif record.model == "virtio-iommu":
                self.guests[record.viommu] = VirtioGuest(
                    record.viommu, self.host, self.ledger, record.options
                )
            return
        guest = self.guests.get(record.viommu)
        if guest is None:
            return
        if isinstance(record, DeviceAttach):
            guest.attach(record.vid, record.device)
        elif isinstance(record, DeviceDetach):
            guest.detach(record.vid)
        elif isinstance(record, Ste) and isinstance(guest, SmmuGuest):
            guest.write_ste(record.vsid, record.data)
        elif isinstance(record, ContextEntry) and isinstance(guest, VtdGuest):
            guest.context_entry(record.sid, record.data)
        elif isinstance(record, PasidEntry) and isinstance(guest, VtdGuest):
            guest.pasid_entry(record.sid, record.pasid, record.data)
        elif isinstance(record, ViommuDestroy):
            del self.guests[record.viommu]

    def doorbell_begin(self, viommu: str, data: bytes) -> None:
        guest = self.guests.get(viommu)
        if isinstance(guest, SmmuGuest | VtdGuest):
            guest.begin(data)

    def doorbell_end(self, viommu: str, failed: set[int]) -> None:
        """Called once the doorbell was answered; ``failed`` are the refused commands'
        indices."""
        guest = self.guests.get(viommu)
        if isinstance(guest, SmmuGuest | VtdGuest):
            guest.end(failed)

    def request_begin(self, viommu: str, data: bytes) -> None:
        """A virtio-iommu request (its device-readable part) is about to be handled."""
        guest = self.guests.get(viommu)
        if isinstance(guest, VirtioGuest):
            self.virtio_host.active = True
            guest.begin(data)

    def request_end(self, viommu: str, status: str) -> None:
        """The request was answered with ``status`` (the reply the guest reads)."""
        guest = self.guests.get(viommu)
        if isinstance(guest, VirtioGuest):
            self.virtio_host.active = False
            guest.end(status == "OK")

    def call(self, ioctl: str, err: int, call: dict[str, Any], iommu: str | None) -> None:
        self.ledger.call()  # what one call removes is unordered within it, after earlier ones
        self.smmu_host.call(ioctl, err, call, iommu)
        self.vtd_host.call(ioctl, err, call, iommu)
        self.virtio_host.call(ioctl, err, call)

    # -- verdict ------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return {"enabled": True, "missed": self.ledger.missed, "over": self.ledger.over}

    def missed_needs(self) -> list[str]:
        return [
            f"{n.origin}: {n.cache} {n.place} tag={n.tag} [{n.lo:#x}, {n.hi:#x})"
            for n in self.ledger.missed_needs
        ]
