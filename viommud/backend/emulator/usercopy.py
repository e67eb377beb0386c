"""Copying a call's arguments in and out of user memory (reference §0.2, §1.5, §2.3).

Mirrors the ioctl entry of ``drivers/iommu/iommufd/main.c`` (the ``size`` convention and
``iommufd_ucmd_respond``) together with the user-copy helpers it relies on:
``copy_struct_from_user`` / ``check_zeroed_user`` (``include/linux/uaccess.h``) and the
``iommu_copy_struct_from_user*`` family over ``struct iommu_user_data(_array)``
(``include/linux/iommu.h``). Every read of user memory by the emulator goes through here,
which is where a ``UserFault`` turns into EFAULT.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from protocols import iommufd as uapi
from viommud.backend.base import UserFault, UserMemory

__all__ = [
    "ENOERR",
    "KMALLOC_MAX_SIZE",
    "PAGE_SIZE",
    "U64_MAX",
    "Call",
    "IoctlError",
    "UserArray",
    "UserData",
    "check_zeroed_user",
    "copy_array_entry",
    "copy_cmd_from_user",
    "copy_data_from_user",
    "copy_full_array",
    "copy_struct_from_user",
    "decode_entries",
]

ENOERR = 0
U64_MAX = (1 << 64) - 1
KMALLOC_MAX_SIZE = 4 << 20
PAGE_SIZE = 4096
_U32 = struct.Struct("<I")


class IoctlError(Exception):
    """Internal: a call fails with ``errno`` and nothing is written back."""

    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


S = TypeVar("S", bound=uapi.UapiStruct)


def copy_cmd_from_user(arg: bytearray, cls: type[S]) -> tuple[S, int]:
    """The iommufd dispatch: read ``size``, check ``MIN_SIZE``, ``copy_struct_from_user``.

    ``arg`` is the user memory at the ioctl argument: bytes past ``len(arg)`` are unmapped.
    Returns the zero-filled structure and the user's ``size``.
    """
    if len(arg) < 4:
        raise IoctlError(errno.EFAULT)
    (user_size,) = _U32.unpack_from(arg)
    if user_size < cls.MIN_SIZE:
        raise IoctlError(errno.EINVAL)
    ksize = cls.FORMAT.size
    if user_size > ksize:
        tail = arg[ksize:user_size]
        if tail.count(0) != len(tail):
            raise IoctlError(errno.E2BIG)
        if user_size > len(arg):
            raise IoctlError(errno.EFAULT)
    n = min(user_size, ksize)
    if n > len(arg):
        raise IoctlError(errno.EFAULT)
    return uapi.decode(cls, arg[:n]), user_size


def check_zeroed_user(memory: UserMemory, addr: int, size: int) -> int:
    """``check_zeroed_user``: 0 when all zero, E2BIG at a non-zero byte, EFAULT at a hole."""
    pos, end = addr, addr + size
    while pos < end:
        stop = min(end, (pos // PAGE_SIZE + 1) * PAGE_SIZE)
        try:
            chunk = memory.read(pos, stop - pos)
        except UserFault:
            for byte_addr in range(pos, stop):
                try:
                    if memory.read(byte_addr, 1) != b"\0":
                        return errno.E2BIG
                except UserFault:
                    return errno.EFAULT
            return errno.EFAULT  # pragma: no cover - the chunk read faulted somewhere
        if chunk.count(0) != len(chunk):
            return errno.E2BIG
        pos = stop
    return ENOERR


def copy_struct_from_user(memory: UserMemory, cls: type[S], addr: int, user_size: int) -> S:
    """``copy_struct_from_user(kernel_size, user_size)`` from user memory (§0.2 step 4)."""
    ksize = cls.FORMAT.size
    if user_size > ksize:
        rc = check_zeroed_user(memory, addr + ksize, user_size - ksize)
        if rc:
            raise IoctlError(rc)
    try:
        raw = memory.read(addr, min(user_size, ksize))
    except UserFault:
        raise IoctlError(errno.EFAULT) from None
    return uapi.decode(cls, raw)


@dataclass(frozen=True, slots=True)
class UserData:
    """``struct iommu_user_data``: typed driver data behind a user pointer."""

    type: int
    uptr: int
    len: int


@dataclass(frozen=True, slots=True)
class UserArray:
    """``struct iommu_user_data_array``: the invalidation array of HWPT_INVALIDATE."""

    type: int
    uptr: int
    entry_len: int
    entry_num: int


def copy_data_from_user(
    memory: UserMemory, cls: type[S], data: UserData, data_type: int, min_len: int
) -> S:
    """``iommu_copy_struct_from_user`` (§1.5): EINVAL type / length, EFAULT bad pointer."""
    if data.type != data_type:
        raise IoctlError(errno.EINVAL)
    if data.len < min_len or data.len > cls.FORMAT.size:
        raise IoctlError(errno.EINVAL)
    return copy_struct_from_user(memory, cls, data.uptr, data.len)


def copy_array_entry(
    memory: UserMemory, cls: type[S], array: UserArray, data_type: int, *, index: int, min_len: int
) -> S:
    """``iommu_copy_struct_from_user_array``: entry ``index`` alone, rules of §1.5 (§2.3)."""
    if index >= array.entry_num or not array.entry_num:
        raise IoctlError(errno.EINVAL)
    entry = UserData(array.type, array.uptr + array.entry_len * index, array.entry_len)
    return copy_data_from_user(memory, cls, entry, data_type, min_len)


def copy_full_array(memory: UserMemory, cls: type[S], array: UserArray, data_type: int) -> list[S]:
    """``iommu_copy_struct_from_full_user_array`` (§2.3): all entries or nothing.

    Short entries are zero-filled, long ones accepted when the extra bytes are zero (E2BIG
    otherwise); a fault anywhere is EFAULT.
    """
    if array.type != data_type:
        raise IoctlError(errno.EINVAL)
    if not array.entry_num:
        raise IoctlError(errno.EINVAL)
    if array.entry_len == cls.FORMAT.size:
        try:
            blob = memory.read(array.uptr, array.entry_num * array.entry_len)
        except UserFault:
            raise IoctlError(errno.EFAULT) from None
        return decode_entries(cls, blob)
    return [
        copy_struct_from_user(memory, cls, array.uptr + array.entry_len * i, array.entry_len)
        for i in range(array.entry_num)
    ]


def decode_entries(cls: type[S], blob: bytes) -> list[S]:
    """A packed array of ``cls`` entries (``entry_len`` == the struct size) decoded."""
    return [uapi.decode(cls, raw) for raw in _chunks(blob, cls.FORMAT.size)]


def _chunks(blob: bytes, size: int) -> Iterator[bytes]:
    for off in range(0, len(blob), size):
        yield blob[off : off + size]


@dataclass(slots=True)
class Call(Generic[S]):
    """One accepted iommufd ioctl: the copied-in struct and the way back to the user."""

    arg: bytearray
    cmd: S
    user_size: int

    def respond(self, cmd: S) -> int:
        """``iommufd_ucmd_respond``: copy ``min(user, kernel)`` bytes back; 0 or EFAULT."""
        n = min(self.user_size, type(cmd).FORMAT.size)
        if n > len(self.arg):
            return errno.EFAULT  # pragma: no cover - the same bytes were just read
        self.arg[:n] = uapi.encode(cmd)[:n]
        return ENOERR
