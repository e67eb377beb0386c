"""The table walks on made-up guest memory: which regions they dump, from which entries."""

from __future__ import annotations

import struct

import pytest

from capture.tables import smmuv3_tables, vtd_tables


class Memory:
    """Sparse guest memory: unwritten bytes read as zero; records every read."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.reads: list[tuple[int, int]] = []

    def write(self, address: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[address + i] = b

    def read(self, address: int, size: int) -> bytes:
        self.reads.append((address, size))
        return bytes(self.bytes.get(address + i, 0) for i in range(size))


def test_smmuv3_two_level_stream_table_and_its_cds() -> None:
    mem = Memory()
    l1, l2, cd = 0x4852_D000, 0x5B66_0000, 0x481A_C000
    mem.write(l1 + 8 * 1, struct.pack("<Q", l2 | 9))  # L1STD 1: span 9 -> 256 STEs
    # STE of SID 0x108 (L2 index 8): V, Config S1 (0b101), one CD; the others abort/bypass.
    mem.write(l2 + 64 * 8, struct.pack("<QQ", cd | 0xB, 0xD6))
    mem.write(l2 + 64 * 9, struct.pack("<Q", 0x9))  # V, Config bypass (0b100): no CD
    # STRTAB_BASE_CFG: FMT 2-level, SPLIT 8, LOG2SIZE 16 (what Linux 6.1 programs).
    regions = smmuv3_tables(mem.read, 0x4000_0000_0000_0000 | l1, 1 << 16 | 8 << 6 | 16)
    assert [(r.what, r.address, len(r.data)) for r in regions] == [
        ("strtab-l1", l1, 2048),
        ("strtab-l2 sid 0x100", l2, 16384),
        ("cd-table sid 0x108", cd, 64),
    ]
    assert regions[1].data[512:528] == struct.pack("<QQ", cd | 0xB, 0xD6)


def test_smmuv3_linear_table_and_a_cd_array() -> None:
    mem = Memory()
    mem.write(0x1000 + 64 * 3, struct.pack("<Q", 0x8000 | 0xB | 2 << 59))  # S1CDMax 2
    regions = smmuv3_tables(mem.read, 0x1000, 4)  # linear, 16 STEs
    assert [(r.what, r.address, len(r.data)) for r in regions] == [
        ("strtab", 0x1000, 1024),
        ("cd-table sid 0x3", 0x8000, 256),
    ]


def test_smmuv3_unset_stream_table_dumps_nothing() -> None:
    assert smmuv3_tables(Memory().read, 0, 0) == []


def test_vtd_legacy_root_and_context_tables() -> None:
    mem = Memory()
    root = 0x25F_F000
    mem.write(root + 16 * 1, struct.pack("<QQ", 0x26C_5001, 0))  # bus 1 present
    mem.write(root + 16 * 2, struct.pack("<QQ", 0x26C_9000, 0))  # bus 2 not present
    regions = vtd_tables(mem.read, root)
    assert [(r.what, r.address) for r in regions] == [
        ("root-table", root),
        ("context-table bus 01", 0x26C_5000),
    ]


def test_vtd_scalable_walks_both_halves_and_the_pasid_structures() -> None:
    mem = Memory()
    root, lower, upper, directory, table = (
        0x207_7000,
        0x20A_D000,
        0x20B_8000,
        0x207_C000,
        0x20A_C000,
    )
    mem.write(root, struct.pack("<QQ", lower | 1, upper | 1))
    mem.write(lower + 32 * 8, struct.pack("<Q", directory | 1))  # devfn 8: present
    mem.write(upper + 32 * 2, struct.pack("<Q", directory | 1))  # shares the directory
    mem.write(directory, struct.pack("<Q", table | 1))  # PASIDs 0-63
    regions = vtd_tables(mem.read, root | 1 << 10)  # TTM 01: scalable
    assert [(r.what, r.address) for r in regions] == [
        ("root-table", root),
        ("context-table bus 00 devfn 0-127", lower),
        ("pasid-directory", directory),
        ("pasid-table 0x0", table),
        ("context-table bus 00 devfn 128-255", upper),
    ]


def test_a_region_too_large_is_refused() -> None:
    with pytest.raises(ValueError, match="more than the kit dumps"):
        smmuv3_tables(Memory().read, 0x1000, 20)  # linear 2^20 STEs = 64 MiB
