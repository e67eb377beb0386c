"""The oracle's VT-d models: what the guest asked for, and what a host call removed.

Guest side (``VtdGuest``, one per VT-d vIOMMU). It decodes the guest's descriptors with its
own ``VtdFrontend`` (a decoder, shared; never the dispatcher) and keeps the guest's context
and PASID entries; at every context- or PASID-cache invalidation it re-reads every device's
binding (DID, PASID, nested or not). Per descriptor:

* IOTLB / PASID-IOTLB (global, domain, page): the IOTLB entries of every device whose
  binding is nested in that domain (and PASID) must go, by the next wait descriptor;
* device-TLB / PASID device-TLB: the device's ATC (host device with ATS, nested binding).
  Its entries can only be stale since the latest IOTLB-class invalidation that overlapped
  the range for that device (the guest changes a translation, invalidates the IOTLB, then
  the device TLB): removals issued since then count. That is the argument that lets the
  dispatcher elide a device-TLB invalidation already covered by a host flush, and this is
  where it is checked.

Host side (``VtdHost``): devices bound and attached (VFIO calls in the log); an
``IOMMU_HWPT_INVALIDATE`` of a VT-d nested HWPT removes, for each entry the kernel handled
(``entry_num``; per-entry driver), the IOTLB and device-TLB entries of the range for every
device attached to that HWPT (iommufd.md §4.3).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from viommud.events import (
    Barrier,
    Cache,
    ContextCacheInvalidated,
    DomainInvalidation,
    GuestError,
    Invalidation,
    PasidCacheInvalidated,
)
from viommud.frontends.vtd.frontend import VtdFeatures, VtdFrontend
from viommud.guest.vtd import LegacyContext, decode_context_entry, decode_pasid_entry
from viommud.host import HostConfig
from viommud.oracle import DEVTLB, FULL, IOTLB, Ledger, Need, Removal
from viommud.topology.vtd import Binding, Mode, legacy_binding, pasid_binding

HISTORY = 256  # IOTLB-class needs remembered per device (for device-TLB 'since')
U64_MAX = (1 << 64) - 1


def _span(addr: int, size: int) -> tuple[int, int]:
    return FULL if size == 0 else (addr, addr + size)


@dataclass(slots=True)
class _Device:
    device: str
    ats: bool
    binding: Binding = field(default_factory=lambda: Binding(Mode.BLOCKED))
    history: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=HISTORY))


@dataclass(slots=True)
class VtdGuest:
    name: str
    host: HostConfig
    ledger: Ledger
    options: dict[str, Any]
    decoder: VtdFrontend = field(init=False)
    devices: dict[int, _Device] = field(default_factory=dict)
    _events: list[Any] = field(default_factory=list)
    _since: int = 0

    def __post_init__(self) -> None:
        self.decoder = VtdFrontend(VtdFeatures.from_options(self.options))

    def attach(self, sid: int, device: str) -> None:
        self.devices[sid] = _Device(device, self.host.device(device).ats)

    def detach(self, sid: int) -> None:
        self.devices.pop(sid, None)

    def context_entry(self, sid: int, data: bytes) -> None:
        self.decoder.write_context_entry(sid, data)

    def pasid_entry(self, sid: int, pasid: int, data: bytes) -> None:
        self.decoder.write_pasid_entry(sid, pasid, data)

    def begin(self, data: bytes) -> None:
        self._since = self.ledger.begin()
        try:
            self.decoder.receive_data(data)
        except ValueError:
            self._events = []
            return
        self._events = self.decoder.events()

    def end(self, refused: set[int]) -> None:
        ledger = self.ledger
        for event in self._events:
            if isinstance(event, Barrier):
                ledger.barrier_reached()
            elif isinstance(event, GuestError) or event.index in refused:
                continue
            elif isinstance(event, ContextCacheInvalidated | PasidCacheInvalidated):
                self._reread()
            elif isinstance(event, DomainInvalidation):
                self._iotlb(event)
            elif isinstance(event, Invalidation) and event.caches & Cache.DEVICE_TLB:
                self._device_tlb(event)
        ledger.settle()

    def _reread(self) -> None:
        table = self.decoder.context_table
        for sid, dev in self.devices.items():
            raw = table.get(sid)
            if raw is None:
                continue  # never written: the daemon leaves the device where it was
            ctx = decode_context_entry(raw)
            if isinstance(ctx, LegacyContext):
                dev.binding = legacy_binding(ctx)
            elif not ctx.present or ctx.reserved:
                dev.binding = Binding(Mode.BLOCKED)
            else:
                entry = self.decoder.pasid_table.get((sid, ctx.rid_pasid))
                decoded = None if entry is None else decode_pasid_entry(entry)
                dev.binding = pasid_binding(decoded, ctx.rid_pasid)

    def _iotlb(self, event: DomainInvalidation) -> None:
        lo, hi = _span(event.addr, event.size)
        for dev in self.devices.values():
            binding = dev.binding
            if binding.mode is not Mode.NESTED:
                continue
            if event.domain is not None and binding.did != event.domain:
                continue
            if event.pasid is not None and binding.pasid != event.pasid:
                continue
            need = Need(
                IOTLB,
                (dev.device,),
                None,
                lo,
                hi,
                event.leaf,
                0,
                f"{self.name}[{event.index}] iotlb",
            )
            self.ledger.need(need, self._since, due=False)
            dev.history.append((lo, hi, self._since))

    def _device_tlb(self, event: Invalidation) -> None:
        dev = self.devices.get(event.device if event.device is not None else -1)
        if dev is None or not dev.ats or dev.binding.mode is not Mode.NESTED:
            return
        lo, hi = _span(event.addr, event.size)
        since = max((s for a, b, s in dev.history if a < hi and lo < b), default=self._since)
        need = Need(
            DEVTLB, (dev.device,), None, lo, hi, False, 0, f"{self.name}[{event.index}] devtlb"
        )
        self.ledger.need(need, since, due=False)


@dataclass(slots=True)
class VtdHost:
    """Devices bound and attached, and what VT-d nested invalidations removed."""

    ledger: Ledger
    host: HostConfig
    devids: dict[int, str] = field(default_factory=dict)
    attached: dict[str, int] = field(default_factory=dict)  # device -> pt_id

    def call(self, ioctl: str, err: int, call: dict[str, Any], iommu: str | None) -> None:
        if ioctl == "IOMMU_HWPT_INVALIDATE":
            if (
                call.get("data_type") == "HWPT_VTD_S1"
                and call.get("object", {}).get("kind") == "hwpt"
            ):
                self._invalidate(call)
            return
        if err:
            return
        args, out = call.get("args", {}), call.get("out", {})
        if ioctl == "VFIO_DEVICE_BIND_IOMMUFD":
            self.devids[out["out_devid"]] = args["device"]
        elif ioctl == "VFIO_DEVICE_ATTACH_IOMMUFD_PT":
            device = self.devids.get(args["dev_id"])
            if device is not None:
                self.attached[device] = args["pt_id"]
        elif ioctl == "VFIO_DEVICE_DETACH_IOMMUFD_PT":
            device = self.devids.get(args["dev_id"])
            if device is not None:
                self.attached.pop(device, None)

    def _invalidate(self, call: dict[str, Any]) -> None:
        hwpt = call["object"]["id"]
        devices = [d for d, pt in self.attached.items() if pt == hwpt]
        for raw in call["entries"][: call["entry_num"]]:
            data = bytes.fromhex(raw)
            addr = int.from_bytes(data[0:8], "little")
            npages = int.from_bytes(data[8:16], "little")
            leaf = bool(data[16] & 1)
            lo, hi = FULL if npages == U64_MAX else (addr, addr + npages * 4096)
            entry = self.ledger.new_entry()
            for device in devices:
                self.ledger.remove(Removal(IOTLB, (device,), None, lo, hi, leaf), entry)
                if self.host.device(device).ats:
                    self.ledger.remove(Removal(DEVTLB, (device,), None, lo, hi), entry)
