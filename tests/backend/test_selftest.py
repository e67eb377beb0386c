"""Conformance with the kernel's iommufd selftest, row by row (reference iommufd.md §5).

Every row of §5.3 (A1-A14 allocation, I1-I14 HWPT invalidation), §5.4 (V1-V14 vIOMMU
invalidation) and §5.5 (O1-O18 vIOMMU / vDEVICE / vEVENTQ, H1-H9 HW queues) is one test,
named after its row, run against ``EmulatedIommufd(selftest=True)`` through the same
packed structures and IOMMU_TEST_CMD operations the selftest uses. Rows that the selftest
runs one after another on one fixture (I, V, H) are replayed as prefixes: the test of row
k replays rows 1..k-1 first, so "cache after" means what the selftest sees after row k.
The §5.3 ``cmd_length`` cases are parametrised over every ioctl the emulator serves.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from protocols import iommufd as uapi
from viommud.backend.emulator import testing
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig

T = TypeVar("T", bound=uapi.UapiStruct)

NO_HOST = HostConfig((), ())
D = uapi.IOMMU_TEST_IOTLB_DEFAULT  # 0xbadbeef
C = uapi.IOMMU_TEST_DEV_CACHE_DEFAULT  # 0xbaddad
NEST_PARENT = uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
FAULT_ID_VALID = uapi.IOMMU_HWPT_FAULT_ID_VALID
HWPT_SELFTEST = uapi.IOMMU_HWPT_DATA_SELFTEST
INV_SELFTEST = uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST
INV_INVALID = uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID
VIOMMU_SELFTEST = uapi.IOMMU_VIOMMU_TYPE_SELFTEST
FLAG_ALL = uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL
PAGE = 4096


class MockRig:
    """A selftest-enabled emulator and the selftest's helper calls."""

    def __init__(self, kernel: str = "mainline") -> None:
        self.be = EmulatedIommufd(NO_HOST, selftest=True, kernel=kernel)

    def call(self, request: int, obj: T) -> tuple[int, T]:
        arg = uapi.encode(obj)
        rc = self.be.ioctl(self.be.iommufd, request, arg)
        return rc, uapi.decode(type(obj), arg)

    def buf(self, data: bytes) -> int:
        addr = self.be.memory.alloc(len(data))
        self.be.memory.write(addr, data)
        return addr

    def test_cmd(self, op: int, obj_id: int, payload: uapi.UapiStruct) -> tuple[int, bytes]:
        rc, out = self.call(uapi.IOMMU_TEST_CMD, uapi.TestCmd.with_payload(op, obj_id, payload))
        return rc, out.payload

    # -- objects --------------------------------------------------------------------------
    def ioas(self) -> int:
        rc, out = self.call(uapi.IOMMU_IOAS_ALLOC, uapi.IoasAlloc())
        assert rc == 0
        return out.out_ioas_id

    def mock_domain(self, pt_id: int, dev_flags: int = 0) -> tuple[int, int, int]:
        """``test_cmd_mock_domain``: (stdev_id, hwpt_id, idev_id)."""
        op = uapi.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS if dev_flags else uapi.IOMMU_TEST_OP_MOCK_DOMAIN
        rc, raw = self.test_cmd(op, pt_id, uapi.TestMockDomain(dev_flags=dev_flags))
        assert rc == 0
        out = uapi.decode(uapi.TestMockDomain, raw)
        return out.out_stdev_id, out.out_hwpt_id, out.out_idev_id

    def replace(self, stdev_id: int, pt_id: int) -> int:
        rc, _ = self.test_cmd(
            uapi.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, stdev_id, uapi.TestMockDomainReplace(pt_id)
        )
        return rc

    def hwpt_alloc(self, dev: int, pt: int, flags: int = 0, **kw: int) -> tuple[int, int]:
        rc, out = self.call(
            uapi.IOMMU_HWPT_ALLOC, uapi.HwptAlloc(flags=flags, dev_id=dev, pt_id=pt, **kw)
        )
        return rc, out.out_hwpt_id

    def nested(
        self,
        dev: int,
        pt: int,
        *,
        flags: int = 0,
        data_type: int = HWPT_SELFTEST,
        data_len: int = 4,
        uptr: int | None = None,
        iotlb: int = D,
        fault_id: int = 0,
    ) -> tuple[int, int]:
        addr = self.buf(struct.pack("<I", iotlb)) if uptr is None else uptr
        return self.hwpt_alloc(
            dev,
            pt,
            flags,
            data_type=data_type,
            data_len=data_len,
            data_uptr=addr,
            fault_id=fault_id,
        )

    def viommu(self, dev: int, hwpt: int, vtype: int = VIOMMU_SELFTEST, **kw: int) -> int:
        rc, out = self.call(
            uapi.IOMMU_VIOMMU_ALLOC, uapi.ViommuAlloc(type=vtype, dev_id=dev, hwpt_id=hwpt, **kw)
        )
        return rc if rc else -out.out_viommu_id

    def vdevice(self, viommu: int, dev: int, virt_id: int) -> tuple[int, int]:
        rc, out = self.call(
            uapi.IOMMU_VDEVICE_ALLOC,
            uapi.VdeviceAlloc(viommu_id=viommu, dev_id=dev, virt_id=virt_id),
        )
        return rc, out.out_vdevice_id

    def destroy(self, obj_id: int) -> int:
        rc, _ = self.call(uapi.IOMMU_DESTROY, uapi.Destroy(id=obj_id))
        return rc

    def invalidate(
        self,
        obj_id: int,
        data_type: int,
        entries: bytes,
        entry_len: int,
        entry_num: int,
        *,
        null: bool = False,
    ) -> tuple[int, int]:
        uptr = 0 if null else self.buf(entries or bytes(8))
        rc, out = self.call(
            uapi.IOMMU_HWPT_INVALIDATE,
            uapi.HwptInvalidate(
                hwpt_id=obj_id,
                data_uptr=uptr,
                data_type=data_type,
                entry_len=entry_len,
                entry_num=entry_num,
            ),
        )
        return rc, out.entry_num

    def iotlb(self, hwpt: int) -> list[int]:
        """The mock IOTLB read through MD_CHECK_IOTLB (and cross-checked on the object)."""
        data = self.be.lookup(hwpt).data  # type: ignore[union-attr]
        values = list(data.iotlb)
        for i, value in enumerate(values):
            rc, _ = self.test_cmd(
                uapi.IOMMU_TEST_OP_MD_CHECK_IOTLB, hwpt, uapi.TestCheckIotlb(i, value)
            )
            assert rc == 0
            rc, _ = self.test_cmd(
                uapi.IOMMU_TEST_OP_MD_CHECK_IOTLB, hwpt, uapi.TestCheckIotlb(i, value ^ 1)
            )
            assert rc == errno.EINVAL
        return values

    def dev_cache(self, idev: int) -> list[int]:
        dev = self.be.lookup(idev)
        values = list(dev.mock_cache or [])  # type: ignore[union-attr]
        for i, value in enumerate(values):
            rc, _ = self.test_cmd(
                uapi.IOMMU_TEST_OP_DEV_CHECK_CACHE, idev, uapi.TestCheckDevCache(i, value)
            )
            assert rc == 0
        return values


