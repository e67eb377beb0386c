"""An emulated iommufd: the kernel's /dev/iommu nested uAPI, errno for errno.

Reference: the Linux iommufd uAPI and drivers/iommu/iommufd/ ("§n" below: the numbering
listed in docs/backend.md). The model is mainline Linux (``kernel="pending"`` switches to
the queued for-next behaviour of §2.7 and §3.6, see docs/backend.md).

This module mirrors the entry points of ``drivers/iommu/iommufd/main.c``: the fd table
(the iommufd, VFIO device cdevs, event fds), the ioctl dispatch tables per file kind and
IOMMU_DESTROY. ``EmulatedIommufd`` assembles the rest of the package, which follows the
kernel's layout:

* ``usercopy`` - the ``size`` convention and the copy rules (§0.2, §1.5, §2.3); every read
  of user memory goes through it, and ``UserFault`` becomes EFAULT exactly there;
* ``objects`` - one class per iommufd object kind and the reference graph (§0.3);
* ``context`` - the object table, destroy, device attach / replace / detach and auto
  domains, and the services drivers call;
* ``ioas``, ``hw_pagetable``, ``viommu``, ``eventq``, ``device`` - the ioctl handlers, one
  module per kernel file (``device`` also holds the VFIO cdev calls of
  ``drivers/vfio/device_cdev.c``);
* ``driver`` - ``IommuDriver``, the driver interface (``iommu_ops`` / ``viommu_ops``), and
  ``IommufdCore``, what a driver may ask of the core;
* ``arm_smmuv3``, ``intel``, ``selftest`` - the ARM SMMUv3, Intel VT-d and selftest mock
  drivers; the mock (§5) and IOMMU_TEST_CMD are loaded with ``selftest=True``;
* ``files`` - the files the kernel holds (fds passed in with ``import_fd``, the files of
  IOAS_MAP_FILE areas) and what pinning their pages (``memfd_pin_folios``) refuses;
* ``caches`` - per physical IOMMU IOTLB and configuration caches and per device ATC /
  device TLB, where every host invalidation is applied and journalled;
* ``testing`` - inspection, cache filling and fault injection for tests.

A handler raises ``IoctlError`` where the kernel returns before writing anything back, and
calls ``Call.respond`` where it copies the struct out. Deliberate choices where the
reference leaves room are listed in ``NOTES`` below.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from protocols import iommufd as uapi
from protocols.models import HostIommu
from viommud.backend.base import UserMemory
from viommud.backend.emulator.arm_smmuv3 import ArmSmmuV3Driver
from viommud.backend.emulator.context import DeviceFile
from viommud.backend.emulator.device import DeviceIoctls
from viommud.backend.emulator.driver import KERNEL_MAINLINE, IommuDriver
from viommud.backend.emulator.eventq import EventqIoctls
from viommud.backend.emulator.files import FileRef
from viommud.backend.emulator.hw_pagetable import INVALIDATE_SIZE, HwptIoctls
from viommud.backend.emulator.intel import IntelVtdDriver
from viommud.backend.emulator.ioas import IOAS_MAP_SIZE, IOAS_UNMAP_SIZE, IoasIoctls
from viommud.backend.emulator.selftest import MockDriver, test_cmd
from viommud.backend.emulator.usercopy import ENOERR, Call, IoctlError, copy_cmd_from_user
from viommud.backend.emulator.viommu import ViommuIoctls
from viommud.host import HostConfig

__all__ = ["DRIVERS", "NOTES", "EmulatedIommufd"]

# issued(), vtd_flushes(), tombstones() and inject_cmdq_error() below are in ``testing``.
NOTES = """\
Choices the reference leaves open, made here:
* Mainline by default; EmulatedIommufd(kernel="pending") switches the ARM vIOMMU
  invalidation to the queued for-next series (§2.7, §3.6), see docs/backend.md.
* Known iommufd ioctls that are not emulated (IOAS_ALLOW_IOVAS, IOAS_COPY, IOAS_IOVA_RANGES,
  OPTION, VFIO_IOAS, dirty tracking, IOAS_CHANGE_PROCESS) answer ENOTTY, as does
  IOMMU_TEST_CMD unless the emulator is built with selftest=True (CONFIG_IOMMUFD_TEST).
