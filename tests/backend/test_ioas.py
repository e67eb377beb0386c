"""IOMMU_IOAS_MAP / IOMMU_IOAS_UNMAP: the kernel's area rules (ioas.c, io_pagetable.c).

An IOAS holds areas; a map never overlaps an area (EEXIST) and an unmap removes whole
areas only (a range that would split one: ENOENT, with the areas before it already gone);
iova 0 with length 2^64-1 unmaps everything. Before any domain the IOAS has no alignment
and no reserved ranges; each HWPT_PAGING on it adds its page size (4 KiB; the mock 2 KiB)
and its aperture, and makes mapping pin the user pages (EFAULT when they are not mapped).
"""

from __future__ import annotations

import errno
import itertools

import pytest

from protocols import iommufd as uapi
from tests.backend.test_emulated import MAP_RW, U64_MAX, Rig
from viommud.backend.base import Backend
from viommud.backend.calls import BackendCallError, CallLog, Iommufd
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.backend.emulator.objects import IoasObject

FIXED = uapi.IOMMU_IOAS_MAP_FIXED_IOVA
PAGE = 4096
MiB = 1 << 20


@pytest.fixture
def rig() -> Rig:
    return Rig()


def areas(rig: Rig, ioas: int) -> list[tuple[int, int]]:
    obj = rig.be.lookup(ioas)
    assert isinstance(obj, IoasObject)
    return [(a.iova, a.length) for a in obj.areas]


def domained(rig: Rig, device: str = "a0") -> int:
    """An IOAS with a device attached (an auto domain: 4 KiB alignment, 48-bit aperture)."""
    rig.bind(device)
    ioas = rig.ioas()
    assert rig.attach(device, ioas)[0] == 0
    return ioas


# ======================================================================================
# IOAS_MAP: argument checks in kernel order
# ======================================================================================

MAP_ARG_ROWS = {
    "unknown-flag": ({"flags": MAP_RW | FIXED | 8}, errno.EOPNOTSUPP),
    "reserved": ({"reserved": 1}, errno.EOPNOTSUPP),
    "reserved-before-overflow": ({"reserved": 1, "iova": U64_MAX}, errno.EOPNOTSUPP),
    "iova-ulong-max": ({"iova": U64_MAX}, errno.EOVERFLOW),
    "length-ulong-max": ({"length": U64_MAX}, errno.EOVERFLOW),
    "no-permission": ({"flags": FIXED}, errno.EINVAL),
    "overflow-before-ioas": ({"iova": U64_MAX, "ioas_id": 99}, errno.EOVERFLOW),
    "no-ioas": ({"ioas_id": 99}, errno.ENOENT),
    "uptr-overflow": ({"user_va": U64_MAX - 100, "length": 200}, errno.EOVERFLOW),
    "length-zero": ({"length": 0}, errno.EINVAL),
    "length-huge": ({"length": U64_MAX - PAGE + 1, "user_va": 0}, errno.EINVAL),
    "last-overflow": ({"iova": U64_MAX - PAGE, "length": 2 * PAGE}, errno.EOVERFLOW),
    "read-only": ({"flags": FIXED | uapi.IOMMU_IOAS_MAP_READABLE}, 0),
    "write-only": ({"flags": FIXED | uapi.IOMMU_IOAS_MAP_WRITEABLE}, 0),
}


@pytest.mark.parametrize(("fields", "expected"), MAP_ARG_ROWS.values(), ids=MAP_ARG_ROWS.keys())
def test_map_argument_checks(rig: Rig, fields: dict[str, int], expected: int) -> None:
    ioas = rig.ioas()
    values = {
        "flags": MAP_RW | FIXED,
        "ioas_id": ioas,
        "user_va": rig.be.memory.alloc(PAGE),
        "length": PAGE,
        "iova": 0x10000,
    }
    values.update(fields)
    arg = uapi.encode(uapi.IoasMap(**values))
    before = bytes(arg)
    assert rig.raw(uapi.IOMMU_IOAS_MAP, arg) == expected
    if expected:
        assert bytes(arg) == before
        assert areas(rig, ioas) == []