def hwpt_req(*entries: tuple[int, int]) -> bytes:
    raw = b"".join(struct.pack("<II", flags, iotlb_id) for flags, iotlb_id in entries)
    return raw + bytes(16 - len(raw))


def viommu_req(*entries: tuple[int, int, int]) -> bytes:
    raw = b"".join(struct.pack("<III", *entry) for entry in entries)
    return raw + bytes(24 - len(raw))


# ======================================================================================
# §5.3: allocation A1-A14
# ======================================================================================


@dataclass
class HwptFixture:
    rig: MockRig
    ioas: int
    stdev: int
    dev: int
    parent: int
    notparent: int


@pytest.fixture
def hf() -> HwptFixture:
    rig = MockRig()
    ioas = rig.ioas()
    stdev, _hwpt, dev = rig.mock_domain(ioas)
    rc, parent = rig.hwpt_alloc(dev, ioas, NEST_PARENT)
    assert rc == 0
    rc, notparent = rig.hwpt_alloc(dev, ioas, 0)
    assert rc == 0
    return HwptFixture(rig, ioas, stdev, dev, parent, notparent)


def _a1(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.hwpt_alloc(f.ioas, f.dev)[0],)


def _a2(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.hwpt_alloc(f.dev, f.dev)[0],)


def _a3(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.hwpt_alloc(f.dev, f.ioas, NEST_PARENT | FAULT_ID_VALID)[0],)


def _a4(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.nested(f.dev, f.parent, data_type=uapi.IOMMU_HWPT_DATA_NONE)[0],)


def _a5(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.nested(f.dev, f.parent, data_type=HWPT_SELFTEST + 1)[0],)


def _a6(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.nested(f.dev, f.parent, data_len=3)[0],)


def _a7(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.nested(f.dev, f.parent, uptr=0)[0],)


def _a8(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.nested(f.dev, f.parent, flags=NEST_PARENT)[0],)


def _a9(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.nested(f.dev, f.notparent)[0],)


def _a10(f: HwptFixture) -> tuple[int, ...]:
    rc0, n0 = f.rig.nested(f.dev, f.parent)
    rc1, n1 = f.rig.nested(f.dev, f.parent)
    assert f.rig.iotlb(n0) == [D] * 4
    assert f.rig.iotlb(n1) == [D] * 4
    return rc0, rc1


def _a11(f: HwptFixture) -> tuple[int, ...]:
    return (f.rig.nested(f.dev, f.parent, flags=FAULT_ID_VALID, fault_id=0xFFFFFFFF)[0],)


def _a12(f: HwptFixture) -> tuple[int, ...]:
    rc, n0 = f.rig.nested(f.dev, f.parent)
    assert rc == 0
    return (f.rig.nested(f.dev, n0)[0],)


def _a13(f: HwptFixture) -> tuple[int, ...]:
    rc, _n0 = f.rig.nested(f.dev, f.parent)
    assert rc == 0
    return (f.rig.destroy(f.parent),)


