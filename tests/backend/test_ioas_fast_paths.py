"""The IOAS fast paths (issue 17) answer as the general ones on the same inputs.

* ``SortedStarts`` against a plain sorted list, with tiny blocks so that splits and block
  removals happen (hypothesis);
* ``IoasObject.meets`` / ``lowest_in`` / ``areas_in`` against a linear scan of the areas;
* the cached ``Iopt`` of an IOAS (domains, alignment, reserved ranges) against a scan of the
  object table, at every IOAS_MAP / UNMAP of every golden fixture's replay.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import iommufd as uapi
from tests.backend.test_emulated import MAP_RW, U64_MAX, Rig
from tests.golden.capture import fixtures, load, run, stored_path
from viommud.backend.emulator import objects
from viommud.backend.emulator.context import IommufdContext, Iopt
from viommud.backend.emulator.objects import Area, IoasObject, SortedStarts

PAGE = 4096
FIXED = uapi.IOMMU_IOAS_MAP_FIXED_IOVA

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=300)
queries = st.lists(st.tuples(st.integers(-2, 305), st.integers(-2, 305)), max_size=40)
# page-relative offsets: area boundaries and the bytes either side of them
edges = st.sampled_from([-1, 0, 1, 7])
ranges = st.lists(st.tuples(st.integers(0, 205), edges, st.integers(0, 205), edges), max_size=40)


@pytest.fixture(autouse=True)
def _tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects, "_LOAD", 2)


@settings(max_examples=300, deadline=None)
@given(ops, queries)
def test_sorted_starts_is_a_sorted_list(steps: list[tuple[bool, int]], probes: Any) -> None:
    objects._LOAD = 2  # hypothesis runs outside the function-scoped fixture's reach
    fast = SortedStarts()
    plain: list[int] = []
    for add, value in steps:
        present = value in plain
        if add and not present:
            fast.add(value)
            plain.insert(bisect_left(plain, value), value)
        elif not add:
            if present:
                fast.remove(value)
                plain.remove(value)
            else:
                with pytest.raises(ValueError, match="not present"):
                    fast.remove(value)
        assert list(fast) == plain
        assert len(fast) == len(plain)
    for lo, hi in probes:
        i = bisect_right(plain, lo)
        assert fast.floor(lo) == (plain[i - 1] if i else None)
        assert fast.higher(lo) == (plain[i] if i < len(plain) else None)
        assert fast.between(lo, hi) == [v for v in plain if lo <= v <= hi]


def _naive(areas: list[Area], first: int, last: int) -> list[Area]:
    return [a for a in sorted(areas, key=lambda a: a.iova) if a.iova <= last and first <= a.last]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 100), st.integers(1, 4)), max_size=120),
    ranges,
)
def test_ioas_lookups_match_a_scan(steps: Any, probes: Any) -> None:
    objects._LOAD = 2
    ioas = IoasObject(1)
    live: list[Area] = []
    for add, page, pages in steps:
        first, last = page * PAGE, (page + pages) * PAGE - 1
        hit = _naive(live, first, last)
        assert ioas.meets(first, last) == bool(hit)
        if add and not hit:
            area = Area(first, pages * PAGE, 0, 3)
            ioas.insert(area)
            live.append(area)
        elif not add and hit:
            ioas.remove(hit[0])
            live.remove(hit[0])
    # every area's edges and the bytes either side of them, and the random probes
    points = sorted(
        {a.iova + d for a in live for d in (-1, 0, 1)}
        | {a.last + d for a in live for d in (-1, 0, 1)}
        | {a * PAGE + da for a, da, _, _ in probes}
        | {b * PAGE + db for _, _, b, db in probes}
    )
    pairs = [(a * PAGE + da, b * PAGE + db) for a, da, b, db in probes]
    pairs += [(p, q) for i, p in enumerate(points) for q in points[i : i + 8]]
    for a, b in pairs:
        first, last = min(a, b), max(a, b)
        want = _naive(live, first, last)
        assert ioas.areas_in(first, last) == want
        assert ioas.meets(first, last) == bool(want)
        assert ioas.lowest_in(first, last) is (want[0] if want else None)
    assert ioas.areas == sorted(live, key=lambda a: a.iova)


TRACES = fixtures()


@pytest.mark.parametrize("trace", TRACES, ids=[t.name.split(".jsonl")[0] for t in TRACES])
def test_cached_iopt_is_the_object_tables(trace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every IOAS_MAP / UNMAP of a replay reads the cached ``Iopt``; each read is checked
    against a fresh scan, and the replay's outputs must still be the stored ones."""
    cached = IommufdContext._iopt
    reads: list[Iopt] = []

    def checked(self: IommufdContext, ioas: IoasObject) -> Iopt:
        got = cached(self, ioas)
        assert got == self._scan_iopt(ioas)
        reads.append(got)
        return got

    monkeypatch.setattr(IommufdContext, "_iopt", checked)
    assert run(trace, "doorbell") == load(stored_path(trace, "doorbell"))
    if trace.name.startswith("virtio-linux"):
        assert len(reads) > 1000  # its MAPs and UNMAPs went through the cache


def test_iopt_follows_domains_coming_and_going(monkeypatch: pytest.MonkeyPatch) -> None:
    """A domain on the IOAS brings its 4 KiB alignment; once the auto domain goes (the
    device detaches), a 2 KiB area maps again: a stale cached Iopt would refuse it."""
    rig = Rig()
    cached = IommufdContext._iopt

    def checked(self: IommufdContext, ioas: IoasObject) -> Iopt:
        got = cached(self, ioas)
        assert got == self._scan_iopt(ioas)
        return got

    monkeypatch.setattr(IommufdContext, "_iopt", checked)
    ioas = rig.ioas()
    user_va = rig.be.memory.alloc(4 * PAGE)

    def map_at(iova: int, length: int) -> int:
        fields = {"flags": MAP_RW | FIXED, "ioas_id": ioas, "user_va": user_va, "iova": iova}
        return rig.call(uapi.IOMMU_IOAS_MAP, uapi.IoasMap(length=length, **fields))[0]

    assert map_at(0x10000, 0x800) == 0  # no domain: no alignment
    assert (
        rig.call(uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap(ioas_id=ioas, iova=0, length=U64_MAX))[0]
        == 0
    )
    rig.bind("a0")
    assert rig.attach("a0", ioas)[0] == 0
    assert map_at(0x20000, 0x800) == errno.EINVAL  # the auto domain's 4 KiB
    assert map_at(0x20000, PAGE) == 0
    assert rig.detach("a0") == 0  # the auto domain is destroyed
    assert map_at(0x30000, 0x800) == 0
