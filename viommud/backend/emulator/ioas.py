"""IOAS ioctls: IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP(_FILE) and IOMMU_IOAS_UNMAP (reference §1.2).

Mirrors ``drivers/iommu/iommufd/ioas.c`` and the parts of ``io_pagetable.c`` behind it:
IOVA allocation (``iopt_alloc_iova``), reserved ranges outside the domains' apertures,
area insertion and whole-area unmapping with partial progress.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import replace

from protocols import iommufd as uapi
from viommud.backend.emulator.context import IommufdContext
from viommud.backend.emulator.files import FileRef
from viommud.backend.emulator.objects import Area, IoasObject
from viommud.backend.emulator.usercopy import ENOERR, PAGE_SIZE, U64_MAX, Call, IoctlError

__all__ = ["IOAS_MAP_SIZE", "IOAS_UNMAP_SIZE", "IoasIoctls"]

MAP_FLAGS = (
    uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_WRITEABLE | uapi.IOMMU_IOAS_MAP_READABLE
)
MAP_PROT = uapi.IOMMU_IOAS_MAP_WRITEABLE | uapi.IOMMU_IOAS_MAP_READABLE


IOAS_MAP_FORMAT = uapi.IoasMap.FORMAT
IOAS_UNMAP_FORMAT = uapi.IoasUnmap.FORMAT
IOAS_MAP_SIZE = IOAS_MAP_FORMAT.size
IOAS_UNMAP_SIZE = IOAS_UNMAP_FORMAT.size
_MAP_IOVA_OFFSET = 32  # struct iommu_ioas_map: iova
_UNMAP_LENGTH_OFFSET = 16  # struct iommu_ioas_unmap: length
_U64 = struct.Struct("<Q")


def _roundup_pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()


class IoasIoctls(IommufdContext):
    """The IOAS handlers of ``EmulatedIommufd``."""

    # -- IOMMU_IOAS_ALLOC (§1.2) -------------------------------------------------------------
    def _ioctl_ioas_alloc(self, call: Call[uapi.IoasAlloc]) -> int:
        if call.cmd.flags:
            return errno.EOPNOTSUPP
        ioas = self._insert(IoasObject)
        return self._finish(call, replace(call.cmd, out_ioas_id=ioas.id), ioas)

    def _reserved(self, ioas: IoasObject) -> tuple[tuple[int, int], ...]:
        """The IOVA ranges outside the apertures of the IOAS's domains."""
        return self._iopt(ioas).reserved

    def _alloc_iova(self, ioas: IoasObject, uptr: int, length: int, iopt_align: int) -> int:
        """``iopt_alloc_iova``: the lowest fitting hole above PAGE_SIZE."""
        if length == 0 or length >= U64_MAX // 2:
            raise IoctlError(errno.EOVERFLOW)
        align = _roundup_pow2(length)
        if uptr:
            align = min(align, uptr & -uptr)
        if align < iopt_align:
            raise IoctlError(errno.EINVAL)
        page_offset = uptr % PAGE_SIZE
        lo, hi = PAGE_SIZE, U64_MAX - PAGE_SIZE
        start = ((lo + align - 1) & ~(align - 1)) | page_offset
        if start > hi or hi - start < length - 1:
            raise IoctlError(errno.ENOSPC)  # pragma: no cover - the span is 2^64 - 8 KiB
        used = sorted([*self._reserved(ioas), *((a.iova, a.last) for a in ioas.areas)])
        hole_start = lo
        for first, last in [*used, (hi + 1, hi + 1)]:
            if first > hole_start:
                hole_last = min(first - 1, hi)
                cand = ((hole_start + align - 1) & ~(align - 1)) | page_offset
                if cand <= hole_last and hole_last - cand >= length - 1:
                    return cand
            hole_start = max(hole_start, last + 1)
            if hole_start > hi:
                break
        raise IoctlError(errno.ENOSPC)

    # -- IOMMU_IOAS_MAP ---------------------------------------------------------------------
    def _ioctl_ioas_map(self, call: Call[uapi.IoasMap]) -> int:
        cmd = call.cmd
        iova = self._ioas_map(
            cmd.flags,
            cmd.ioas_id,
            reserved=cmd.reserved,
            user_va=cmd.user_va,
            length=cmd.length,
            iova=cmd.iova,
        )
        if iova < 0:
            return -iova
        out = cmd if iova == cmd.iova else replace(cmd, iova=iova)  # FIXED_IOVA: the same
        if call.respond(out):
            return errno.EFAULT  # pragma: no cover - respond cannot fault here
        return ENOERR

    def _ioas_map_exact(self, arg: bytearray) -> int:
        """``IOMMU_IOAS_MAP`` whose ``size`` is the kernel's struct size and whose argument
        holds exactly that struct (what ``Iommufd.ioas_map`` passes): ``copy_cmd_from_user``
        passes and would copy it whole, and ``respond`` would write it back whole with only
        ``iova`` possibly changed, so the fields are unpacked straight from ``arg`` (the
        same FORMAT) and ``iova`` packed back. ``_iommufd_ioctl`` takes it only for such an
        ``arg``; tests/backend/test_ioas_exact.py holds it to the general path."""
        _size, flags, ioas_id, reserved, user_va, length, iova = IOAS_MAP_FORMAT.unpack(arg)
        try:
            out = self._ioas_map(
                flags, ioas_id, reserved=reserved, user_va=user_va, length=length, iova=iova
            )
        except IoctlError as exc:
            return exc.errno  # as _iommufd_ioctl: nothing written back
        if out < 0:
            return -out
        if out != iova:
            _U64.pack_into(arg, _MAP_IOVA_OFFSET, out)
        return ENOERR

    def _ioas_map(
        self, flags: int, ioas_id: int, *, reserved: int, user_va: int, length: int, iova: int
    ) -> int:
        """``iommufd_ioas_map``'s checks and ``iopt_map_user_pages``: the IOVA mapped, or
        minus the errno (raises IoctlError where the kernel's helpers fail)."""
        if flags & ~MAP_FLAGS or reserved:
            return -errno.EOPNOTSUPP
        if iova >= U64_MAX or length >= U64_MAX:
            return -errno.EOVERFLOW
        if not flags & MAP_PROT:
            return -errno.EINVAL
        ioas: IoasObject = self._get(ioas_id, IoasObject)
        # iopt_alloc_user_pages / iopt_alloc_pages
        if user_va + length > U64_MAX:
            return -errno.EOVERFLOW
        if length == 0 or length > U64_MAX - PAGE_SIZE:
            return -errno.EINVAL
        return self._map_area(ioas, flags, iova, length, user_va, file=None)

    # -- IOMMU_IOAS_MAP_FILE ----------------------------------------------------------------
    def _ioctl_ioas_map_file(self, call: Call[uapi.IoasMapFile]) -> int:
        """``iommufd_ioas_map_file`` (ioas.c) and ``iopt_map_file_pages`` (io_pagetable.c):
        the checks of IOAS_MAP, then the file's; its pages are pinned (memfd_pin_folios)
        only when a domain needs them, so a file that is no memfd, or too short, fails
        there (EINVAL) and not before."""
        cmd = call.cmd
        if cmd.flags & ~MAP_FLAGS:
            return errno.EOPNOTSUPP
        if cmd.iova >= U64_MAX or cmd.length >= U64_MAX:
            return errno.EOVERFLOW
        if not cmd.flags & MAP_PROT:
            return errno.EINVAL
        ioas: IoasObject = self._get(cmd.ioas_id, IoasObject)
        # iopt_map_file_pages
        if cmd.length == 0:
            return errno.EINVAL
        if cmd.start + cmd.length - 1 > U64_MAX:
            return errno.EOVERFLOW
        file = self._fget(cmd.fd)
        if file is None:
            return errno.EBADF
        # iopt_alloc_file_pages / iopt_alloc_pages
        if cmd.length > U64_MAX - PAGE_SIZE:
            return errno.EINVAL
        file.get()  # the area's iopt_pages holds the file
        try:
            iova = self._map_area(ioas, cmd.flags, cmd.iova, cmd.length, cmd.start, file=file)
        except IoctlError:
            file.put()
            raise
        if call.respond(replace(cmd, iova=iova)):
            return errno.EFAULT  # pragma: no cover - respond cannot fault here
        return ENOERR

    def _fget(self, fd: int) -> FileRef | None:
        """``fget(fd)``: the open file numbered ``fd`` in this process (the emulator's fd
        table); the iommufd, device and event fds are files too, but no memfd."""
        imported = self._imported.get(fd)
        if imported is not None:
            return imported
        if fd == self.iommufd or fd in self._files or fd in self._event_files:
            return FileRef(-1, memfd=False, refs=0)
        return None

    def _map_area(
        self,
        ioas: IoasObject,
        flags: int,
        iova: int,
        length: int,
        source: int,
        *,
        file: FileRef | None,
    ) -> int:
        """``iopt_map_common``: place an area of ``length`` bytes from ``source`` (a user VA,
        or a byte offset in ``file``) at ``iova`` (or a free IOVA without FIXED_IOVA);
        pins it when the IOAS has a domain. Returns the IOVA; raises IoctlError."""
        # iopt_alloc_area_pages
        iopt = self._iopt(ioas)
        align = iopt.align
        if length & (align - 1):
            raise IoctlError(errno.EINVAL)
        if flags & uapi.IOMMU_IOAS_MAP_FIXED_IOVA:
            if iova & (align - 1):
                raise IoctlError(errno.EINVAL)
            last = iova + length - 1
            if last > U64_MAX:
                raise IoctlError(errno.EOVERFLOW)
            for first, end in iopt.reserved:
                if first <= last and iova <= end:
                    raise IoctlError(errno.EINVAL)
            if ioas.meets(iova, last):
                raise IoctlError(errno.EEXIST)
        else:
            iova = self._alloc_iova(ioas, source, length, align)
        # iopt_insert_area
        if (source % PAGE_SIZE) & (align - 1):
            raise IoctlError(errno.EINVAL)
        area = Area(iova, length, source, flags & MAP_PROT, 0, file)
        # iopt_fill_domains_pages: pin the pages when a domain needs them
        if iopt.domains:
            rc = self._pin_error(area)
            if rc:
                raise IoctlError(rc)
        ioas.insert(area)
        return iova

    # -- IOMMU_IOAS_UNMAP -------------------------------------------------------------------
    def _ioctl_ioas_unmap(self, call: Call[uapi.IoasUnmap]) -> int:
        cmd = call.cmd
        unmapped = self._ioas_unmap(cmd.ioas_id, cmd.iova, cmd.length)
        if unmapped < 0:
            return -unmapped
        out = cmd if unmapped == cmd.length else replace(cmd, length=unmapped)
        if call.respond(out):
            return errno.EFAULT  # pragma: no cover - respond cannot fault here
        return ENOERR

    def _ioas_unmap_exact(self, arg: bytearray) -> int:
        """``IOMMU_IOAS_UNMAP`` with an argument of exactly the struct (see
        ``_ioas_map_exact``): ``length`` is packed back when it differs."""
        _size, ioas_id, iova, length = IOAS_UNMAP_FORMAT.unpack(arg)
        try:
            unmapped = self._ioas_unmap(ioas_id, iova, length)
        except IoctlError as exc:
            return exc.errno
        if unmapped < 0:
            return -unmapped
        if unmapped != length:
            _U64.pack_into(arg, _UNMAP_LENGTH_OFFSET, unmapped)
        return ENOERR

    def _ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``iommufd_ioas_unmap``: the bytes unmapped, or minus the errno."""
        ioas: IoasObject = self._get(ioas_id, IoasObject)
        if iova == 0 and length == U64_MAX:
            rc, unmapped = self._unmap_range(ioas, 0, U64_MAX)
            if rc == errno.ENOENT:
                rc = ENOERR  # unmapping everything of an empty IOAS succeeds
        else:
            if iova >= U64_MAX or length >= U64_MAX:
                return -errno.EOVERFLOW
            if not length:
                return -errno.EINVAL
            if iova + length - 1 > U64_MAX:
                return -errno.EOVERFLOW
            rc, unmapped = self._unmap_range(ioas, iova, iova + length - 1)
        return -rc if rc else unmapped

    def _unmap_range(self, ioas: IoasObject, start: int, last: int) -> tuple[int, int]:
        """``iopt_unmap_iova_range``: whole areas only, lowest first; partial progress."""
        unmapped = 0
        while True:
            area = ioas.lowest_in(start, last)
            if area is None:
                break
            if area.locks:
                return errno.EBUSY, unmapped
            if area.iova < start or area.last > last:
                return errno.ENOENT, unmapped
            ioas.remove(area)
            for hwpt in self._iopt(ioas).domains:
                self._drivers[hwpt.model].unmap_flush(self, hwpt, area.iova, area.last)
            unmapped += area.length
        return (ENOERR if unmapped else errno.ENOENT), unmapped