def _a14(f: HwptFixture) -> tuple[int, ...]:
    return f.rig.hwpt_alloc(0, f.ioas)[0], f.rig.nested(0, f.parent)[0]


A_ROWS: dict[str, tuple[Callable[[HwptFixture], tuple[int, ...]], tuple[int, ...]]] = {
    "A1": (_a1, (errno.ENOENT,)),
    "A2": (_a2, (errno.EINVAL,)),
    "A3": (_a3, (errno.EOPNOTSUPP,)),
    "A4": (_a4, (errno.EINVAL,)),
    "A5": (_a5, (errno.EOPNOTSUPP,)),
    "A6": (_a6, (errno.EINVAL,)),
    "A7": (_a7, (errno.EFAULT,)),
    "A8": (_a8, (errno.EOPNOTSUPP,)),
    "A9": (_a9, (errno.EINVAL,)),
    "A10": (_a10, (0, 0)),
    "A11": (_a11, (errno.ENOENT,)),
    "A12": (_a12, (errno.EINVAL,)),
    "A13": (_a13, (errno.EBUSY,)),
    "A14": (_a14, (errno.ENOENT, errno.ENOENT)),
}


@pytest.mark.parametrize("row", A_ROWS.values(), ids=A_ROWS.keys())
def test_hwpt_alloc_row(
    hf: HwptFixture, row: tuple[Callable[[HwptFixture], tuple[int, ...]], tuple[int, ...]]
) -> None:
    run, expected = row
    before = hf.rig.be.live_objects()
    assert run(hf) == expected
    if 0 not in expected:
        created = set(hf.rig.be.live_objects()) - set(before)
        assert all(kind == "HWPT_NESTED" for _, kind in created)  # only A12/A13's own n0


# ======================================================================================
# §5.3: HWPT invalidation I1-I14 (cumulative on n0, I14 on n1)
# ======================================================================================


@dataclass(frozen=True)
class InvRow:
    target: str  # "parent" | "n0" | "n1"
    req: bytes
    entry_len: int
    entry_num: int
    rc: int
    done: int
    iotlb_after: list[int]
    data_type: int = INV_SELFTEST
    null: bool = False


I_ROWS: dict[str, InvRow] = {
    "I1": InvRow("parent", hwpt_req(), 8, 1, errno.EINVAL, 0, [D] * 4),
    "I2": InvRow("n0", hwpt_req(), 8, 0, 0, 0, [D] * 4),
    "I3": InvRow("n0", hwpt_req(), 8, 1, errno.EINVAL, 0, [D] * 4, data_type=INV_INVALID),
    "I4": InvRow("n0", hwpt_req(), 9, 1, errno.EINVAL, 0, [D] * 4),
    "I5": InvRow("n0", hwpt_req(), 1, 1, errno.EINVAL, 0, [D] * 4),
    "I6": InvRow("n0", hwpt_req((0xFFFFFFFF, 0)), 8, 1, errno.EOPNOTSUPP, 0, [D] * 4),
    "I7": InvRow("n0", hwpt_req(), 8, 1, errno.EINVAL, 0, [D] * 4, null=True),
    "I8": InvRow("n0", hwpt_req(), 0, 1, errno.EINVAL, 0, [D] * 4),
    "I9": InvRow("n0", hwpt_req((0, 4)), 8, 1, errno.EINVAL, 0, [D] * 4),
    "I10": InvRow("n0", hwpt_req((0, 0), (0xFFFFFFFF, 1)), 8, 2, errno.EOPNOTSUPP, 1, [0, D, D, D]),
    "I11": InvRow("n0", hwpt_req((0, 0), (0, 4)), 8, 2, errno.EINVAL, 1, [0, D, D, D]),
    "I12": InvRow("n0", hwpt_req((0, 1)), 8, 1, 0, 1, [0, 0, D, D]),
    "I13": InvRow("n0", hwpt_req((0, 2), (0, 3)), 8, 2, 0, 2, [0, 0, 0, 0]),
    "I14": InvRow("n1", hwpt_req((FLAG_ALL, 3)), 8, 1, 0, 1, [0, 0, 0, 0]),
}


def _run_inv(rig: MockRig, ids: dict[str, int], row: InvRow) -> tuple[int, int]:
    return rig.invalidate(
        ids[row.target], row.data_type, row.req, row.entry_len, row.entry_num, null=row.null
    )


@pytest.mark.parametrize("name", I_ROWS.keys())
def test_hwpt_invalidate_row(hf: HwptFixture, name: str) -> None:
    rig = hf.rig
    ids = {"parent": hf.parent}
    ids["n0"] = rig.nested(hf.dev, hf.parent)[1]
    ids["n1"] = rig.nested(hf.dev, hf.parent)[1]
    names = list(I_ROWS)
    for earlier in names[: names.index(name)]:
        _run_inv(rig, ids, I_ROWS[earlier])
    row = I_ROWS[name]
    assert _run_inv(rig, ids, row) == (row.rc, row.done)
    checked = "n1" if row.target == "n1" else "n0"
    assert rig.iotlb(ids[checked]) == row.iotlb_after
    if checked == "n1":
        assert rig.iotlb(ids["n0"]) == [0, 0, 0, 0]  # I13 left n0 empty, I14 left it alone


