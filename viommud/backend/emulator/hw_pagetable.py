"""HWPT ioctls: IOMMU_HWPT_ALLOC and IOMMU_HWPT_INVALIDATE (reference §1.4, §2.2).

Mirrors ``drivers/iommu/iommufd/hw_pagetable.c``: paging domains on an IOAS, nested
domains on a nesting parent or on a vIOMMU (through the driver's allocators), the optional
FAULT object, and the invalidation entry that hands a user array to the driver of a nested
HWPT or a vIOMMU and writes back how many entries were handled.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import replace

from protocols import iommufd as uapi
from viommud.backend.emulator.context import IommufdContext
from viommud.backend.emulator.objects import (
    DeviceObject,
    FaultObject,
    HwptNestedObject,
    HwptPagingObject,
    IoasObject,
    IommufdObject,
    ViommuObject,
)
from viommud.backend.emulator.usercopy import Call, IoctlError, UserArray, UserData

__all__ = ["INVALIDATE_SIZE", "HwptIoctls"]

NESTED_FLAGS = uapi.IOMMU_HWPT_FAULT_ID_VALID | uapi.IOMMU_HWPT_ALLOC_PASID
PAGING_FLAGS = (
    uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
    | uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | uapi.IOMMU_HWPT_FAULT_ID_VALID
    | uapi.IOMMU_HWPT_ALLOC_PASID
)
_ENTRY_NUM_OFFSET = 24  # iommu_hwpt_invalidate.entry_num (§2.1)
_U32 = struct.Struct("<I")
_INVALIDATE = uapi.HwptInvalidate.FORMAT
INVALIDATE_SIZE = _INVALIDATE.size

# The arrays of recent calls: a VMM passes the same few (its scratch buffer, a handful of
# lengths), and a frozen 4-field value costs more to build than to look up.
_ARRAYS: dict[tuple[int, int, int, int], UserArray] = {}


def _user_array(data_type: int, uptr: int, entry_len: int, entry_num: int) -> UserArray:
    key = (data_type, uptr, entry_len, entry_num)
    array = _ARRAYS.get(key)
    if array is None:
        array = UserArray(data_type, uptr, entry_len, entry_num)
        if len(_ARRAYS) < 1024:
            _ARRAYS[key] = array
    return array


class HwptIoctls(IommufdContext):
    """The HWPT handlers of ``EmulatedIommufd``."""

    # -- IOMMU_HWPT_ALLOC (§1.4) -------------------------------------------------------------
    def _ioctl_hwpt_alloc(self, call: Call[uapi.HwptAlloc]) -> int:
        cmd = call.cmd
        if cmd.reserved:
            return errno.EOPNOTSUPP
        if (cmd.data_type == uapi.IOMMU_HWPT_DATA_NONE) != (cmd.data_len == 0):
            return errno.EINVAL
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        pt = self._objects.get(cmd.pt_id)
        data = UserData(cmd.data_type, cmd.data_uptr, cmd.data_len)
        make: Callable[[int], IommufdObject]
        if isinstance(pt, IoasObject):
            make = self._hwpt_paging_alloc(dev, pt, cmd.flags, data if data.len else None)
        elif isinstance(pt, HwptPagingObject):
            make = self._hwpt_nested_alloc(dev, pt, cmd.flags, data)
        elif isinstance(pt, ViommuObject):
            if pt.iommu != dev.pdev.iommu:
                return errno.EINVAL
            make = self._viommu_alloc_hwpt_nested(pt, cmd.flags, data)
        else:
            return errno.EINVAL  # not found (step 4) or any other kind (step 8)
        fault_id = 0
        if cmd.flags & uapi.IOMMU_HWPT_FAULT_ID_VALID:
            if not isinstance(self._objects.get(cmd.fault_id), FaultObject):
                return errno.ENOENT  # step 9: the new HWPT is discarded
            fault_id = cmd.fault_id
        hwpt = self._insert(lambda obj_id: _with_fault(make(obj_id), fault_id))
        return self._finish(call, replace(cmd, out_hwpt_id=hwpt.id), hwpt)

    def _hwpt_paging_alloc(
        self, dev: DeviceObject, ioas: IoasObject, flags: int, data: UserData | None
    ) -> Callable[[int], IommufdObject]:
        driver = self.driver(dev.pdev.iommu)
        if flags & ~PAGING_FLAGS:
            raise IoctlError(errno.EOPNOTSUPP)
        dirty = bool(flags & uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        if dirty and not driver.dirty_capable(dev):
            raise IoctlError(errno.EOPNOTSUPP)
        if flags & uapi.IOMMU_HWPT_FAULT_ID_VALID and flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT:
            raise IoctlError(errno.EOPNOTSUPP)
        driver.paging_alloc(self, dev, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, data)
        self._add_domain_check(ioas, driver)
        nest_parent = bool(flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
        return self._paging_maker(dev, ioas, driver, nest_parent=nest_parent, dirty=dirty)

    def _hwpt_nested_alloc(
        self, dev: DeviceObject, parent: HwptPagingObject, flags: int, data: UserData
    ) -> Callable[[int], IommufdObject]:
        driver = self.driver(dev.pdev.iommu)
        if flags & ~NESTED_FLAGS or not data.len or not driver.has_domain_alloc_nested:
            raise IoctlError(errno.EOPNOTSUPP)
        if parent.auto_domain or not parent.nest_parent or parent.model != driver.model:
            raise IoctlError(errno.EINVAL)
        nested = driver.domain_alloc_nested(
            self, dev, parent, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, data
        )

        def make(obj_id: int) -> IommufdObject:
            return HwptNestedObject(obj_id, parent.id, 0, dev.pdev.iommu, driver.model, nested)

        return make

    def _viommu_alloc_hwpt_nested(
        self, viommu: ViommuObject, flags: int, data: UserData
    ) -> Callable[[int], IommufdObject]:
        if flags & ~NESTED_FLAGS or not data.len:
            raise IoctlError(errno.EOPNOTSUPP)
        driver = self.driver(viommu.iommu)
        nested = driver.viommu_alloc_domain_nested(
            self, viommu, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, data
        )

        def make(obj_id: int) -> IommufdObject:
            return HwptNestedObject(
                obj_id, viommu.parent_id, viommu.id, viommu.iommu, driver.model, nested
            )

        return make

    # -- IOMMU_HWPT_INVALIDATE (§2.2) --------------------------------------------------------
    def _ioctl_hwpt_invalidate(self, call: Call[uapi.HwptInvalidate]) -> int:
        cmd = call.cmd
        rc, done = self._hwpt_invalidate(
            cmd.hwpt_id,
            data_uptr=cmd.data_uptr,
            data_type=cmd.data_type,
            entry_len=cmd.entry_len,
            entry_num=cmd.entry_num,
            reserved=cmd.reserved,
        )
        # The write-back of the whole struct (§2.2 step 6) changes only entry_num; MIN_SIZE
        # is the whole struct, so the user's copy always covers it.
        _U32.pack_into(call.arg, _ENTRY_NUM_OFFSET, done)
        return rc

    def _hwpt_invalidate_exact(self, arg: bytearray) -> int:
        """``IOMMU_HWPT_INVALIDATE`` whose ``size`` is the kernel's struct size and whose
        argument holds exactly that struct (what ``Iommufd.invalidate_array`` passes): the
        ``copy_cmd_from_user`` checks all pass and it would copy the whole struct, so the
        fields are unpacked straight from ``arg`` (the same FORMAT), without the decoded
        struct and ``Call`` the general dispatch builds. ``_iommufd_ioctl`` takes it only
        for such an ``arg``; tests/backend/test_invalidate_exact.py holds it to the general
        path."""
        _size, hwpt_id, uptr, data_type, entry_len, entry_num, reserved = _INVALIDATE.unpack(arg)
        try:
            rc, done = self._hwpt_invalidate(
                hwpt_id,
                data_uptr=uptr,
                data_type=data_type,
                entry_len=entry_len,
                entry_num=entry_num,
                reserved=reserved,
            )
        except IoctlError as exc:
            return exc.errno  # as _iommufd_ioctl: nothing written back
        _U32.pack_into(arg, _ENTRY_NUM_OFFSET, done)
        return rc

    def _hwpt_invalidate(
        self,
        hwpt_id: int,
        *,
        data_uptr: int,
        data_type: int,
        entry_len: int,
        entry_num: int,
        reserved: int,
    ) -> tuple[int, int]:
        if reserved:
            return errno.EOPNOTSUPP, 0
        if entry_num and (not data_uptr or not entry_len):
            return errno.EINVAL, 0
        obj = self._objects.get(hwpt_id)
        if obj is None:
            return errno.ENOENT, 0
        array = _user_array(data_type, data_uptr, entry_len, entry_num)
        result: tuple[int, int] | None
        if isinstance(obj, HwptNestedObject):
            result = self._drivers[obj.model].hwpt_cache_invalidate(self, obj, array)
        elif isinstance(obj, ViommuObject):
            result = self.driver(obj.iommu).viommu_cache_invalidate(self, obj, array)
        else:
            return errno.EINVAL, 0
        if result is None:
            return errno.EOPNOTSUPP, 0
        return result


def _with_fault(obj: IommufdObject, fault_id: int) -> IommufdObject:
    if fault_id and isinstance(obj, HwptPagingObject | HwptNestedObject):
        return replace(obj, fault_id=fault_id)
    return obj