def test_map_on_a_non_ioas_id_is_enoent(rig: Rig) -> None:
    dev = rig.bind("a0")
    assert rig.map(dev, 0x10000, PAGE)[0] == errno.ENOENT


def test_fixed_map_writes_the_iova_back_and_records_the_area(rig: Rig) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0x40000, 3 * PAGE) == (0, 0x40000)
    assert areas(rig, ioas) == [(0x40000, 3 * PAGE)]


OVERLAPS = {
    "same": (0x40000, 2 * PAGE),
    "head": (0x3F000, 2 * PAGE),
    "tail": (0x41000, 2 * PAGE),
    "inside": (0x41000, PAGE),
    "around": (0x30000, 0x20000),
    "last-byte": (0x41FFF, 1),
}


@pytest.mark.parametrize(("iova", "length"), OVERLAPS.values(), ids=OVERLAPS.keys())
def test_overlapping_map_is_eexist(rig: Rig, iova: int, length: int) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0x40000, 2 * PAGE)[0] == 0
    assert rig.map(ioas, iova, length)[0] == errno.EEXIST
    assert areas(rig, ioas) == [(0x40000, 2 * PAGE)]


def test_adjacent_maps_are_separate_areas(rig: Rig) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0x42000, PAGE)[0] == 0
    assert rig.map(ioas, 0x40000, 2 * PAGE)[0] == 0
    assert rig.map(ioas, 0x43000, PAGE)[0] == 0
    assert areas(rig, ioas) == [(0x40000, 2 * PAGE), (0x42000, PAGE), (0x43000, PAGE)]


def test_without_a_domain_there_is_no_alignment_and_no_pinning(rig: Rig) -> None:
    """A software-only IOAS (iova_alignment 1) takes any length and never touches memory."""
    ioas = rig.ioas()
    assert rig.map(ioas, 0x12345, 7, user_va=0xDEAD0003)[0] == 0
    assert rig.map(ioas, 1 << 60, PAGE, user_va=0xDEAD0000)[0] == 0  # no aperture yet


def test_with_a_domain_lengths_iovas_and_offsets_must_be_page_aligned(rig: Rig) -> None:
    ioas = domained(rig)
    buf = rig.be.memory.alloc(4 * PAGE)
    assert rig.map(ioas, 0x10000, PAGE + 1, user_va=buf)[0] == errno.EINVAL
    assert rig.map(ioas, 0x10800, PAGE, user_va=buf)[0] == errno.EINVAL
    assert rig.map(ioas, 0x10000, PAGE, user_va=buf + 0x800)[0] == errno.EINVAL
    assert rig.map(ioas, 0x10000, PAGE, user_va=buf)[0] == 0


def test_with_a_domain_the_user_pages_are_pinned(rig: Rig) -> None:
    ioas = domained(rig)
    assert rig.map(ioas, 0x10000, PAGE, user_va=0xDEAD0000)[0] == errno.EFAULT
    buf = rig.be.memory.alloc(PAGE)
    assert rig.map(ioas, 0x10000, 2 * PAGE, user_va=buf)[0] == errno.EFAULT  # overruns
    assert areas(rig, ioas) == []
    big = rig.be.memory.alloc(1 << 30)  # sparse: a GiB of guest RAM costs nothing
    assert rig.map(ioas, 0x4000_0000, 1 << 30, user_va=big)[0] == 0


def test_the_domain_aperture_is_reserved(rig: Rig) -> None:
    ioas = domained(rig)
    buf = rig.be.memory.alloc(PAGE)
    assert rig.map(ioas, 1 << 48, PAGE, user_va=buf)[0] == errno.EINVAL
    assert rig.map(ioas, (1 << 48) - PAGE, PAGE, user_va=buf)[0] == 0


