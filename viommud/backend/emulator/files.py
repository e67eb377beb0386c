"""Files the emulated kernel holds: fds a VMM passed in, and what pinning file pages needs.

Mirrors the ``struct file`` references of IOMMU_IOAS_MAP_FILE (``iopt_map_file_pages`` in
``drivers/iommu/iommufd/io_pagetable.c`` takes one with ``fget``, the area's
``iopt_pages`` keeps one until the area is unmapped) and the pinning of file pages
(``pin_memfd_pages`` in ``pages.c``, which calls ``memfd_pin_folios`` of ``mm/gup.c``).

A ``FileRef`` is one reference-counted file: the emulator's own duplicate of an OS fd
(``import_fd``), or an fd of the emulator's own table (iommufd, device or event fd), which
is no memfd. The duplicate is closed when the last reference goes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from viommud.backend.emulator.usercopy import ENOERR, PAGE_SIZE

__all__ = ["FileRef", "is_memfd_kind"]


def is_memfd_kind(os_fd: int) -> bool:
    """Whether ``memfd_pin_folios`` accepts the file: ``shmem_file() || is_file_hugepages()``.

    F_GET_SEALS answers for exactly those files (``memfd_file_seals_ptr`` in mm/memfd.c
    returns the seals of a shmem or hugetlbfs inode, NULL, i.e. EINVAL, for any other), so
    a memfd, a file on tmpfs or on hugetlbfs passes and anything else does not.
    """
    try:
        info = os.fstat(os_fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        fcntl.fcntl(os_fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return True


@dataclass(eq=False, slots=True)
class FileRef:
    """One open file the emulator references (a ``struct file``)."""

    os_fd: int  # the emulator's own OS fd (-1: a file of the emulator's own table)
    memfd: bool  # shmem or hugetlbfs: memfd_pin_folios can pin its pages
    refs: int = 1

    @classmethod
    def adopt(cls, os_fd: int) -> FileRef:
        """Take ``os_fd`` (the emulator's own, closed with the last reference)."""
        return cls(os_fd, is_memfd_kind(os_fd))

    def get(self) -> FileRef:
        self.refs += 1
        return self

    def put(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.os_fd >= 0:
            os.close(self.os_fd)
            self.os_fd = -1

    def pin_error(self, start: int, length: int) -> int:
        """``memfd_pin_folios`` on file bytes ``[start, start + length)``: 0 or its errno.

        EINVAL for a file that is not shmem / hugetlbfs, and for pages at or past the end
        of the file (``shmem_get_folio_gfp`` refuses, with SGP_CACHE, an index whose offset
        is at or past i_size: a memfd is never grown by pinning)."""
        if not self.memfd or self.os_fd < 0:
            return errno.EINVAL
        try:
            size = os.fstat(self.os_fd).st_size
        except OSError:  # pragma: no cover - our own fd stays open while referenced
            return errno.EINVAL
        last_page = (start + length - 1) // PAGE_SIZE
        if last_page * PAGE_SIZE >= size:
            return errno.EINVAL
        return ENOERR
