"""What a VMM hands the daemon besides guest commands: guest RAM and its VFIO devices.

A VMM passes file descriptors over the Unix socket (SCM_RIGHTS, docs/protocol.md): memfds
that back guest RAM, with the guest-physical layout they fill, and the VFIO device cdevs of
the devices it assigns. The shell receives the fds and hands them to the session's
``GuestResources``, which owns them from then on (closes them when the session ends) and
which the models read: guest RAM is mapped into the nesting parent's IOAS with
``IOMMU_IOAS_MAP_FILE`` and a passed cdev is bound instead of opening one by name.

A session without resources keeps working on synthetic memory, as replays do.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "PAGE_SIZE",
    "GuestResourceError",
    "GuestResources",
    "RamRegion",
    "close_all",
    "synthetic_memfd",
]

PAGE_SIZE = 4096


class GuestResourceError(ValueError):
    """Passed resources refused; ``errno`` is the kernel's answer for the same mistake."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{errno.errorcode.get(err, str(err))}: {message}")
        self.errno = err


@dataclass(frozen=True, slots=True)
class RamRegion:
    """``size`` bytes of guest RAM at guest-physical ``gpa``, backed by bytes
    ``[offset, offset + size)`` of the file ``fd`` (an OS fd the session owns)."""

    gpa: int
    size: int
    fd: int
    offset: int = 0

    @property
    def last(self) -> int:
        return self.gpa + self.size - 1


@dataclass
class GuestResources:
    """The guest RAM layout and the device fds one session was given."""

    regions: tuple[RamRegion, ...] = ()
    devices: dict[str, int] = field(default_factory=dict)  # host device name -> cdev fd
    given: set[str] = field(default_factory=set)  # every device a cdev fd was given for

    def set_memory(self, regions: Iterable[RamRegion]) -> None:
        """Take the guest RAM layout. Checks what can be checked before any ioctl: page
        alignment, overlaps, and that each fd is a file at least ``offset + size`` long.
        On error every fd of ``regions`` is closed and the old layout stays."""
        new = tuple(regions)
        try:
            if self.regions:
                raise GuestResourceError(errno.EEXIST, "guest memory was already given")
            _check_layout(new)
        except GuestResourceError:
            close_all(r.fd for r in new)
            raise
        self.regions = tuple(sorted(new, key=lambda r: r.gpa))

    def add_device(self, device: str, fd: int) -> None:
        """Take the VFIO cdev fd of host device ``device``. The fd's kind is the backend's
        to judge (binding a file that is no VFIO cdev fails with ENOTTY there)."""
        if device in self.devices:
            os.close(fd)
            raise GuestResourceError(errno.EEXIST, f"device {device!r} was already given an fd")
        self.devices[device] = fd
        self.given.add(device)

    def take_device(self, device: str) -> int | None:
        """Hand over the cdev fd of ``device`` (None: none was given): binding it passes
        it to the backend, which closes it when the device is unbound. A device attached
        again after that is opened by name, unless the VMM passes a new fd."""
        return self.devices.pop(device, None)

    def close(self) -> None:
        """Close every fd still owned (the session ended)."""
        close_all([*(r.fd for r in self.regions), *self.devices.values()])
        self.regions = ()
        self.devices.clear()

    def layout(self) -> list[list[int]]:
        """The guest-physical layout of the RAM: ``[gpa, size]`` per region (what a state
        document records; fds cannot travel in one)."""
        return [[r.gpa, r.size] for r in self.regions]


def _check_layout(regions: tuple[RamRegion, ...]) -> None:
    for i, region in enumerate(regions):
        where = f"region {i} (gpa {region.gpa:#x}, size {region.size:#x})"
        if region.size <= 0 or region.gpa < 0 or region.offset < 0:
            raise GuestResourceError(errno.EINVAL, f"{where}: empty or negative")
        if (region.gpa | region.size | region.offset) % PAGE_SIZE:
            raise GuestResourceError(errno.EINVAL, f"{where}: not {PAGE_SIZE}-byte aligned")
        if region.gpa + region.size > 1 << 64:
            raise GuestResourceError(errno.EOVERFLOW, f"{where}: ends past 2^64")
        try:
            info = os.fstat(region.fd)
        except OSError as exc:
            raise GuestResourceError(errno.EBADF, f"{where}: fd {region.fd}: {exc}") from None
        if not stat.S_ISREG(info.st_mode):
            raise GuestResourceError(
                errno.EINVAL, f"{where}: fd {region.fd} is not a memory file (memfd)"
            )
        if info.st_size < region.offset + region.size:
            raise GuestResourceError(
                errno.EINVAL,
                f"{where}: needs bytes up to {region.offset + region.size:#x} of its file, "
                f"which holds {info.st_size:#x}",
            )
    ordered = sorted(regions, key=lambda r: r.gpa)
    for a, b in itertools.pairwise(ordered):
        if b.gpa <= a.last:
            raise GuestResourceError(
                errno.EINVAL, f"regions at gpa {a.gpa:#x} and {b.gpa:#x} overlap"
            )


def close_all(fds: Iterable[int]) -> None:
    """Close each of ``fds`` once (an fd number named twice is closed once); errors ignored."""
    for fd in set(fds):
        with contextlib.suppress(OSError):
            os.close(fd)


def synthetic_memfd(size: int, name: str = "viommud-guest-ram") -> int:
    """A sparse memfd of ``size`` bytes (nothing is allocated until a page is touched or
    pinned): the synthetic guest RAM of a session without passed RAM on a backend whose
    user memory is not sparse (/dev/iommu). The caller owns and closes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd
