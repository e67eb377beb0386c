"""The dispatcher: turns one doorbell's events into the fewest backend calls that keep the
guest's guarantees (DESIGN.md point 4), and maps host failures back to guest commands.

SMMUv3 plan (``SmmuDispatcher.run``):

* forwarded invalidations (TLBI_NH_*, TLBI_NSNH_ALL, CFGI_CD, CFGI_CD_ALL, ATC_INV — the
  commands the kernel accepts, iommufd.md §3.3) are collected per iommufd vIOMMU object and
  sent as one ``IOMMU_HWPT_INVALIDATE`` array call each when the doorbell ends. Commands
  that name a stream go to the physical SMMU of that stream's vDEVICE only (and are dropped,
  as QEMU drops them, when the vSID has no device); the others go to every physical SMMU
  the vIOMMU holds objects on;
* CFGI_STE / CFGI_STE_RANGE / CFGI_ALL are handled by the VMM (topology.install_ste); the
  work collected before them is flushed first, so host order follows guest order;
* CMD_SYNC is never forwarded: every call is synchronous, so when the doorbell's calls have
  returned, every sync in it is complete;
* a failed entry k becomes CERROR_ILL on the guest command that produced it. The ARM driver
  issues entries in groups of 63 and, on a bad entry, may not have issued the group's earlier
  entries although it counts them (iommufd.md §3.4), so everything from the start of that
  group is re-sent, minus the bad entry, until the call succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols import iommufd as uapi
from viommud.backend.calls import Iommufd
from viommud.dispatcher import DispatchStats
from viommud.events import (
    Barrier,
    Event,
    GuestError,
    Invalidation,
    Scope,
    StreamTableInvalidated,
)
from viommud.frontends.smmuv3.frontend import CERROR_ILL, SmmuV3Frontend
from viommud.topology import TopologyError
from viommud.topology.smmuv3 import PiommuSlot, SmmuTopology

ARM_ISSUE_GROUP = 63  # CMDQ_BATCH_ENTRIES - 1 commands per host CMD_SYNC (iommufd.md §3.4)
ARM_ENTRY_LEN = 16


@dataclass(slots=True)
class _Pending:
    """Entries collected for one vIOMMU object, with the guest command each came from."""

    slot: PiommuSlot
    entries: list[bytes] = field(default_factory=list)
    origins: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SmmuDispatcher:
    frontend: SmmuV3Frontend
    topology: SmmuTopology
    iommufd: Iommufd
    stats: DispatchStats = field(default_factory=DispatchStats)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _first_barrier: int = 0  # barrier number the pending work belongs to

    def run(self, events: list[Event]) -> list[GuestError]:
        """Execute one doorbell's events; returns the guest errors, in command order."""
        errors: list[GuestError] = []
        stats = self.stats
        for event in events:
            kind = type(event)
            if kind is Invalidation:
                assert isinstance(event, Invalidation)
                self._collect(event)
            elif kind is Barrier:
                stats.barriers += 1
            elif kind is StreamTableInvalidated:
                assert isinstance(event, StreamTableInvalidated)
                self._flush(errors)
                self._install(event, errors)
            else:
                assert isinstance(event, GuestError)
                errors.append(event)
        self._flush(errors)
        if len(errors) > 1:
            errors.sort(key=lambda e: e.index)
        return errors

    # -- routing ------------------------------------------------------------------------
    def _collect(self, inv: Invalidation) -> None:
        topology = self.topology
        if inv.scope is Scope.DEVICE:
            assert inv.device is not None
            vdev = topology.vdevice(inv.device)
            if vdev is None:
                self.stats.dropped += 1
                return
            targets = [topology.slots[vdev.iommu]]
        else:
            targets = list(topology.slots.values())
        if not targets:
            return
        if not self._pending:
            self._first_barrier = self.stats.barriers + 1
        self.stats.forwarded += 1
        self.stats.baseline_invalidate_calls += len(targets)
        pending = self._pending
        for slot in targets:
            bucket = pending.get(slot.iommu)
            if bucket is None:
                bucket = pending[slot.iommu] = _Pending(slot)
            bucket.entries.append(inv.raw)
            bucket.origins.append(inv.index)

    # -- execution ----------------------------------------------------------------------
    def _flush(self, errors: list[GuestError]) -> None:
        if not self._pending:
            return
        self.iommufd.log.barrier = self._first_barrier
        for bucket in self._pending.values():
            self._send(bucket, errors)
        self._pending.clear()

    def _send(self, bucket: _Pending, errors: list[GuestError]) -> None:
        entries, origins = bucket.entries, bucket.origins
        while entries:
            result = self.iommufd.invalidate(
                bucket.slot.iommu,
                object_kind="viommu",
                object_id=bucket.slot.viommu_id,
                data_type=uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                entry_len=ARM_ENTRY_LEN,
                entries=entries,
            )
            if result.errno == 0:
                return
            bad = min(result.done, len(entries) - 1)
            self.frontend.record_error(CERROR_ILL)
            errors.append(
                GuestError(
                    origins[bad],
                    CERROR_ILL,
                    f"host IOMMU_HWPT_INVALIDATE failed on this command (errno {result.errno})",
                    entries[bad],
                )
            )
            # Entries of the group holding the bad one may not have reached the hardware.
            certain = bad - bad % ARM_ISSUE_GROUP
            entries = entries[certain:bad] + entries[bad + 1 :]
            origins = origins[certain:bad] + origins[bad + 1 :]

    def _install(self, event: StreamTableInvalidated, errors: list[GuestError]) -> None:
        frontend = self.frontend
        failures: list[str] = []
        for vdev in self.topology.vdevices_in(event.first, event.last):
            ste = frontend.stream_table.get(vdev.vid)
            if ste is None:
                continue  # the guest never wrote this STE: nothing to read (QEMU does the same)
            try:
                self.topology.install_ste(vdev.vid, ste)
            except TopologyError as exc:
                failures.append(str(exc))
        if failures:
            frontend.record_error(CERROR_ILL)
            errors.append(GuestError(event.index, CERROR_ILL, "; ".join(failures), event.raw))