def test_hwpt_invalidate_lifecycle(hf: HwptFixture) -> None:
    """The §5.3 tail: attach / replace order decides which destroys are EBUSY."""
    rig = hf.rig
    n0 = rig.nested(hf.dev, hf.parent)[1]
    n1 = rig.nested(hf.dev, hf.parent)[1]
    assert rig.replace(hf.stdev, n0) == 0
    assert rig.destroy(n0) == errno.EBUSY
    assert rig.replace(hf.stdev, n1) == 0
    assert rig.destroy(n1) == errno.EBUSY
    assert rig.destroy(n0) == 0
    assert rig.replace(hf.stdev, hf.parent) == 0
    assert rig.destroy(n1) == 0
    assert rig.replace(hf.stdev, hf.ioas) == 0
    assert rig.destroy(hf.parent) == 0
    assert rig.destroy(hf.notparent) == 0


# ======================================================================================
# §5.4: vIOMMU invalidation V1-V14 (cumulative on the device cache)
# ======================================================================================


@dataclass
class ViommuFixture:
    rig: MockRig
    ioas: int
    stdev: int
    dev: int
    hwpt: int
    viommu: int
    nested: int
    vdev: int


@pytest.fixture
def vf() -> ViommuFixture:
    rig = MockRig()
    ioas = rig.ioas()
    stdev, _auto, dev = rig.mock_domain(ioas)
    rc, hwpt = rig.hwpt_alloc(dev, ioas, NEST_PARENT)
    assert rc == 0
    viommu = -rig.viommu(dev, hwpt)
    rc, nested = rig.nested(dev, viommu)
    assert rc == 0
    rc, vdev = rig.vdevice(viommu, dev, 0x99)
    assert rc == 0
    return ViommuFixture(rig, ioas, stdev, dev, hwpt, viommu, nested, vdev)


V_ROWS: dict[str, InvRow] = {
    "V1": InvRow("viommu", viommu_req(), 12, 0, 0, 0, [C] * 4),
    "V2": InvRow("viommu", viommu_req(), 12, 1, errno.EINVAL, 0, [C] * 4, data_type=INV_INVALID),
    "V3": InvRow("viommu", viommu_req(), 13, 1, errno.EINVAL, 0, [C] * 4),
    "V4": InvRow("viommu", viommu_req(), 1, 1, errno.EINVAL, 0, [C] * 4),
    "V5": InvRow("viommu", viommu_req((0xFFFFFFFF, 0x99, 0)), 12, 1, errno.EOPNOTSUPP, 0, [C] * 4),
    "V6": InvRow("viommu", viommu_req(), 12, 1, errno.EINVAL, 0, [C] * 4, null=True),
    "V7": InvRow("viommu", viommu_req((0, 0x99, 0)), 0, 1, errno.EINVAL, 0, [C] * 4),
    "V8": InvRow("viommu", viommu_req((0, 0x99, 4)), 12, 1, errno.EINVAL, 0, [C] * 4),
    "V9": InvRow("viommu", viommu_req((0, 0x9, 0)), 12, 1, errno.EINVAL, 0, [C] * 4),
    "V10": InvRow(
        "viommu",
        viommu_req((0, 0x99, 0), (0xFFFFFFFF, 0x99, 1)),
        12,
        2,
        errno.EOPNOTSUPP,
        1,
        [0, C, C, C],
    ),
    "V11": InvRow(
        "viommu", viommu_req((0, 0x99, 0), (0, 0x99, 4)), 12, 2, errno.EINVAL, 1, [0, C, C, C]
    ),
    "V12": InvRow("viommu", viommu_req((0, 0x99, 1)), 12, 1, 0, 1, [0, 0, C, C]),
    "V13": InvRow("viommu", viommu_req((0, 0x99, 2), (0, 0x99, 3)), 12, 2, 0, 2, [0, 0, 0, 0]),
    "V14": InvRow("viommu", viommu_req((FLAG_ALL, 0x99, 3)), 12, 1, 0, 1, [0, 0, 0, 0]),
}


@pytest.mark.parametrize("name", V_ROWS.keys())
def test_viommu_invalidate_row(vf: ViommuFixture, name: str) -> None:
    rig = vf.rig
    ids = {"viommu": vf.viommu}
    names = list(V_ROWS)
    for earlier in names[: names.index(name)]:
        _run_inv(rig, ids, V_ROWS[earlier])
    row = V_ROWS[name]
    assert _run_inv(rig, ids, row) == (row.rc, row.done)
    assert rig.dev_cache(vf.dev) == row.iotlb_after


