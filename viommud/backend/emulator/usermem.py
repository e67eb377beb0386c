"""Emulated user memory: what ``*_uptr`` pointers point into for the emulated backend.

Allocations are sparse (a ``dict`` of base address to ``bytearray``, looked up with
``bisect``). Bases are page aligned, start at 0x10000 and are never reused, and at least one
unmapped guard page separates two allocations, so an overrun, an underrun or a use after
``free`` faults instead of silently touching a neighbour. Mapping is exact to the byte: a
read or write touching any byte past the requested size raises ``UserFault`` (stricter than
real page-granular memory, and deterministic). Address 0 is never mapped.

Allocations of ``SPARSE_THRESHOLD`` bytes or more (e.g. a VMM's guest RAM backing an
``IOMMU_IOAS_MAP``) are sparse: their pages exist only once written, so mapping gigabytes
costs nothing until they are touched.
"""

from __future__ import annotations

from bisect import bisect_right, insort

from viommud.backend.base import UserFault

PAGE_SIZE = 4096
FIRST_ADDRESS = 0x10000
GUARD = PAGE_SIZE
ADDRESS_LIMIT = 1 << 64
SPARSE_THRESHOLD = 1 << 20


def _page_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class SparseBlock:
    """A zero-initialised byte range whose pages are materialised on first write."""

    __slots__ = ("_pages", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: slice) -> bytes:
        start, stop, _ = index.indices(self._size)
        out = bytearray()
        pos = start
        while pos < stop:
            page, off = divmod(pos, PAGE_SIZE)
            n = min(stop - pos, PAGE_SIZE - off)
            data = self._pages.get(page)
            out += data[off : off + n] if data is not None else bytes(n)
            pos += n
        return bytes(out)

    def __setitem__(self, index: slice, data: bytes | bytearray | memoryview) -> None:
        start, stop, _ = index.indices(self._size)
        view = memoryview(bytes(data))
        pos = start
        while pos < stop:
            page, off = divmod(pos, PAGE_SIZE)
            n = min(stop - pos, PAGE_SIZE - off)
            buf = self._pages.get(page)
            if buf is None:
                buf = self._pages[page] = bytearray(PAGE_SIZE)
            buf[off : off + n] = view[pos - start : pos - start + n]
            pos += n


class EmulatedMemory:
    """A sparse, fault-checking address space implementing ``UserMemory``."""

    __slots__ = ("_bases", "_blocks", "_next")

    # alloc() costs nothing until written: synthetic guest RAM may be placed here
    # (viommud/topology/virtio.py); a backend memory without it gets a sparse memfd.
    sparse = True

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._blocks: dict[int, bytearray | SparseBlock] = {}
        self._next = FIRST_ADDRESS

    # -- UserMemory ---------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Map ``size`` zeroed bytes at a fresh page-aligned address (never 0)."""
        if size < 0:
            raise ValueError(f"negative allocation size {size}")
        base = self._next
        end = base + size
        if end > ADDRESS_LIMIT:
            raise MemoryError("emulated address space exhausted")
        self._next = _page_up(max(end, base + 1)) + GUARD
        self._blocks[base] = SparseBlock(size) if size >= SPARSE_THRESHOLD else bytearray(size)
        insort(self._bases, base)
        return base

    def free(self, addr: int) -> None:
        """Unmap the allocation starting at ``addr``; the range is never handed out again."""
        if self._blocks.pop(addr, None) is None:
            raise ValueError(f"{addr:#x} is not the start of an allocation")
        del self._bases[bisect_right(self._bases, addr) - 1]

    def read(self, addr: int, size: int) -> bytes:
        """Load ``size`` bytes; ``UserFault`` if any of them is unmapped."""
        if size <= 0:
            return b""
        block, off = self._locate(addr, size)
        return bytes(block[off : off + size])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data``; ``UserFault`` (and nothing written) if any byte is unmapped."""
        size = len(data)
        if size == 0:
            return
        block, off = self._locate(addr, size)
        block[off : off + size] = data

    # -- helpers ------------------------------------------------------------------------
    def mapped(self, addr: int, size: int = 1) -> bool:
        """True when ``[addr, addr + size)`` lies inside one allocation."""
        try:
            self._locate(addr, max(size, 1))
        except UserFault:
            return False
        return True

    def allocations(self) -> list[tuple[int, int]]:
        """``(base, size)`` of every live allocation, in address order."""
        return [(base, len(self._blocks[base])) for base in self._bases]

    def _locate(self, addr: int, size: int) -> tuple[bytearray | SparseBlock, int]:
        if addr <= 0 or addr + size > ADDRESS_LIMIT:
            raise UserFault(f"access to {addr:#x}+{size:#x} outside the address space")
        index = bisect_right(self._bases, addr) - 1
        if index >= 0:
            base = self._bases[index]
            block = self._blocks[base]
            off = addr - base
            if off + size <= len(block):
                return block, off
        raise UserFault(f"access to {addr:#x}+{size:#x} touches unmapped memory")
