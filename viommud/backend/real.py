"""The real backend: the same ``Backend`` interface over ``fcntl.ioctl`` on /dev/iommu.

``RealIommufd`` opens ``/dev/iommu`` and the VFIO cdevs (``/dev/vfio/devices/vfioN``) of
the host devices it is asked for, and passes every request through unchanged: the packed
structure in ``arg`` is handed to the kernel, which writes its output fields back into the
same buffer; an ``OSError`` becomes its errno. Pointers inside structures (``data_uptr``,
``user_va``) are addresses in this process: ``CtypesMemory`` hands out ctypes buffers for
them, and refuses (``UserFault``) to touch memory it did not allocate, so a bad pointer can
reach the kernel (which answers EFAULT) but never crashes this process.

One difference from the emulator, for malformed input only: the emulator treats bytes past
``len(arg)`` as unmapped (EFAULT when ``size`` claims more), while ``fcntl.ioctl`` copies
a short buffer into a 1024-byte scratch area, so the kernel reads zeros there instead.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from bisect import bisect_right, insort
from pathlib import Path

from viommud.backend.base import UserFault, UserMemory
from viommud.host import HostConfig

__all__ = ["DEV_IOMMU", "CtypesMemory", "RealIommufd", "vfio_cdev_path"]

DEV_IOMMU = "/dev/iommu"
PAGE_SIZE = 4096
SYS_PCI_DEVICES = "/sys/bus/pci/devices"
VFIO_DEVICES_DIR = "/dev/vfio/devices"


class CtypesMemory:
    """``UserMemory`` over ctypes buffers of this process (what the kernel dereferences)."""

    __slots__ = ("_bases", "_bufs", "_sizes")

    def __init__(self) -> None:
        self._bufs: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self._sizes: dict[int, int] = {}
        self._bases: list[int] = []

    def alloc(self, size: int) -> int:
        """``size`` zeroed bytes at a page-aligned address (like an anonymous mmap)."""
        if size < 0:
            raise ValueError(f"negative allocation size {size}")
        buf = ctypes.create_string_buffer(size + PAGE_SIZE)
        addr = (ctypes.addressof(buf) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        self._bufs[addr] = buf
        self._sizes[addr] = size
        insort(self._bases, addr)
        return addr

    def free(self, addr: int) -> None:
        if self._bufs.pop(addr, None) is None:
            raise ValueError(f"{addr:#x} is not the start of an allocation")
        del self._sizes[addr]
        self._bases.remove(addr)

    def read(self, addr: int, size: int) -> bytes:
        if size <= 0:
            return b""
        self._check(addr, size)
        return ctypes.string_at(addr, size)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if size == 0:
            return
        self._check(addr, size)
        ctypes.memmove(addr, bytes(data), size)

    def mapped(self, addr: int, size: int = 1) -> bool:
        try:
            self._check(addr, max(size, 1))
        except UserFault:
            return False
        return True

    def _check(self, addr: int, size: int) -> None:
        index = bisect_right(self._bases, addr) - 1
        if index >= 0:
            base = self._bases[index]
            if addr + size <= base + self._sizes[base]:
                return
        raise UserFault(f"access to {addr:#x}+{size:#x} outside this backend's buffers")


def vfio_cdev_path(device: str, *, sysfs: str = SYS_PCI_DEVICES) -> str:
    """``/dev/vfio/devices/vfioN`` of PCI device ``device`` (a BDF); ENODEV if none."""
    vfio_dev = Path(sysfs) / device / "vfio-dev"
    try:
        names = sorted(p.name for p in vfio_dev.iterdir() if p.name.startswith("vfio"))
    except OSError:
        names = []
    if not names:
        raise OSError(errno.ENODEV, f"{device} has no VFIO cdev (is it bound to vfio-pci?)")
    return f"{VFIO_DEVICES_DIR}/{names[0]}"


class RealIommufd:
    """One open of /dev/iommu plus the VFIO cdevs of ``host`` (``Backend``)."""

    name = "iommufd"

    def __init__(
        self,
        host: HostConfig,
        *,
        path: str = DEV_IOMMU,
        memory: CtypesMemory | None = None,
        sysfs: str = SYS_PCI_DEVICES,
    ) -> None:
        self.host = host
        self.memory: UserMemory = memory if memory is not None else CtypesMemory()
        self._sysfs = sysfs
        self.iommufd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._devices: dict[int, str] = {}
        self._fds: set[int] = set()  # event fds handed out by the kernel
        self._adopted: dict[str, int] = {}  # device -> the cdev fd the VMM passed
        self._imported: set[int] = set()  # guest RAM fds (the caller's: never closed here)

    def open_device(self, device: str) -> int:
        adopted = self._adopted.get(device)
        if adopted is not None:
            self._devices[adopted] = device
            return adopted
        try:
            self.host.device(device)
        except KeyError:
            raise OSError(errno.ENODEV, f"no host device {device!r}") from None
        if device in self._devices.values():
            raise OSError(errno.EBUSY, f"device {device!r} is already open")
        fd = os.open(vfio_cdev_path(device, sysfs=self._sysfs), os.O_RDWR | os.O_CLOEXEC)
        self._devices[fd] = device
        return fd

    def close_device(self, fd: int) -> None:
        device = self._devices.pop(fd, None)
        if device is None:
            if fd not in self._adopted.values():
                raise OSError(errno.EBADF, f"fd {fd} is not an open device")
            device = next(name for name, adopted in self._adopted.items() if adopted == fd)
        if self._adopted.get(device) == fd:
            del self._adopted[device]
        os.close(fd)  # the kernel unbinds a cdev when its file is released

    def adopt_device(self, device: str, os_fd: int) -> None:
        """The VMM's cdev fd of ``device`` (owned here from now on, closed by close_device
        or close). Whether it is a VFIO cdev, and of that device, is the kernel's to say at
        VFIO_DEVICE_BIND_IOMMUFD (ENOTTY for a file without VFIO's ioctls)."""
        try:
            self.host.device(device)
        except KeyError:
            os.close(os_fd)
            raise OSError(errno.ENODEV, f"no host device {device!r}") from None
        if device in self._adopted:
            os.close(os_fd)
            raise OSError(errno.EBUSY, f"device {device!r} already has a passed fd open")
        self._adopted[device] = os_fd

    def import_fd(self, os_fd: int) -> int:
        """The kernel takes the caller's fd itself (IOAS_MAP_FILE's fget)."""
        self._imported.add(os_fd)
        return os_fd

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        try:
            if arg:
                fcntl.ioctl(fd, request, arg, True)
            else:
                fcntl.ioctl(fd, request, 0)  # a NULL argument pointer
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    # -- event fds (vEVENTQ, FAULT) -----------------------------------------------------------
    def read(self, fd: int, count: int) -> tuple[int, bytes]:
        try:
            return 0, os.read(fd, count)
        except OSError as exc:
            return exc.errno or errno.EIO, b""

    def write(self, fd: int, data: bytes) -> tuple[int, int]:
        try:
            return 0, os.write(fd, data)
        except OSError as exc:
            return exc.errno or errno.EIO, 0

    def close_fd(self, fd: int) -> None:
        if fd in self._imported:
            self._imported.discard(fd)  # the caller's fd: it closes it
            return
        if fd in self._devices or fd in self._adopted.values():
            self.close_device(fd)
            return
        os.close(fd)

    def close(self) -> None:
        for fd in list(self._devices):
            self.close_device(fd)
        for fd in list(self._adopted.values()):
            self.close_device(fd)
        self._imported.clear()
        if self.iommufd >= 0:
            os.close(self.iommufd)
            self.iommufd = -1
