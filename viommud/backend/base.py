"""The interface every backend offers: the kernel's own calling convention.

A backend is addressed exactly like the kernel: ``ioctl(fd, request, arg)`` where ``arg`` is
the packed uAPI structure (``protocols.iommufd``) in a mutable buffer; the backend writes
back output fields into ``arg`` as the kernel's ``copy_to_user`` would and returns 0 or a
positive errno. Pointers inside structures (``data_uptr``) are addresses in the backend's
``memory``: emulated user memory for the emulator, real process memory for /dev/iommu.

``fd`` is either ``iommufd`` (the open /dev/iommu) or a device fd from ``open_device``
(a VFIO cdev, on which VFIO_DEVICE_BIND_IOMMUFD / ATTACH / DETACH are issued). Fds a VMM
passed enter through ``adopt_device`` (its device cdevs) and ``import_fd`` (guest RAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from viommud.host import HostConfig


class UserFault(Exception):  # noqa: N818 - mirrors the kernel's EFAULT condition
    """An access to user memory that is not mapped (the kernel would answer EFAULT)."""


class UserMemory(Protocol):
    """Memory a backend reads ``*_uptr`` pointers from."""

    def alloc(self, size: int) -> int:
        """Map ``size`` zeroed bytes and return their address (never 0)."""
        ...

    def free(self, addr: int) -> None:
        """Unmap an allocation made by ``alloc``."""
        ...

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr``; raises UserFault if any byte is unmapped."""
        ...

    def read(self, addr: int, size: int) -> bytes:
        """Load ``size`` bytes from ``addr``; raises UserFault if any byte is unmapped."""
        ...


class Backend(Protocol):
    """One iommufd context (one open of /dev/iommu) plus the device cdevs it uses."""

    name: str
    host: HostConfig
    iommufd: int
    memory: UserMemory

    def open_device(self, device: str) -> int:
        """Open the VFIO cdev of host device ``device``; returns its fd.

        Raises ``OSError(errno)`` like open(2): ENODEV for an unknown device, EBUSY when it
        is already open.
        """
        ...

    def close_device(self, fd: int) -> None:
        """Close a device fd: the device is unbound from the iommufd."""
        ...

    def adopt_device(self, device: str, os_fd: int) -> None:
        """Take ``os_fd``, a VFIO cdev the VMM passed, as host device ``device``'s: from
        then on ``open_device(device)`` returns it (its number) until it is closed. The
        backend owns ``os_fd`` from the call on, also when it raises ``OSError``
        (ENODEV: no such host device; EBUSY: a passed fd of that device is still open)."""
        ...

    def import_fd(self, os_fd: int) -> int:
        """Make ``os_fd`` (a guest RAM memfd) usable in ioctls: returns the number to put in
        IOMMU_IOAS_MAP_FILE's ``fd``. The caller keeps ``os_fd`` open until ``close_fd`` of
        that number (the emulator holds a duplicate; /dev/iommu takes the fd itself)."""
        ...

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        """Issue ``request`` with the packed structure ``arg``; returns 0 or an errno."""
        ...

    def read(self, fd: int, count: int) -> tuple[int, bytes]:
        """``read(fd, count)`` on a vEVENTQ or FAULT fd: ``(errno, data)``; never blocks."""
        ...

    def write(self, fd: int, data: bytes) -> tuple[int, int]:
        """``write(fd, data)`` on a FAULT fd (page responses): ``(errno, bytes taken)``."""
        ...

    def close_fd(self, fd: int) -> None:
        """Close an event fd (vEVENTQ, FAULT): the object may then be destroyed; or forget
        a number ``import_fd`` returned (mappings made from it stay)."""
        ...

    def close(self) -> None:
        """Close the iommufd: every object it holds is destroyed, leaf first."""
        ...


@dataclass(frozen=True, slots=True)
class DeviceFault:
    """A DMA fault the host reported for one physical device (backend -> frontend).

    ``device`` is the host device id. ``address`` is the faulting input address, None when
    the host gave none; ``read``/``write`` the access; ``pasid`` the access's PASID, if any.
    ``translation`` is True for a translation or permission fault on an address and False for
    anything else (bad configuration, internal error). The frontend of the device's vIOMMU
    turns it into the guest's own fault record (virtio-iommu: ``virtio_iommu_fault``)."""

    device: str
    address: int | None = None
    read: bool = False
    write: bool = False
    pasid: int | None = None
    translation: bool = True
