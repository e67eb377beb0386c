"""vIOMMU ioctls: IOMMU_VIOMMU_ALLOC, IOMMU_VDEVICE_ALLOC, IOMMU_HW_QUEUE_ALLOC (§1.6-§1.9).

Mirrors ``drivers/iommu/iommufd/viommu.c``: a vIOMMU on a nesting parent (checked by the
driver's ``viommu_init``), one vDEVICE per device and virtual ID, and HW queues whose guest
pages are pinned in the parent's IOAS through an access (``iommufd_access_pin_pages``).
"""

from __future__ import annotations

import errno
from dataclasses import replace

from protocols import iommufd as uapi
from viommud.backend.emulator.context import IommufdContext
from viommud.backend.emulator.objects import (
    Area,
    DeviceObject,
    HwptPagingObject,
    HwQueueObject,
    IoasObject,
    VdeviceObject,
    ViommuObject,
)
from viommud.backend.emulator.usercopy import PAGE_SIZE, U64_MAX, Call, IoctlError, UserData

__all__ = ["ViommuIoctls"]


class ViommuIoctls(IommufdContext):
    """The vIOMMU, vDEVICE and HW queue handlers of ``EmulatedIommufd``."""

    # -- IOMMU_VIOMMU_ALLOC (§1.6) -----------------------------------------------------------
    def _ioctl_viommu_alloc(self, call: Call[uapi.ViommuAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags or cmd.type == uapi.IOMMU_VIOMMU_TYPE_DEFAULT:
            return errno.EOPNOTSUPP
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        driver = self.driver(dev.pdev.iommu)
        if not driver.viommu_supported(cmd.type):
            return errno.EOPNOTSUPP
        parent: HwptPagingObject = self._get(cmd.hwpt_id, HwptPagingObject)
        if not parent.nest_parent:
            return errno.EINVAL
        data = UserData(cmd.type, cmd.data_uptr, cmd.data_len) if cmd.data_len else None
        driver.viommu_init(self, dev, parent, data)
        viommu = self._insert(
            lambda obj_id: ViommuObject(obj_id, cmd.type, dev.pdev.iommu, parent.id, parent.vmid)
        )
        return self._finish(call, replace(cmd, out_viommu_id=viommu.id), viommu)

    # -- IOMMU_VDEVICE_ALLOC (§1.7) ----------------------------------------------------------
    def _ioctl_vdevice_alloc(self, call: Call[uapi.VdeviceAlloc]) -> int:
        cmd = call.cmd
        # virt_id > ULONG_MAX cannot happen on a 64-bit host
        viommu: ViommuObject = self._get(cmd.viommu_id, ViommuObject)
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        if viommu.iommu != dev.pdev.iommu:
            return errno.EINVAL
        if dev.vdevice_id:
            return errno.EEXIST
        if cmd.virt_id in viommu.vdevs:
            return errno.EEXIST
        vdev = self._insert(lambda obj_id: VdeviceObject(obj_id, viommu.id, dev.id, cmd.virt_id))
        viommu.vdevs[cmd.virt_id] = vdev.id
        dev.vdevice_id = vdev.id
        return self._finish(call, replace(cmd, out_vdevice_id=vdev.id), vdev)

    # -- IOMMU_HW_QUEUE_ALLOC (§1.9) ---------------------------------------------------------
    def _ioctl_hw_queue_alloc(self, call: Call[uapi.HwQueueAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags or cmd.type == uapi.IOMMU_HW_QUEUE_TYPE_DEFAULT:
            return errno.EOPNOTSUPP
        if not cmd.length:
            return errno.EINVAL
        if cmd.nesting_parent_iova + cmd.length - 1 > U64_MAX:
            return errno.EOVERFLOW
        viommu: ViommuObject = self._get(cmd.viommu_id, ViommuObject)
        driver = self.driver(viommu.iommu)
        if not driver.hw_queue_supported(viommu, cmd.type):
            return errno.EOPNOTSUPP
        # iommufd_hw_queue_alloc_phys: pin the page-aligned range through an access
        offset = cmd.nesting_parent_iova % PAGE_SIZE
        length = offset + cmd.length + PAGE_SIZE - 1
        if length > U64_MAX:
            return errno.ERANGE
        length -= length % PAGE_SIZE
        parent = self._objects[viommu.parent_id]
        assert isinstance(parent, HwptPagingObject)
        ioas = self._objects[parent.ioas_id]
        assert isinstance(ioas, IoasObject)
        pinned = self._access_pin(ioas, cmd.nesting_parent_iova - offset, length)
        prev_id = driver.hw_queue_init(self, viommu, cmd.index)
        queue = self._insert(
            lambda obj_id: HwQueueObject(
                obj_id,
                viommu.id,
                cmd.type,
                cmd.index,
                cmd.nesting_parent_iova,
                cmd.length,
                prev_id,
                pinned,
            )
        )
        for area in pinned:
            area.locks += 1
        viommu.hw_queues[cmd.index] = queue.id
        return self._finish(call, replace(cmd, out_hw_queue_id=queue.id), queue)

    def _access_pin(self, ioas: IoasObject, iova: int, length: int) -> list[Area]:
        """``iommufd_access_pin_pages``: contiguous areas covering the range, pinned."""
        last = iova + length - 1
        if last > U64_MAX:
            raise IoctlError(errno.EOVERFLOW)  # pragma: no cover - checked by the caller
        areas = ioas.areas_in(iova, last)
        cur = iova
        for area in areas:
            if area.iova > cur:
                break
            cur = area.last + 1
        if not areas or areas[0].iova > iova or cur <= last:
            raise IoctlError(errno.ENOENT)
        for area in areas:
            first = max(area.iova, iova)
            end = min(area.last, last)
            rc = self._pin_error(area, first - area.iova, end - first + 1)
            if rc:
                raise IoctlError(rc)
        return areas