def test_viommu_invalidate_accepts_long_zero_padded_entries(vf: ViommuFixture) -> None:
    """The §5.4 note: entry_len 16 with a valid vdev_id succeeds (whole-array copy)."""
    req = struct.pack("<IIII", 0, 0x99, 2, 0)
    assert vf.rig.invalidate(vf.viommu, INV_SELFTEST, req, 16, 1) == (0, 1)
    assert vf.rig.dev_cache(vf.dev) == [C, C, 0, C]
    bad = struct.pack("<IIII", 0, 0x99, 2, 1)
    assert vf.rig.invalidate(vf.viommu, INV_SELFTEST, bad, 16, 1) == (errno.E2BIG, 0)


def test_mock_nested_on_viommu_has_a_hwpt_invalidation_too(vf: ViommuFixture) -> None:
    assert vf.rig.invalidate(vf.nested, INV_SELFTEST, hwpt_req((0, 2)), 8, 1) == (0, 1)
    assert vf.rig.iotlb(vf.nested) == [D, D, 0, D]


# ======================================================================================
# §5.5: vIOMMU / vDEVICE / vEVENTQ O1-O18
# ======================================================================================


@dataclass
class VBase:
    rig: MockRig
    ioas: int
    stdev: int
    dev: int
    parent: int
    notparent: int


@pytest.fixture
def vb() -> VBase:
    rig = MockRig()
    ioas = rig.ioas()
    stdev, _auto, dev = rig.mock_domain(ioas)
    parent = rig.hwpt_alloc(dev, ioas, NEST_PARENT)[1]
    notparent = rig.hwpt_alloc(dev, ioas, 0)[1]
    return VBase(rig, ioas, stdev, dev, parent, notparent)


def _veventq(rig: MockRig, viommu: int, depth: int = 2) -> tuple[int, int, int]:
    rc, out = rig.call(
        uapi.IOMMU_VEVENTQ_ALLOC,
        uapi.VeventqAlloc(
            viommu_id=viommu, type=uapi.IOMMU_VEVENTQ_TYPE_SELFTEST, veventq_depth=depth
        ),
    )
    return rc, out.out_veventq_id, out.out_veventq_fd


def _trigger(rig: MockRig, dev: int) -> int:
    rc, _ = rig.test_cmd(uapi.IOMMU_TEST_OP_TRIGGER_VEVENT, 0, uapi.TestTriggerVevent(dev))
    return rc


