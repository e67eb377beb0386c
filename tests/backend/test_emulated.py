"""Conformance of the emulated iommufd with the kernel (reference: iommufd.md).

One test case per row of the reference's tables. Each case checks the errno, the fields
the kernel writes back (out ids, entry_num) and the resulting object table. ``Rig`` wraps
the backend with the calls a test needs; ``Rig.arm_topology`` builds the usual SMMUv3
stack: bind device, IOAS, nesting parent, vIOMMU, vDEVICE.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import iommufd as uapi
from viommud.backend.base import Backend
from viommud.backend.emulator import testing
from viommud.backend.emulator.intel import VtdFlush
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.backend.emulator.objects import (
    ArmNestedData,
    HwptNestedObject,
    HwptPagingObject,
    ViommuObject,
)
from viommud.host import HostConfig

T = TypeVar("T", bound=uapi.UapiStruct)

HOST = HostConfig.from_json(
    {
        "iommus": [
            {"id": "smmu0", "model": "arm-smmuv3"},
            {"id": "smmu1", "model": "arm-smmuv3"},
            {"id": "vtd0", "model": "intel-vtd"},
            {"id": "vtd1", "model": "intel-vtd"},
        ],
        "devices": [
            {"id": "a0", "iommu": "smmu0", "sid": 0x100, "ats": True},
            {"id": "a1", "iommu": "smmu0", "sid": 0x101},
            {"id": "b0", "iommu": "smmu1", "sid": 0x200},
            {"id": "v0", "iommu": "vtd0", "sid": 0x10, "ats": True},
            {"id": "v1", "iommu": "vtd0", "sid": 0x11},
            {"id": "w0", "iommu": "vtd1", "sid": 0x20},
        ],
    }
)

NEST_PARENT = uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
DIRTY = uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
FAULT_ID_VALID = uapi.IOMMU_HWPT_FAULT_ID_VALID
PASID = uapi.IOMMU_HWPT_ALLOC_PASID
ARM_DATA = uapi.IOMMU_HWPT_DATA_ARM_SMMUV3
VTD_DATA = uapi.IOMMU_HWPT_DATA_VTD_S1
ARM_INV = uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3
VTD_INV = uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1
U64_MAX = (1 << 64) - 1
SYNC = struct.pack("<QQ", 0x46, 0)
MAP_RW = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE

# vSTE words (SMMUv3 §5.2): V=1 with Config in bits 3:1
STE_ABORT = 0x1
STE_BYPASS = 0x9
STE_S1 = 0xB


def cmd(w0: int, w1: int = 0) -> bytes:
    return struct.pack("<QQ", w0, w1)


def vtd_inv(addr: int = 0, npages: int = 1, flags: int = 0, reserved: int = 0) -> bytes:
    return bytes(uapi.encode(uapi.HwptVtdS1Invalidate(addr, npages, flags, reserved)))


def with_size(obj: uapi.UapiStruct, size: int, tail: bytes = b"") -> bytearray:
    """``obj`` packed with its ``size`` field replaced, plus ``tail`` bytes after it."""
    raw = uapi.encode(obj)
    raw[0:4] = struct.pack("<I", size)
    return raw + tail


@dataclass(frozen=True)
class Topo:
    dev: int
    ioas: int
    parent: int
    viommu: int
    vdev: int


class Rig:
    """The backend plus short-hands for every call the tests make."""

    def __init__(self, host: HostConfig = HOST, **options: Any) -> None:
        self.be = EmulatedIommufd(host, **options)
        self.fds: dict[str, int] = {}
        self.ids: dict[str, int] = {}

    # -- raw calls ------------------------------------------------------------------------
    def call(self, request: int, obj: T, fd: int | None = None) -> tuple[int, T]:
        arg = uapi.encode(obj)
        rc = self.be.ioctl(self.be.iommufd if fd is None else fd, request, arg)
        return rc, uapi.decode(type(obj), arg)

    def raw(self, request: int, arg: bytearray, fd: int | None = None) -> int:
        return self.be.ioctl(self.be.iommufd if fd is None else fd, request, arg)

    def buf(self, data: bytes) -> int:
        addr = self.be.memory.alloc(len(data))
        self.be.memory.write(addr, data)
        return addr

    def objects(self) -> list[tuple[int, str]]:
        return self.be.live_objects()

    # -- devices --------------------------------------------------------------------------
    def open(self, name: str) -> int:
        self.fds[name] = self.be.open_device(name)
        return self.fds[name]

    def bind(self, name: str) -> int:
        fd = self.open(name)
        rc, out = self.call(
            uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.VfioDeviceBindIommufd(iommufd=self.be.iommufd), fd
        )
        assert rc == 0
        self.ids[name] = out.out_devid
        return out.out_devid

    def attach(self, name: str, pt_id: int, **kw: int) -> tuple[int, int]:
        rc, out = self.call(
            uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            uapi.VfioDeviceAttachIommufdPt(pt_id=pt_id, **kw),
            self.fds[name],
        )
        return rc, out.pt_id

    def detach(self, name: str, **kw: int) -> int:
        rc, _ = self.call(
            uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT,
            uapi.VfioDeviceDetachIommufdPt(**kw),
            self.fds[name],
        )
        return rc

    # -- objects --------------------------------------------------------------------------
    def ioas(self) -> int:
        rc, out = self.call(uapi.IOMMU_IOAS_ALLOC, uapi.IoasAlloc())
        assert rc == 0
        return out.out_ioas_id

    def hwpt(
        self,
        dev: int,
        pt: int,
        flags: int = 0,
        data_type: int = 0,
        data: bytes = b"",
        **kw: int,
    ) -> tuple[int, int]:
        fields: dict[str, Any] = {
            "flags": flags,
            "dev_id": dev,
            "pt_id": pt,
            "data_type": data_type,
            "data_len": len(data),
            "data_uptr": self.buf(data) if data else 0,
        }
        fields.update(kw)
        rc, out = self.call(uapi.IOMMU_HWPT_ALLOC, uapi.HwptAlloc(**fields))
        return rc, out.out_hwpt_id

    def ok_hwpt(
        self, dev: int, pt: int, flags: int = 0, data_type: int = 0, data: bytes = b""
    ) -> int:
        rc, hwpt = self.hwpt(dev, pt, flags, data_type, data)
        assert rc == 0
        return hwpt

    def nest_parent(self, dev: int, ioas: int) -> int:
        return self.ok_hwpt(dev, ioas, NEST_PARENT)

    def arm_nested(self, dev: int, viommu: int, ste0: int, ste1: int = 0) -> tuple[int, int]:
        return self.hwpt(dev, viommu, 0, ARM_DATA, cmd(ste0, ste1))

    def vtd_nested(self, dev: int, parent: int, **s1: int) -> tuple[int, int]:
        """A VTD_S1 nested HWPT; a 4-level first stage (48 bits, the width the kernel
        accepts at attach) unless ``s1`` says otherwise."""
        data = bytes(uapi.encode(uapi.HwptVtdS1(**{"addr_width": 48, **s1})))
        return self.hwpt(dev, parent, 0, VTD_DATA, data)

    def viommu(self, dev: int, hwpt: int, vtype: int = 1, **kw: int) -> tuple[int, int]:
        rc, out = self.call(
            uapi.IOMMU_VIOMMU_ALLOC, uapi.ViommuAlloc(type=vtype, dev_id=dev, hwpt_id=hwpt, **kw)
        )
        return rc, out.out_viommu_id

    def vdevice(self, viommu: int, dev: int, virt_id: int) -> tuple[int, int]:
        rc, out = self.call(
            uapi.IOMMU_VDEVICE_ALLOC,
            uapi.VdeviceAlloc(viommu_id=viommu, dev_id=dev, virt_id=virt_id),
        )
        return rc, out.out_vdevice_id

    def destroy(self, obj_id: int) -> int:
        rc, _ = self.call(uapi.IOMMU_DESTROY, uapi.Destroy(id=obj_id))
        return rc

    def map(
        self,
        ioas: int,
        iova: int,
        length: int,
        user_va: int | None = None,
        flags: int = MAP_RW | uapi.IOMMU_IOAS_MAP_FIXED_IOVA,
        **kw: int,
    ) -> tuple[int, int]:
        """IOAS_MAP; ``user_va`` None maps a fresh buffer of ``length`` bytes."""
        if user_va is None:
            user_va = self.be.memory.alloc(length)
        rc, out = self.call(
            uapi.IOMMU_IOAS_MAP,
            uapi.IoasMap(
                flags=flags, ioas_id=ioas, user_va=user_va, length=length, iova=iova, **kw
            ),
        )
        return rc, out.iova

    def unmap(self, ioas: int, iova: int, length: int) -> tuple[int, int]:
        rc, out = self.call(
            uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap(ioas_id=ioas, iova=iova, length=length)
        )
        return rc, out.length

    def invalidate(
        self,
        hwpt_id: int,
        blob: bytes,
        data_type: int,
        entry_len: int,
        entry_num: int | None = None,
        *,
        uptr: int | None = None,
        reserved: int = 0,
    ) -> tuple[int, int]:
        if entry_num is None:
            entry_num = len(blob) // entry_len if entry_len else 0
        if uptr is None:
            uptr = self.buf(blob) if blob else 0
        rc, out = self.call(
            uapi.IOMMU_HWPT_INVALIDATE,
            uapi.HwptInvalidate(
                hwpt_id=hwpt_id,
                data_uptr=uptr,
                data_type=data_type,
                entry_len=entry_len,
                entry_num=entry_num,
                reserved=reserved,
            ),
        )
        return rc, out.entry_num

    # -- topologies -----------------------------------------------------------------------
    def arm_topology(self, name: str = "a0", vsid: int = 0x8) -> Topo:
        """Bind ``name``, IOAS, nesting parent, ARM vIOMMU and a vDEVICE with ``vsid``."""
        dev = self.bind(name)
        ioas = self.ioas()
        parent = self.nest_parent(dev, ioas)
        rc, viommu = self.viommu(dev, parent)
        assert rc == 0
        rc, vdev = self.vdevice(viommu, dev, vsid)
        assert rc == 0
        return Topo(dev, ioas, parent, viommu, vdev)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_is_a_backend() -> None:
    backend: Backend = EmulatedIommufd(HOST)
    assert backend.name == "emulated"
    assert backend.host is HOST


# ======================================================================================
# §0.2: dispatch and the size convention
# ======================================================================================

DESTROY_ARGS = [
    ("null", bytearray(), errno.EFAULT),
    ("3-bytes", bytearray(b"\x08\x00\x00"), errno.EFAULT),
    ("size-7", with_size(uapi.Destroy(), 7), errno.EINVAL),
    ("size-0", with_size(uapi.Destroy(), 0), errno.EINVAL),
    ("exact-id-0", uapi.encode(uapi.Destroy()), errno.ENOENT),
    ("16-zero-tail", with_size(uapi.Destroy(), 16, bytes(8)), errno.ENOENT),
    ("16-nonzero-tail", with_size(uapi.Destroy(), 16, bytes(7) + b"\x01"), errno.E2BIG),
    ("16-tail-missing", with_size(uapi.Destroy(), 16), errno.EFAULT),
    ("16-tail-half-missing", with_size(uapi.Destroy(), 16, bytes(4)), errno.EFAULT),
    ("huge-size-nonzero-first", with_size(uapi.Destroy(), 0xFFFFFFFF, b"\x01"), errno.E2BIG),
    ("huge-size", with_size(uapi.Destroy(), 0xFFFFFFFF, bytes(8)), errno.EFAULT),
    ("size-8-in-long-buffer", with_size(uapi.Destroy(), 8, b"\xff" * 8), errno.ENOENT),
]


@pytest.mark.parametrize(
    ("arg", "expected"), [c[1:] for c in DESTROY_ARGS], ids=[c[0] for c in DESTROY_ARGS]
)
def test_destroy_size_convention(rig: Rig, arg: bytearray, expected: int) -> None:
    before = bytes(arg)
    assert rig.raw(uapi.IOMMU_DESTROY, arg) == expected
    assert bytes(arg) == before  # DESTROY writes nothing back


@pytest.mark.parametrize(
    "request_",
    [
        0x3B7F,
        0x3B00,
        0x3BFF,
        0xC0083B80,
        0x3C80,
        uapi.IOMMU_IOAS_COPY,
        uapi.IOMMU_TEST_CMD,
        uapi.VFIO_DEVICE_BIND_IOMMUFD,
        uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    ],
)
def test_unknown_request_on_iommufd_is_enotty(rig: Rig, request_: int) -> None:
    arg = uapi.encode(uapi.Destroy())
    assert rig.raw(request_, arg) == errno.ENOTTY
    assert rig.raw(request_, bytearray()) == errno.ENOTTY  # before the size is read


SIZED = [
    (uapi.IOMMU_DESTROY, uapi.Destroy()),
    (uapi.IOMMU_IOAS_ALLOC, uapi.IoasAlloc()),
    (uapi.IOMMU_HWPT_ALLOC, uapi.HwptAlloc()),
    (uapi.IOMMU_VIOMMU_ALLOC, uapi.ViommuAlloc()),
    (uapi.IOMMU_VDEVICE_ALLOC, uapi.VdeviceAlloc()),
    (uapi.IOMMU_HWPT_INVALIDATE, uapi.HwptInvalidate()),
]
SIZED_IDS = [uapi.IOCTL_NAMES[r] for r, _ in SIZED]


@pytest.mark.parametrize(("request_", "obj"), SIZED, ids=SIZED_IDS)
def test_cmd_length_below_min_is_einval(rig: Rig, request_: int, obj: uapi.UapiStruct) -> None:
    """selftest cmd_length: size = min_size - 1 with a trailing 0xFF byte."""
    min_size = type(obj).MIN_SIZE
    arg = with_size(obj, min_size - 1)
    arg[min_size - 1] = 0xFF
    before = bytes(arg)
    assert rig.raw(request_, arg) == errno.EINVAL
    assert bytes(arg) == before
    assert rig.objects() == []


@pytest.mark.parametrize(("request_", "obj"), SIZED, ids=SIZED_IDS)
def test_cmd_length_nonzero_tail_is_e2big(rig: Rig, request_: int, obj: uapi.UapiStruct) -> None:
    size = type(obj).FORMAT.size
    arg = with_size(obj, size + 1, b"\xff")
    before = bytes(arg)
    assert rig.raw(request_, arg) == errno.E2BIG
    assert bytes(arg) == before
    assert rig.objects() == []


@pytest.mark.parametrize(("request_", "obj"), SIZED, ids=SIZED_IDS)
def test_cmd_length_zero_tail_same_as_exact(rig: Rig, request_: int, obj: uapi.UapiStruct) -> None:
    size = type(obj).FORMAT.size
    exact = uapi.encode(obj)
    rc_exact = rig.raw(request_, exact)
    other = Rig()
    longer = with_size(obj, size + 1, b"\x00")
    assert other.raw(request_, longer) == rc_exact
    assert longer[4:size] == exact[4:size]  # the same write-back, tail untouched
    assert longer[size] == 0
    assert other.objects() == rig.objects()


def test_short_struct_is_zero_filled_and_written_back_short(rig: Rig) -> None:
    """HWPT_ALLOC with size 24 (its min): bytes past 24 read as zero and are never written."""
    dev = rig.bind("a0")
    ioas = rig.ioas()
    obj = uapi.HwptAlloc(dev_id=dev, pt_id=ioas, data_type=ARM_DATA, data_len=16, data_uptr=1)
    arg = with_size(obj, 24)
    garbage = bytes(arg[24:])
    assert rig.raw(uapi.IOMMU_HWPT_ALLOC, arg) == 0  # data_type/len/uptr read as zero
    out = uapi.decode(uapi.HwptAlloc, arg)
    assert out.out_hwpt_id == 3
    assert bytes(arg[24:]) == garbage
    assert rig.objects() == [(1, "DEVICE"), (2, "IOAS"), (3, "HWPT_PAGING")]


def test_write_back_is_min_of_user_and_kernel_size(rig: Rig) -> None:
    arg = with_size(uapi.IoasAlloc(), 16, bytes(4)) + b"\xaa" * 4
    assert rig.raw(uapi.IOMMU_IOAS_ALLOC, arg) == 0
    assert uapi.decode(uapi.IoasAlloc, arg).out_ioas_id == 1
    assert bytes(arg[12:]) == bytes(4) + b"\xaa" * 4


def test_write_back_keeps_input_fields(rig: Rig) -> None:
    """The whole struct goes back: inputs as read, outputs filled in."""
    dev = rig.bind("a0")
    ioas = rig.ioas()
    obj = uapi.HwptAlloc(flags=NEST_PARENT, dev_id=dev, pt_id=ioas, fault_id=77, reserved2=9)
    rc, out = rig.call(uapi.IOMMU_HWPT_ALLOC, obj)
    assert rc == 0
    assert out == replace(obj, out_hwpt_id=3)


def test_failed_creation_writes_nothing_back(rig: Rig) -> None:
    arg = uapi.encode(uapi.IoasAlloc(flags=1, out_ioas_id=0x5555))
    before = bytes(arg)
    assert rig.raw(uapi.IOMMU_IOAS_ALLOC, arg) == errno.EOPNOTSUPP
    assert bytes(arg) == before
    assert rig.objects() == []


def test_unknown_fd_is_ebadf(rig: Rig) -> None:
    assert rig.raw(uapi.IOMMU_IOAS_ALLOC, uapi.encode(uapi.IoasAlloc()), fd=99) == errno.EBADF


# ======================================================================================
# §0.3: the ID space
# ======================================================================================


def test_ids_start_at_one_shared_with_devices_lowest_free_reused(rig: Rig) -> None:
    assert rig.ioas() == 1
    assert rig.bind("a0") == 2
    assert rig.ioas() == 3
    assert rig.ioas() == 4
    assert rig.destroy(3) == 0
    assert rig.destroy(1) == 0
    assert rig.bind("v0") == 1
    assert rig.ioas() == 3
    assert rig.ioas() == 5
    assert rig.objects() == [(1, "DEVICE"), (2, "DEVICE"), (3, "IOAS"), (4, "IOAS"), (5, "IOAS")]


def test_unbinding_frees_the_device_id(rig: Rig) -> None:
    rig.bind("a0")
    rig.ioas()
    rig.be.close_device(rig.fds["a0"])
    assert rig.objects() == [(2, "IOAS")]
    assert rig.bind("a1") == 1


def test_tombstone_keeps_its_id_until_close(rig: Rig) -> None:
    topo = rig.arm_topology()
    rig.be.close_device(rig.fds["a0"])
    assert rig.objects() == [(2, "IOAS"), (3, "HWPT_PAGING"), (4, "VIOMMU")]
    assert testing.tombstones(rig.be) == [topo.vdev]
    assert rig.destroy(topo.vdev) == errno.ENOENT  # O17
    assert rig.bind("a1") == 1  # the device id is free again
    assert rig.ioas() == 6  # 5 is the tombstone
    viommu = rig.be.lookup(topo.viommu)
    assert isinstance(viommu, ViommuObject)
    assert viommu.vdevs == {}
    assert rig.destroy(topo.viommu) == 0  # the vDEVICE no longer holds it


# ======================================================================================
# §1.1 / §0.3: IOMMU_DESTROY and the reference graph
# ======================================================================================


def test_destroy_enoent(rig: Rig) -> None:
    rig.ioas()
    assert rig.destroy(0) == errno.ENOENT
    assert rig.destroy(2) == errno.ENOENT
    assert rig.destroy(0xFFFFFFFF) == errno.ENOENT
    assert rig.destroy(1) == 0
    assert rig.destroy(1) == errno.ENOENT
    assert rig.objects() == []


def _holder_ioas_by_paging(r: Rig) -> tuple[int, int]:
    dev = r.bind("v0")
    ioas = r.ioas()
    return ioas, r.ok_hwpt(dev, ioas)


def _holder_parent_by_vtd_nested(r: Rig) -> tuple[int, int]:
    dev = r.bind("v0")
    parent = r.nest_parent(dev, r.ioas())
    rc, nested = r.vtd_nested(dev, parent)
    assert rc == 0
    return parent, nested


def _holder_parent_by_viommu(r: Rig) -> tuple[int, int]:
    dev = r.bind("a0")
    parent = r.nest_parent(dev, r.ioas())
    rc, viommu = r.viommu(dev, parent)
    assert rc == 0
    return parent, viommu


def _holder_viommu_by_nested(r: Rig) -> tuple[int, int]:
    dev = r.bind("a0")
    parent = r.nest_parent(dev, r.ioas())
    _, viommu = r.viommu(dev, parent)
    rc, nested = r.arm_nested(dev, viommu, STE_ABORT)
    assert rc == 0
    return viommu, nested


def _holder_viommu_by_vdevice(r: Rig) -> tuple[int, int]:
    topo = r.arm_topology()
    return topo.viommu, topo.vdev


def _holder_paging_by_device(r: Rig) -> tuple[int, int]:
    dev = r.bind("a0")
    hwpt = r.ok_hwpt(dev, r.ioas())
    assert r.attach("a0", hwpt) == (0, hwpt)
    return hwpt, 0


def _holder_nested_by_device(r: Rig) -> tuple[int, int]:
    topo = r.arm_topology()
    _, nested = r.arm_nested(topo.dev, topo.viommu, STE_S1)
    assert r.attach("a0", nested) == (0, nested)
    return nested, 0


def _holder_parent_by_arm_nested_via_viommu(r: Rig) -> tuple[int, int]:
    """The nested HWPT holds the vIOMMU, not the parent: the parent is held by the vIOMMU."""
    viommu, _ = _holder_viommu_by_nested(r)
    parent = r.be.lookup(viommu)
    assert isinstance(parent, ViommuObject)
    return parent.parent_id, viommu


HOLDERS = {
    "ioas<-hwpt_paging": _holder_ioas_by_paging,
    "parent<-vtd_nested": _holder_parent_by_vtd_nested,
    "parent<-viommu": _holder_parent_by_viommu,
    "viommu<-nested": _holder_viommu_by_nested,
    "viommu<-vdevice": _holder_viommu_by_vdevice,
    "paging<-attached_device": _holder_paging_by_device,
    "nested<-attached_device": _holder_nested_by_device,
    "parent<-viommu(with nested)": _holder_parent_by_arm_nested_via_viommu,
}


@pytest.mark.parametrize("build", HOLDERS.values(), ids=HOLDERS.keys())
def test_destroy_ebusy_per_holder(rig: Rig, build: Any) -> None:
    target, holder = build(rig)
    table = rig.objects()
    assert rig.destroy(target) == errno.EBUSY
    assert rig.objects() == table
    if holder:
        if rig.destroy(holder) == errno.EBUSY:  # the holder is held itself (nested on viommu)
            for obj_id, kind in reversed(table):
                if kind == "HWPT_NESTED":
                    assert rig.destroy(obj_id) == 0
            assert rig.destroy(holder) == 0
    else:
        assert rig.detach("a0") == 0
    assert rig.destroy(target) == 0
    assert target not in dict(rig.objects())


def test_destroy_device_is_ebusy_while_bound(rig: Rig) -> None:
    dev = rig.bind("a0")
    assert rig.destroy(dev) == errno.EBUSY
    assert rig.objects() == [(dev, "DEVICE")]


def test_nested_on_viommu_does_not_hold_the_parent_directly(rig: Rig) -> None:
    topo = rig.arm_topology()
    _, nested = rig.arm_nested(topo.dev, topo.viommu, STE_ABORT)
    obj = rig.be.lookup(nested)
    assert isinstance(obj, HwptNestedObject)
    assert obj.holds() == (topo.viommu,)
    assert obj.parent_id == topo.parent


# ======================================================================================
# §1.2 IOMMU_IOAS_ALLOC
# ======================================================================================


@pytest.mark.parametrize(
    ("flags", "expected"), [(0, 0), (1, errno.EOPNOTSUPP), (0x80000000, errno.EOPNOTSUPP)]
)
def test_ioas_alloc(rig: Rig, flags: int, expected: int) -> None:
    rc, out = rig.call(uapi.IOMMU_IOAS_ALLOC, uapi.IoasAlloc(flags=flags))
    assert rc == expected
    assert out.out_ioas_id == (1 if expected == 0 else 0)
    assert rig.objects() == ([(1, "IOAS")] if expected == 0 else [])


# ======================================================================================
# §1.4 IOMMU_HWPT_ALLOC: check order
# ======================================================================================


@dataclass(frozen=True)
class HwptRow:
    dev: str  # "a0" / "b0" / "v0" / "ioas" (the IOAS id) / "none" (0)
    pt: str  # ioas / parent / notparent / auto / viommu / device / nested / vdev / missing
    flags: int = 0
    data_type: int = 0
    data: bytes = b""
    data_len: int | None = None  # overrides len(data)
    uptr: int | None = None  # overrides the buffer address
    reserved: int = 0
    reserved2: int = 0
    expected: int = 0
    kind: str = ""  # kind of the created object on success


ARM_S1 = cmd(STE_S1)
VTD_S1_DATA = bytes(uapi.encode(uapi.HwptVtdS1(pgtbl_addr=0x1000, addr_width=48)))

HWPT_ROWS: dict[str, HwptRow] = {
    # 1. __reserved
    "reserved": HwptRow("a0", "ioas", reserved=1, expected=errno.EOPNOTSUPP),
    "reserved-before-bad-dev": HwptRow("none", "missing", reserved=1, expected=errno.EOPNOTSUPP),
    # 2. data_type / data_len consistency
    "none-with-len": HwptRow("none", "missing", data_len=4, expected=errno.EINVAL),
    "type-without-len": HwptRow("none", "missing", data_type=ARM_DATA, expected=errno.EINVAL),
    # 3. dev_id
    "dev-0": HwptRow("none", "ioas", expected=errno.ENOENT),
    "dev-is-ioas": HwptRow("ioas", "ioas", expected=errno.ENOENT),  # A1
    # 4. pt_id lookup
    "pt-missing": HwptRow("a0", "missing", expected=errno.EINVAL),
    "pt-0": HwptRow("a0", "zero", expected=errno.EINVAL),
    # 5. IOAS: paging
    "paging": HwptRow("a0", "ioas", kind="HWPT_PAGING"),
    "paging-nest-parent": HwptRow("a0", "ioas", flags=NEST_PARENT, kind="HWPT_PAGING"),
    "paging-pasid": HwptRow("v0", "ioas", flags=PASID, kind="HWPT_PAGING"),
    "paging-reserved2-ignored": HwptRow("a0", "ioas", reserved2=0xFFFFFFFF, kind="HWPT_PAGING"),
    "paging-unknown-flag": HwptRow("a0", "ioas", flags=1 << 4, expected=errno.EOPNOTSUPP),
    "paging-dirty": HwptRow("a0", "ioas", flags=DIRTY, expected=errno.EOPNOTSUPP),
    "paging-fault-nest-parent": HwptRow(  # A3
        "a0", "ioas", flags=NEST_PARENT | FAULT_ID_VALID, expected=errno.EOPNOTSUPP
    ),
    "paging-with-data": HwptRow(
        "v0", "ioas", data_type=VTD_DATA, data=VTD_S1_DATA, expected=errno.EOPNOTSUPP
    ),
    "paging-fault-id": HwptRow("a0", "ioas", flags=FAULT_ID_VALID, expected=errno.ENOENT),
    # 6. HWPT_PAGING: nested on a parent (VT-d, §4.1)
    "vtd-nested": HwptRow("v0", "parent", data_type=VTD_DATA, data=VTD_S1_DATA, kind="HWPT_NESTED"),
    "vtd-nested-pasid": HwptRow(
        "v0", "parent", flags=PASID, data_type=VTD_DATA, data=VTD_S1_DATA, kind="HWPT_NESTED"
    ),
    "vtd-nested-other-unit": HwptRow(
        "w0", "parent", data_type=VTD_DATA, data=VTD_S1_DATA, kind="HWPT_NESTED"
    ),
    "vtd-nested-nest-parent-flag": HwptRow(  # A8
        "v0",
        "parent",
        flags=NEST_PARENT,
        data_type=VTD_DATA,
        data=VTD_S1_DATA,
        expected=errno.EOPNOTSUPP,
    ),
    "vtd-nested-no-data": HwptRow("v0", "parent", expected=errno.EOPNOTSUPP),
    "vtd-nested-not-parent": HwptRow(  # A9
        "v0", "notparent", data_type=VTD_DATA, data=VTD_S1_DATA, expected=errno.EINVAL
    ),
    "vtd-nested-auto-domain": HwptRow(
        "v0", "auto", data_type=VTD_DATA, data=VTD_S1_DATA, expected=errno.EINVAL
    ),
    "vtd-nested-arm-parent": HwptRow(
        "v0", "arm-parent", data_type=VTD_DATA, data=VTD_S1_DATA, expected=errno.EINVAL
    ),
    "vtd-nested-wrong-type": HwptRow(
        "v0", "parent", data_type=ARM_DATA, data=ARM_S1, expected=errno.EOPNOTSUPP
    ),
    "vtd-nested-type-before-parent": HwptRow(
        "v0", "notparent", data_type=ARM_DATA, data=ARM_S1, expected=errno.EINVAL
    ),
    "vtd-nested-len-23": HwptRow(
        "v0", "parent", data_type=VTD_DATA, data=VTD_S1_DATA[:23], expected=errno.EINVAL
    ),
    "vtd-nested-len-25": HwptRow(
        "v0", "parent", data_type=VTD_DATA, data=VTD_S1_DATA + b"\0", expected=errno.EINVAL
    ),
    "vtd-nested-null-uptr": HwptRow(
        "v0", "parent", data_type=VTD_DATA, data=VTD_S1_DATA, uptr=0, expected=errno.EFAULT
    ),
    "vtd-nested-fault-id": HwptRow(
        "v0",
        "parent",
        flags=FAULT_ID_VALID,
        data_type=VTD_DATA,
        data=VTD_S1_DATA,
        expected=errno.ENOENT,
    ),
    "arm-on-parent": HwptRow(
        "a0", "arm-parent", data_type=ARM_DATA, data=ARM_S1, expected=errno.EOPNOTSUPP
    ),
    "arm-on-notparent": HwptRow(  # no domain_alloc_nested comes before the parent checks
        "a0", "arm-notparent", data_type=ARM_DATA, data=ARM_S1, expected=errno.EOPNOTSUPP
    ),
    # 7. VIOMMU (ARM, §3.1)
    "arm-nested": HwptRow("a0", "viommu", data_type=ARM_DATA, data=ARM_S1, kind="HWPT_NESTED"),
    "arm-nested-other-smmu": HwptRow(
        "b0", "viommu", data_type=ARM_DATA, data=ARM_S1, expected=errno.EINVAL
    ),
    "arm-nested-vtd-device": HwptRow(
        "v0", "viommu", data_type=ARM_DATA, data=ARM_S1, expected=errno.EINVAL
    ),
    "arm-nested-nest-parent-flag": HwptRow(
        "a0",
        "viommu",
        flags=NEST_PARENT,
        data_type=ARM_DATA,
        data=ARM_S1,
        expected=errno.EOPNOTSUPP,
    ),
    "arm-nested-unknown-flag": HwptRow(  # O9
        "a0",
        "viommu",
        flags=FAULT_ID_VALID | 1 << 31,
        data_type=ARM_DATA,
        data=ARM_S1,
        expected=errno.EOPNOTSUPP,
    ),
    "arm-nested-pasid": HwptRow(
        "a0", "viommu", flags=PASID, data_type=ARM_DATA, data=ARM_S1, expected=errno.EOPNOTSUPP
    ),
    "arm-nested-no-data": HwptRow("a0", "viommu", expected=errno.EOPNOTSUPP),
    "arm-nested-wrong-type": HwptRow(
        "a0", "viommu", data_type=VTD_DATA, data=ARM_S1, expected=errno.EINVAL
    ),
    "arm-nested-len-15": HwptRow(
        "a0", "viommu", data_type=ARM_DATA, data=ARM_S1[:15], expected=errno.EINVAL
    ),
    "arm-nested-len-17": HwptRow(
        "a0", "viommu", data_type=ARM_DATA, data=ARM_S1 + b"\0", expected=errno.EINVAL
    ),
    "arm-nested-null-uptr": HwptRow(
        "a0", "viommu", data_type=ARM_DATA, data=ARM_S1, uptr=0, expected=errno.EFAULT
    ),
    "arm-nested-bad-uptr": HwptRow(
        "a0", "viommu", data_type=ARM_DATA, data=ARM_S1, uptr=0xDEAD0000, expected=errno.EFAULT
    ),
    "arm-nested-fault-id": HwptRow(  # O8
        "a0",
        "viommu",
        flags=FAULT_ID_VALID,
        data_type=ARM_DATA,
        data=ARM_S1,
        expected=errno.ENOENT,
    ),
    "arm-nested-bad-vste-before-fault-id": HwptRow(
        "a0",
        "viommu",
        flags=FAULT_ID_VALID,
        data_type=ARM_DATA,
        data=cmd(STE_S1 | 1 << 52),
        expected=errno.EIO,
    ),
    # 8. any other kind
    "pt-is-device": HwptRow("a0", "device", expected=errno.EINVAL),  # A2
    "pt-is-nested": HwptRow(
        "a0", "nested", data_type=ARM_DATA, data=ARM_S1, expected=errno.EINVAL
    ),  # A12
    "pt-is-vdevice": HwptRow("a0", "vdev", expected=errno.EINVAL),
}


def _hwpt_scene(r: Rig) -> dict[str, int]:
    """Every kind of object on a fixed set of ids, for the HWPT_ALLOC rows."""
    ids = {"a0": r.bind("a0"), "b0": r.bind("b0"), "v0": r.bind("v0"), "w0": r.bind("w0")}
    r.bind("v1")
    ids["ioas"] = r.ioas()
    ids["parent"] = r.nest_parent(ids["v0"], ids["ioas"])
    ids["notparent"] = r.ok_hwpt(ids["v0"], ids["ioas"])
    ids["arm-parent"] = r.nest_parent(ids["a0"], ids["ioas"])
    ids["arm-notparent"] = r.ok_hwpt(ids["a0"], ids["ioas"])
    rc, ids["auto"] = r.attach("v1", ids["ioas"])
    assert rc == 0
    rc, ids["viommu"] = r.viommu(ids["a0"], ids["arm-parent"])
    assert rc == 0
    rc, ids["nested"] = r.arm_nested(ids["a0"], ids["viommu"], STE_ABORT)
    assert rc == 0
    rc, ids["vdev"] = r.vdevice(ids["viommu"], ids["a0"], 0x1)
    assert rc == 0
    ids["device"] = ids["a0"]
    ids["none"] = 0
    ids["zero"] = 0
    ids["missing"] = 0x7777
    return ids


@pytest.mark.parametrize("row", HWPT_ROWS.values(), ids=HWPT_ROWS.keys())
def test_hwpt_alloc_rows(rig: Rig, row: HwptRow) -> None:
    ids = _hwpt_scene(rig)
    table = rig.objects()
    obj = uapi.HwptAlloc(
        flags=row.flags,
        dev_id=ids[row.dev],
        pt_id=ids[row.pt],
        reserved=row.reserved,
        reserved2=row.reserved2,
        data_type=row.data_type,
        data_len=len(row.data) if row.data_len is None else row.data_len,
        data_uptr=(rig.buf(row.data) if row.data else 0) if row.uptr is None else row.uptr,
    )
    rc, out = rig.call(uapi.IOMMU_HWPT_ALLOC, obj)
    assert rc == row.expected
    if row.expected:
        assert out == obj  # nothing written back
        assert rig.objects() == table
    else:
        new_id = max(i for i, _ in table) + 1
        assert out == replace(obj, out_hwpt_id=new_id)
        assert rig.objects() == [*table, (new_id, row.kind)]


def test_vtd_nested_keeps_its_data(rig: Rig) -> None:
    dev = rig.bind("v0")
    parent = rig.nest_parent(dev, rig.ioas())
    rc, nested = rig.vtd_nested(
        dev, parent, flags=7, pgtbl_addr=0xABC000, addr_width=57, reserved=5
    )  # the nested alloc does not validate these
    assert rc == 0
    obj = rig.be.lookup(nested)
    assert isinstance(obj, HwptNestedObject)
    assert obj.data == uapi.HwptVtdS1(7, 0xABC000, 57, 5)
    assert obj.holds() == (parent,)


# ======================================================================================
# §3.1 vSTE validation
# ======================================================================================

VSTE_ROWS: dict[str, tuple[int, int, int, ArmNestedData | None]] = {
    # V=0: zeroed and accepted whatever else is set
    "v0-junk": (0xFFFF_FFFF_FFFF_FFFE, U64_MAX, 0, ArmNestedData(0, 0, 0, False)),
    "v0-zero": (0, 0, 0, ArmNestedData(0, 0, 0, False)),
    # Config
    "cfg-abort": (STE_ABORT, 0, 0, ArmNestedData(STE_ABORT, 0, 0, False)),
    "cfg-1": (0x3, 0, errno.EIO, None),
    "cfg-2": (0x5, 0, errno.EIO, None),
    "cfg-3": (0x7, 0, errno.EIO, None),
    "cfg-bypass": (STE_BYPASS, 0, 0, ArmNestedData(STE_BYPASS, 0, 4, False)),
    "cfg-s1": (STE_S1, 0, 0, ArmNestedData(STE_S1, 0, 5, False)),
    "cfg-6-s2": (0xD, 0, errno.EIO, None),
    "cfg-7-nested": (0xF, 0, errno.EIO, None),
    # EATS
    "eats-0": (STE_S1, 0 << 28, 0, ArmNestedData(STE_S1, 0, 5, False)),
    "eats-1": (STE_S1, 1 << 28, 0, ArmNestedData(STE_S1, 0, 5, True)),
    "eats-2": (STE_S1, 2 << 28, errno.EIO, None),
    "eats-3": (STE_S1, 3 << 28, errno.EIO, None),
    "eats-1-bypass-no-ats": (STE_BYPASS, 1 << 28, 0, ArmNestedData(STE_BYPASS, 0, 4, False)),
    # allowed fields are kept (EATS removed)
    "all-allowed": (
        0xF80F_FFFF_FFFF_FFF1 | STE_S1,
        0x1800_00FF,  # EATS=1 (both EATS bits are allowed, but 3 is not a valid EATS)
        0,
        ArmNestedData(0xF80F_FFFF_FFFF_FFFB, 0x0800_00FF, 5, True),
    ),
    # disallowed bits: each class
    "ste0-bit52": (STE_S1 | 1 << 52, 0, errno.EIO, None),
    "ste0-bit55": (STE_S1 | 1 << 55, 0, errno.EIO, None),
    "ste0-bit58": (STE_S1 | 1 << 58, 0, errno.EIO, None),
    "ste1-bit8": (STE_S1, 1 << 8, errno.EIO, None),
    "ste1-bit26": (STE_S1, 1 << 26, errno.EIO, None),
    "ste1-bit30": (STE_S1, 1 << 30, errno.EIO, None),
    "ste1-bit63": (STE_S1, 1 << 63, errno.EIO, None),
    "disallowed-on-abort": (STE_ABORT | 1 << 52, 0, errno.EIO, None),
}


@pytest.mark.parametrize(
    ("ste0", "ste1", "expected", "stored"), VSTE_ROWS.values(), ids=VSTE_ROWS.keys()
)
def test_vste_validation(
    rig: Rig, ste0: int, ste1: int, expected: int, stored: ArmNestedData | None
) -> None:
    topo = rig.arm_topology()
    table = rig.objects()
    rc, hwpt = rig.arm_nested(topo.dev, topo.viommu, ste0, ste1)
    assert rc == expected
    if expected:
        assert hwpt == 0
        assert rig.objects() == table
        return
    assert rig.objects() == [*table, (hwpt, "HWPT_NESTED")]
    obj = rig.be.lookup(hwpt)
    assert isinstance(obj, HwptNestedObject)
    assert obj.data == stored
    assert obj.viommu_id == topo.viommu


# ======================================================================================
# §1.6 IOMMU_VIOMMU_ALLOC
# ======================================================================================


@dataclass(frozen=True)
class ViommuRow:
    dev: str
    hwpt: str
    vtype: int = uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3
    flags: int = 0
    reserved: int = 0
    expected: int = 0


VIOMMU_ROWS: dict[str, ViommuRow] = {
    "ok": ViommuRow("a0", "parent"),
    "reserved-not-checked": ViommuRow("a0", "parent", reserved=0xFFFFFFFF),
    "flags": ViommuRow("none", "none", flags=1, expected=errno.EOPNOTSUPP),
    "type-default": ViommuRow("none", "none", vtype=0, expected=errno.EOPNOTSUPP),
    "dev-0": ViommuRow("none", "parent", expected=errno.ENOENT),  # O6
    "dev-is-ioas": ViommuRow("ioas", "parent", expected=errno.ENOENT),
    "vtd-device": ViommuRow("v0", "vtd-parent", expected=errno.EOPNOTSUPP),
    "type-tegra-on-arm": ViommuRow("a0", "none", vtype=2, expected=errno.EOPNOTSUPP),
    "type-selftest": ViommuRow("a0", "parent", vtype=0xDEADBEEF, expected=errno.EOPNOTSUPP),
    "type-checked-before-hwpt": ViommuRow(
        "a0", "none", vtype=0xDEAD, expected=errno.EOPNOTSUPP
    ),  # O3 (6.13: ENOENT)
    "hwpt-0": ViommuRow("a0", "none", expected=errno.ENOENT),  # O1
    "hwpt-is-ioas": ViommuRow("a0", "ioas", expected=errno.ENOENT),
    "hwpt-is-nested": ViommuRow("a0", "nested", expected=errno.ENOENT),
    "hwpt-is-viommu": ViommuRow("a0", "viommu", expected=errno.ENOENT),
    "not-nest-parent": ViommuRow("a0", "notparent", expected=errno.EINVAL),  # O2
    "parent-other-smmu": ViommuRow("b0", "parent", expected=errno.EINVAL),
    "parent-is-vtd": ViommuRow("a0", "vtd-parent", expected=errno.EINVAL),
}


@pytest.mark.parametrize("row", VIOMMU_ROWS.values(), ids=VIOMMU_ROWS.keys())
def test_viommu_alloc_rows(rig: Rig, row: ViommuRow) -> None:
    ids = {"a0": rig.bind("a0"), "b0": rig.bind("b0"), "v0": rig.bind("v0"), "none": 0}
    ids["ioas"] = rig.ioas()
    ids["parent"] = rig.nest_parent(ids["a0"], ids["ioas"])
    ids["notparent"] = rig.ok_hwpt(ids["a0"], ids["ioas"])
    ids["vtd-parent"] = rig.nest_parent(ids["v0"], ids["ioas"])
    _, ids["viommu"] = rig.viommu(ids["a0"], ids["parent"])
    _, ids["nested"] = rig.arm_nested(ids["a0"], ids["viommu"], STE_ABORT)
    table = rig.objects()
    obj = uapi.ViommuAlloc(
        flags=row.flags,
        type=row.vtype,
        dev_id=ids[row.dev],
        hwpt_id=ids[row.hwpt],
        reserved=row.reserved,
    )
    rc, out = rig.call(uapi.IOMMU_VIOMMU_ALLOC, obj)
    assert rc == row.expected
    if row.expected:
        assert out == obj
        assert rig.objects() == table
    else:
        new_id = max(i for i, _ in table) + 1
        assert out == replace(obj, out_viommu_id=new_id)
        assert rig.objects() == [*table, (new_id, "VIOMMU")]


def test_vmids_per_physical_smmu_from_the_parent(rig: Rig) -> None:
    a0, a1, b0 = rig.bind("a0"), rig.bind("a1"), rig.bind("b0")
    ioas = rig.ioas()
    p1 = rig.nest_parent(a0, ioas)
    p2 = rig.nest_parent(a1, ioas)
    q1 = rig.nest_parent(b0, ioas)
    plain = rig.ok_hwpt(a0, ioas)
    vmids = {}
    for name, hwpt in {"p1": p1, "p2": p2, "q1": q1, "plain": plain}.items():
        obj = rig.be.lookup(hwpt)
        assert isinstance(obj, HwptPagingObject)
        vmids[name] = obj.vmid
    assert vmids == {"p1": 1, "p2": 2, "q1": 1, "plain": 0}
    _, v1 = rig.viommu(a0, p1)
    _, v2 = rig.viommu(a1, p1)
    _, v3 = rig.viommu(a1, p2)
    got = [rig.be.lookup(v) for v in (v1, v2, v3)]
    assert [v.vmid for v in got if isinstance(v, ViommuObject)] == [1, 1, 2]
    # releasing a VMID makes it the lowest free one again
    assert rig.destroy(v3) == 0
    assert rig.destroy(p2) == 0
    p3 = rig.nest_parent(a1, ioas)
    obj = rig.be.lookup(p3)
    assert isinstance(obj, HwptPagingObject)
    assert obj.vmid == 2


# ======================================================================================
# §1.7 IOMMU_VDEVICE_ALLOC
# ======================================================================================


@dataclass(frozen=True)
class VdevRow:
    viommu: str
    dev: str
    virt_id: int
    expected: int = 0


VDEV_ROWS: dict[str, VdevRow] = {
    "ok": VdevRow("viommu", "a1", 0x9),
    "ok-64bit-virt-id": VdevRow("viommu", "a1", U64_MAX),
    "viommu-0": VdevRow("none", "none", 0x9, errno.ENOENT),  # O18
    "viommu-is-ioas": VdevRow("ioas", "a1", 0x9, errno.ENOENT),
    "viommu-is-parent": VdevRow("parent", "a1", 0x9, errno.ENOENT),
    "dev-0": VdevRow("viommu", "none", 0x9, errno.ENOENT),
    "dev-is-ioas": VdevRow("viommu", "ioas", 0x9, errno.ENOENT),
    "dev-other-smmu": VdevRow("viommu", "b0", 0x9, errno.EINVAL),
    "dev-vtd": VdevRow("viommu", "v0", 0x9, errno.EINVAL),
    "dev-other-smmu-before-eexist": VdevRow("viommu", "b0", 0x8, errno.EINVAL),
    "dev-has-vdevice": VdevRow("viommu", "a0", 0x9, errno.EEXIST),
    "dev-has-vdevice-elsewhere": VdevRow("viommu2", "a0", 0x9, errno.EEXIST),
    "virt-id-taken": VdevRow("viommu", "a1", 0x8, errno.EEXIST),  # O12
    "virt-id-free-on-other-viommu": VdevRow("viommu2", "a1", 0x8),
}


@pytest.mark.parametrize("row", VDEV_ROWS.values(), ids=VDEV_ROWS.keys())
def test_vdevice_alloc_rows(rig: Rig, row: VdevRow) -> None:
    topo = rig.arm_topology("a0", vsid=0x8)
    ids = {"a0": topo.dev, "a1": rig.bind("a1"), "b0": rig.bind("b0"), "v0": rig.bind("v0")}
    ids.update(viommu=topo.viommu, ioas=topo.ioas, parent=topo.parent, none=0)
    _, ids["viommu2"] = rig.viommu(topo.dev, topo.parent)
    table = rig.objects()
    obj = uapi.VdeviceAlloc(viommu_id=ids[row.viommu], dev_id=ids[row.dev], virt_id=row.virt_id)
    rc, out = rig.call(uapi.IOMMU_VDEVICE_ALLOC, obj)
    assert rc == row.expected
    if row.expected:
        assert out == obj
        assert rig.objects() == table
        return
    new_id = max(i for i, _ in table) + 1
    assert out == replace(obj, out_vdevice_id=new_id)
    assert rig.objects() == [*table, (new_id, "VDEVICE")]
    viommu = rig.be.lookup(ids[row.viommu])
    assert isinstance(viommu, ViommuObject)
    assert viommu.vdevs[row.virt_id] == new_id


def test_vdevice_destroy_frees_virt_id_and_device(rig: Rig) -> None:
    topo = rig.arm_topology("a0", vsid=0x8)
    assert rig.vdevice(topo.viommu, topo.dev, 0x9) == (errno.EEXIST, 0)
    assert rig.destroy(topo.vdev) == 0
    assert rig.vdevice(topo.viommu, topo.dev, 0x9) == (0, topo.vdev)
    a1 = rig.bind("a1")
    assert rig.vdevice(topo.viommu, a1, 0x8) == (0, a1 + 1)


# ======================================================================================
# §2.2 IOMMU_HWPT_INVALIDATE: core order, §2.3 copy rules
# ======================================================================================

GOOD_ARM = cmd(0x11 | 5 << 48)
ARM_SCENE = ("a0", "a1", "v0")


def _inv_scene(r: Rig) -> dict[str, int]:
    topo = r.arm_topology("a0", vsid=0x8)
    v0 = r.bind("v0")
    vtd_parent = r.nest_parent(v0, topo.ioas)
    _, vtd_nested = r.vtd_nested(v0, vtd_parent)
    _, arm_nested = r.arm_nested(topo.dev, topo.viommu, STE_S1)
    return {
        "viommu": topo.viommu,
        "arm-nested": arm_nested,
        "vtd-nested": vtd_nested,
        "parent": topo.parent,
        "vtd-parent": vtd_parent,
        "ioas": topo.ioas,
        "device": topo.dev,
        "vdev": topo.vdev,
        "missing": 0x4444,
        "zero": 0,
    }


@dataclass(frozen=True)
class InvRow:
    target: str
    blob: bytes
    data_type: int
    entry_len: int
    entry_num: int | None = None
    uptr: int | None = None
    reserved: int = 0
    expected: int = 0
    done: int = 0
    issued: tuple[bytes, ...] = ()  # on smmu0, CMD_SYNCs included


VMID1 = 1 << 32
CORE_ROWS: dict[str, InvRow] = {
    "reserved": InvRow("viommu", GOOD_ARM, ARM_INV, 16, reserved=1, expected=errno.EOPNOTSUPP),
    "reserved-before-lookup": InvRow(
        "missing", b"", ARM_INV, 16, 5, reserved=1, expected=errno.EOPNOTSUPP
    ),
    "null-uptr": InvRow("viommu", b"", ARM_INV, 16, 1, uptr=0, expected=errno.EINVAL),  # V6
    "entry-len-0": InvRow("viommu", GOOD_ARM, ARM_INV, 0, 1, expected=errno.EINVAL),  # V7
    "null-uptr-before-lookup": InvRow(
        "missing", b"", ARM_INV, 16, 1, uptr=0, expected=errno.EINVAL
    ),
    "empty-null-uptr-reaches-lookup": InvRow("missing", b"", ARM_INV, 0, 0, expected=errno.ENOENT),
    "id-0": InvRow("zero", b"", ARM_INV, 16, 0, expected=errno.ENOENT),
    "missing": InvRow("missing", GOOD_ARM, ARM_INV, 16, expected=errno.ENOENT),
    "paging-parent": InvRow("parent", GOOD_ARM, ARM_INV, 16, expected=errno.EINVAL),  # I1
    "vtd-paging-parent": InvRow("vtd-parent", vtd_inv(), VTD_INV, 24, expected=errno.EINVAL),
    "ioas": InvRow("ioas", GOOD_ARM, ARM_INV, 16, expected=errno.EINVAL),
    "device": InvRow("device", GOOD_ARM, ARM_INV, 16, expected=errno.EINVAL),
    "vdevice": InvRow("vdev", GOOD_ARM, ARM_INV, 16, expected=errno.EINVAL),
    "arm-nested-hwpt": InvRow("arm-nested", GOOD_ARM, ARM_INV, 16, expected=errno.EOPNOTSUPP),
    # §2.3, ARM column (whole-array driver)
    "arm-empty": InvRow("viommu", b"", ARM_INV, 16, 0, expected=errno.EINVAL),
    "arm-empty-wrong-type": InvRow("viommu", b"", VTD_INV, 16, 0, expected=errno.EINVAL),
    "arm-wrong-type": InvRow("viommu", GOOD_ARM, VTD_INV, 16, expected=errno.EINVAL),
    "arm-ok": InvRow(
        "viommu", GOOD_ARM, ARM_INV, 16, done=1, issued=(cmd(0x11 | 5 << 48 | VMID1), SYNC)
    ),
    "arm-short-entry-zero-filled": InvRow(
        "viommu",
        GOOD_ARM[:8] + GOOD_ARM[:8],
        ARM_INV,
        8,
        done=2,
        issued=(cmd(0x11 | 5 << 48 | VMID1),) * 2 + (SYNC,),
    ),
    "arm-1-byte-entries": InvRow(
        "viommu", b"\x30\x30", ARM_INV, 1, done=2, issued=(cmd(0x10 | VMID1),) * 2 + (SYNC,)
    ),
    "arm-long-entry-zero-tail": InvRow(
        "viommu",
        GOOD_ARM + bytes(8) + GOOD_ARM + bytes(8),
        ARM_INV,
        24,
        done=2,
        issued=(cmd(0x11 | 5 << 48 | VMID1),) * 2 + (SYNC,),
    ),
    "arm-long-entry-nonzero-tail": InvRow(
        "viommu",
        GOOD_ARM + bytes(8) + GOOD_ARM + bytes(7) + b"\x01",
        ARM_INV,
        24,
        expected=errno.E2BIG,
    ),
    "arm-unreadable-entry": InvRow("viommu", GOOD_ARM * 2, ARM_INV, 16, 3, expected=errno.EFAULT),
    "arm-unreadable-long-entry": InvRow(
        "viommu", GOOD_ARM + bytes(8) + GOOD_ARM, ARM_INV, 24, 2, expected=errno.EFAULT
    ),
    "arm-bad-uptr": InvRow("viommu", b"", ARM_INV, 16, 1, uptr=0xDEAD000, expected=errno.EFAULT),
    "arm-semantic-error-at-1": InvRow(
        "viommu", GOOD_ARM + cmd(0x46), ARM_INV, 16, expected=errno.EIO, done=1
    ),
    "arm-enomem": InvRow(
        "viommu", b"", ARM_INV, 16, (4 << 20) // 16 + 1, uptr=0x10000, expected=errno.ENOMEM
    ),
    # §2.3 / §4.2, VT-d column (per-entry driver)
    "vtd-ok": InvRow("vtd-nested", vtd_inv(0x1000, 2, 1), VTD_INV, 24, done=1),
    "vtd-empty": InvRow("vtd-nested", b"", VTD_INV, 24, 0, done=0),
    "vtd-empty-any-len-null-uptr": InvRow("vtd-nested", b"", VTD_INV, 0, 0, done=0),
    "vtd-empty-wrong-type": InvRow("vtd-nested", b"", ARM_INV, 24, 0, expected=errno.EINVAL),
    "vtd-wrong-type": InvRow("vtd-nested", vtd_inv(), ARM_INV, 24, expected=errno.EINVAL),
    "vtd-short-entry": InvRow("vtd-nested", vtd_inv()[:23] * 2, VTD_INV, 23, expected=errno.EINVAL),
    "vtd-long-entry-zero-tail": InvRow(
        "vtd-nested", vtd_inv() + bytes(1), VTD_INV, 25, expected=errno.EINVAL
    ),
    "vtd-long-entry-nonzero-tail": InvRow(
        "vtd-nested", vtd_inv() + b"\x01", VTD_INV, 25, expected=errno.EINVAL
    ),
    "vtd-unreadable-entry-2": InvRow(
        "vtd-nested", vtd_inv() * 2, VTD_INV, 24, 3, expected=errno.EFAULT, done=2
    ),
    "vtd-bad-uptr": InvRow(
        "vtd-nested", b"", VTD_INV, 24, 1, uptr=0xDEAD000, expected=errno.EFAULT
    ),
    "vtd-unknown-flag-at-1": InvRow(
        "vtd-nested", vtd_inv() + vtd_inv(flags=2), VTD_INV, 24, expected=errno.EOPNOTSUPP, done=1
    ),
    "vtd-reserved-at-0": InvRow(
        "vtd-nested", vtd_inv(reserved=1), VTD_INV, 24, expected=errno.EOPNOTSUPP
    ),
    "vtd-unaligned-at-2": InvRow(
        "vtd-nested",
        vtd_inv() * 2 + vtd_inv(addr=0x1800),
        VTD_INV,
        24,
        expected=errno.EINVAL,
        done=2,
    ),
    "vtd-all-with-addr": InvRow(
        "vtd-nested", vtd_inv(0x1000, U64_MAX), VTD_INV, 24, expected=errno.EINVAL
    ),
    "vtd-all": InvRow("vtd-nested", vtd_inv(0, U64_MAX), VTD_INV, 24, done=1),
    "vtd-npages-0": InvRow("vtd-nested", vtd_inv(0x2000, 0), VTD_INV, 24, done=1),
    "vtd-leaf": InvRow("vtd-nested", vtd_inv(0x2000, 1, 1) * 3, VTD_INV, 24, done=3),
}


@pytest.mark.parametrize("row", CORE_ROWS.values(), ids=CORE_ROWS.keys())
def test_hwpt_invalidate_rows(rig: Rig, row: InvRow) -> None:
    ids = _inv_scene(rig)
    table = rig.objects()
    before = testing.vtd_flushes(rig.be)
    rc, done = rig.invalidate(
        ids[row.target],
        row.blob,
        row.data_type,
        row.entry_len,
        row.entry_num,
        uptr=row.uptr,
        reserved=row.reserved,
    )
    assert (rc, done) == (row.expected, row.done)
    assert rig.objects() == table
    assert testing.issued(rig.be, "smmu0") == list(row.issued)
    flushes = testing.vtd_flushes(rig.be)[len(before) :]
    assert len(flushes) == (row.done if row.target == "vtd-nested" else 0)


def test_invalidate_writes_back_whole_struct_on_every_path(rig: Rig) -> None:
    ids = _inv_scene(rig)
    obj = uapi.HwptInvalidate(
        hwpt_id=ids["missing"], data_uptr=0x1234, data_type=ARM_INV, entry_len=16, entry_num=0
    )
    arg = with_size(obj, 33, b"\0") + b"\xee" * 3
    assert rig.raw(uapi.IOMMU_HWPT_INVALIDATE, arg) == errno.ENOENT
    assert uapi.decode(uapi.HwptInvalidate, arg) == replace(obj, size=33, entry_num=0)
    assert bytes(arg[32:]) == b"\0" + b"\xee" * 3
    obj = replace(obj, hwpt_id=ids["viommu"], entry_num=9, reserved=1)
    arg = uapi.encode(obj)
    assert rig.raw(uapi.IOMMU_HWPT_INVALIDATE, arg) == errno.EOPNOTSUPP
    assert uapi.decode(uapi.HwptInvalidate, arg) == replace(obj, entry_num=0)


def test_vtd_flushes_record_range_leaf_and_units(rig: Rig) -> None:
    v0, w0 = rig.bind("v0"), rig.bind("w0")
    parent = rig.nest_parent(v0, rig.ioas())
    _, nested = rig.vtd_nested(v0, parent)
    assert rig.attach("v0", nested) == (0, nested)
    assert rig.attach("w0", nested) == (0, nested)
    blob = vtd_inv(0x4000, 4, 1) + vtd_inv(0, U64_MAX)
    assert rig.invalidate(nested, blob, VTD_INV, 24) == (0, 2)
    assert testing.vtd_flushes(rig.be) == [
        VtdFlush(nested, 0x4000, 4, True, ("vtd0", "vtd1")),
        VtdFlush(nested, 0, U64_MAX, False, ("vtd0", "vtd1")),
    ]
    testing.clear_issued(rig.be)
    assert testing.vtd_flushes(rig.be) == []
    assert w0 != v0


# ======================================================================================
# §3.3 command conversion (checked through what reached the host queue)
# ======================================================================================

VSID, PSID = 0x8, 0x100  # a0 behind smmu0 as vSID 8
CONVERT_ROWS: dict[str, tuple[bytes, bytes | None]] = {
    "nsnh-all": (cmd(0x30 | 0xABCD << 32 | 0x1234_0000_0000_FF00, U64_MAX), cmd(0x10 | 2 << 32)),
    "nh-all": (cmd(0x10 | 0xFFFF << 32), cmd(0x10 | 2 << 32)),
    "nh-asid": (
        cmd(0x11 | 0x77 << 32 | 0xBEEF << 48, 0x5),
        cmd(0x11 | 2 << 32 | 0xBEEF << 48, 0x5),
    ),
    "nh-va": (
        cmd(0x12 | 0x3 << 12 | 0x1 << 20 | 9 << 32 | 0xAA << 48, 0xFFFF_F000 | 0x301),
        cmd(0x12 | 0x3 << 12 | 0x1 << 20 | 2 << 32 | 0xAA << 48, 0xFFFF_F000 | 0x301),
    ),
    "nh-vaa": (cmd(0x13 | 0x1234 << 32, 0x4000_0000), cmd(0x13 | 2 << 32, 0x4000_0000)),
    "nh-va-reserved-bits-forwarded": (
        cmd(0x12 | 1 << 8 | 1 << 31, 1 << 4),
        cmd(0x12 | 1 << 8 | 1 << 31 | 2 << 32, 1 << 4),
    ),
    "atc-inv": (
        cmd(0x40 | 1 << 9 | 1 << 11 | 0x5 << 12 | VSID << 32, 0x8000_0000 | 12),
        cmd(0x40 | 1 << 9 | 1 << 11 | 0x5 << 12 | PSID << 32, 0x8000_0000 | 12),
    ),
    "cfgi-cd": (cmd(0x05 | 0x3 << 12 | VSID << 32, 1), cmd(0x05 | 0x3 << 12 | PSID << 32, 1)),
    "cfgi-cd-all": (cmd(0x06 | VSID << 32), cmd(0x06 | PSID << 32)),
    "atc-inv-unknown-vsid": (cmd(0x40 | 0x9 << 32), None),
    "cfgi-cd-unknown-vsid": (cmd(0x05 | PSID << 32), None),
    "cfgi-cd-all-unknown-vsid": (cmd(0x06), None),
    **{
        f"rejected-{op:#04x}": (cmd(op | VSID << 32), None)
        for op in (
            0x00,
            0x01,
            0x02,
            0x03,
            0x04,
            0x0C,
            0x14,
            0x20,
            0x21,
            0x22,
            0x28,
            0x2A,
            0x41,
            0x44,
            0x45,
            0x46,
            0xFF,
        )
    },
}


@pytest.mark.parametrize(("given_", "expected"), CONVERT_ROWS.values(), ids=CONVERT_ROWS.keys())
def test_command_conversion(rig: Rig, given_: bytes, expected: bytes | None) -> None:
    a0 = rig.bind("a0")
    ioas = rig.ioas()
    rig.nest_parent(a0, ioas)  # takes VMID 1, so the vIOMMU's parent has VMID 2
    topo_parent = rig.nest_parent(a0, ioas)
    _, viommu = rig.viommu(a0, topo_parent)
    assert rig.vdevice(viommu, a0, VSID)[0] == 0
    rc, done = rig.invalidate(viommu, given_, ARM_INV, 16)
    if expected is None:
        assert (rc, done) == (errno.EIO, 0)
        assert testing.issued(rig.be, "smmu0") == []
    else:
        assert (rc, done) == (0, 1)
        assert testing.issued(rig.be, "smmu0") == [expected, SYNC]
    assert testing.issued(rig.be, "smmu1") == []


def test_vsid_lookup_is_per_viommu_and_follows_vdevice_lifetime(rig: Rig) -> None:
    topo = rig.arm_topology("a0", vsid=VSID)
    b0 = rig.bind("b0")
    parent1 = rig.nest_parent(b0, topo.ioas)
    _, viommu1 = rig.viommu(b0, parent1)
    assert rig.invalidate(viommu1, cmd(0x06 | VSID << 32), ARM_INV, 16) == (errno.EIO, 0)
    assert rig.vdevice(viommu1, b0, VSID)[0] == 0
    assert rig.invalidate(viommu1, cmd(0x06 | VSID << 32), ARM_INV, 16) == (0, 1)
    assert testing.issued(rig.be, "smmu1") == [cmd(0x06 | 0x200 << 32), SYNC]
    assert rig.destroy(topo.vdev) == 0
    assert rig.invalidate(topo.viommu, cmd(0x06 | VSID << 32), ARM_INV, 16) == (errno.EIO, 0)
    assert testing.issued(rig.be, "smmu0") == []


# ======================================================================================
# §3.4 groups of 63 and the reported entry_num
# ======================================================================================


def _tlbi(i: int) -> bytes:
    return cmd(0x12 | (i & 0xFFFF) << 48, (i + 1) << 12)


def _tlbi_out(i: int) -> bytes:
    return cmd(0x12 | VMID1 | (i & 0xFFFF) << 48, (i + 1) << 12)


@dataclass(frozen=True)
class GroupCase:
    count: int  # commands in the array
    bad: int | None  # index of an illegal command (CMD_SYNC), if any
    expected: int
    done: int  # reported entry_num
    groups: tuple[tuple[int, int], ...]  # [start, end) of each group that reached the queue


GROUP_CASES = [
    GroupCase(1, None, 0, 1, ((0, 1),)),
    GroupCase(63, None, 0, 63, ((0, 63),)),
    GroupCase(64, None, 0, 64, ((0, 63), (63, 64))),
    GroupCase(70, None, 0, 70, ((0, 63), (63, 70))),
    GroupCase(126, None, 0, 126, ((0, 63), (63, 126))),
    GroupCase(127, None, 0, 127, ((0, 63), (63, 126), (126, 127))),
    GroupCase(71, 70, errno.EIO, 70, ((0, 63),)),  # 63..69 converted, counted, never issued
    GroupCase(100, 70, errno.EIO, 70, ((0, 63),)),
    GroupCase(70, 63, errno.EIO, 63, ((0, 63),)),
    GroupCase(70, 62, errno.EIO, 62, ()),  # 0..61 never issued
    GroupCase(70, 0, errno.EIO, 0, ()),
    GroupCase(200, 130, errno.EIO, 130, ((0, 63), (63, 126))),
]


@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: f"n{c.count}-bad{c.bad}")
def test_groups_of_63(rig: Rig, case: GroupCase) -> None:
    topo = rig.arm_topology()
    blob = b"".join(cmd(0x46) if i == case.bad else _tlbi(i) for i in range(case.count))
    assert rig.invalidate(topo.viommu, blob, ARM_INV, 16) == (case.expected, case.done)
    want: list[bytes] = []
    for start, end in case.groups:
        want.extend(_tlbi_out(i) for i in range(start, end))
        want.append(SYNC)
    assert testing.issued(rig.be, "smmu0") == want


@pytest.mark.parametrize(("count", "done", "groups"), [(100, 62, 1), (30, 29, 1), (63, 62, 1)])
def test_hardware_issue_failure_reports_e_minus_1(
    rig: Rig, count: int, done: int, groups: int
) -> None:
    topo = rig.arm_topology()
    testing.inject_cmdq_error(rig.be, "smmu0", errno.ETIMEDOUT)
    blob = b"".join(_tlbi(i) for i in range(count))
    assert rig.invalidate(topo.viommu, blob, ARM_INV, 16) == (errno.ETIMEDOUT, done)
    issued = testing.issued(rig.be, "smmu0")
    assert issued.count(SYNC) == groups
    assert len(issued) == min(count, 63) + groups


def test_clear_issued(rig: Rig) -> None:
    topo = rig.arm_topology()
    assert rig.invalidate(topo.viommu, GOOD_ARM, ARM_INV, 16) == (0, 1)
    assert testing.issued(rig.be, "smmu0")
    testing.clear_issued(rig.be)
    assert testing.issued(rig.be, "smmu0") == []
    assert testing.issued(rig.be, "vtd0") == []
    with pytest.raises(KeyError):
        testing.issued(rig.be, "nope")


# ======================================================================================
# VFIO cdev: bind / attach / detach
# ======================================================================================


def test_open_device_errors(rig: Rig) -> None:
    with pytest.raises(OSError, match="no host device") as exc:
        rig.be.open_device("zz")
    assert exc.value.errno == errno.ENODEV
    rig.open("a0")
    with pytest.raises(OSError, match="already open") as exc:
        rig.be.open_device("a0")
    assert exc.value.errno == errno.EBUSY
    with pytest.raises(OSError, match="not an open device") as exc:
        rig.be.close_device(1234)
    assert exc.value.errno == errno.EBADF


BIND_ROWS: dict[str, tuple[dict[str, int], int, int]] = {
    "ok": ({}, 0, 1),
    "argsz-15": ({"argsz": 15}, errno.EINVAL, 0),
    "argsz-large-ignored": ({"argsz": 4096}, 0, 1),
    "flags": ({"flags": 1}, errno.EINVAL, 0),
    "negative-fd": ({"iommufd": -1}, errno.EINVAL, 0),
    "not-an-fd": ({"iommufd": 77}, errno.EBADF, 0),
    "device-fd": ({"iommufd": -2}, errno.EBADFD, 0),  # -2: the device's own fd
}


@pytest.mark.parametrize(("fields", "expected", "devid"), BIND_ROWS.values(), ids=BIND_ROWS.keys())
def test_bind_rows(rig: Rig, fields: dict[str, int], expected: int, devid: int) -> None:
    fd = rig.open("a0")
    values = {"iommufd": rig.be.iommufd, **fields}
    if values["iommufd"] == -2:
        values["iommufd"] = fd
    rc, out = rig.call(uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.VfioDeviceBindIommufd(**values), fd)
    assert (rc, out.out_devid) == (expected, devid)
    assert rig.objects() == ([(1, "DEVICE")] if devid else [])


def test_bind_twice_and_short_arg(rig: Rig) -> None:
    dev = rig.bind("a0")
    fd = rig.fds["a0"]
    rc, out = rig.call(
        uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.VfioDeviceBindIommufd(iommufd=rig.be.iommufd), fd
    )
    assert (rc, out.out_devid) == (errno.EINVAL, 0)
    fd2 = rig.open("a1")
    arg = uapi.encode(uapi.VfioDeviceBindIommufd(iommufd=rig.be.iommufd))[:15]
    assert rig.raw(uapi.VFIO_DEVICE_BIND_IOMMUFD, arg, fd=fd2) == errno.EFAULT
    assert rig.objects() == [(dev, "DEVICE")]


def test_requests_on_unbound_and_bound_device(rig: Rig) -> None:
    fd = rig.open("a0")
    attach = uapi.encode(uapi.VfioDeviceAttachIommufdPt(pt_id=1))
    assert rig.raw(uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach, fd=fd) == errno.EINVAL
    assert rig.raw(uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, bytearray(16), fd=fd) == errno.EINVAL
    assert rig.raw(uapi.IOMMU_IOAS_ALLOC, uapi.encode(uapi.IoasAlloc()), fd=fd) == errno.EINVAL
    rig.bind("a1")
    fd1 = rig.fds["a1"]
    assert rig.raw(uapi.IOMMU_IOAS_ALLOC, uapi.encode(uapi.IoasAlloc()), fd=fd1) == errno.ENOTTY
    assert rig.raw(0x3B79, bytearray(16), fd=fd1) == errno.ENOTTY


def _attach_scene(r: Rig) -> dict[str, int]:
    topo = r.arm_topology("a0", vsid=0x8)
    ids = {
        "a0": topo.dev,
        "a1": r.bind("a1"),
        "b0": r.bind("b0"),
        "v0": r.bind("v0"),
        "w0": r.bind("w0"),
    }
    ids.update(ioas=topo.ioas, parent=topo.parent, viommu=topo.viommu, vdev=topo.vdev)
    ids["paging"] = r.ok_hwpt(topo.dev, topo.ioas)
    ids["vtd-parent"] = r.nest_parent(ids["v0"], topo.ioas)
    ids["vtd-paging"] = r.ok_hwpt(ids["v0"], topo.ioas)
    ids["vtd-nested"] = r.vtd_nested(ids["v0"], ids["vtd-parent"])[1]
    for name, ste0 in (
        ("s1", STE_S1),
        ("abort", STE_ABORT),
        ("bypass", STE_BYPASS),
        ("invalid", 0),
    ):
        ids[name] = r.arm_nested(topo.dev, topo.viommu, ste0)[1]
    ids["missing"] = 0x999
    ids["zero"] = 0
    return ids


ATTACH_ROWS: dict[str, tuple[str, str, int]] = {
    "paging": ("a0", "paging", 0),
    "paging-other-device-same-smmu": ("a1", "paging", 0),
    "paging-other-smmu": ("b0", "paging", errno.EINVAL),
    "paging-arm-by-vtd-device": ("v0", "paging", errno.EINVAL),
    "nest-parent-directly": ("a0", "parent", 0),
    "vtd-paging": ("v0", "vtd-paging", 0),
    "vtd-paging-other-unit": ("w0", "vtd-paging", 0),
    "vtd-paging-by-arm-device": ("a0", "vtd-paging", errno.EINVAL),
    "vtd-nested": ("v0", "vtd-nested", 0),
    "vtd-nested-other-unit": ("w0", "vtd-nested", 0),
    "vtd-nested-by-arm-device": ("a0", "vtd-nested", errno.EINVAL),
    "arm-s1-with-vdevice": ("a0", "s1", 0),
    "arm-s1-without-vdevice": ("a1", "s1", errno.ENOENT),  # O10
    "arm-abort-without-vdevice": ("a1", "abort", 0),
    "arm-bypass-without-vdevice": ("a1", "bypass", 0),
    "arm-invalid-ste-without-vdevice": ("a1", "invalid", 0),
    "arm-s1-other-smmu": ("b0", "s1", errno.EINVAL),
    "arm-abort-other-smmu": ("b0", "abort", errno.EINVAL),
    "arm-s1-vtd-device": ("v0", "s1", errno.EINVAL),
    "missing": ("a0", "missing", errno.ENOENT),
    "zero": ("a0", "zero", errno.ENOENT),
    "viommu": ("a0", "viommu", errno.EINVAL),
    "device": ("a0", "a1", errno.EINVAL),
    "vdevice": ("a0", "vdev", errno.EINVAL),
}


@pytest.mark.parametrize(
    ("device", "target", "expected"), ATTACH_ROWS.values(), ids=ATTACH_ROWS.keys()
)
def test_attach_rows(rig: Rig, device: str, target: str, expected: int) -> None:
    ids = _attach_scene(rig)
    table = rig.objects()
    rc, pt_id = rig.attach(device, ids[target])
    assert (rc, pt_id) == (expected, ids[target])
    assert rig.objects() == table
    dev = rig.be.lookup(ids[device])
    assert dev is not None
    assert dev.holds() == ((ids[target],) if not expected else ())
    if not expected:
        assert rig.destroy(ids[target]) == errno.EBUSY
        assert rig.detach(device) == 0
        assert dev.holds() == ()


@pytest.mark.parametrize(
    ("fields", "arg_len", "expected"),
    [
        ({}, 16, 0),
        ({}, 12, 0),  # minsz is 12 (pt_id); pasid is read only with the flag
        ({}, 11, errno.EFAULT),
        ({"argsz": 11}, 16, errno.EINVAL),
        ({"argsz": 12}, 16, 0),
        ({"flags": 2}, 16, errno.EINVAL),
        ({"flags": 1}, 16, errno.EOPNOTSUPP),
    ],
)
def test_attach_struct_rules(rig: Rig, fields: dict[str, int], arg_len: int, expected: int) -> None:
    dev = rig.bind("a0")
    hwpt = rig.ok_hwpt(dev, rig.ioas())
    arg = uapi.encode(uapi.VfioDeviceAttachIommufdPt(pt_id=hwpt, **fields))[:arg_len]
    assert rig.raw(uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg, fd=rig.fds["a0"]) == expected
    lookup = rig.be.lookup(dev)
    assert lookup is not None
    assert lookup.holds() == ((hwpt,) if not expected else ())


@pytest.mark.parametrize(
    ("fields", "arg_len", "expected"),
    [
        ({}, 16, 0),
        ({}, 8, 0),
        ({}, 7, errno.EFAULT),
        ({"argsz": 7}, 16, errno.EINVAL),
        ({"flags": 2}, 16, errno.EINVAL),
        ({"flags": 1}, 16, errno.EOPNOTSUPP),
        ({"reserved": 0xFFFF}, 16, 0),
    ],
)
def test_detach_struct_rules(rig: Rig, fields: dict[str, int], arg_len: int, expected: int) -> None:
    dev = rig.bind("a0")
    hwpt = rig.ok_hwpt(dev, rig.ioas())
    assert rig.attach("a0", hwpt) == (0, hwpt)
    arg = uapi.encode(uapi.VfioDeviceDetachIommufdPt(**fields))[:arg_len]
    assert rig.raw(uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, arg, fd=rig.fds["a0"]) == expected
    lookup = rig.be.lookup(dev)
    assert lookup is not None
    assert lookup.holds() == (() if not expected else (hwpt,))


def test_detach_when_not_attached_is_a_no_op(rig: Rig) -> None:
    rig.bind("a0")
    assert rig.detach("a0") == 0


def test_attach_replaces_and_releases(rig: Rig) -> None:
    """Lifecycle of §5.3 on the VT-d path: replace moves the reference."""
    dev = rig.bind("v0")
    ioas = rig.ioas()
    parent = rig.nest_parent(dev, ioas)
    notparent = rig.ok_hwpt(dev, ioas)
    n0 = rig.vtd_nested(dev, parent)[1]
    n1 = rig.vtd_nested(dev, parent)[1]
    assert rig.attach("v0", n0) == (0, n0)
    assert rig.destroy(n0) == errno.EBUSY
    assert rig.attach("v0", n0) == (0, n0)  # same HWPT again: no-op
    assert rig.attach("v0", n1) == (0, n1)
    assert rig.destroy(n1) == errno.EBUSY
    assert rig.destroy(n0) == 0
    assert rig.attach("v0", parent) == (0, parent)
    assert rig.destroy(n1) == 0
    rc, auto = rig.attach("v0", ioas)
    assert (rc, auto) == (0, n0)  # a fresh auto domain takes the lowest free id
    assert rig.destroy(parent) == 0
    assert rig.destroy(notparent) == 0
    assert rig.objects() == [(dev, "DEVICE"), (ioas, "IOAS"), (auto, "HWPT_PAGING")]


def test_failed_replace_keeps_the_old_attachment(rig: Rig) -> None:
    topo = rig.arm_topology()
    a1 = rig.bind("a1")
    paging = rig.ok_hwpt(a1, topo.ioas)
    s1 = rig.arm_nested(topo.dev, topo.viommu, STE_S1)[1]
    assert rig.attach("a1", paging) == (0, paging)
    assert rig.attach("a1", s1) == (errno.ENOENT, s1)
    dev = rig.be.lookup(a1)
    assert dev is not None
    assert dev.holds() == (paging,)


def test_auto_domains(rig: Rig) -> None:
    a0, a1, b0 = rig.bind("a0"), rig.bind("a1"), rig.bind("b0")
    v0, w0 = rig.bind("v0"), rig.bind("w0")
    ioas = rig.ioas()
    ioas2 = rig.ioas()
    rc, auto_a = rig.attach("a0", ioas)
    assert (rc, auto_a) == (0, 8)
    assert rig.attach("a1", ioas) == (0, auto_a)  # reused on the same SMMU
    rc, auto_b = rig.attach("b0", ioas)  # incompatible: a new one
    assert (rc, auto_b) == (0, 9)
    rc, auto_v = rig.attach("v0", ioas)
    assert (rc, auto_v) == (0, 10)
    assert rig.attach("w0", ioas) == (0, auto_v)  # VT-d units share
    assert rig.attach("a0", ioas) == (0, auto_a)  # again: same domain, no-op
    obj = rig.be.lookup(auto_a)
    assert isinstance(obj, HwptPagingObject)
    assert obj.auto_domain
    assert not obj.nest_parent
    assert rig.destroy(auto_a) == errno.EBUSY
    assert rig.destroy(ioas) == errno.EBUSY
    # a nested HWPT cannot sit on an auto domain
    assert rig.vtd_nested(v0, auto_v) == (errno.EINVAL, 0)
    assert rig.detach("a0") == 0
    assert auto_a in dict(rig.objects())
    assert rig.detach("a1") == 0
    assert auto_a not in dict(rig.objects())  # the last user took it away
    assert rig.attach("b0", ioas2) == (0, auto_a)  # replace: new domain, old one gone
    assert auto_b not in dict(rig.objects())
    rig.be.close_device(rig.fds["v0"])
    rig.be.close_device(rig.fds["w0"])
    assert auto_v not in dict(rig.objects())
    assert rig.objects() == [
        (a0, "DEVICE"),
        (a1, "DEVICE"),
        (b0, "DEVICE"),
        (ioas, "IOAS"),
        (ioas2, "IOAS"),
        (auto_a, "HWPT_PAGING"),
    ]
    assert w0 == v0 + 1


def test_unbind_with_attachment_and_vdevice(rig: Rig) -> None:
    topo = rig.arm_topology()
    s1 = rig.arm_nested(topo.dev, topo.viommu, STE_S1)[1]
    assert rig.attach("a0", s1) == (0, s1)
    rig.be.close_device(rig.fds["a0"])
    assert rig.objects() == [(2, "IOAS"), (3, "HWPT_PAGING"), (4, "VIOMMU"), (6, "HWPT_NESTED")]
    assert testing.tombstones(rig.be) == [5]
    assert rig.destroy(s1) == 0
    assert rig.destroy(topo.viommu) == 0


# ======================================================================================
# Leaks: teardown in the right order, and close()
# ======================================================================================


def _full_topology(r: Rig) -> dict[str, int]:
    topo = r.arm_topology("a0", vsid=0x8)
    a1 = r.bind("a1")
    assert r.vdevice(topo.viommu, a1, 0x9)[0] == 0
    s1 = r.arm_nested(topo.dev, topo.viommu, STE_S1)[1]
    abort = r.arm_nested(topo.dev, topo.viommu, STE_ABORT)[1]
    assert r.attach("a0", s1) == (0, s1)
    assert r.attach("a1", abort) == (0, abort)
    b0 = r.bind("b0")
    assert r.attach("b0", topo.ioas)[0] == 0
    v0 = r.bind("v0")
    vtd_parent = r.nest_parent(v0, topo.ioas)
    vtd_nested = r.vtd_nested(v0, vtd_parent)[1]
    assert r.attach("v0", vtd_nested) == (0, vtd_nested)
    assert r.invalidate(topo.viommu, GOOD_ARM * 3, ARM_INV, 16) == (0, 3)
    assert r.invalidate(vtd_nested, vtd_inv(), VTD_INV, 24) == (0, 1)
    return {
        "s1": s1,
        "abort": abort,
        "vtd-parent": vtd_parent,
        "vtd-nested": vtd_nested,
        "ioas": topo.ioas,
        "parent": topo.parent,
        "viommu": topo.viommu,
        "b0": b0,
    }


def test_teardown_in_reference_order_leaves_nothing(rig: Rig) -> None:
    ids = _full_topology(rig)
    assert len(rig.objects()) == 14
    for name in ("a0", "a1", "v0"):
        assert rig.detach(name) == 0
    for obj_id, kind in rig.objects():
        if kind == "VDEVICE":
            assert rig.destroy(obj_id) == 0
    order = ["s1", "abort", "viommu", "parent", "vtd-nested", "vtd-parent"]
    for name in order:
        assert rig.destroy(ids[name]) == 0, name
    for name in ("a0", "a1", "b0", "v0"):
        rig.be.close_device(rig.fds[name])
    assert rig.destroy(ids["ioas"]) == 0
    assert rig.objects() == []
    assert testing.tombstones(rig.be) == []
    rig.be.close()
    assert rig.objects() == []


def test_close_on_a_populated_backend_leaves_nothing(rig: Rig) -> None:
    _full_topology(rig)
    rig.be.close_device(rig.fds["a1"])  # leave a tombstone behind too
    assert testing.tombstones(rig.be)
    rig.be.close()
    assert rig.objects() == []
    assert testing.tombstones(rig.be) == []
    arg = uapi.encode(uapi.IoasAlloc())
    assert rig.raw(uapi.IOMMU_IOAS_ALLOC, arg) == errno.EBADF
    with pytest.raises(OSError, match="not an open device"):
        rig.be.close_device(rig.fds["a0"])
    rig.be.close()  # idempotent


def test_destroy_order_violations_are_ebusy_not_leaks(rig: Rig) -> None:
    ids = _full_topology(rig)
    table = rig.objects()
    for name in ("ioas", "parent", "viommu", "s1", "abort", "vtd-parent", "vtd-nested"):
        assert rig.destroy(ids[name]) == errno.EBUSY, name
    assert rig.objects() == table


# ======================================================================================
# Robustness: no input makes ioctl raise
# ======================================================================================

REQUESTS = [*uapi.IOCTL_NAMES, 0x3B7F, 0x1234]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(REQUESTS),
            st.binary(max_size=56),
            st.integers(0, 12),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
    payload=st.binary(max_size=80),
)
def test_ioctl_never_raises(steps: list[tuple[int, bytes, int, bool]], payload: bytes) -> None:
    rig = Rig()
    for name in ("a0", "b0", "v0"):
        rig.bind(name)
    rig.arm_topology("a1", vsid=3)
    addr = rig.buf(payload) if payload else 0
    for request, raw, small_id, on_device in steps:
        arg = bytearray(raw)
        # make ids and pointers plausible often enough to reach deep paths
        if len(arg) >= 8 and small_id:
            arg[4:8] = struct.pack("<I", small_id)
        if len(arg) >= 40 and addr and request == uapi.IOMMU_HWPT_ALLOC:
            arg[32:40] = struct.pack("<Q", addr)
        if len(arg) >= 16 and addr and request == uapi.IOMMU_HWPT_INVALIDATE:
            arg[8:16] = struct.pack("<Q", addr)
        fd = rig.fds["a0"] if on_device else rig.be.iommufd
        rc = rig.be.ioctl(fd, request, arg)
        assert isinstance(rc, int)
        assert rc >= 0
        assert len(arg) == len(raw)
    rig.be.close()
    assert rig.objects() == []


_SMALL = st.integers(0, 14)
_FIELD_VALUES: dict[str, st.SearchStrategy[int]] = {
    "size": st.sampled_from([0, 7, 8, 12, 16, 24, 32, 40, 48, 49, 64]),
    "argsz": st.sampled_from([0, 8, 12, 16, 32]),
    "flags": st.sampled_from([0, 1, 2, 4, 8, 5, 0x80000000]),
    "data_len": st.sampled_from([0, 1, 8, 15, 16, 17, 23, 24, 25]),
    "entry_len": st.sampled_from([0, 1, 8, 16, 17, 24, 25]),
    "entry_num": st.sampled_from([0, 1, 2, 3, 64, 70]),
    "data_type": st.sampled_from([0, 1, 2, 3, 0xDEAD]),
    "type": st.sampled_from([0, 1, 2, 0xDEADBEEF]),
    "virt_id": st.sampled_from([0, 3, 8, U64_MAX]),
    "reserved": st.sampled_from([0, 0, 0, 1]),
    "reserved2": st.sampled_from([0, 1]),
    "iommufd": st.sampled_from([-1, 3, 4, 99]),
}
_STRUCT_FOR = {
    uapi.IOMMU_DESTROY: uapi.Destroy,
    uapi.IOMMU_IOAS_ALLOC: uapi.IoasAlloc,
    uapi.IOMMU_HWPT_ALLOC: uapi.HwptAlloc,
    uapi.IOMMU_VIOMMU_ALLOC: uapi.ViommuAlloc,
    uapi.IOMMU_VDEVICE_ALLOC: uapi.VdeviceAlloc,
    uapi.IOMMU_HWPT_INVALIDATE: uapi.HwptInvalidate,
    uapi.VFIO_DEVICE_BIND_IOMMUFD: uapi.VfioDeviceBindIommufd,
    uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT: uapi.VfioDeviceAttachIommufdPt,
    uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT: uapi.VfioDeviceDetachIommufdPt,
}


@st.composite
def _plausible_call(draw: st.DrawFn, addr: int) -> tuple[int, uapi.UapiStruct, bool]:
    request = draw(st.sampled_from(sorted(_STRUCT_FOR)))
    cls = _STRUCT_FOR[request]
    values: dict[str, Any] = {}
    for name in uapi.field_names(cls):
        if name in _FIELD_VALUES:
            values[name] = draw(_FIELD_VALUES[name])
        elif name.endswith("uptr"):
            values[name] = draw(st.sampled_from([0, addr, addr + 8, 0xDEAD0000]))
        else:
            values[name] = draw(_SMALL)
    return request, cls(**values), request >> 4 == 0x3B7


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), payload=st.binary(min_size=0, max_size=64))
def test_plausible_call_sequences_keep_the_graph_consistent(
    data: st.DataObject, payload: bytes
) -> None:
    """Random but well-formed calls: no exception, and close() always empties the table."""
    rig = Rig()
    for name in ("a0", "b0", "v0"):
        rig.bind(name)
    rig.open("a1")
    addr = rig.buf(payload) if payload else 0x10
    for _ in range(data.draw(st.integers(1, 25))):
        request, obj, on_device = data.draw(_plausible_call(addr))
        device = data.draw(st.sampled_from(["a0", "a1", "b0", "v0"]))
        fd = rig.fds[device] if on_device else rig.be.iommufd
        arg = uapi.encode(obj)
        rc = rig.be.ioctl(fd, request, arg)
        assert rc >= 0
        for obj_id, _kind in rig.objects():
            live = rig.be.lookup(obj_id)
            assert live is not None
            assert all(held in dict(rig.objects()) for held in live.holds())
    rig.be.close()
    assert rig.objects() == []