* IOAS_MAP_FILE takes the fds of the emulator's table: import_fd() enters a duplicate of an
  OS fd (a memfd); the iommufd, device and event fds are files too, but no memfds. The
  order of checks is the newest mainline one (iopt_map_file_pages checks length 0 and
  start + length overflow before fget's EBADF; 6.13-6.18 looked the fd up first). Pages
  are pinned only when the IOAS has a domain (at the map, or when a domain is added):
  memfd_pin_folios answers EINVAL for a file that is not shmem/hugetlbfs (the emulator asks
  F_GET_SEALS, which answers for exactly those) and for pages at or past the file's end.
  No dma-buf fds; no EPERM for a writeable mapping of a read-only file (a proposed fix,
  not mainline).
* adopt_device(): any character device passed as a device's cdev is taken for that VFIO
  cdev (e.g. /dev/null in tests; the emulator cannot tell them apart); a passed fd that is
  no character device answers ENOTTY to every VFIO request. BIND of a device bound through
  another fd is EINVAL (vfio_df_open: a cdev-opened device is opened once), as is a second
  BIND on the same fd (device_cdev.c: one device cannot be bound twice).
* Emulated ARM and VT-d devices have no dirty-tracking capability (DIRTY_TRACKING:
  EOPNOTSUPP) and no PASID support on the VFIO side (ATTACH/DETACH with the PASID flag:
  EOPNOTSUPP); GET_HW_INFO reports out_max_pasid_log2 0 and no capabilities for them.
  Mock devices can track dirty pages unless created with MOCK_FLAGS_DEVICE_NO_DIRTY.
* Every emulated SMMU has FEAT_NESTING, S2FWB, range invalidation, ATS and coherent
  devices; every VT-d unit supports nesting. A VT-d paging domain may be attached by
  devices behind any VT-d unit (the units are identical, hence compatible); an ARM domain
  only by devices behind its own SMMU. GET_HW_INFO returns the fixed register values in
  ARM_HW_INFO / VTD_HW_INFO.
* ARM VMIDs belong to the nesting-parent stage-2 HWPT, as in mainline (arm_vsmmu_init takes
  the parent's VMID): allocated per physical SMMU, lowest free from 1, when the
  NEST_PARENT HWPT is created on an SMMU, released when it is destroyed. Every vIOMMU on
  that parent uses it. Other ARM paging domains are stage-1 domains with a host ASID
  (one ASID space shared by all SMMUs, lowest free from 1). Freeing a VMID flushes it
  (TLBI_S12_VMALL), freeing an ASID flushes it (TLBI_NH_ASID).
* VT-d domain IDs are allocated per unit, lowest free from 1, when the first device behind
  that unit attaches a domain, and released when the last one leaves; a nested domain is
  attached on PASID 0 (RID), so its IOTLB entries are tagged (DID, PASID 0).
* The ARM vIOMMU command array is refused with ENOMEM when entry_num * 16 exceeds 4 MiB
  (kcalloc's KMALLOC_MAX_SIZE with 4 KiB pages); the mock vIOMMU likewise at 12 bytes.
* VIOMMU_ALLOC driver data (data_len/data_uptr) is ignored for ARM_SMMUV3 (no copy).
* VFIO structures follow the classic argsz rule: minsz bytes are read, argsz < minsz is
  EINVAL, bytes past minsz are never checked (no E2BIG); only out fields are written back.
* inject_cmdq_error(): the failing group reached the queue (it is in issued() and its
  commands took effect on the caches) and the call reports e-1 (§3.4).
* inject_invalidate_error(): entry-keyed faults; an "entry" fault fails as a refused entry
  (ARM: as a convert failure, the group's earlier entries not issued; VT-d: the earlier
  entries done), an "issue" fault as inject_cmdq_error on the group holding the entry.
  While one is armed the ARM vectorised walk is not used (the reference walk checks them).
* VT-d invalidations are recorded as VtdFlush entries (vtd_flushes()), one per entry.
  npages 0 (not rejected by the kernel) flushes the one page at addr: the kernel's range
  arithmetic rounds 0 pages up to 1 on x86 (reference §7 calls the effect unspecified).
* Attaching to an IOAS is emulated (not refused): a compatible auto domain on that IOAS is
  reused, else a new HWPT_PAGING (auto_domain) is created and its id written back to pt_id;
  it is destroyed when its last device leaves, as iommufd_hw_pagetable_put does.
* A mixed host (ARM and VT-d units): a domain of one driver attached by a device of the
  other is EINVAL (domain owner mismatch); an ARM vIOMMU on a VT-d parent is EINVAL.
* Tombstoned vDEVICE ids are not objects: live_objects() omits them (tombstones() lists
  them); close() forgets them.
* Device fds: before BIND every other request is EINVAL; once bound, requests other than
  ATTACH/DETACH are ENOTTY (vfio-pci does not know them). close_device() of an unknown fd
  raises OSError(EBADF).
* IOAS: no device reserved regions (no SW_MSI window) are modelled; domain apertures are
  (ARM, VT-d: 48-bit input addresses; mock: MOCK_APERTURE_START..LAST). Pinning user pages
  (IOAS_MAP into an IOAS with a domain, HWPT_PAGING creation on a populated IOAS, HW queue
  pinning) checks that [user_va, user_va + length) is mapped in the emulated user memory:
  EFAULT otherwise. Pages are physically contiguous (HW_QUEUE never EFAULT for contiguity).
* Kernel-internal invalidations (attach/replace/detach, IOAS_UNMAP, VMID/ASID/DID release)
  are applied to the caches and journalled with a "kernel:" cause; they are not added to
  issued(), which lists what HWPT_INVALIDATE calls put on the host queue.
* Event fds (vEVENTQ, FAULT) are numbered like device fds; read()/write()/close_fd() stand
  for read(2)/write(2)/close(2) on them and answer (errno, data). close() closes them too.
* FAULT response cookies are allocated lowest free from 1; TRIGGER_IOPF reports one fault
  group of one fault with LAST_PAGE, and PASID_VALID when pasid != 0; it is dropped (the
  call still succeeds) when the device's domain has no FAULT object.
* The mock driver is the version of iommufd.md §5: iommu_hwpt_selftest is 4 bytes,
  iommu_viommu_selftest 8 bytes (no mmap fields); IOMMU_TEST_CMD ops other than
  MOCK_DOMAIN(_FLAGS), MOCK_DOMAIN_REPLACE, MD_CHECK_IOTLB, DEV_CHECK_CACHE,
  TRIGGER_VEVENT and TRIGGER_IOPF answer EOPNOTSUPP.
"""

DRIVERS: dict[str, IommuDriver] = {
    HostIommu.ARM_SMMUV3: ArmSmmuV3Driver(),
    HostIommu.INTEL_VTD: IntelVtdDriver(),
}


class EmulatedIommufd(IoasIoctls, HwptIoctls, ViommuIoctls, EventqIoctls, DeviceIoctls):
    """One emulated /dev/iommu context plus the VFIO cdevs of ``host`` (``Backend``).

    ``kernel`` selects mainline (default) or the pending for-next behaviour (§2.7, §3.6);
    ``selftest`` adds the iommufd selftest mock driver and IOMMU_TEST_CMD (§5).
    """

    name = "emulated"

    def __init__(
        self,
        host: HostConfig,
        memory: UserMemory | None = None,
        *,
        kernel: str = KERNEL_MAINLINE,
        selftest: bool = False,
    ) -> None:
        drivers = dict(DRIVERS)
        if selftest:
            drivers[HostIommu.SELFTEST] = MockDriver()
        super().__init__(host, memory, kernel=kernel, selftest=selftest, drivers=drivers)

    # -- Backend ------------------------------------------------------------------------
    def open_device(self, device: str) -> int:
        adopted = self._adopted.get(device)
        if adopted is not None:
            return adopted  # the cdev the VMM passed (adopt_device)
        try:
            pdev = self.host.device(device)
        except KeyError:
            raise OSError(errno.ENODEV, f"no host device {device!r}") from None
        if any(f.pdev.id == device for f in self._files.values()):
            raise OSError(errno.EBUSY, f"device {device!r} is already open")
        fd = self._new_fd()
        self._files[fd] = DeviceFile(fd, pdev)
        return fd

    def adopt_device(self, device: str, os_fd: int) -> None:
        """Take ``os_fd`` as the VFIO cdev of ``device`` (ownership passes here, also on
        error); ``open_device(device)`` returns its number until it is closed. Any
        character device is taken for the cdev of the device named (the emulator cannot
        tell a VFIO cdev from another one); any other file answers ENOTTY to every VFIO
        request, as a file without VFIO's ioctls does."""
        try:
            pdev = self.host.device(device)
            if device in self._adopted:
                raise OSError(errno.EBUSY, f"device {device!r} already has a passed fd open")
            cdev = stat.S_ISCHR(os.fstat(os_fd).st_mode)
        except KeyError:
            os.close(os_fd)
            raise OSError(errno.ENODEV, f"no host device {device!r}") from None
        except OSError:
            with contextlib.suppress(OSError):
                os.close(os_fd)
            raise
        fd = self._new_fd()
        self._files[fd] = DeviceFile(fd, pdev, os_fd=os_fd, cdev=cdev)
        self._adopted[device] = fd

    def import_fd(self, os_fd: int) -> int:
        """Enter a duplicate of ``os_fd`` in the fd table (the caller keeps its own fd);
        returns the number IOAS_MAP_FILE takes. ``close_fd`` closes it; areas mapped from
        it keep the file until they are unmapped."""
        dup = os.dup(os_fd)
        fd = self._new_fd()
        self._imported[fd] = FileRef.adopt(dup)
        return fd

    def close_device(self, fd: int) -> None:
        self._mark = len(self.cache_model.journal)
        file = self._files.pop(fd, None)
        if file is None:
            raise OSError(errno.EBADF, f"fd {fd} is not an open device")
        if file.dev_id:
            self._unbind(file.dev_id)
        if file.os_fd >= 0:
            os.close(file.os_fd)
            if self._adopted.get(file.pdev.id) == fd:
                del self._adopted[file.pdev.id]

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        self._mark = len(self.cache_model.journal)
        if fd == self.iommufd and self._open:
            return self._iommufd_ioctl(request, arg)
        file = self._files.get(fd)
        if file is None:
            known = fd in self._event_files or fd in self._imported
            return errno.ENOTTY if known else errno.EBADF
        return self._device_ioctl(file, request, arg)

    def close(self) -> None:
        self._mark = len(self.cache_model.journal)
        for fd in sorted(self._event_files):
            del self._event_files[fd]
        for fd in sorted(self._files):
            self.close_device(fd)
        for fd in sorted(self._imported):
            self._imported.pop(fd).put()
        while self._objects:
            leaves = [obj for obj in self._objects.values() if not self._busy(obj)]
            assert leaves, "reference cycle in the object graph"
            for obj in sorted(leaves, key=lambda o: o.id, reverse=True):
                if self._objects.get(obj.id) is obj and not self._busy(obj):
                    self._destroy(obj)
        self._tombstones.clear()
        self._open = False

    def close_fd(self, fd: int) -> None:
        """``close(fd)`` of an event fd, an imported fd (or a device fd, like close_device)."""
        if self._event_files.pop(fd, None) is not None:
            return
        imported = self._imported.pop(fd, None)
        if imported is not None:
            imported.put()
            return
        self.close_device(fd)

    # -- dispatch -------------------------------------------------------------------------
    def _iommufd_ioctl(self, request: int, arg: bytearray) -> int:
        if (
            request == _HWPT_INVALIDATE
            and len(arg) == INVALIDATE_SIZE
            and arg[0] == INVALIDATE_SIZE
            and not arg[1] | arg[2] | arg[3]
        ):
            return self._hwpt_invalidate_exact(arg)  # size == the struct: the checks all pass
        if request == _IOAS_MAP:
            if (
                len(arg) == IOAS_MAP_SIZE
                and arg[0] == IOAS_MAP_SIZE
                and not arg[1] | arg[2] | arg[3]
            ):
                return self._ioas_map_exact(arg)  # the same, for the virtio-iommu MAP path
        elif (
            request == _IOAS_UNMAP
            and len(arg) == IOAS_UNMAP_SIZE
            and arg[0] == IOAS_UNMAP_SIZE
            and not arg[1] | arg[2] | arg[3]
        ):
            return self._ioas_unmap_exact(arg)
        op = _IOMMUFD_OPS.get(request)
        if op is None or (request == uapi.IOMMU_TEST_CMD and not self.selftest):
            return errno.ENOTTY
        cls, handler = op
        try:
            cmd, user_size = copy_cmd_from_user(arg, cls)
            return handler(self, Call(arg, cmd, user_size))
        except IoctlError as exc:
            return exc.errno

    def _device_ioctl(self, file: DeviceFile, request: int, arg: bytearray) -> int:
        if not file.cdev:
            return errno.ENOTTY  # a passed fd that is no VFIO cdev has none of its ioctls
        handler: _DeviceHandler
        if request == uapi.VFIO_DEVICE_BIND_IOMMUFD:
            handler = EmulatedIommufd._vfio_bind
        else:
            if not file.dev_id:
                return errno.EINVAL  # only BIND before the device is bound
            found = _DEVICE_OPS.get(request)
            if found is None:
                return errno.ENOTTY  # the vfio-pci driver does not know it
            handler = found
        try:
            return handler(self, file, arg)
        except IoctlError as exc:
            return exc.errno

    # -- IOMMU_DESTROY (§1.1) ----------------------------------------------------------------
    def _ioctl_destroy(self, call: Call[uapi.Destroy]) -> int:
        obj = self._objects.get(call.cmd.id)
        if obj is None:
            return errno.ENOENT
        if self._busy(obj):
            return errno.EBUSY
        self._destroy(obj)
        return ENOERR


_Handler = Callable[[EmulatedIommufd, Any], int]
_HWPT_INVALIDATE = uapi.IOMMU_HWPT_INVALIDATE
_IOAS_MAP = uapi.IOMMU_IOAS_MAP
_IOAS_UNMAP = uapi.IOMMU_IOAS_UNMAP
_DeviceHandler = Callable[[EmulatedIommufd, DeviceFile, bytearray], int]

# request -> (structure, handler). Known but not emulated requests are absent (ENOTTY).
_IOMMUFD_OPS: dict[int, tuple[type[uapi.UapiStruct], _Handler]] = {
    uapi.IOMMU_DESTROY: (uapi.Destroy, EmulatedIommufd._ioctl_destroy),
    uapi.IOMMU_IOAS_ALLOC: (uapi.IoasAlloc, EmulatedIommufd._ioctl_ioas_alloc),
    uapi.IOMMU_IOAS_MAP: (uapi.IoasMap, EmulatedIommufd._ioctl_ioas_map),
    uapi.IOMMU_IOAS_MAP_FILE: (uapi.IoasMapFile, EmulatedIommufd._ioctl_ioas_map_file),
    uapi.IOMMU_IOAS_UNMAP: (uapi.IoasUnmap, EmulatedIommufd._ioctl_ioas_unmap),
    uapi.IOMMU_HWPT_ALLOC: (uapi.HwptAlloc, EmulatedIommufd._ioctl_hwpt_alloc),
    uapi.IOMMU_GET_HW_INFO: (uapi.GetHwInfo, EmulatedIommufd._ioctl_get_hw_info),
    uapi.IOMMU_HWPT_INVALIDATE: (uapi.HwptInvalidate, EmulatedIommufd._ioctl_hwpt_invalidate),
    uapi.IOMMU_FAULT_QUEUE_ALLOC: (uapi.FaultQueueAlloc, EmulatedIommufd._ioctl_fault_queue_alloc),
    uapi.IOMMU_VIOMMU_ALLOC: (uapi.ViommuAlloc, EmulatedIommufd._ioctl_viommu_alloc),
    uapi.IOMMU_VDEVICE_ALLOC: (uapi.VdeviceAlloc, EmulatedIommufd._ioctl_vdevice_alloc),
    uapi.IOMMU_VEVENTQ_ALLOC: (uapi.VeventqAlloc, EmulatedIommufd._ioctl_veventq_alloc),
    uapi.IOMMU_HW_QUEUE_ALLOC: (uapi.HwQueueAlloc, EmulatedIommufd._ioctl_hw_queue_alloc),
    uapi.IOMMU_TEST_CMD: (uapi.TestCmd, test_cmd),
}

# requests on a bound device cdev (BIND is handled before the bound check)
_DEVICE_OPS: dict[int, _DeviceHandler] = {
    uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT: EmulatedIommufd._vfio_attach,
    uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT: EmulatedIommufd._vfio_detach,
}