def test_hwpt_paging_on_a_populated_ioas_checks_alignment_aperture_and_pins(rig: Rig) -> None:
    dev = rig.bind("a0")
    for iova, length, user_va, expected in [
        (0x10000, 7, 0x10000, errno.EADDRINUSE),  # not page aligned
        (1 << 50, PAGE, 0x10000, errno.EADDRINUSE),  # outside the 48-bit aperture
        (0x10000, PAGE, 0xDEAD0000, errno.EFAULT),  # user pages not mapped
    ]:
        ioas = rig.ioas()
        assert rig.map(ioas, iova, length, user_va=user_va)[0] == 0
        assert rig.hwpt(dev, ioas)[0] == expected
        assert rig.attach("a0", ioas)[0] == expected  # the auto domain makes the same checks
    good = rig.ioas()
    assert rig.map(good, 0x10000, PAGE)[0] == 0
    assert rig.hwpt(dev, good)[0] == 0


# ======================================================================================
# IOAS_MAP without FIXED_IOVA: iopt_alloc_iova
# ======================================================================================


def test_allocated_iovas_start_above_page_size_and_follow_alignment(rig: Rig) -> None:
    ioas = domained(rig)
    buf = rig.be.memory.alloc(64 * PAGE)
    assert rig.map(ioas, 0, PAGE, user_va=buf, flags=MAP_RW) == (0, PAGE)
    # 3 pages: aligned to min(roundup_pow2(3 pages), lowest set bit of user_va)
    rc, iova = rig.map(ioas, 0, 3 * PAGE, user_va=buf, flags=MAP_RW)
    assert rc == 0
    assert iova % min(4 * PAGE, buf & -buf) == 0
    assert iova >= 2 * PAGE
    rc, third = rig.map(ioas, 0, PAGE, user_va=buf, flags=MAP_RW)
    assert (rc, third) == (0, 2 * PAGE)  # the hole left below the aligned 3-page area
    spans = areas(rig, ioas)
    for (a, alen), (b, _) in itertools.pairwise(spans):
        assert a + alen <= b


def test_allocated_iova_keeps_the_user_page_offset_without_a_domain(rig: Rig) -> None:
    ioas = rig.ioas()
    rc, iova = rig.map(ioas, 0, 0x100, user_va=0x7000_0123, flags=MAP_RW)
    assert rc == 0
    assert iova % PAGE == 0x123


def test_allocated_iova_needs_enough_alignment(rig: Rig) -> None:
    ioas = domained(rig)
    # uptr aligned to 2 KiB only: the IOVA alignment would be below the domain's 4 KiB
    assert rig.map(ioas, 0, PAGE, user_va=0x1800, flags=MAP_RW)[0] == errno.EINVAL


def test_allocated_iova_overflow(rig: Rig) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0, 1 << 63, user_va=0x1000, flags=MAP_RW)[0] == errno.EOVERFLOW


# ======================================================================================
# IOAS_UNMAP
# ======================================================================================

UNMAP_ARG_ROWS = {
    "length-zero": (0x40000, 0, errno.EINVAL),
    "iova-ulong-max": (U64_MAX, 1, errno.EOVERFLOW),
    "length-ulong-max": (1, U64_MAX, errno.EOVERFLOW),
    "last-overflow": (U64_MAX - PAGE, 2 * PAGE, errno.EOVERFLOW),
    "nothing-there": (0x80000, PAGE, errno.ENOENT),
    "split-head": (0x40000, PAGE, errno.ENOENT),
    "split-tail": (0x41000, PAGE, errno.ENOENT),
    "superset": (0x30000, 0x20000, 0),
    "exact": (0x40000, 2 * PAGE, 0),
}


@pytest.mark.parametrize(
    ("iova", "length", "expected"), UNMAP_ARG_ROWS.values(), ids=UNMAP_ARG_ROWS.keys()
)
def test_unmap_rules(rig: Rig, iova: int, length: int, expected: int) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0x40000, 2 * PAGE)[0] == 0
    arg = uapi.encode(uapi.IoasUnmap(ioas_id=ioas, iova=iova, length=length))
    before = bytes(arg)
    assert rig.raw(uapi.IOMMU_IOAS_UNMAP, arg) == expected
    if expected:
        assert bytes(arg) == before  # nothing written back on error
        assert areas(rig, ioas) == [(0x40000, 2 * PAGE)]
    else:
        assert uapi.decode(uapi.IoasUnmap, arg).length == 2 * PAGE
        assert areas(rig, ioas) == []


