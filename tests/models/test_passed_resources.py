"""Guest RAM and device cdevs the VMM passed, through a session (issue 16 §1).

With ``Session.resources`` holding memfds, every nesting-parent IOAS the SMMUv3 and VT-d
topologies make holds each RAM region at IOVA = GPA (IOMMU_IOAS_MAP_FILE, fixed IOVA, read
and write) before the NEST_PARENT HWPT is allocated on it; virtio-iommu maps its identity
IOAS and every MAP from the passed memfds (a MAP outside them stays S_FAULT... as before,
NotGuestRam). A passed device cdev is bound instead of opening one by name, and closed
once, when the device is unbound. Real memfds and /dev/null stand in for the VMM's fds.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import pytest

from protocols import iommufd as uapi
from protocols.virtio_iommu import RequestType, build_request
from tests.backend.test_emulated import HOST
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.backend.emulator.objects import HwptPagingObject, IoasObject
from viommud.backend.emulator.usermem import EmulatedMemory
from viommud.guest_memory import RamRegion
from viommud.session import Session
from viommud.trace import DeviceAttach, DeviceDetach, Request, ViommuCreate, ViommuDestroy

MiB = 1 << 20
GiB = 1 << 30
RW = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
FIXED = uapi.IOMMU_IOAS_MAP_FIXED_IOVA
A, M = RequestType.ATTACH, RequestType.MAP


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def base() -> int:
    return open_fds()


@pytest.fixture
def session(base: int) -> Iterator[Session]:
    """A session given 16 MiB at GPA 0 (one memfd) and 32 MiB at 4 GiB (bytes 16 MiB.. of a
    second memfd)."""
    s = Session(EmulatedIommufd(HOST), keep_calls=True)
    low, high = memfd(16 * MiB), memfd(48 * MiB)
    s.resources.set_memory(
        [RamRegion(0, 16 * MiB, low), RamRegion(4 * GiB, 32 * MiB, high, 16 * MiB)]
    )
    yield s
    s.close()
    assert open_fds() == base  # every memfd, import and cdev closed exactly once


def ok(session: Session, record: Any) -> None:
    reply = as_json(session.handle(record))
    assert reply == {"ok": True}, reply


def map_file_calls(session: Session) -> list[dict[str, Any]]:
    return [c for c in session.calls.entries if c["ioctl"] == "IOMMU_IOAS_MAP_FILE"]


def file_areas(backend: EmulatedIommufd, ioas_id: int) -> list[tuple[int, int, int]]:
    ioas = backend.lookup(ioas_id)
    assert isinstance(ioas, IoasObject)
    return [(a.iova, a.length, a.user_va) for a in ioas.areas if a.file is not None]


EXPECTED_RAM = [(0, 16 * MiB, 0), (4 * GiB, 32 * MiB, 16 * MiB)]


@pytest.mark.parametrize(
    ("model", "iommu", "device"), [("smmuv3", "smmu0", "a0"), ("vtd", "vtd0", "v0")]
)
def test_nesting_parent_ioas_holds_the_passed_ram(
    session: Session, model: str, iommu: str, device: str
) -> None:
    backend = session.backend
    assert isinstance(backend, EmulatedIommufd)
    ok(session, ViommuCreate(1, "x", model, (iommu,), {}))
    ok(session, DeviceAttach(2, "x", 8, device))
    calls = session.calls.entries
    [ioas_id] = [c["out"]["out_ioas_id"] for c in calls if c["ioctl"] == "IOMMU_IOAS_ALLOC"]
    maps = map_file_calls(session)
    assert [(c["args"]["iova"], c["args"]["length"], c["args"]["start"]) for c in maps] == [
        (gpa, size, start) for gpa, size, start in EXPECTED_RAM
    ]
    assert all(c["args"]["ioas_id"] == ioas_id and c["errno"] == 0 for c in maps)
    assert all(c["args"]["flags"] == RW | FIXED for c in maps)
    # mapped before the nesting parent is allocated on that IOAS (which pins them)
    order = [c["ioctl"] for c in calls]
    parent = next(c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC")
    assert parent["args"]["flags"] & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
    assert parent["args"]["pt_id"] == ioas_id
    assert order.index("IOMMU_HWPT_ALLOC") > max(
        i for i, name in enumerate(order) if name == "IOMMU_IOAS_MAP_FILE"
    )
    assert file_areas(backend, ioas_id) == EXPECTED_RAM
    hwpt = backend.lookup(parent["out"]["out_hwpt_id"])
    assert isinstance(hwpt, HwptPagingObject)
    assert hwpt.ioas_id == ioas_id
    ok(session, DeviceDetach(3, "x", 8))
    ok(session, ViommuDestroy(4, "x"))
    assert backend.live_objects() == []


def test_without_passed_ram_the_parent_ioas_stays_empty() -> None:
    s = Session(EmulatedIommufd(HOST), keep_calls=True)
    ok(s, ViommuCreate(1, "x", "smmuv3", ("smmu0",), {}))
    ok(s, DeviceAttach(2, "x", 8, "a0"))
    assert map_file_calls(s) == []
    s.close()


def test_a_memfd_shorter_than_its_region_fails_the_attach(base: int) -> None:
    """The map itself pins nothing; the NEST_PARENT allocation pins every page and the
    kernel refuses pages past the end of the memfd (EINVAL): the attach is refused, the
    device unbound."""
    s = Session(EmulatedIommufd(HOST), keep_calls=True)
    fd = memfd(16 * MiB)
    s.resources.set_memory([RamRegion(0, 16 * MiB, fd)])
    os.ftruncate(fd, MiB)  # the VMM shrank it after passing it
    ok(s, ViommuCreate(1, "x", "vtd", ("vtd0",), {}))
    reply = as_json(s.handle(DeviceAttach(2, "x", 8, "v0")))
    assert reply["ok"] is False
    assert "EINVAL" in reply["error"]
    parent = [c for c in s.calls.entries if c["ioctl"] == "IOMMU_HWPT_ALLOC"]
    assert [c["errno"] for c in parent] == [errno.EINVAL]
    s.close()
    assert open_fds() == base


def test_virtio_identity_and_map_use_the_passed_ram(session: Session) -> None:
    backend = session.backend
    assert isinstance(backend, EmulatedIommufd)
    ok(session, ViommuCreate(1, "v", "virtio-iommu", (), {}))
    ok(session, DeviceAttach(2, "v", 0x10, "v0"))  # bypass: the identity IOAS
    maps = map_file_calls(session)
    assert [(c["args"]["iova"], c["args"]["length"], c["args"]["start"]) for c in maps] == (
        EXPECTED_RAM
    )
    identity = maps[0]["args"]["ioas_id"]
    assert file_areas(backend, identity) == EXPECTED_RAM
    session.calls.drain()
    attach = build_request(A, domain=1, endpoint=0x10)
    assert as_json(session.handle(Request(3, "v", attach)))["status"] == "OK"
    # GPA 4 GiB + 1 MiB is byte 17 MiB of the second memfd
    mapped = build_request(
        M,
        domain=1,
        virt_start=0x10000,
        virt_end=0x10000 + 2 * MiB - 1,
        phys_start=4 * GiB + MiB,
        flags=1,
    )
    assert as_json(session.handle(Request(4, "v", mapped)))["status"] == "OK"
    [call] = map_file_calls(session)
    assert call["args"]["iova"] == 0x10000
    assert call["args"]["length"] == 2 * MiB
    assert call["args"]["start"] == 17 * MiB
    assert call["args"]["flags"] == uapi.IOMMU_IOAS_MAP_READABLE | FIXED
    # a MAP straddling the end of the passed RAM: not guest RAM, S_FAULT as before
    outside = build_request(
        M,
        domain=1,
        virt_start=0x800000,
        virt_end=0x800000 + 2 * MiB - 1,
        phys_start=15 * MiB,
        flags=3,
    )
    assert as_json(session.handle(Request(5, "v", outside)))["status"] == "FAULT"
    ok(session, DeviceDetach(6, "v", 0x10))
    ok(session, ViommuDestroy(7, "v"))
    assert backend.live_objects() == []


def test_virtio_guest_memory_option_and_passed_ram_exclude_each_other(session: Session) -> None:
    reply = as_json(
        session.handle(
            ViommuCreate(1, "v", "virtio-iommu", (), {"guest_memory": [{"gpa": 0, "size": MiB}]})
        )
    )
    assert reply["ok"] is False
    assert "exclude" in reply["error"]


def test_a_passed_cdev_is_bound_and_closed_once(session: Session, base: int) -> None:
    backend = session.backend
    assert isinstance(backend, EmulatedIommufd)
    session.resources.add_device("a0", os.open("/dev/null", os.O_RDWR))
    ok(session, ViommuCreate(1, "x", "smmuv3", ("smmu0",), {}))
    ok(session, DeviceAttach(2, "x", 8, "a0"))
    assert "a0" not in session.resources.devices  # handed to the backend
    passed = [f for f in backend._files.values() if f.os_fd >= 0]
    assert [f.pdev.id for f in passed] == ["a0"]
    assert passed[0].dev_id
    with_cdev = open_fds()
    ok(session, DeviceDetach(3, "x", 8))
    assert open_fds() == with_cdev - 1  # unbinding closed the passed cdev
    ok(session, DeviceAttach(4, "x", 8, "a0"))  # opened by name now
    assert all(f.os_fd == -1 for f in backend._files.values())


def test_a_passed_fd_that_is_no_cdev_refuses_the_attach(session: Session) -> None:
    session.resources.add_device("v0", memfd(4096))
    ok(session, ViommuCreate(1, "x", "vtd", ("vtd0",), {}))
    reply = as_json(session.handle(DeviceAttach(2, "x", 8, "v0")))
    assert reply["ok"] is False
    assert "ENOTTY" in reply["error"]
    bind = [c for c in session.calls.entries if c["ioctl"] == "VFIO_DEVICE_BIND_IOMMUFD"]
    assert [c["errno"] for c in bind] == [errno.ENOTTY]


def test_a_device_never_attached_keeps_its_fd_until_the_session_ends(
    session: Session,
) -> None:
    session.resources.add_device("b0", os.open("/dev/null", os.O_RDWR))
    # the fixture checks that closing the session closes it


# -- the real backend's synthetic virtio RAM ------------------------------------------------------


class DenseMemory(EmulatedMemory):
    """User memory as /dev/iommu's: not sparse (every alloc is real), alloc sizes recorded."""

    __slots__ = ("sizes",)
    sparse = False

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def alloc(self, size: int) -> int:
        self.sizes.append(size)
        if size >= GiB:
            raise MemoryError(f"alloc({size:#x}) on a dense memory")
        return super().alloc(size)


