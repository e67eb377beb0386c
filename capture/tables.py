"""The guest's translation-structure tables at the end of a capture, walked from the vIOMMU's
registers: SMMUv3 stream table and context-descriptor tables; VT-d root, context and (in
scalable mode) PASID directory and table pages.

A capture's commands say *when* the guest changed a structure, not what it wrote; these dumps
give the final contents (the entries of devices whose configuration never changed are
therefore the ones they had throughout). The walk reads guest memory through a callable, so
it runs on the monitor in the kit and on a dictionary in the tests.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Region", "smmuv3_tables", "vtd_tables"]

Read = Callable[[int, int], bytes]  # (guest physical address, size) -> bytes

PAGE = 4096
STE_SIZE = 64
CD_SIZE = 64
MAX_REGION = 1 << 20  # a register value naming more than this is reported, not dumped


@dataclass(frozen=True, slots=True)
class Region:
    """One dumped piece of guest memory and what it is."""

    what: str
    address: int
    data: bytes


def _read(read: Read, what: str, address: int, size: int, out: list[Region]) -> bytes:
    if size > MAX_REGION:
        raise ValueError(f"{what} at 0x{address:x}: {size} bytes is more than the kit dumps")
    data = read(address, size)
    out.append(Region(what, address, data))
    return data


def _stes(read: Read, table: bytes, first_sid: int, out: list[Region]) -> None:
    """The CD tables the valid stage-1 STEs in ``table`` point to."""
    for index in range(len(table) // STE_SIZE):
        (word0,) = struct.unpack_from("<Q", table, index * STE_SIZE)
        valid, config = word0 & 1, (word0 >> 1) & 0x7
        if not valid or config not in (0b101, 0b111):  # SMMUv3 5.2 STE.Config: S1 / nested
            continue
        s1fmt, cdmax = (word0 >> 4) & 0x3, word0 >> 59
        address = word0 & 0x000F_FFFF_FFFF_FFC0
        # 5.2 S1ContextPtr: one CD when S1CDMax is 0, else a linear table of 2^S1CDMax CDs
        # (S1Fmt 0) or a level-1 table of 8-byte descriptors (not walked further).
        size = CD_SIZE if cdmax == 0 else (CD_SIZE << cdmax if s1fmt == 0 else 8 << cdmax)
        kind = "cd-table" if s1fmt == 0 or cdmax == 0 else "cd-l1-table"
        _read(read, f"{kind} sid 0x{first_sid + index:x}", address, size, out)


def smmuv3_tables(read: Read, strtab_base: int, strtab_cfg: int) -> list[Region]:
    """SMMUv3 6.3.23/6.3.24: the stream table named by STRTAB_BASE and STRTAB_BASE_CFG."""
    out: list[Region] = []
    address = strtab_base & 0x000F_FFFF_FFFF_FFC0
    fmt, split, log2size = (strtab_cfg >> 16) & 0x3, (strtab_cfg >> 6) & 0x1F, strtab_cfg & 0x3F
    if address == 0:
        return out
    if fmt == 0:  # linear
        table = _read(read, "strtab", address, STE_SIZE << log2size, out)
        _stes(read, table, 0, out)
        return out
    l1 = _read(read, "strtab-l1", address, 8 << max(log2size - split, 0), out)
    for index in range(len(l1) // 8):
        (desc,) = struct.unpack_from("<Q", l1, index * 8)
        span = desc & 0x1F
        if span == 0:  # 6.3.24 L1STD.Span 0: invalid
            continue
        first = index << split
        l2 = _read(
            read,
            f"strtab-l2 sid 0x{first:x}",
            desc & 0x000F_FFFF_FFFF_FFC0,
            STE_SIZE << (span - 1),
            out,
        )
        _stes(read, l2, first, out)
    return out


def vtd_tables(read: Read, rtaddr: int) -> list[Region]:
    """VT-d 3.4/3.5 and 9.1-9.6: root table, context tables, PASID directories and tables
    (their first page: Linux's DMA domains use PASID 0)."""
    out: list[Region] = []
    root_address = rtaddr & ~0xFFF & (2**64 - 1)
    scalable = (rtaddr >> 10) & 0x3 == 1  # RTADDR_REG.TTM: 00 legacy, 01 scalable
    if root_address == 0:
        return out
    root = _read(read, "root-table", root_address, PAGE, out)
    seen: set[int] = set()
    for bus in range(256):
        lo, hi = struct.unpack_from("<QQ", root, bus * 16)
        halves = [(lo, "")] if not scalable else [(lo, " devfn 0-127"), (hi, " devfn 128-255")]
        for entry, part in halves:
            if not entry & 1:
                continue
            table = _read(read, f"context-table bus {bus:02x}{part}", entry & ~0xFFF, PAGE, out)
            if scalable:
                _pasid(read, table, seen, out)
    return out


def _pasid(read: Read, table: bytes, seen: set[int], out: list[Region]) -> None:
    for index in range(len(table) // 32):  # 9.4 scalable-mode context entries: 32 bytes
        (lo,) = struct.unpack_from("<Q", table, index * 32)
        directory = lo & ~0xFFF & (2**64 - 1)
        if not lo & 1 or directory in seen:
            continue
        seen.add(directory)
        pages = _read(read, "pasid-directory", directory, PAGE, out)
        for slot in range(PAGE // 8):
            (entry,) = struct.unpack_from("<Q", pages, slot * 8)
            table_address = entry & ~0xFFF & (2**64 - 1)
            if entry & 1 and table_address not in seen:  # 9.5 PASID directory entry: P
                seen.add(table_address)
                _read(read, f"pasid-table {slot << 6:#x}", table_address, PAGE, out)
