"""The domain mapping store against a brute-force model, and crosvm's memory_mapper cases.

``MappingStore`` is a sorted interval structure (columns in sorted blocks of arrays); the
model below is a plain list scanned in full. Hypothesis drives both with the same random MAP
/ UNMAP / lookup sequences and checks every answer and the whole content after each step,
once with the real block size and once with tiny blocks, so that splits and merges happen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from viommud.mappings import Mapping, MappingStore, SplitError

U64_MAX = (1 << 64) - 1


@dataclass
class BruteForce:
    """The specification of §2.5, written as directly as possible."""

    items: list[Mapping] = field(default_factory=list)

    def add(self, m: Mapping) -> bool:
        if any(o.start <= m.end and m.start <= o.end for o in self.items):
            return False
        self.items.append(m)
        return True

    def remove_range(self, start: int, end: int) -> list[Mapping] | None:
        hit = [m for m in self.items if m.start <= end and start <= m.end]
        if any(m.start < start or m.end > end for m in hit):
            return None
        self.items = [m for m in self.items if m not in hit]
        return sorted(hit, key=lambda m: m.start)

    def lookup(self, addr: int) -> Mapping | None:
        found = [m for m in self.items if m.start <= addr <= m.end]
        return found[0] if found else None

    def sorted(self) -> list[Mapping]:
        return sorted(self.items, key=lambda m: m.start)


# Small address space so that overlaps, splits and holes are frequent.
ADDR = st.integers(min_value=0, max_value=64)


def interval() -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(ADDR, ADDR).map(lambda p: (min(p), max(p)))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MappingStore()
        self.model = BruteForce()

    @rule(span=interval(), phys=st.integers(0, 1 << 20), flags=st.integers(0, 7))
    def map(self, span: tuple[int, int], phys: int, flags: int) -> None:
        m = Mapping(span[0], span[1], phys, flags)
        assert self.store.add(m) == self.model.add(m)

    @rule(span=interval())
    def unmap(self, span: tuple[int, int]) -> None:
        expected = self.model.remove_range(*span)
        if expected is None:
            with pytest.raises(SplitError):
                self.store.remove_range(*span)
        else:
            assert self.store.remove_range(*span) == expected

    @rule(addr=ADDR)
    def lookup(self, addr: int) -> None:
        assert self.store.lookup(addr) == self.model.lookup(addr)

    @rule(span=interval())
    def overlaps(self, span: tuple[int, int]) -> None:
        expected = any(m.start <= span[1] and span[0] <= m.end for m in self.model.items)
        assert self.store.overlaps(*span) == expected
        hits = [m for m in self.model.sorted() if m.start <= span[1] and span[0] <= m.end]
        assert self.store.intersecting(*span) == hits

    @invariant()
    def same_content(self) -> None:
        assert list(self.store) == self.model.sorted()
        assert len(self.store) == len(self.model.items)


StoreMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestStoreAgainstBruteForce = StoreMachine.TestCase


class TinyBlocks(MappingStore):
    """Blocks of at most 8 mappings; one left with a single mapping joins a neighbour."""

    __slots__ = ()
    _load = 4


def check_blocks(store: MappingStore) -> None:
    """The block structure: aligned columns, no empty or overfull block, first starts."""
    starts, ends = store._starts, store._ends
    assert len(store._firsts) == len(starts) == len(ends) == len(store._phys)
    assert len(store._flags) == len(starts)
    for b, block in enumerate(starts):
        assert 0 < len(block) <= 2 * store._load
        assert len(ends[b]) == len(store._phys[b]) == len(store._flags[b]) == len(block)
        assert store._firsts[b] == block[0]
    flat = [x for block in starts for x in block]
    assert flat == sorted(set(flat))
    assert len(flat) == len(store)


# Wider space and short mappings: dozens of mappings, so several blocks of TinyBlocks.
WIDE = st.integers(min_value=0, max_value=400)


class TinyBlockMachine(StoreMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = TinyBlocks()

    @rule(start=WIDE, length=st.integers(0, 6), phys=st.integers(0, 1 << 20))
    def map_short(self, start: int, length: int, phys: int) -> None:
        m = Mapping(start, start + length, phys, 3)
        assert self.store.add(m) == self.model.add(m)

    @rule(base=WIDE, count=st.integers(1, 30), step=st.integers(1, 4), downwards=st.booleans())
    def fill(self, base: int, count: int, step: int, downwards: bool) -> None:
        """Consecutive MAPs upwards or downwards: the one-mapping splits at either end."""
        bases = [base + k * step for k in range(count)]
        for start in reversed(bases) if downwards else bases:
            m = Mapping(start, start + step - 1, start * 2, 1)
            assert self.store.add(m) == self.model.add(m)

    @rule(span=st.tuples(WIDE, WIDE).map(lambda p: (min(p), max(p))))
    def unmap_wide(self, span: tuple[int, int]) -> None:
        self.unmap(span)

    @rule(addr=WIDE)
    def lookup_wide(self, addr: int) -> None:
        self.lookup(addr)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        if self.model.items:
            m = data.draw(st.sampled_from(self.model.items))
            self.store.discard(m)
            self.model.items.remove(m)

    @invariant()
    def blocks(self) -> None:
        check_blocks(self.store)


TinyBlockMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
TestTinyBlocksAgainstBruteForce = TinyBlockMachine.TestCase


@pytest.mark.parametrize("downwards", [False, True], ids=["upwards", "downwards"])
def test_sequential_fill_leaves_full_blocks(downwards: bool) -> None:
    """Pages mapped in address order, as a guest does: every block but one is 3/4 full
    (room for later MAPs in the middle without a split), and one-page UNMAPs in the same
    order empty the store through merges."""
    store = TinyBlocks()
    pages = range(0, 100 * 0x1000, 0x1000)
    for start in reversed(pages) if downwards else pages:
        assert store.add(Mapping(start, start + 0xFFF, start, 3))
    check_blocks(store)
    sizes = [len(block) for block in store._starts]
    assert sizes.count(3 * TinyBlocks._load // 2) == len(sizes) - 1
    for start in pages:
        assert store.remove_range(start, start + 0xFFF) == [Mapping(start, start + 0xFFF, start, 3)]
        check_blocks(store)
    assert not store
    assert list(store) == []


def test_unmap_across_blocks() -> None:
    store = TinyBlocks(Mapping(s, s + 9, s, 1) for s in range(0, 1000, 10))
    assert len(store._starts) > 10
    assert store.intersecting(95, 504) == [Mapping(s, s + 9, s, 1) for s in range(90, 510, 10)]
    with pytest.raises(SplitError) as caught:
        store.remove_range(100, 504)
    assert caught.value.mapping == Mapping(500, 509, 500, 1)
    removed = store.remove_range(100, 509)
    assert removed == [Mapping(s, s + 9, s, 1) for s in range(100, 510, 10)]
    check_blocks(store)
    assert [m.start for m in store] == [*range(0, 100, 10), *range(510, 1000, 10)]
    assert store.clear() == [
        Mapping(s, s + 9, s, 1) for s in [*range(0, 100, 10), *range(510, 1000, 10)]
    ]
    assert not store
    check_blocks(store)


def test_discard_needs_the_exact_mapping() -> None:
    store = MappingStore([Mapping(0, 9, 100, 1)])
    for other in [Mapping(0, 9, 100, 3), Mapping(0, 9, 0, 1), Mapping(0, 8, 100, 1)]:
        with pytest.raises(ValueError, match="not in the store"):
            store.discard(other)
    with pytest.raises(ValueError, match="not in the store"):
        MappingStore().discard(Mapping(0, 9, 100, 1))
    store.discard(Mapping(0, 9, 100, 1))
    assert not store


@pytest.mark.parametrize(
    "mapping",
    [
        Mapping(-1, 9, 0, 1),
        Mapping(0, U64_MAX + 1, 0, 1),
        Mapping(0, 9, -1, 1),
        Mapping(0, 9, U64_MAX + 1, 1),
        Mapping(0, 9, 0, 1 << 32),
    ],
)
def test_out_of_range_values_are_refused(mapping: Mapping) -> None:
    """The columns hold what the MAP request can carry (§2.4): u64 addresses, u32 flags."""
    store = MappingStore()
    with pytest.raises(ValueError, match="u64"):
        store.add(mapping)
    assert not store
    assert store.add(Mapping(0, U64_MAX, U64_MAX, (1 << 32) - 1))
    assert list(store) == [Mapping(0, U64_MAX, U64_MAX, (1 << 32) - 1)]


@given(st.lists(st.tuples(interval(), st.integers(0, 100)), max_size=30), interval())
@settings(max_examples=300, deadline=None)
def test_unmap_is_atomic(maps: list[tuple[tuple[int, int], int]], span: tuple[int, int]) -> None:
    """A refused UNMAP (it would split a mapping) leaves every mapping in place."""
    store = MappingStore()
    for (start, end), phys in maps:
        store.add(Mapping(start, end, phys, 1))
    before = list(store)
    try:
        store.remove_range(*span)
    except SplitError:
        assert list(store) == before


def test_extreme_addresses() -> None:
    store = MappingStore()
    top = Mapping(U64_MAX - 0xFFF, U64_MAX, 0, 1)
    assert store.add(top)
    assert store.add(Mapping(0, 0xFFF, 0, 1))
    assert store.lookup(U64_MAX) == top
    assert store.overlaps(U64_MAX, U64_MAX)
    assert store.remove_range(0x1000, U64_MAX) == [top]
    with pytest.raises(ValueError, match="empty"):
        store.add(Mapping(5, 4, 0, 1))


# -- the spec's UNMAP examples (virtio-iommu.md §2.5) -------------------------------------------

SPEC_EXAMPLES = [
    ([], (0, 4), []),
    ([(0, 9)], (0, 9), [(0, 9)]),
    ([(0, 4), (5, 9)], (0, 9), [(0, 4), (5, 9)]),
    ([(0, 9)], (0, 4), None),
    ([(0, 4), (5, 9)], (0, 4), [(0, 4)]),
    ([(0, 4)], (0, 9), [(0, 4)]),
    ([(0, 4), (10, 14)], (0, 14), [(0, 4), (10, 14)]),
]


@pytest.mark.parametrize(
    ("setup", "span", "removed"), SPEC_EXAMPLES, ids=[f"ex{i}" for i in range(1, 8)]
)
def test_spec_unmap_examples(
    setup: list[tuple[int, int]], span: tuple[int, int], removed: list[tuple[int, int]] | None
) -> None:
    store = MappingStore([Mapping(s, e, 0x1000 * i, 1) for i, (s, e) in enumerate(setup)])
    if removed is None:
        with pytest.raises(SplitError):
            store.remove_range(*span)
        assert len(store) == len(setup)
    else:
        assert [(m.start, m.end) for m in store.remove_range(*span)] == removed


# -- crosvm devices/src/virtio/iommu/memory_mapper.rs (virtio-iommu.md §7.2) ------------------


def test_crosvm_map_overlap() -> None:
    store = MappingStore([Mapping(10, 19, 1000, 1)])
    for start, end in [(14, 14), (0, 11), (16, 21), (5, 24)]:
        assert not store.add(Mapping(start, end, 0, 1)), (start, end)
    assert len(store) == 1


def test_crosvm_map_unmap_translations() -> None:
    # example 2: map [0, 8] -> 1000; 0 -> 1000, 8 -> 1008, 9 faults
    store = MappingStore([Mapping(0, 8, 1000, 1)])
    first, last = store.lookup(0), store.lookup(8)
    assert first is not None
    assert first.translate(0) == 1000
    assert last is not None
    assert last.translate(8) == 1008
    assert store.lookup(9) is None
    assert store.remove_range(0, 8)
    assert store.lookup(0) is None
    # example 3: [0, 3] -> 1000 and [5, 8] -> 50; 6 -> 51
    store = MappingStore([Mapping(0, 3, 1000, 1), Mapping(5, 8, 50, 1)])
    found = store.lookup(6)
    assert found is not None
    assert found.translate(6) == 51
    assert len(store.remove_range(0, 8)) == 2
    # example 4: unmapping [0, 3] out of [0, 8] is refused, 5 still maps to 1005
    store = MappingStore([Mapping(0, 8, 1000, 1)])
    with pytest.raises(SplitError):
        store.remove_range(0, 3)
    found = store.lookup(5)
    assert found is not None
    assert found.translate(5) == 1005
    # example 7: [0, 3] R and [10, 13] RW; 4 is a hole; unmap [0, 13] removes both
    store = MappingStore([Mapping(0, 3, 1000, 1), Mapping(10, 13, 50, 3)])
    assert store.lookup(4) is None
    found = store.lookup(13)
    assert found is not None
    assert (found.translate(13), found.flags) == (53, 3)
    assert len(store.remove_range(0, 13)) == 2


def test_crosvm_remove_map() -> None:
    store = MappingStore([Mapping(1, 4, 0, 1), Mapping(5, 8, 0, 1), Mapping(9, 12, 0, 1)])
    for span, left in [
        ((0, 5), None),
        ((1, 5), None),
        ((1, 9), None),
        ((6, 9), None),
        ((6, 19), None),
        ((5, 8), 2),
        ((1, 9), None),
        ((0, 14), 0),
    ]:
        before = len(store)
        if left is None:
            with pytest.raises(SplitError):
                store.remove_range(*span)
            assert len(store) == before, span
        else:
            store.remove_range(*span)
            assert len(store) == left, span


def test_constructor_refuses_overlaps() -> None:
    with pytest.raises(ValueError, match="overlapping"):
        MappingStore([Mapping(0, 9, 0, 1), Mapping(9, 12, 0, 1)])


def test_sequential_fill_leaves_room_in_the_middle() -> None:
    """Every other page mapped upwards, then the holes of the first block: it takes
    ``_load // 2`` of them before it splits (a full block would split at the first)."""
    store = TinyBlocks()
    page = 0x1000
    for i in range(40):
        assert store.add(Mapping(2 * i * page, 2 * i * page + 0xFFF, 0, 3))
    blocks = len(store._firsts)
    holes = [(2 * i + 1) * page for i in range(TinyBlocks._load // 2 + 1)]
    for start in holes[:-1]:
        assert store.add(Mapping(start, start + 0xFFF, 0, 3))
        assert len(store._firsts) == blocks
    assert store.add(Mapping(holes[-1], holes[-1] + 0xFFF, 0, 3))
    assert len(store._firsts) == blocks + 1
    check_blocks(store)