def test_unmap_of_no_ioas(rig: Rig) -> None:
    assert rig.unmap(42, 0, PAGE)[0] == errno.ENOENT
    assert rig.unmap(42, 0, U64_MAX)[0] == errno.ENOENT  # the lookup comes first


def test_unmap_covering_several_areas_returns_their_sum(rig: Rig) -> None:
    ioas = rig.ioas()
    for iova in (0x10000, 0x20000, 0x30000):
        assert rig.map(ioas, iova, PAGE)[0] == 0
    assert rig.unmap(ioas, 0x10000, 0x20000) == (0, 2 * PAGE)
    assert areas(rig, ioas) == [(0x30000, PAGE)]


def test_unmap_stops_at_a_split_after_removing_what_came_before(rig: Rig) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0x10000, PAGE)[0] == 0
    assert rig.map(ioas, 0x20000, 2 * PAGE)[0] == 0
    assert rig.unmap(ioas, 0x10000, 0x11000)[0] == errno.ENOENT  # cuts the second area
    assert areas(rig, ioas) == [(0x20000, 2 * PAGE)]  # the first one is gone anyway


def test_unmap_all(rig: Rig) -> None:
    ioas = rig.ioas()
    assert rig.unmap(ioas, 0, U64_MAX) == (0, 0)  # an empty IOAS: success, 0 bytes
    assert rig.map(ioas, 0x10000, PAGE)[0] == 0
    assert rig.map(ioas, 1 << 40, 3 * PAGE)[0] == 0
    assert rig.unmap(ioas, 0, U64_MAX) == (0, 4 * PAGE)
    assert areas(rig, ioas) == []


def test_unmap_iova_0_length_0_is_not_unmap_all(rig: Rig) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0x10000, PAGE)[0] == 0
    assert rig.unmap(ioas, 0, 0)[0] == errno.EINVAL
    assert areas(rig, ioas) == [(0x10000, PAGE)]


def test_destroying_an_ioas_drops_its_areas(rig: Rig) -> None:
    ioas = rig.ioas()
    assert rig.map(ioas, 0x10000, PAGE)[0] == 0
    assert rig.destroy(ioas) == 0


def test_ioas_busy_while_a_domain_uses_it(rig: Rig) -> None:
    ioas = domained(rig)
    assert rig.map(ioas, 0x10000, PAGE)[0] == 0
    assert rig.destroy(ioas) == errno.EBUSY
    assert rig.unmap(ioas, 0x10000, PAGE) == (0, PAGE)


# ======================================================================================
# The typed client (viommud.backend.calls)
# ======================================================================================


def test_typed_client_map_and_unmap() -> None:
    from tests.backend.test_emulated import HOST

    backend: Backend = EmulatedIommufd(HOST)
    log = CallLog(keep=True)
    client = Iommufd(backend, log)
    ioas = client.ioas_alloc()
    buf = backend.memory.alloc(2 * MiB)
    assert client.ioas_map(None, ioas, 0x20_0000, 2 * MiB, user_va=buf) == 0x20_0000
    got = client.ioas_map(None, ioas, 0, PAGE, user_va=buf, fixed_iova=False, writeable=False)
    assert got == PAGE
    with pytest.raises(BackendCallError) as info:
        client.ioas_map(None, ioas, 0x20_0000, PAGE, user_va=buf)
    assert info.value.errno == errno.EEXIST
    assert client.ioas_unmap(None, ioas, 0, U64_MAX) == 2 * MiB + PAGE
    entries = log.drain()
    assert [e["ioctl"] for e in entries] == [
        "IOMMU_IOAS_ALLOC",
        "IOMMU_IOAS_MAP",
        "IOMMU_IOAS_MAP",
        "IOMMU_IOAS_MAP",
        "IOMMU_IOAS_UNMAP",
    ]
    assert entries[1]["args"]["flags"] == MAP_RW | FIXED
    assert entries[2]["args"]["flags"] == uapi.IOMMU_IOAS_MAP_READABLE
    assert entries[3]["errno"] == errno.EEXIST
    assert entries[4]["out"] == {"length": 2 * MiB + PAGE}
