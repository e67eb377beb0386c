"""``EmulatedMemory``: sparse, page-aligned, guard-gapped, byte-exact fault checking."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viommud.backend.base import UserFault, UserMemory
from viommud.backend.emulator.usermem import FIRST_ADDRESS, PAGE_SIZE, EmulatedMemory


def test_is_a_user_memory() -> None:
    memory: UserMemory = EmulatedMemory()
    assert memory.alloc(1) == FIRST_ADDRESS


def test_allocations_are_page_aligned_zeroed_and_separated() -> None:
    memory = EmulatedMemory()
    first = memory.alloc(PAGE_SIZE)
    second = memory.alloc(10)
    third = memory.alloc(0)
    fourth = memory.alloc(1)
    assert first == FIRST_ADDRESS
    for addr in (first, second, third, fourth):
        assert addr % PAGE_SIZE == 0
    assert second >= first + 2 * PAGE_SIZE  # one guard page at least
    assert len({first, second, third, fourth}) == 4
    assert memory.read(second, 10) == bytes(10)
    assert memory.allocations() == [(first, PAGE_SIZE), (second, 10), (third, 0), (fourth, 1)]


@pytest.mark.parametrize(
    ("offset", "size"),
    [(-1, 1), (0, 11), (10, 1), (9, 2), (-PAGE_SIZE, 1), (PAGE_SIZE, 1)],
    ids=["underrun", "overrun", "just-past", "straddle-end", "guard-below", "guard-above"],
)
def test_touching_an_unmapped_byte_faults(offset: int, size: int) -> None:
    memory = EmulatedMemory()
    addr = memory.alloc(10)
    with pytest.raises(UserFault):
        memory.read(addr + offset, size)
    with pytest.raises(UserFault):
        memory.write(addr + offset, b"\x01" * size)
    assert memory.read(addr, 10) == bytes(10)  # a faulting write wrote nothing


@pytest.mark.parametrize("addr", [0, 1, FIRST_ADDRESS - 1, (1 << 64) - 1, 1 << 64, -5])
def test_unmapped_addresses(addr: int) -> None:
    memory = EmulatedMemory()
    memory.alloc(PAGE_SIZE)
    with pytest.raises(UserFault):
        memory.read(addr, 1)
    assert not memory.mapped(addr)


def test_zero_length_access_never_faults() -> None:
    memory = EmulatedMemory()
    assert memory.read(0, 0) == b""
    memory.write(0, b"")


def test_free_unmaps_and_never_reuses() -> None:
    memory = EmulatedMemory()
    addr = memory.alloc(32)
    memory.write(addr, b"x" * 32)
    memory.free(addr)
    with pytest.raises(UserFault):
        memory.read(addr, 1)
    assert memory.alloc(32) != addr
    with pytest.raises(ValueError, match="not the start"):
        memory.free(addr)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * PAGE_SIZE), min_size=1, max_size=8),
    data=st.data(),
)
def test_round_trip(sizes: list[int], data: st.DataObject) -> None:
    memory = EmulatedMemory()
    blocks = [(memory.alloc(size), size) for size in sizes]
    for addr, size in blocks:
        # bytes from a drawn seed: drawing up to 8 x 12 KiB directly overflows hypothesis's
        # data buffer (HealthCheck.data_too_large on a loaded machine)
        payload = random.Random(data.draw(st.integers(0, 2**32))).randbytes(size)
        memory.write(addr, payload)
        assert memory.read(addr, size) == payload
        assert memory.mapped(addr, size) == (size > 0)
        assert not memory.mapped(addr + size)


def test_large_allocations_are_sparse_and_behave_like_small_ones() -> None:
    from viommud.backend.emulator.usermem import SPARSE_THRESHOLD, EmulatedMemory, SparseBlock

    mem = EmulatedMemory()
    base = mem.alloc(1 << 34)  # 16 GiB of guest RAM: nothing is materialised
    block = mem._blocks[base]
    assert isinstance(block, SparseBlock)
    assert mem.read(base + (1 << 33), 8) == bytes(8)
    mem.write(base + 4090, b"0123456789")  # across a page boundary
    assert mem.read(base + 4088, 14) == b"\0\x000123456789\0\0"
    assert len(block._pages) == 2
    assert mem.mapped(base, 1 << 34)
    assert not mem.mapped(base, (1 << 34) + 1)
    assert mem.allocations()[-1] == (base, 1 << 34)
    small = mem.alloc(SPARSE_THRESHOLD - 1)
    assert not isinstance(mem._blocks[small], SparseBlock)
