"""The iommufd context: the object table, the reference graph and device attachment.

Mirrors ``struct iommufd_ctx`` and the object lifetime of ``drivers/iommu/iommufd/main.c``
(ID allocation, lookup, destroy), the attach / replace / detach and auto-domain logic of
``device.c``, and the checks of ``io_pagetable.c`` that a new domain on an IOAS must pass.
``IommufdContext`` also provides the services drivers call (``driver.IommufdCore``). The
ioctl handlers are mixins on top of it, one module per kernel file (``ioas``,
``hw_pagetable``, ``viommu``, ``eventq``, ``device``); ``kernel.EmulatedIommufd`` puts
them together.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from protocols import iommufd as uapi
from protocols.models import HostIommu
from viommud.backend.base import DeviceFault, UserFault, UserMemory
from viommud.backend.emulator.caches import CacheModel, vtd_psi_mask
from viommud.backend.emulator.driver import (
    ISSUED_HISTORY,
    KERNELS,
    IommuDriver,
    PhysicalIommuState,
)
from viommud.backend.emulator.files import FileRef
from viommud.backend.emulator.intel import VtdFlush
from viommud.backend.emulator.objects import (
    Area,
    DeviceObject,
    FaultObject,
    HwptNestedObject,
    HwptObject,
    HwptPagingObject,
    HwQueueObject,
    IoasObject,
    IommufdObject,
    SelftestObject,
    VdeviceObject,
    VeventqObject,
    ViommuObject,
)
from viommud.backend.emulator.usercopy import (
    ENOERR,
    PAGE_SIZE,
    U64_MAX,
    Call,
    IoctlError,
    S,
)
from viommud.backend.emulator.usermem import EmulatedMemory
from viommud.host import HostConfig, PhysicalDevice, PhysicalIommu

__all__ = ["IOMMUFD_FD", "DeviceFile", "EventFile", "IommufdContext", "Iopt"]

IOMMUFD_FD = 3
_QQ = struct.Struct("<QQ")
# read once per VT-d invalidation entry: bound here, an enum attribute lookup costs ~90 ns
_INTEL_VTD = HostIommu.INTEL_VTD


@dataclass(slots=True)
class DeviceFile:
    """An open VFIO cdev; ``dev_id`` is set once bound to the iommufd.

    A cdev the VMM passed (``adopt_device``) keeps its OS fd in ``os_fd`` (closed with the
    file); ``cdev`` is False when that fd is no character device, hence no VFIO cdev."""

    fd: int
    pdev: PhysicalDevice
    dev_id: int = 0
    os_fd: int = -1
    cdev: bool = True


class Iopt(NamedTuple):
    """The parts of ``struct io_pagetable`` its domains decide."""

    domains: tuple[HwptPagingObject, ...]  # the HWPT_PAGING objects on the IOAS
    align: int  # iopt->iova_alignment: 1, or the largest smallest page size of the domains
    reserved: tuple[tuple[int, int], ...]  # the IOVA ranges outside the domains' apertures


@dataclass(slots=True)
class EventFile:
    """An anonymous fd of a vEVENTQ or FAULT object; it holds the object while open."""

    fd: int
    obj_id: int


class IommufdContext:
    """One iommufd context: its objects, open files, physical units and drivers.

    ``drivers`` maps an IOMMU model to its driver; with ``selftest`` it must include the
    mock driver, whose physical unit is added here.
    """

    def __init__(
        self,
        host: HostConfig,
        memory: UserMemory | None,
        *,
        kernel: str,
        selftest: bool,
        drivers: Mapping[str, IommuDriver],
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        self.host = host
        self.memory: UserMemory = memory if memory is not None else EmulatedMemory()
        self.kernel = kernel
        self.selftest = selftest
        self.iommufd = IOMMUFD_FD
        self.cache_model = CacheModel()
        self._open = True
        self._objects: dict[int, IommufdObject] = {}
        # IOAS id -> its Iopt; emptied whenever an object comes or goes (``_iopt``)
        self._iopts: dict[int, Iopt] = {}
        self._tombstones: set[int] = set()
        self._files: dict[int, DeviceFile] = {}
        self._event_files: dict[int, EventFile] = {}
        self._imported: dict[int, FileRef] = {}  # fds passed in with import_fd
        self._adopted: dict[str, int] = {}  # device name -> fd of its passed cdev
        self._units = {unit.id: PhysicalIommuState(unit) for unit in host.iommus}
        self._drivers: dict[str, IommuDriver] = dict(drivers)
        self._pdevs: dict[str, PhysicalDevice] = {d.id: d for d in host.devices}
        self._sid_maps: dict[str, dict[int, str]] = {unit: {} for unit in self._units}
        for pdev in host.devices:
            self._sid_maps[pdev.iommu][pdev.sid] = pdev.id
        self._vtd_flushes: deque[VtdFlush] = deque(maxlen=ISSUED_HISTORY)  # latest only
        self._asids: set[int] = set()
        self._mock_devices = 0
        self._mark = 0  # journal length before the current call (testing.last_removed)
        # Readiness: called whenever a vEVENTQ or FAULT fd (or the device-fault source)
        # becomes readable, as epoll would report EPOLLIN on the fd; the shell turns it into
        # a read-and-send on its event loop (docs/protocol.md §10, "Push").
        self.event_notifier: Callable[[], None] | None = None
        # Host DMA faults of devices outside any FAULT object (testing.inject_device_fault),
        # taken by drain_device_faults (docs/virtio-iommu.md §8).
        self._device_faults: list[DeviceFault] = []
        if selftest:
            mock = HostIommu.SELFTEST
            if mock in self._units:
                raise ValueError(f"host already has an IOMMU named {mock.value!r}")
            self._units[mock] = PhysicalIommuState(PhysicalIommu(mock, mock))
            self._sid_maps[mock] = {}

    # -- introspection ------------------------------------------------------------------
    def live_objects(self) -> list[tuple[int, str]]:
        """``(id, kind)`` of every live object, by id (tombstones are not objects)."""
        return sorted((obj.id, obj.KIND) for obj in self._objects.values())

    def lookup(self, obj_id: int) -> IommufdObject | None:
        return self._objects.get(obj_id)

    # -- services for drivers -----------------------------------------------------------
    def unit(self, iommu_id: str) -> PhysicalIommuState:
        return self._units[iommu_id]

    def driver(self, iommu_id: str) -> IommuDriver:
        """The driver of physical IOMMU ``iommu_id`` (by its model)."""
        return self._drivers[self._units[iommu_id].unit.model]

    def units_of_model(self, model: str) -> list[str]:
        return sorted(u for u, state in self._units.items() if state.unit.model == model)

    def viommu_device_ids(self, viommu: ViommuObject) -> set[int]:
        out: set[int] = set()
        for vdev_id in viommu.vdevs.values():
            vdev = self._objects[vdev_id]
            assert isinstance(vdev, VdeviceObject)
            out.add(vdev.dev_id)
        return out

    def vsid_to_device(self, viommu: ViommuObject, virt_id: int) -> DeviceObject | None:
        vdev_id = viommu.vdevs.get(virt_id)
        if vdev_id is None:
            return None
        vdev = self._objects[vdev_id]
        assert isinstance(vdev, VdeviceObject)
        dev = self._objects[vdev.dev_id]
        assert isinstance(dev, DeviceObject)
        return dev

    def vsid_to_pdev(self, viommu: ViommuObject, virt_id: int) -> PhysicalDevice | None:
        dev = self.vsid_to_device(viommu, virt_id)
        return dev.pdev if dev is not None else None

    def attached_devices(
        self, hwpt: HwptPagingObject
    ) -> tuple[list[DeviceObject], list[DeviceObject]]:
        """Devices attached to ``hwpt`` directly, and through nested HWPTs on it."""
        direct: list[DeviceObject] = []
        nested: list[DeviceObject] = []
        for obj in self._objects.values():
            if not isinstance(obj, DeviceObject) or not obj.hwpt_id:
                continue
            if obj.hwpt_id == hwpt.id:
                direct.append(obj)
                continue
            child = self._objects.get(obj.hwpt_id)
            if isinstance(child, HwptNestedObject) and child.parent_id == hwpt.id:
                nested.append(obj)
        return direct, nested

    def apply_host_commands(self, iommu_id: str, commands: list[bytes]) -> None:
        """Apply commands issued on the host queue of ``iommu_id`` to its caches."""
        sids = self._sid_maps[iommu_id]
        model = self.cache_model
        if not (model.iotlb.get(iommu_id) or model.config.get(iommu_id) or any(model.atc.values())):
            return  # nothing cached that a command could remove (each drop_* returns at once)
        for raw in commands:
            w0, w1 = _QQ.unpack(raw)
            model.smmu_command(iommu_id, w0, w1, sids)

    def record_vtd_flush(self, hwpt: HwptNestedObject, inv: uapi.HwptVtdS1Invalidate) -> None:
        """One VT-d stage-1 invalidation: P_IOTLB per unit, device TLBs of ATS devices."""
        devices = [
            obj
            for obj in self._objects.values()
            if isinstance(obj, DeviceObject) and obj.hwpt_id == hwpt.id
        ]
        units = sorted({dev.pdev.iommu for dev in devices})
        leaf = bool(inv.flags & uapi.IOMMU_VTD_INV_FLAGS_LEAF)
        self._vtd_flushes.append(VtdFlush(hwpt.id, inv.addr, inv.npages, leaf, tuple(units)))
        last = (inv.addr + inv.npages * PAGE_SIZE - 1) & U64_MAX
        addr, am = vtd_psi_mask(inv.addr, last)
        for unit in units:
            did = self._units[unit].dids.get(hwpt.id)
            if did is not None:
                self.cache_model.vtd_p_iotlb(
                    unit, did, 0, addr=addr, am=am, ih=leaf, cause="P_IOTLB"
                )
        driver = self._drivers[_INTEL_VTD]
        for dev in devices:
            if driver.ats_enabled(dev, hwpt):
                self.cache_model.vtd_devtlb(dev.pdev.id, addr, am, "DEVTLB")

    def report_vevent(self, viommu: ViommuObject, event_type: int, payload: bytes) -> int:
        """``iommufd_viommu_report_event``: 0, or EOPNOTSUPP without such a vEVENTQ."""
        queue = self._veventq(viommu, event_type)
        if queue is None:
            return errno.EOPNOTSUPP
        queue.report(payload)
        self.notify_readable()
        return ENOERR

    def report_fault(self, dev: DeviceObject, fault: uapi.HwptPgfault) -> None:
        """An I/O page fault of ``dev``: a group of one, to its domain's FAULT object."""
        hwpt = self._objects.get(dev.hwpt_id) if dev.hwpt_id else None
        fault_id = getattr(hwpt, "fault_id", 0)
        queue = self._objects.get(fault_id) if fault_id else None
        if isinstance(queue, FaultObject):
            queue.deliver.append([replace(fault, dev_id=dev.id)])
            self.notify_readable()

    def report_device_fault(self, fault: DeviceFault) -> None:
        """A DMA fault of host device ``fault.device`` for the device-fault source."""
        self._device_faults.append(fault)
        self.notify_readable()

    def drain_device_faults(self, devices: frozenset[str]) -> list[DeviceFault]:
        """The queued device faults of ``devices``, oldest first; the others stay."""
        taken = [f for f in self._device_faults if f.device in devices]
        if taken:
            self._device_faults = [f for f in self._device_faults if f.device not in devices]
        return taken

    def notify_readable(self) -> None:
        """Tell the notifier that something became readable (no-op without one)."""
        notifier = self.event_notifier
        if notifier is not None:
            notifier()

    def new_mock_device(self) -> PhysicalDevice:
        """A fresh selftest device behind the mock IOMMU (``mock_dev_create``)."""
        n = self._mock_devices
        self._mock_devices += 1
        pdev = PhysicalDevice(f"mock{n}", HostIommu.SELFTEST, n)
        self._pdevs[pdev.id] = pdev
        return pdev

    # -- ID space and the reference graph -------------------------------------------------
    def _insert(self, make: Callable[[int], IommufdObject]) -> IommufdObject:
        obj_id = 1
        while obj_id in self._objects or obj_id in self._tombstones:
            obj_id += 1
        if obj_id >= 1 << 31:
            raise IoctlError(errno.EBUSY)  # pragma: no cover - xa_limit_31b exhausted
        obj = make(obj_id)
        self._objects[obj_id] = obj
        self._iopts.clear()
        return obj

    def _get(self, obj_id: int, kind: type[IommufdObject]) -> Any:
        obj = self._objects.get(obj_id)
        if not isinstance(obj, kind):
            raise IoctlError(errno.ENOENT)
        return obj

    def _busy(self, obj: IommufdObject) -> bool:
        if isinstance(obj, DeviceObject):
            return True  # the bound VFIO driver (or selftest object) is a user until unbind
        if any(f.obj_id == obj.id for f in self._event_files.values()):
            return True  # an open vEVENTQ / FAULT fd
        return any(obj.id in other.holds() for other in self._objects.values())

    def _new_fd(self) -> int:
        fd = IOMMUFD_FD + 1
        while fd in self._files or fd in self._event_files or fd in self._imported:
            fd += 1
        return fd

    def _alloc_asid(self) -> int:
        asid = 1
        while asid in self._asids:
            asid += 1
        if asid >= 1 << 16:
            raise IoctlError(errno.ENOSPC)
        self._asids.add(asid)
        return asid

    def _veventq(self, viommu: ViommuObject, event_type: int) -> VeventqObject | None:
        for obj in self._objects.values():
            if (
                isinstance(obj, VeventqObject)
                and obj.viommu_id == viommu.id
                and obj.type == event_type
            ):
                return obj
        return None

    def _destroy(self, obj: IommufdObject) -> None:
        """Remove an unreferenced object and undo its side effects."""
        del self._objects[obj.id]
        self._iopts.clear()
        if isinstance(obj, VdeviceObject):
            viommu = self._objects[obj.viommu_id]
            assert isinstance(viommu, ViommuObject)
            del viommu.vdevs[obj.virt_id]
            dev = self._objects.get(obj.dev_id)
            if isinstance(dev, DeviceObject):
                dev.vdevice_id = 0
        elif isinstance(obj, HwptPagingObject):
            self.driver(obj.iommu).domain_freed(self, obj)
            if obj.vmid:
                self._units[obj.iommu].vmids.discard(obj.vmid)
            if obj.asid:
                self._asids.discard(obj.asid)
        elif isinstance(obj, IoasObject):
            obj.clear()  # iommufd_ioas_destroy unmaps everything, dropping file references
        elif isinstance(obj, HwQueueObject):
            for area in obj.pinned:
                area.locks -= 1
            viommu = self._objects[obj.viommu_id]
            assert isinstance(viommu, ViommuObject)
            viommu.hw_queues.pop(obj.index, None)
        elif isinstance(obj, SelftestObject):
            self._unbind(obj.dev_id)

    def _finish(self, call: Call[S], out: S, obj: IommufdObject) -> int:
        """Write back a creation's result; a fault destroys the new object (§0.2 step 5)."""
        if call.respond(out):
            self._destroy(obj)  # pragma: no cover - respond cannot fault here
            return errno.EFAULT  # pragma: no cover
        return ENOERR

    # -- the IO page table of an IOAS (io_pagetable.c) -----------------------------------
    def _iopt(self, ioas: IoasObject) -> Iopt:
        """What the IOAS's domains make of its IO page table (cached: an IOAS_MAP or UNMAP
        reads it, and only a new or destroyed object changes it)."""
        iopt = self._iopts.get(ioas.id)
        if iopt is None:
            iopt = self._iopts[ioas.id] = self._scan_iopt(ioas)
        return iopt

    def _scan_iopt(self, ioas: IoasObject) -> Iopt:
        """``_iopt`` from the object table itself."""
        domains = tuple(
            obj
            for obj in self._objects.values()
            if isinstance(obj, HwptPagingObject) and obj.ioas_id == ioas.id
        )
        align = 1
        reserved: list[tuple[int, int]] = []
        for hwpt in domains:
            driver = self._drivers[hwpt.model]
            align = max(align, driver.pgsize)
            start, end = driver.aperture
            if start:
                reserved.append((0, start - 1))
            if end != U64_MAX:
                reserved.append((end + 1, U64_MAX))
        return Iopt(domains, align, tuple(reserved))

    def _domains(self, ioas: IoasObject) -> tuple[HwptPagingObject, ...]:
        """The HWPT_PAGING objects on ``ioas``, in the object table's order."""
        return self._iopt(ioas).domains

    def _iova_alignment(self, ioas: IoasObject) -> int:
        """``iopt->iova_alignment``: 1, or the largest smallest page size of its domains."""
        return self._iopt(ioas).align

    def _pinnable(self, user_va: int, length: int) -> bool:
        """Whether ``pin_user_pages`` would succeed on ``[user_va, user_va + length)``."""
        mapped = getattr(self.memory, "mapped", None)
        if callable(mapped):
            return bool(mapped(user_va, length))
        try:  # a UserMemory without ``mapped``: probe both ends
            self.memory.read(user_va, 1)
            self.memory.read(user_va + length - 1, 1)
        except UserFault:
            return False
        return True

    def _pin_error(self, area: Area, offset: int = 0, length: int | None = None) -> int:
        """Pinning ``length`` bytes of ``area`` from ``offset``: 0, or EFAULT for user
        memory that is not mapped (pin_user_pages), EINVAL for a file memfd_pin_folios
        refuses (not shmem/hugetlbfs, or pages past its end)."""
        size = area.length - offset if length is None else length
        if area.file is not None:
            return area.file.pin_error(area.user_va + offset, size)
        return ENOERR if self._pinnable(area.user_va + offset, size) else errno.EFAULT

    def _add_domain_check(self, ioas: IoasObject, driver: IommuDriver) -> None:
        """``iopt_table_add_domain``: alignment, aperture and filling (pinning) checks."""
        new_align = max(driver.pgsize, self._iova_alignment(ioas))
        if new_align > PAGE_SIZE:
            raise IoctlError(errno.EINVAL)  # pragma: no cover - every driver maps 4 KiB
        mask = new_align - 1
        for area in ioas.areas:
            if area.iova & mask or area.length & mask or (area.user_va % PAGE_SIZE) & mask:
                raise IoctlError(errno.EADDRINUSE)
        start, end = driver.aperture
        for area in ioas.areas:
            if area.iova < start or area.last > end:
                raise IoctlError(errno.EADDRINUSE)
        for area in ioas.areas:
            rc = self._pin_error(area)
            if rc:
                raise IoctlError(rc)

    def _paging_maker(
        self,
        dev: DeviceObject,
        ioas: IoasObject,
        driver: IommuDriver,
        *,
        nest_parent: bool = False,
        dirty: bool = False,
        auto: bool = False,
    ) -> Callable[[int], IommufdObject]:
        unit = self._units[dev.pdev.iommu]

        def make(obj_id: int) -> IommufdObject:
            vmid = asid = 0
            if driver.model == HostIommu.ARM_SMMUV3:
                # a nesting parent is a stage-2 domain with a VMID, others stage-1 with an ASID
                if nest_parent:
                    vmid = unit.alloc_vmid()
                else:
                    asid = self._alloc_asid()
            return HwptPagingObject(
                obj_id,
                ioas.id,
                dev.pdev.iommu,
                driver.model,
                nest_parent,
                auto_domain=auto,
                vmid=vmid,
                asid=asid,
                dirty=dirty,
            )

        return make

    # -- attach / replace / detach (device.c) ----------------------------------------------
    def _unbind(self, dev_id: int) -> None:
        dev = self._objects[dev_id]
        assert isinstance(dev, DeviceObject)
        self._detach(dev)
        if dev.vdevice_id:
            vdev = self._objects[dev.vdevice_id]
            self._destroy(vdev)
            self._tombstones.add(vdev.id)  # §0.3: its ID stays taken until close
        del self._objects[dev.id]
        self._iopts.clear()

    def attach_pt(self, dev: DeviceObject, pt_id: int) -> tuple[int, int]:
        """``iommufd_device_attach`` / ``_replace``: ``(errno, hwpt id attached)``."""
        pt = self._objects.get(pt_id)
        if pt is None:
            return errno.ENOENT, 0
        if isinstance(pt, HwptPagingObject | HwptNestedObject):
            return self._attach(dev, pt), pt.id
        if isinstance(pt, IoasObject):
            return self._attach_ioas(dev, pt)
        return errno.EINVAL, 0

    def _attach(self, dev: DeviceObject, hwpt: HwptObject) -> int:
        """Attach or replace (vfio picks replace when attached); 0 or the driver's errno."""
        if dev.hwpt_id == hwpt.id:
            return ENOERR  # replacing with the same HWPT is a no-op
        driver = self.driver(dev.pdev.iommu)
        if hwpt.model != driver.model:
            return errno.EINVAL  # domain owned by another driver
        if isinstance(hwpt, HwptPagingObject):
            rc = driver.attach_paging(self, dev, hwpt)
        else:
            rc = driver.attach_nested(self, dev, hwpt)
        if rc:
            return rc
        self._set_attachment(dev, hwpt.id)
        return ENOERR

    def _set_attachment(self, dev: DeviceObject, new_id: int) -> None:
        """Move ``dev`` to ``new_id`` (0: detached) with the kernel's own invalidations."""
        old_id = dev.hwpt_id
        old = self._objects.get(old_id) if old_id else None
        driver = self.driver(dev.pdev.iommu)
        unit = self._units[dev.pdev.iommu]
        if new_id and driver.model == HostIommu.INTEL_VTD:
            unit.did(new_id)
        dev.hwpt_id = new_id
        driver.attach_changed(self, dev, old)
        if old_id and driver.model == HostIommu.INTEL_VTD:
            still = any(
                isinstance(obj, DeviceObject)
                and obj.hwpt_id == old_id
                and obj.pdev.iommu == dev.pdev.iommu
                for obj in self._objects.values()
            )
            if not still:
                unit.dids.pop(old_id, None)
        if old_id:
            self._hwpt_put(old_id)

    def _attach_ioas(self, dev: DeviceObject, ioas: IoasObject) -> tuple[int, int]:
        """``iommufd_device_auto_get_domain``: reuse a fitting auto domain or make one."""
        autos = [
            obj
            for obj in self._objects.values()  # insertion order == the IOAS's hwpt_list order
            if isinstance(obj, HwptPagingObject) and obj.auto_domain and obj.ioas_id == ioas.id
        ]
        for hwpt in autos:
            rc = self._attach(dev, hwpt)
            if rc == errno.EINVAL:
                continue  # incompatible: try the next one
            if rc:
                return rc, 0
            return ENOERR, hwpt.id
        driver = self.driver(dev.pdev.iommu)
        try:
            self._add_domain_check(ioas, driver)
            hwpt_new = self._insert(self._paging_maker(dev, ioas, driver, auto=True))
        except IoctlError as exc:
            return exc.errno, 0
        assert isinstance(hwpt_new, HwptPagingObject)
        rc = self._attach(dev, hwpt_new)
        if rc:  # pragma: no cover - a fresh domain always fits its own device
            self._destroy(hwpt_new)
            return rc, 0
        return ENOERR, hwpt_new.id

    def _detach(self, dev: DeviceObject) -> None:
        if dev.hwpt_id:
            self._set_attachment(dev, 0)

    def _hwpt_put(self, hwpt_id: int) -> None:
        """Drop an attachment reference; an unused auto domain goes away with it."""
        hwpt = self._objects.get(hwpt_id)
        if isinstance(hwpt, HwptPagingObject) and hwpt.auto_domain and not self._busy(hwpt):
            self._destroy(hwpt)
