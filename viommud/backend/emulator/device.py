"""Device-side ioctls: IOMMU_GET_HW_INFO and the VFIO cdev calls (reference §1.3).

Mirrors ``iommufd_get_hw_info`` of ``drivers/iommu/iommufd/device.c`` and the iommufd
ioctls of a VFIO device cdev in ``drivers/vfio/device_cdev.c``
(VFIO_DEVICE_BIND_IOMMUFD, VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_DEVICE_DETACH_IOMMUFD_PT),
which VFIO reads with its ``argsz`` / ``minsz`` rule rather than iommufd's ``size`` one.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import replace

from protocols import iommufd as uapi
from viommud.backend.base import UserFault
from viommud.backend.emulator.context import DeviceFile, IommufdContext
from viommud.backend.emulator.objects import DeviceObject
from viommud.backend.emulator.usercopy import ENOERR, Call, IoctlError, S

__all__ = ["DeviceIoctls"]

_U32 = struct.Struct("<I")


class DeviceIoctls(IommufdContext):
    """GET_HW_INFO and the VFIO cdev handlers of ``EmulatedIommufd``."""

    # -- IOMMU_GET_HW_INFO (§1.3) ------------------------------------------------------------
    def _ioctl_get_hw_info(self, call: Call[uapi.GetHwInfo]) -> int:
        cmd = call.cmd
        if cmd.flags & ~uapi.IOMMU_HW_INFO_FLAG_INPUT_TYPE:
            return errno.EOPNOTSUPP
        in_type = cmd.data_type if cmd.flags & uapi.IOMMU_HW_INFO_FLAG_INPUT_TYPE else 0
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        driver = self.driver(dev.pdev.iommu)
        out_type, data = driver.hw_info(self, dev, in_type)
        copy_len = min(cmd.data_len, len(data))
        try:
            self.memory.write(cmd.data_uptr, data[:copy_len])
            if copy_len < cmd.data_len:
                self.memory.write(cmd.data_uptr + copy_len, bytes(cmd.data_len - copy_len))
        except UserFault:
            return errno.EFAULT
        caps = uapi.IOMMU_HW_CAP_DIRTY_TRACKING if driver.dirty_capable(dev) else 0
        out = replace(
            cmd,
            data_len=len(data),
            data_type=out_type,
            out_capabilities=caps,
            out_max_pasid_log2=driver.max_pasid_log2(dev),
        )
        if call.respond(out):
            return errno.EFAULT  # pragma: no cover - respond cannot fault here
        return ENOERR

    # -- VFIO_DEVICE_BIND_IOMMUFD --------------------------------------------------------------
    def _vfio_bind(self, file: DeviceFile, arg: bytearray) -> int:
        cls = uapi.VfioDeviceBindIommufd
        cmd = _copy_vfio_minsz(arg, cls)
        if cmd.argsz < cls.MIN_SIZE or cmd.flags or cmd.iommufd < 0:
            return errno.EINVAL
        if file.dev_id:
            return errno.EINVAL  # one device cannot be bound twice
        if cmd.iommufd != self.iommufd or not self._open:
            return errno.EBADFD if cmd.iommufd in self._files else errno.EBADF
        if any(f.dev_id and f.pdev.id == file.pdev.id for f in self._files.values()):
            return errno.EINVAL  # vfio_df_open: a cdev-opened device is opened only once
        dev = self._insert(lambda obj_id: DeviceObject(obj_id, file.pdev, file.fd))
        file.dev_id = dev.id
        arg[12:16] = _U32.pack(dev.id)  # copy_to_user(&arg->out_devid)
        return ENOERR

    # -- VFIO_DEVICE_ATTACH_IOMMUFD_PT / DETACH ------------------------------------------
    def _vfio_attach(self, file: DeviceFile, arg: bytearray) -> int:
        cls = uapi.VfioDeviceAttachIommufdPt
        cmd = _copy_vfio_minsz(arg, cls)
        if cmd.argsz < cls.MIN_SIZE:
            return errno.EINVAL
        if cmd.flags & ~uapi.VFIO_DEVICE_ATTACH_PASID:
            return errno.EINVAL
        if cmd.flags & uapi.VFIO_DEVICE_ATTACH_PASID:
            return errno.EOPNOTSUPP  # no pasid_attach_ioas on emulated devices
        dev = self._objects[file.dev_id]
        assert isinstance(dev, DeviceObject)
        rc, pt_id = self.attach_pt(dev, cmd.pt_id)
        if rc:
            return rc
        arg[8:12] = _U32.pack(pt_id)  # copy_to_user(&arg->pt_id)
        return ENOERR

    def _vfio_detach(self, file: DeviceFile, arg: bytearray) -> int:
        cls = uapi.VfioDeviceDetachIommufdPt
        cmd = _copy_vfio_minsz(arg, cls)
        if cmd.argsz < cls.MIN_SIZE:
            return errno.EINVAL
        if cmd.flags & ~uapi.VFIO_DEVICE_DETACH_PASID:
            return errno.EINVAL
        if cmd.flags & uapi.VFIO_DEVICE_DETACH_PASID:
            return errno.EOPNOTSUPP
        dev = self._objects[file.dev_id]
        assert isinstance(dev, DeviceObject)
        self._detach(dev)  # detaching a detached device is a silent no-op
        return ENOERR


def _copy_vfio_minsz(arg: bytearray, cls: type[S]) -> S:
    """VFIO's ``copy_from_user(&cmd, arg, minsz)``: EFAULT if the first minsz bytes are missing."""
    if len(arg) < cls.MIN_SIZE:
        raise IoctlError(errno.EFAULT)
    return uapi.decode(cls, arg[: cls.MIN_SIZE])
