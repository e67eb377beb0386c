"""IOMMU_IOAS_MAP_FILE, import_fd and adopt_device on the emulator, case by case.

The kernel's order (ioas.c ``iommufd_ioas_map_file``, io_pagetable.c
``iopt_map_file_pages`` / ``iopt_alloc_area_pages`` / ``iopt_insert_area``, pages.c
``iopt_alloc_file_pages``): flags, 2^64-1 overflow, no permission, the IOAS, length 0,
start + length overflow, ``fget`` (EBADF), a length past ``SIZE_MAX - PAGE_SIZE``, then the
area rules IOAS_MAP has (alignment, reserved ranges, EEXIST). Pages are pinned only when a
domain needs them: ``memfd_pin_folios`` (mm/gup.c) answers EINVAL for a file that is not
shmem / hugetlbfs and for pages at or past the file's end. Every memfd here is a real one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from protocols import iommufd as uapi
from tests.backend.test_emulated import HOST, MAP_RW, U64_MAX, Rig
from tests.backend.test_selftest import MockRig
from viommud.backend.calls import BackendCallError, CallLog, Iommufd
from viommud.backend.emulator.objects import IoasObject

FIXED = uapi.IOMMU_IOAS_MAP_FIXED_IOVA
PAGE = 4096
MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int) -> int:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.be.close()


@pytest.fixture
def ram() -> Iterator[int]:
    fd = memfd(16 * PAGE)
    yield fd
    os.close(fd)


def map_file(rig: Rig, **fields: int) -> tuple[int, int]:
    values = {"flags": MAP_RW | FIXED, "start": 0, "length": PAGE, "iova": 0x10000}
    values.update(fields)
    rc, out = rig.call(uapi.IOMMU_IOAS_MAP_FILE, uapi.IoasMapFile(**values))
    return rc, out.iova


def areas(rig: Rig, ioas: int) -> list[tuple[int, int, int, bool]]:
    obj = rig.be.lookup(ioas)
    assert isinstance(obj, IoasObject)
    return [(a.iova, a.length, a.user_va, a.file is not None) for a in obj.areas]


def domained(rig: Rig, device: str = "a0") -> int:
    rig.bind(device)
    ioas = rig.ioas()
    assert rig.attach(device, ioas)[0] == 0
    return ioas


# ======================================================================================
# argument checks in kernel order (no domain: nothing is pinned)
# ======================================================================================

ARG_ROWS = {
    "unknown-flag": ({"flags": MAP_RW | FIXED | 8}, errno.EOPNOTSUPP),
    "unknown-flag-before-overflow": ({"flags": MAP_RW | 8, "iova": U64_MAX}, errno.EOPNOTSUPP),
    "iova-ulong-max": ({"iova": U64_MAX}, errno.EOVERFLOW),
    "length-ulong-max": ({"length": U64_MAX}, errno.EOVERFLOW),
    "no-permission": ({"flags": FIXED}, errno.EINVAL),
    "overflow-before-ioas": ({"iova": U64_MAX, "ioas_id": 99}, errno.EOVERFLOW),
    "no-ioas": ({"ioas_id": 99}, errno.ENOENT),
    "no-ioas-before-bad-fd": ({"ioas_id": 99, "fd": 1000}, errno.ENOENT),
    "length-zero": ({"length": 0}, errno.EINVAL),
    "length-zero-before-bad-fd": ({"length": 0, "fd": 1000}, errno.EINVAL),
    "start-overflow": ({"start": U64_MAX - 100, "length": 2 * PAGE}, errno.EOVERFLOW),
    "start-overflow-before-bad-fd": (
        {"start": U64_MAX - 100, "length": 2 * PAGE, "fd": 1000},
        errno.EOVERFLOW,
    ),
    "fd-not-open": ({"fd": 1000}, errno.EBADF),
    "fd-negative": ({"fd": -1}, errno.EBADF),
    "length-huge": ({"length": U64_MAX - PAGE + 1}, errno.EINVAL),
    "last-overflow": ({"iova": U64_MAX - PAGE, "length": 2 * PAGE}, errno.EOVERFLOW),
    "ok": ({}, 0),
    "read-only": ({"flags": FIXED | uapi.IOMMU_IOAS_MAP_READABLE}, 0),
    "write-only": ({"flags": FIXED | uapi.IOMMU_IOAS_MAP_WRITEABLE}, 0),
    "past-the-file-end-unpinned": ({"length": 64 * PAGE}, 0),
    "unaligned-without-domain": ({"start": 3, "length": 5, "iova": 0x10003}, 0),
}


@pytest.mark.parametrize(("fields", "expected"), ARG_ROWS.values(), ids=ARG_ROWS.keys())
def test_map_file_argument_checks(
    rig: Rig, ram: int, fields: dict[str, int], expected: int
) -> None:
    ioas = rig.ioas()
    number = rig.be.import_fd(ram)
    values = {
        "flags": MAP_RW | FIXED,
        "ioas_id": ioas,
        "fd": number,
        "start": 0,
        "length": PAGE,
        "iova": 0x10000,
        **fields,
    }
    arg = uapi.encode(uapi.IoasMapFile(**values))
    before = bytes(arg)
    assert rig.raw(uapi.IOMMU_IOAS_MAP_FILE, arg) == expected
    if expected:
        assert bytes(arg) == before  # nothing written back
        assert areas(rig, ioas) == []
    else:
        out = uapi.decode(uapi.IoasMapFile, arg)
        assert areas(rig, ioas) == [(out.iova, out.length, out.start, True)]


def test_map_file_is_no_longer_enotty(rig: Rig, ram: int) -> None:
    ioas = rig.ioas()
    assert map_file(rig, ioas_id=ioas, fd=rig.be.import_fd(ram)) == (0, 0x10000)


OVERLAPS = {"same": (0x40000, 2 * PAGE), "head": (0x3F000, 2 * PAGE), "inside": (0x41000, PAGE)}


@pytest.mark.parametrize(("iova", "length"), OVERLAPS.values(), ids=OVERLAPS.keys())
def test_overlap_is_eexist_with_user_and_file_areas(
    rig: Rig, ram: int, iova: int, length: int
) -> None:
    ioas = rig.ioas()
    number = rig.be.import_fd(ram)
    assert map_file(rig, ioas_id=ioas, fd=number, iova=0x40000, length=2 * PAGE)[0] == 0
    assert map_file(rig, ioas_id=ioas, fd=number, iova=iova, length=length)[0] == errno.EEXIST
    assert rig.map(ioas, iova, length)[0] == errno.EEXIST  # IOAS_MAP sees the file area
    assert areas(rig, ioas) == [(0x40000, 2 * PAGE, 0, True)]


def test_the_emulators_own_fds_are_files_but_no_memfds(rig: Rig) -> None:
    """fget() finds the iommufd and device fds; without a domain the map succeeds (lazy),
    with one memfd_pin_folios refuses them (EINVAL)."""
    ioas = rig.ioas()
    dev_fd = rig.open("a1")
    assert map_file(rig, ioas_id=ioas, fd=rig.be.iommufd)[0] == 0
    assert map_file(rig, ioas_id=ioas, fd=dev_fd, iova=0x20000)[0] == 0
    other = domained(rig)
    assert map_file(rig, ioas_id=other, fd=rig.be.iommufd)[0] == errno.EINVAL


# ======================================================================================
# with a domain: alignment, aperture, pinning the file
# ======================================================================================


def test_with_a_domain_the_file_pages_are_pinned(rig: Rig) -> None:
    ioas = domained(rig)
    fd = memfd(4 * PAGE)
    try:
        number = rig.be.import_fd(fd)
        rows = [
            ({"length": 5 * PAGE}, errno.EINVAL),  # past the end of the file
            ({"start": 3 * PAGE, "length": 2 * PAGE}, errno.EINVAL),
            ({"start": 0x800}, errno.EINVAL),  # page offset not 4 KiB aligned
            ({"length": PAGE + 1}, errno.EINVAL),  # length not aligned
            ({"iova": 0x10800}, errno.EINVAL),  # iova not aligned
            ({"iova": 1 << 48}, errno.EINVAL),  # outside the 48-bit aperture
            ({"start": 0, "length": 4 * PAGE}, 0),  # exactly the whole file
        ]
        for fields, expected in rows:
            assert map_file(rig, ioas_id=ioas, fd=number, **fields)[0] == expected, fields
        assert areas(rig, ioas) == [(0x10000, 4 * PAGE, 0, True)]
    finally:
        os.close(fd)


def test_with_a_domain_a_file_that_is_no_memfd_is_einval(rig: Rig) -> None:
    ioas = domained(rig)
    read, write = os.pipe()
    try:
        assert map_file(rig, ioas_id=ioas, fd=rig.be.import_fd(read))[0] == errno.EINVAL
    finally:
        os.close(read)
        os.close(write)


def test_a_domain_added_to_a_populated_ioas_pins_the_files(rig: Rig) -> None:
    """iopt_table_add_domain fills the new domain: a memfd truncated after the map fails
    the HWPT allocation and the auto-domain attach alike (EINVAL), a whole one passes."""
    dev = rig.bind("a0")
    fd = memfd(4 * PAGE)
    try:
        number = rig.be.import_fd(fd)
        bad = rig.ioas()
        assert map_file(rig, ioas_id=bad, fd=number, length=4 * PAGE)[0] == 0
        os.ftruncate(fd, PAGE)
        assert rig.hwpt(dev, bad, flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)[0] == errno.EINVAL
        assert rig.attach("a0", bad)[0] == errno.EINVAL
        os.ftruncate(fd, 4 * PAGE)
        rc, hwpt = rig.hwpt(dev, bad, flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
        assert rc == 0
        assert rig.attach("a0", hwpt)[0] == 0
    finally:
        os.close(fd)


def test_allocated_iova_follows_the_file_offset(rig: Rig, ram: int) -> None:
    """Without FIXED_IOVA, iopt_alloc_iova aligns like the start offset (and the length)."""
    ioas = rig.ioas()
    number = rig.be.import_fd(ram)
    rc, iova = map_file(rig, ioas_id=ioas, fd=number, flags=MAP_RW, length=4 * PAGE)
    assert rc == 0
    assert iova == 4 * PAGE  # lowest hole above PAGE_SIZE aligned to roundup_pow2(length)
    rc, iova2 = map_file(rig, ioas_id=ioas, fd=number, flags=MAP_RW, start=PAGE, length=4 * PAGE)
    assert rc == 0
    assert iova2 == 8 * PAGE  # 4 KiB aligned (the start's), the 12 KiB hole below too small


# ======================================================================================
# areas backed by a file are areas: unmap, partial progress, destroy
# ======================================================================================


def test_map_file_then_attach_and_unmap(rig: Rig, ram: int) -> None:
    ioas = rig.ioas()
    number = rig.be.import_fd(ram)
    assert map_file(rig, ioas_id=ioas, fd=number, length=8 * PAGE)[0] == 0
    assert rig.map(ioas, 0x10000 + 8 * PAGE, PAGE)[0] == 0  # a user area right after
    rig.bind("a0")
    assert rig.attach("a0", ioas)[0] == 0  # pins the file pages and the user pages
    rc, out = rig.call(
        uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap(ioas_id=ioas, iova=0x10000, length=9 * PAGE)
    )
    assert (rc, out.length) == (0, 9 * PAGE)
    assert areas(rig, ioas) == []


def test_unmap_splitting_a_file_area_is_enoent_after_progress(rig: Rig, ram: int) -> None:
    ioas = rig.ioas()
    number = rig.be.import_fd(ram)
    assert map_file(rig, ioas_id=ioas, fd=number, iova=0x10000, length=PAGE)[0] == 0
    assert map_file(rig, ioas_id=ioas, fd=number, iova=0x20000, length=4 * PAGE)[0] == 0
    rc, _ = rig.call(
        uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap(ioas_id=ioas, iova=0x10000, length=0x12000)
    )
    assert rc == errno.ENOENT
    assert areas(rig, ioas) == [(0x20000, 4 * PAGE, 0, True)]  # the first one went


def test_selftest_basic_file(ram: int) -> None:
    """selftest iommufd.c ``iommufd_mock_domain`` with the ``file`` variant
    (``test_basic_file``): a one-page map of the memfd on a mock domain; a length past
    the file (EINVAL); after ftruncate(mfd, 0) the same map (EINVAL)."""
    mock = MockRig()
    ioas = mock.ioas()
    mock.mock_domain(ioas)
    mfd_tmp = memfd(16 * PAGE)
    try:
        number = mock.be.import_fd(ram)
        tmp = mock.be.import_fd(mfd_tmp)

        def map_one(fd: int, length: int) -> int:
            rc, _ = mock.call(
                uapi.IOMMU_IOAS_MAP_FILE,
                uapi.IoasMapFile(flags=MAP_RW, ioas_id=ioas, fd=fd, start=0, length=length),
            )
            return rc

        assert map_one(number, PAGE) == 0
        assert map_one(tmp, 16 * PAGE + 1) == errno.EINVAL
        os.ftruncate(mfd_tmp, 0)
        assert map_one(tmp, 16 * PAGE) == errno.EINVAL
    finally:
        mock.be.close()
        os.close(mfd_tmp)


# ======================================================================================
# import_fd / close accounting: no fd leaks
# ======================================================================================


def test_import_close_and_areas_hold_the_file(ram: int) -> None:
    base = open_fds()
    rig = Rig()
    number = rig.be.import_fd(ram)
    assert open_fds() == base + 1  # the emulator's duplicate
    assert rig.raw(uapi.IOMMU_IOAS_ALLOC, bytearray(12), fd=number) == errno.ENOTTY
    ioas = rig.ioas()
    assert map_file(rig, ioas_id=ioas, fd=number)[0] == 0
    rig.be.close_fd(number)
    assert open_fds() == base + 1  # the area keeps the file, as iopt_pages does
    assert map_file(rig, ioas_id=ioas, fd=number, iova=0x20000)[0] == errno.EBADF
    rc, _ = rig.call(uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap(ioas_id=ioas, iova=0, length=U64_MAX))
    assert rc == 0
    assert open_fds() == base
    rig.be.close()
    assert open_fds() == base


def test_close_releases_imports_and_mapped_files(ram: int) -> None:
    base = open_fds()
    rig = Rig()
    ioas = rig.ioas()
    number = rig.be.import_fd(ram)
    assert map_file(rig, ioas_id=ioas, fd=number)[0] == 0
    rig.be.import_fd(ram)
    assert open_fds() == base + 2
    rig.be.close()
    assert open_fds() == base
    os.fstat(ram)  # the caller's fd is untouched


def test_destroying_the_ioas_releases_its_files(rig: Rig, ram: int) -> None:
    base = open_fds()
    ioas = rig.ioas()
    number = rig.be.import_fd(ram)
    assert map_file(rig, ioas_id=ioas, fd=number)[0] == 0
    rig.be.close_fd(number)
    assert open_fds() == base + 1
    rc, _ = rig.call(uapi.IOMMU_DESTROY, uapi.Destroy(id=ioas))
    assert rc == 0
    assert open_fds() == base


def test_typed_call_logs_map_file(ram: int) -> None:
    log = CallLog(keep=True)
    rig = Rig()
    fd = Iommufd(rig.be, log)
    ioas = fd.ioas_alloc()
    number = fd.import_fd(ram)
    assert fd.ioas_map_file(None, ioas, number, PAGE, 2 * PAGE, iova=0x40000) == 0x40000
    assert fd.ioas_map_file(None, ioas, number, 0, PAGE) != 0  # the kernel's choice
    with pytest.raises(BackendCallError) as failed:
        fd.ioas_map_file(None, ioas, number, 0, PAGE, iova=0x40000)
    assert failed.value.errno == errno.EEXIST
    entries = log.drain()
    first = next(e for e in entries if e["ioctl"] == "IOMMU_IOAS_MAP_FILE")
    assert first["args"] == {
        "ioas_id": ioas,
        "iova": 0x40000,
        "length": 2 * PAGE,
        "fd": number,
        "start": PAGE,
        "flags": MAP_RW | FIXED,
    }
    assert first["out"] == {"iova": 0x40000}
    second = [e for e in entries if e["ioctl"] == "IOMMU_IOAS_MAP_FILE"][1]
    assert second["args"]["iova"] is None
    assert second["args"]["flags"] == MAP_RW
    fd.close_imported(number)
    rig.be.close()


# ======================================================================================
# adopt_device: a VFIO cdev the VMM passed
# ======================================================================================


def bind_fd(rig: Rig, fd: int) -> int:
    rc, _ = rig.call(
        uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.VfioDeviceBindIommufd(iommufd=rig.be.iommufd), fd
    )
    return rc


def test_adopted_cdev_binds_and_its_fd_closes_with_it() -> None:
    base = open_fds()
    rig = Rig()
    rig.be.adopt_device("a0", os.open("/dev/null", os.O_RDWR))
    assert open_fds() == base + 1
    number = rig.be.open_device("a0")
    assert rig.be.open_device("a0") == number  # from then on: that fd
    assert bind_fd(rig, number) == 0
    assert bind_fd(rig, number) == errno.EINVAL  # the same fd twice
    rig.be.close_device(number)
    assert open_fds() == base
    other = rig.be.open_device("a0")  # by name again
    assert bind_fd(rig, other) == 0
    rig.be.close()
    assert open_fds() == base


def test_binding_a_device_bound_through_another_fd_is_einval() -> None:
    rig = Rig()
    by_name = rig.bind("a0")
    assert by_name
    rig.be.adopt_device("a0", os.open("/dev/null", os.O_RDWR))
    passed = rig.be.open_device("a0")
    assert passed != rig.fds["a0"]
    assert bind_fd(rig, passed) == errno.EINVAL  # vfio_df_open: opened once via cdev
    rig.be.close_device(rig.fds["a0"])
    assert bind_fd(rig, passed) == 0
    rig.be.close()


def test_a_passed_fd_that_is_no_char_device_is_enotty(ram: int) -> None:
    base = open_fds()
    rig = Rig()
    rig.be.adopt_device("a0", os.dup(ram))
    number = rig.be.open_device("a0")
    assert bind_fd(rig, number) == errno.ENOTTY
    rc, _ = rig.call(
        uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, uapi.VfioDeviceAttachIommufdPt(pt_id=1), number
    )
    assert rc == errno.ENOTTY
    rig.be.close()
    assert open_fds() == base


def test_adopting_an_unknown_device_closes_the_fd() -> None:
    base = open_fds()
    rig = Rig()
    with pytest.raises(OSError, match="no host device") as refused:
        rig.be.adopt_device("nope", os.open("/dev/null", os.O_RDWR))
    assert refused.value.errno == errno.ENODEV
    rig.be.adopt_device("a0", os.open("/dev/null", os.O_RDWR))
    with pytest.raises(OSError, match="already has a passed fd") as busy:
        rig.be.adopt_device("a0", os.open("/dev/null", os.O_RDWR))
    assert busy.value.errno == errno.EBUSY
    rig.be.close()
    assert open_fds() == base


def test_typed_bind_uses_the_passed_fd_once() -> None:
    base = open_fds()
    rig = Rig()
    passed = {"a0": os.open("/dev/null", os.O_RDWR)}
    fd = Iommufd(rig.be)
    fd.take_device_fd = lambda device: passed.pop(device, None)
    bound = fd.bind("a0", "smmu0")
    assert rig.be._files[bound.fd].os_fd >= 0
    fd.unbind(bound)
    assert open_fds() == base
    again = fd.bind("a0", "smmu0")  # no fd left: opened by name
    assert rig.be._files[again.fd].os_fd == -1
    rig.be.close()
    assert HOST.device("a0").iommu == "smmu0"