def _records(raw: bytes) -> list[tuple[int, int, int | None]]:
    """(flags, sequence, virt_id or None for a lost-events header) per record."""
    out: list[tuple[int, int, int | None]] = []
    pos = 0
    while pos < len(raw):
        flags, seq = struct.unpack_from("<II", raw, pos)
        pos += 8
        if flags & uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS:
            out.append((flags, seq, None))
            continue
        (virt_id,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        out.append((flags, seq, virt_id))
    return out


def _o1(b: VBase) -> Any:
    return b.rig.viommu(b.dev, 0)


def _o2(b: VBase) -> Any:
    return b.rig.viommu(b.dev, b.notparent)


def _o3(b: VBase) -> Any:
    return b.rig.viommu(b.dev, b.parent, vtype=0xDEAD)


def _o4(b: VBase) -> Any:
    assert b.rig.viommu(b.dev, b.parent) < 0
    return b.rig.destroy(b.parent)


def _o5(b: VBase) -> Any:
    viommu = -b.rig.viommu(b.dev, b.parent)
    assert b.rig.nested(b.dev, viommu)[0] == 0
    return b.rig.destroy(viommu)


def _o6(b: VBase) -> Any:
    return b.rig.viommu(0, b.parent)


def _o7(b: VBase) -> Any:
    data = b.rig.buf(struct.pack("<II", 0xBEEF, 0))
    viommu = b.rig.viommu(b.dev, b.parent, data_len=8, data_uptr=data)
    assert viommu < 0
    return struct.unpack("<II", b.rig.be.memory.read(data, 8))


def _o8(b: VBase) -> Any:
    viommu = -b.rig.viommu(b.dev, b.parent)
    return b.rig.nested(b.dev, viommu, flags=FAULT_ID_VALID, fault_id=0xFFFFFFFF)[0]


def _o9(b: VBase) -> Any:
    viommu = -b.rig.viommu(b.dev, b.parent)
    return b.rig.nested(b.dev, viommu, flags=FAULT_ID_VALID | (1 << 31))[0]


def _o10(b: VBase) -> Any:
    viommu = -b.rig.viommu(b.dev, b.parent)
    nested = b.rig.nested(b.dev, viommu)[1]
    rc = b.rig.replace(b.stdev, nested)
    assert b.rig.vdevice(viommu, b.dev, 0x99)[0] == 0
    assert b.rig.replace(b.stdev, nested) == 0  # with the vDEVICE it attaches
    return rc


def _o11(b: VBase) -> Any:
    viommu = -b.rig.viommu(b.dev, b.parent)
    return _veventq(b.rig, viommu)[0], _veventq(b.rig, viommu)[0]


def _o12(b: VBase) -> Any:
    viommu = -b.rig.viommu(b.dev, b.parent)
    return b.rig.vdevice(viommu, b.dev, 0x99)[0], b.rig.vdevice(viommu, b.dev, 0x99)[0]


@dataclass
class EventScene:
    viommu: int
    veventq: int
    fd: int
    vdev: int


def _event_scene(b: VBase) -> EventScene:
    viommu = -b.rig.viommu(b.dev, b.parent)
    rc, veventq, fd = _veventq(b.rig, viommu)
    assert rc == 0
    rc, vdev = b.rig.vdevice(viommu, b.dev, 0x99)
    assert rc == 0
    return EventScene(viommu, veventq, fd, vdev)


def _o13(b: VBase) -> Any:
    s = _event_scene(b)
    assert _trigger(b.rig, b.dev) == 0
    rc, raw = b.rig.be.read(s.fd, 12)
    assert rc == 0
    return _records(raw)


def _o14(b: VBase) -> Any:
    s = _event_scene(b)
    _trigger(b.rig, b.dev)
    b.rig.be.read(s.fd, 12)
    assert b.rig.destroy(s.vdev) == 0
    assert b.rig.vdevice(s.viommu, b.dev, 0x88)[0] == 0
    rcs = [_trigger(b.rig, b.dev) for _ in range(3)]
    assert rcs == [0, 0, 0]
    return _records(b.rig.be.read(s.fd, 4096)[1])


def _o15(b: VBase) -> Any:
    s = _event_scene(b)
    _trigger(b.rig, b.dev)
    b.rig.be.read(s.fd, 12)
    b.rig.destroy(s.vdev)
    b.rig.vdevice(s.viommu, b.dev, 0x88)
    for _ in range(3):
        _trigger(b.rig, b.dev)
    b.rig.be.read(s.fd, 4096)
    assert _trigger(b.rig, b.dev) == 0
    return _records(b.rig.be.read(s.fd, 4096)[1])


def _o16(b: VBase) -> Any:
    s = _event_scene(b)
    busy = b.rig.destroy(s.veventq)
    b.rig.be.close_fd(s.fd)
    return busy, b.rig.destroy(s.veventq)


def _o17(b: VBase) -> Any:
    viommu = -b.rig.viommu(b.dev, b.parent)
    rc, vdev = b.rig.vdevice(viommu, b.dev, 0x99)
    assert rc == 0
    assert b.rig.destroy(b.stdev) == 0  # the mock device goes away: vDEVICE tombstoned
    assert testing.tombstones(b.rig.be) == [vdev]
    return b.rig.destroy(vdev)


def _o18(b: VBase) -> Any:
    return b.rig.vdevice(0, b.dev, 0x99)[0]


O_ROWS: dict[str, tuple[Callable[[VBase], Any], Any]] = {
    "O1": (_o1, errno.ENOENT),
    "O2": (_o2, errno.EINVAL),
    "O3": (_o3, errno.EOPNOTSUPP),
    "O4": (_o4, errno.EBUSY),
    "O5": (_o5, errno.EBUSY),
    "O6": (_o6, errno.ENOENT),
    "O7": (_o7, (0xBEEF, 0xBEEF)),
    "O8": (_o8, errno.ENOENT),
    "O9": (_o9, errno.EOPNOTSUPP),
    "O10": (_o10, errno.ENOENT),
    "O11": (_o11, (0, errno.EEXIST)),
    "O12": (_o12, (0, errno.EEXIST)),
    "O13": (_o13, [(0, 0, 0x99)]),
    "O14": (_o14, [(0, 1, 0x88), (0, 2, 0x88), (uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS, 3, None)]),
    "O15": (_o15, [(0, 4, 0x88)]),
    "O16": (_o16, (errno.EBUSY, 0)),
    "O17": (_o17, errno.ENOENT),
    "O18": (_o18, errno.ENOENT),
}


@pytest.mark.parametrize("row", O_ROWS.values(), ids=O_ROWS.keys())
def test_viommu_object_row(vb: VBase, row: tuple[Callable[[VBase], Any], Any]) -> None:
    run, expected = row
    assert run(vb) == expected


# ======================================================================================
# §5.5: HW queues H1-H9 (cumulative)
# ======================================================================================


@dataclass
class QueueScene:
    rig: MockRig
    ioas: int
    viommu: int
    buffer: int
    queues: dict[int, int]


def _hwq(
    s: QueueScene,
    index: int,
    iova: int,
    length: int = PAGE,
    qtype: int = uapi.IOMMU_HW_QUEUE_TYPE_SELFTEST,
) -> int:
    rc, out = s.rig.call(
        uapi.IOMMU_HW_QUEUE_ALLOC,
        uapi.HwQueueAlloc(
            viommu_id=s.viommu,
            type=qtype,
            index=index,
            nesting_parent_iova=iova,
            length=length,
        ),
    )
    if not rc:
        s.queues[index] = out.out_hw_queue_id
    return rc


IOVA = uapi.MOCK_APERTURE_START


def _h1(s: QueueScene) -> Any:
    return _hwq(s, 0, IOVA, qtype=uapi.IOMMU_HW_QUEUE_TYPE_DEFAULT)


def _h2(s: QueueScene) -> Any:
    return _hwq(s, 0, IOVA, length=0)


def _h3(s: QueueScene) -> Any:
    return _hwq(s, 0, (1 << 64) - 1)


def _h4(s: QueueScene) -> Any:
    return _hwq(s, 0, IOVA)


def _h5(s: QueueScene) -> Any:
    rc, _ = s.rig.call(
        uapi.IOMMU_IOAS_MAP,
        uapi.IoasMap(
            flags=uapi.IOMMU_IOAS_MAP_FIXED_IOVA
            | uapi.IOMMU_IOAS_MAP_READABLE
            | uapi.IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id=s.ioas,
            user_va=s.buffer,
            length=PAGE,
            iova=IOVA,
        ),
    )
    assert rc == 0
    return _hwq(s, 1, IOVA)


def _h6(s: QueueScene) -> Any:
    return _hwq(s, 2, IOVA)


def _h7(s: QueueScene) -> Any:
    return _hwq(s, 0, IOVA), _hwq(s, 0, IOVA)


def _h8(s: QueueScene) -> Any:
    rc, _ = s.rig.call(
        uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap(ioas_id=s.ioas, iova=IOVA, length=PAGE)
    )
    return rc


def _h9(s: QueueScene) -> Any:
    first = _hwq(s, 1, IOVA)
    busy = s.rig.destroy(s.queues[0])
    return first, busy, s.rig.destroy(s.queues[1]), s.rig.destroy(s.queues[0])


H_ROWS: dict[str, tuple[Callable[[QueueScene], Any], Any]] = {
    "H1": (_h1, errno.EOPNOTSUPP),
    "H2": (_h2, errno.EINVAL),
    "H3": (_h3, errno.EOVERFLOW),
    "H4": (_h4, errno.ENOENT),
    "H5": (_h5, errno.EIO),
    "H6": (_h6, errno.EINVAL),
    "H7": (_h7, (0, errno.EEXIST)),
    "H8": (_h8, errno.EBUSY),
    "H9": (_h9, (0, errno.EBUSY, 0, 0)),
}


@pytest.mark.parametrize("name", H_ROWS.keys())
def test_hw_queue_row(vb: VBase, name: str) -> None:
    rig = vb.rig
    viommu = -rig.viommu(vb.dev, vb.parent)
    scene = QueueScene(rig, vb.ioas, viommu, rig.be.memory.alloc(PAGE), {})
    names = list(H_ROWS)
    for earlier in names[: names.index(name)]:
        H_ROWS[earlier][0](scene)
    run, expected = H_ROWS[name]
    assert run(scene) == expected


def test_hw_queue_unmap_after_destroy_succeeds(vb: VBase) -> None:
    rig = vb.rig
    viommu = -rig.viommu(vb.dev, vb.parent)
    scene = QueueScene(rig, vb.ioas, viommu, rig.be.memory.alloc(PAGE), {})
    for name in H_ROWS:
        H_ROWS[name][0](scene)
    rc, out = rig.call(
        uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap(ioas_id=vb.ioas, iova=IOVA, length=PAGE)
    )
    assert (rc, out.length) == (0, PAGE)


# ======================================================================================
# §5.3 cmd_length: the size convention on every ioctl the emulator serves
# ======================================================================================

SIZED: list[tuple[int, uapi.UapiStruct]] = [
    (uapi.IOMMU_DESTROY, uapi.Destroy()),
    (uapi.IOMMU_IOAS_ALLOC, uapi.IoasAlloc()),
    (uapi.IOMMU_IOAS_MAP, uapi.IoasMap()),
    (uapi.IOMMU_IOAS_UNMAP, uapi.IoasUnmap()),
    (uapi.IOMMU_HWPT_ALLOC, uapi.HwptAlloc()),
    (uapi.IOMMU_GET_HW_INFO, uapi.GetHwInfo()),
    (uapi.IOMMU_HWPT_INVALIDATE, uapi.HwptInvalidate()),
    (uapi.IOMMU_FAULT_QUEUE_ALLOC, uapi.FaultQueueAlloc()),
    (uapi.IOMMU_VIOMMU_ALLOC, uapi.ViommuAlloc()),
    (uapi.IOMMU_VDEVICE_ALLOC, uapi.VdeviceAlloc()),
    (uapi.IOMMU_VEVENTQ_ALLOC, uapi.VeventqAlloc()),
    (uapi.IOMMU_HW_QUEUE_ALLOC, uapi.HwQueueAlloc()),
    (uapi.IOMMU_TEST_CMD, uapi.TestCmd()),
]
SIZED_IDS = [uapi.IOCTL_NAMES[r] for r, _ in SIZED]


def _with_size(obj: uapi.UapiStruct, size: int, tail: bytes = b"") -> bytearray:
    raw = uapi.encode(obj)
    raw[0:4] = struct.pack("<I", size)
    return raw + tail


@pytest.mark.parametrize(("request_", "obj"), SIZED, ids=SIZED_IDS)
def test_cmd_length_below_min(request_: int, obj: uapi.UapiStruct) -> None:
    rig = MockRig()
    min_size = type(obj).MIN_SIZE
    arg = _with_size(obj, min_size - 1)
    arg[min_size - 1] = 0xFF
    before = bytes(arg)
    assert rig.be.ioctl(rig.be.iommufd, request_, arg) == errno.EINVAL
    assert bytes(arg) == before


@pytest.mark.parametrize(("request_", "obj"), SIZED, ids=SIZED_IDS)
def test_cmd_length_nonzero_tail(request_: int, obj: uapi.UapiStruct) -> None:
    rig = MockRig()
    arg = _with_size(obj, type(obj).FORMAT.size + 1, b"\xff")
    before = bytes(arg)
    assert rig.be.ioctl(rig.be.iommufd, request_, arg) == errno.E2BIG
    assert bytes(arg) == before
    assert rig.be.live_objects() == []


@pytest.mark.parametrize(("request_", "obj"), SIZED, ids=SIZED_IDS)
def test_cmd_length_zero_tail(request_: int, obj: uapi.UapiStruct) -> None:
    size = type(obj).FORMAT.size
    one, other = MockRig(), MockRig()
    exact = uapi.encode(obj)
    rc = one.be.ioctl(one.be.iommufd, request_, exact)
    longer = _with_size(obj, size + 1, b"\x00")
    assert other.be.ioctl(other.be.iommufd, request_, longer) == rc
    assert longer[4:size] == exact[4:size]
    assert longer[size] == 0
    assert other.be.live_objects() == one.be.live_objects()


def test_zero_structs_answer_like_the_kernel() -> None:
    """What the selftest's exact-size zero structs give (HWPT_INVALIDATE: ENOENT, id 0)."""
    rig = MockRig()
    expected = {
        uapi.IOMMU_DESTROY: errno.ENOENT,
        uapi.IOMMU_IOAS_ALLOC: 0,
        uapi.IOMMU_IOAS_MAP: errno.EINVAL,  # neither READABLE nor WRITEABLE
        uapi.IOMMU_IOAS_UNMAP: errno.ENOENT,
        uapi.IOMMU_HWPT_ALLOC: errno.ENOENT,
        uapi.IOMMU_GET_HW_INFO: errno.ENOENT,
        uapi.IOMMU_HWPT_INVALIDATE: errno.ENOENT,
        uapi.IOMMU_FAULT_QUEUE_ALLOC: 0,
        uapi.IOMMU_VIOMMU_ALLOC: errno.EOPNOTSUPP,
        uapi.IOMMU_VDEVICE_ALLOC: errno.ENOENT,
        uapi.IOMMU_VEVENTQ_ALLOC: errno.EOPNOTSUPP,
        uapi.IOMMU_HW_QUEUE_ALLOC: errno.EOPNOTSUPP,
        uapi.IOMMU_TEST_CMD: errno.EOPNOTSUPP,
    }
    for request_, obj in SIZED:
        assert rig.be.ioctl(rig.be.iommufd, request_, uapi.encode(obj)) == expected[request_]


def test_test_cmd_needs_selftest() -> None:
    be = EmulatedIommufd(NO_HOST)
    assert be.ioctl(be.iommufd, uapi.IOMMU_TEST_CMD, uapi.encode(uapi.TestCmd())) == errno.ENOTTY


# ======================================================================================
# User pointers: EFAULT where the copy faults, per-entry vs whole-array progress
# ======================================================================================


def test_hwpt_invalidate_fault_at_entry_k_keeps_earlier_entries(hf: HwptFixture) -> None:
    rig = hf.rig
    n0 = rig.nested(hf.dev, hf.parent)[1]
    uptr = rig.buf(struct.pack("<II", 0, 0))  # entry 1 lies past the mapping
    rc, out = rig.call(
        uapi.IOMMU_HWPT_INVALIDATE,
        uapi.HwptInvalidate(
            hwpt_id=n0, data_uptr=uptr, data_type=INV_SELFTEST, entry_len=8, entry_num=2
        ),
    )
    assert (rc, out.entry_num) == (errno.EFAULT, 1)
    assert rig.iotlb(n0) == [0, D, D, D]


def test_viommu_invalidate_fault_anywhere_changes_nothing(vf: ViommuFixture) -> None:
    rig = vf.rig
    uptr = rig.buf(struct.pack("<III", 0, 0x99, 0))
    rc, out = rig.call(
        uapi.IOMMU_HWPT_INVALIDATE,
        uapi.HwptInvalidate(
            hwpt_id=vf.viommu, data_uptr=uptr, data_type=INV_SELFTEST, entry_len=12, entry_num=2
        ),
    )
    assert (rc, out.entry_num) == (errno.EFAULT, 0)
    assert rig.dev_cache(vf.dev) == [C] * 4


def test_viommu_alloc_data_pointer_faults(vb: VBase) -> None:
    assert vb.rig.viommu(vb.dev, vb.parent, data_len=8, data_uptr=0) == errno.EFAULT
    assert vb.rig.viommu(vb.dev, vb.parent, data_len=4, data_uptr=vb.rig.buf(bytes(4))) == (
        errno.EINVAL
    )
    assert vb.rig.viommu(vb.dev, vb.parent, data_len=9, data_uptr=vb.rig.buf(bytes(9))) == (
        errno.EINVAL
    )