def test_synthetic_ram_on_dense_memory_is_a_sparse_memfd(base: int) -> None:
    """Without passed RAM on a backend whose memory is not sparse, the default 1 TiB of
    virtio-iommu guest RAM is a sparse memfd mapped with IOAS_MAP_FILE, not alloc(1 TiB)
    (which raised MemoryError with CtypesMemory)."""
    memory = DenseMemory()
    s = Session(EmulatedIommufd(HOST, memory=memory), keep_calls=True)
    ok(s, ViommuCreate(1, "v", "virtio-iommu", (), {}))
    ok(s, DeviceAttach(2, "v", 0x10, "v0"))  # bypass: the identity IOAS is mapped
    assert all(size < GiB for size in memory.sizes)
    [call] = map_file_calls(s)
    assert (call["args"]["iova"], call["args"]["length"], call["args"]["start"]) == (0, 1 << 40, 0)
    assert call["errno"] == 0
    assert [c for c in s.calls.entries if c["ioctl"] == "IOMMU_IOAS_MAP"] == []
    assert open_fds() == base + 2  # the memfd and the emulator's duplicate
    ok(s, ViommuDestroy(3, "v"))
    assert open_fds() == base
    s.close()


def test_synthetic_ram_on_the_emulators_memory_is_unchanged() -> None:
    s = Session(EmulatedIommufd(HOST), keep_calls=True)
    ok(s, ViommuCreate(1, "v", "virtio-iommu", (), {}))
    ok(s, DeviceAttach(2, "v", 0x10, "v0"))
    assert map_file_calls(s) == []
    [call] = [c for c in s.calls.entries if c["ioctl"] == "IOMMU_IOAS_MAP"]
    assert call["args"]["length"] == 1 << 40
    s.close()


def test_vtd_page_requests_keep_the_passed_cdev(base: int) -> None:
    """A VT-d vIOMMU with page requests (option prs, HELLO events) ties its stage-1 HWPTs to
    a FAULT object; a passed cdev is still the one bound, also when given afterwards."""
    s = Session(EmulatedIommufd(HOST), keep_calls=True, event_depth=8)
    try:
        ok(s, ViommuCreate(1, "x", "vtd", ("vtd0",), {"dw": 256, "prs": True}))
        s.resources.add_device("v0", os.open("/dev/null", os.O_RDWR))
        ok(s, DeviceAttach(2, "x", 8, "v0"))
        assert "v0" not in s.resources.devices  # handed to the backend, not opened by name
        backend = s.backend
        assert isinstance(backend, EmulatedIommufd)
        assert [f.pdev.id for f in backend._files.values() if f.os_fd >= 0] == ["v0"]
    finally:
        s.close()
    assert open_fds() == base
