"""Test support for the emulated iommufd: inspection, cache filling and fault injection.

Nothing here is part of the kernel being emulated: these helpers let a test see what the
emulator did (the host command queues, the VT-d flushes, the caches and the journal of
what each call removed from them), put entries in the caches as DMA would, and inject
host-side errors and events. Each takes the ``EmulatedIommufd`` (any ``IommufdContext``)
as its first argument and reads its state directly.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from protocols import iommufd as uapi
from protocols.models import HostIommu
from viommud.backend.base import DeviceFault
from viommud.backend.emulator.caches import (
    AtcEntry,
    CacheView,
    ConfigEntry,
    Removal,
    TlbEntry,
    granule_level_size,
)
from viommud.backend.emulator.context import IommufdContext
from viommud.backend.emulator.driver import EntryFault
from viommud.backend.emulator.intel import VtdFlush
from viommud.backend.emulator.objects import (
    DeviceObject,
    HwptNestedObject,
    VdeviceObject,
    ViommuObject,
)
from viommud.backend.emulator.usercopy import PAGE_SIZE

__all__ = [
    "atc",
    "bound_device",
    "caches",
    "clear_faults",
    "clear_issued",
    "dma",
    "inject_cmdq_error",
    "inject_device_fault",
    "inject_event",
    "inject_invalidate_error",
    "inject_iopf",
    "issued",
    "last_removed",
    "mock_devices",
    "populate_atc",
    "populate_config",
    "populate_iotlb",
    "removals",
    "tombstones",
    "vtd_flushes",
]


def tombstones(be: IommufdContext) -> list[int]:
    """IDs of vDEVICEs whose device went away: taken until close, but not objects."""
    return sorted(be._tombstones)


def issued(be: IommufdContext, iommu_id: str) -> list[bytes]:
    """Commands that reached the host command queue of physical SMMU ``iommu_id``."""
    return list(be._units[iommu_id].cmdq)


def clear_issued(be: IommufdContext) -> None:
    """Forget the host command queues and the VT-d flushes recorded so far."""
    for unit in be._units.values():
        unit.cmdq.clear()
    be._vtd_flushes.clear()


def vtd_flushes(be: IommufdContext) -> list[VtdFlush]:
    """VT-d stage-1 invalidations carried out, in order."""
    return list(be._vtd_flushes)


def inject_cmdq_error(be: IommufdContext, iommu_id: str, err: int = errno.ETIMEDOUT) -> None:
    """Make the next command-queue issue on ``iommu_id`` fail with ``err`` (§3.4)."""
    be._units[iommu_id].pending_error = err


def inject_invalidate_error(
    be: IommufdContext,
    iommu_id: str,
    entry: bytes | Callable[[bytes], bool],
    *,
    err: int | None = None,
    at: Literal["entry", "issue"] = "entry",
    times: int | None = 1,
) -> EntryFault:
    """Make ``IOMMU_HWPT_INVALIDATE`` entries on physical IOMMU ``iommu_id`` fail: those equal
    to ``entry`` (or for which it is true), as the VMM passed them (ARM: the guest command,
    before the kernel writes the VMID or SID; VT-d: the ``iommu_hwpt_vtd_s1_invalidate``),
    ``times`` times (None: every time). How the call fails is the kernel's own:

    * ``at="entry"``: the entry is refused. ARM: as ``arm_vsmmu_convert_user_cmd`` refusing
      it (``err`` default EIO; ``entry_num`` = its index; the earlier entries of its 63-group
      never reach the queue; with the pending series, nothing of its chunk, ``entry_num`` =
      the chunk's start). VT-d: as ``intel_nested_cache_invalidate_user`` refusing it
      (``err`` default EINVAL; ``entry_num`` = its index; the earlier entries were done).
    * ``at="issue"`` (ARM): the issue of the 63-group (pending: chunk) holding it fails
      after the group reached the queue (``err`` default ETIMEDOUT, a CMD_SYNC timeout);
      ``entry_num`` = the group's last index (mainline) or the chunk's start (pending).

    Returns the fault; its ``hits`` counts the failures so far."""
    unit = be._units[iommu_id]
    if err is None:
        vtd = unit.unit.model == HostIommu.INTEL_VTD
        err = errno.ETIMEDOUT if at == "issue" else errno.EINVAL if vtd else errno.EIO
    match = entry if callable(entry) else entry.__eq__
    fault = EntryFault(match, err, at, times)
    unit.faults.append(fault)
    return fault


def clear_faults(be: IommufdContext) -> None:
    """Forget every fault ``inject_invalidate_error`` armed."""
    for unit in be._units.values():
        unit.faults.clear()


def mock_devices(be: IommufdContext) -> dict[int, str]:
    """Device object id -> device name of the selftest mock devices alive."""
    return {
        obj.id: obj.pdev.id
        for obj in be._objects.values()
        if isinstance(obj, DeviceObject) and obj.pdev.iommu == HostIommu.SELFTEST
    }


def caches(be: IommufdContext, iommu_id: str) -> CacheView:
    """IOTLB and configuration cache of ``iommu_id`` and the ATCs of its devices."""
    devices = sorted(d for d, p in be._pdevs.items() if p.iommu == iommu_id)
    return be.cache_model.view(iommu_id, devices)


def atc(be: IommufdContext, device: str) -> tuple[AtcEntry, ...]:
    """The ATC / device TLB of host device ``device``."""
    return tuple(be.cache_model.atc.get(device, ()))


def populate_iotlb(be: IommufdContext, iommu_id: str, entry: TlbEntry) -> None:
    """Put ``entry`` in the IOTLB of ``iommu_id`` (no check that DMA could make it)."""
    if iommu_id not in be._units:
        raise KeyError(iommu_id)
    be.cache_model.add_iotlb(iommu_id, entry)


def populate_atc(be: IommufdContext, device: str, entry: AtcEntry) -> None:
    """Put ``entry`` in the ATC of ``device``; ValueError unless its ATS is enabled."""
    dev = bound_device(be, device)
    hwpt = be._objects.get(dev.hwpt_id) if dev.hwpt_id else None
    if not be.driver(dev.pdev.iommu).ats_enabled(dev, hwpt):
        raise ValueError(f"ATS is not enabled for {device}")
    be.cache_model.add_atc(device, entry)


def populate_config(be: IommufdContext, iommu_id: str, entry: ConfigEntry) -> None:
    """Put ``entry`` in the configuration cache of ``iommu_id``."""
    if iommu_id not in be._units:
        raise KeyError(iommu_id)
    be.cache_model.add_config(iommu_id, entry)


def dma(
    be: IommufdContext,
    device: str,
    iova: int,
    *,
    size: int = PAGE_SIZE,
    granule: int = PAGE_SIZE,
    asid: int = 0,
    ssid: int | None = None,
    walk: bool = True,
    global_: bool = False,
) -> list[TlbEntry | AtcEntry | ConfigEntry]:
    """Fill the caches as a translated DMA of ``device`` at ``iova`` would.

    The IOTLB gets a leaf entry of ``size`` (a page or block of the ``granule``) tagged
    from the device's attachment (``asid`` is the guest's ASID for an SMMUv3 stage-1
    STE; VT-d nested entries carry PASID 0), and with ``walk`` the walk-cache entries
    of the table levels above it (levels 1 .. leaf-1); the ATC gets the translation
    (with ``ssid`` as its PASID) when the device's ATS is enabled; the configuration
    cache gets the STE (and the CD for a stage-1 STE) or the context and PASID
    entries. Returns what was added; ValueError when such a DMA cannot be cached.
    """
    dev = bound_device(be, device)
    if not dev.hwpt_id:
        raise ValueError(f"{device} is not attached")
    hwpt = be._objects[dev.hwpt_id]
    driver = be.driver(dev.pdev.iommu)
    tag, tlb_asid = driver.dma_tags(be, dev, hwpt, asid)
    level = next((lvl for lvl in (3, 2, 1) if granule_level_size(granule, lvl) == size), None)
    if level is None or granule not in (4096, 16384, 65536):
        raise ValueError(f"{size:#x} is not a page or block size of a {granule:#x} granule")
    unit = dev.pdev.iommu
    added: list[TlbEntry | AtcEntry | ConfigEntry] = []
    base = iova & ~(size - 1)
    tlb = [TlbEntry(tag, tlb_asid, base, size, True, level, granule, global_)]
    if walk:
        for lvl in range(1, level):
            region = granule_level_size(granule, lvl)
            tlb.append(TlbEntry(tag, tlb_asid, iova & ~(region - 1), region, False, lvl, granule))
    for entry in tlb:
        be.cache_model.add_iotlb(unit, entry)
        added.append(entry)
    if driver.ats_enabled(dev, hwpt):
        atc_entry = AtcEntry(base, size, ssid, global_)
        be.cache_model.add_atc(dev.pdev.id, atc_entry)
        added.append(atc_entry)
    config: list[ConfigEntry] = []
    if driver.model == HostIommu.ARM_SMMUV3:
        config.append(ConfigEntry("ste", dev.pdev.sid))
        if isinstance(hwpt, HwptNestedObject) and tlb_asid is not None:
            config.append(ConfigEntry("cd", dev.pdev.sid, ssid or 0))
    else:
        config += [ConfigEntry("context", dev.pdev.sid), ConfigEntry("pasid", dev.pdev.sid)]
    for centry in config:
        be.cache_model.add_config(unit, centry)
        added.append(centry)
    return added


def last_removed(be: IommufdContext) -> list[Removal]:
    """Cache entries removed by the most recent ioctl / close_device / close."""
    return be.cache_model.journal[be._mark :]


def removals(be: IommufdContext) -> list[Removal]:
    """Every cache entry removed so far, in order."""
    return list(be.cache_model.journal)


def inject_event(be: IommufdContext, device: str, record: bytes) -> int:
    """A host SMMUv3 event record (32 bytes) for ``device``, forwarded as a vEVENT.

    The StreamID field (evt[0] bits 63:32) is replaced by the vSID (§3.5). Returns 0,
    ENOENT when the device has no vDEVICE, EOPNOTSUPP when its vIOMMU has no vEVENTQ
    of type ARM_SMMUV3 (the event is dropped).
    """
    dev = bound_device(be, device)
    if not dev.vdevice_id:
        return errno.ENOENT
    vdev = be._objects[dev.vdevice_id]
    assert isinstance(vdev, VdeviceObject)
    viommu = be._objects[vdev.viommu_id]
    assert isinstance(viommu, ViommuObject)
    evt = uapi.decode(uapi.VeventArmSmmuv3, record)
    evt = replace(evt, evt0=(evt.evt0 & 0xFFFF_FFFF) | ((vdev.virt_id & 0xFFFF_FFFF) << 32))
    return be.report_vevent(viommu, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, bytes(uapi.encode(evt)))


def bound_device(be: IommufdContext, device: str) -> DeviceObject:
    """The DEVICE object of host device ``device``; ValueError when it is not bound."""
    for obj in be._objects.values():
        if isinstance(obj, DeviceObject) and obj.pdev.id == device:
            return obj
    raise ValueError(f"{device} is not bound to this iommufd")


def inject_iopf(
    be: IommufdContext,
    device: str,
    addr: int,
    *,
    perm: int = uapi.IOMMU_PGFAULT_PERM_READ,
    pasid: int | None = None,
    grpid: int = 0,
    last: bool = True,
) -> int:
    """A page request of host device ``device`` (PCIe PRI), as the host IOMMU driver reports
    it (VT-d: ``intel_prq_report``): one fault group of one fault to the FAULT object of the
    device's domain. Returns 0, or ENOENT when that domain has no FAULT object (the kernel's
    iopf core then answers the device itself: nothing reaches userspace)."""
    dev = bound_device(be, device)
    hwpt = be._objects.get(dev.hwpt_id) if dev.hwpt_id else None
    if not getattr(hwpt, "fault_id", 0):
        return errno.ENOENT
    flags = uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE if last else 0
    if pasid is not None:
        flags |= uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID
    fault = uapi.HwptPgfault(
        flags=flags, pasid=pasid or 0, grpid=grpid, perm=perm, addr=addr & ~(PAGE_SIZE - 1)
    )
    be.report_fault(dev, fault)
    return 0


def inject_device_fault(be: IommufdContext, fault: DeviceFault) -> None:
    """A DMA fault of a host device outside any FAULT object (a translation fault on a
    kernel-managed domain), for the device-fault source ``drain_device_faults`` that the
    virtio-iommu model polls (docs/virtio-iommu.md §8). The real kernel has no uAPI for
    these; the emulator offers them so the guest-visible path can be exercised."""
    be.report_device_fault(fault)
