"""GET_HW_INFO, vEVENTQ, FAULT queues, HW queues on real drivers, and robustness.

Reference: iommufd.md §1.3, §1.8-§1.10, §3.5. The selftest rows for the same objects are
in test_selftest.py; these cover the ARM / VT-d side and the read / write formats.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import iommufd as uapi
from tests.backend.test_emulated import ARM_DATA, STE_S1, Rig, cmd
from tests.backend.test_selftest import MockRig
from viommud.backend.emulator import testing
from viommud.backend.emulator.objects import INT_MAX, VeventqObject

LOST = uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS
ARM_EVQ = uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3


# ======================================================================================
# GET_HW_INFO (§1.3)
# ======================================================================================


def hw_info(
    rig: Rig,
    dev: int,
    data_len: int,
    *,
    uptr: int | None = None,
    flags: int = 0,
    data_type: int = 0,
) -> tuple[int, uapi.GetHwInfo, bytes]:
    addr = rig.be.memory.alloc(max(data_len, 1)) if uptr is None else uptr
    if uptr is None:
        rig.be.memory.write(addr, b"\xaa" * max(data_len, 1))
    rc, out = rig.call(
        uapi.IOMMU_GET_HW_INFO,
        uapi.GetHwInfo(
            flags=flags, dev_id=dev, data_len=data_len, data_uptr=addr, data_type=data_type
        ),
    )
    data = rig.be.memory.read(addr, data_len) if uptr is None and data_len else b""
    return rc, out, data


@pytest.mark.parametrize(
    ("device", "info_type", "length"),
    [
        ("a0", uapi.IOMMU_HW_INFO_TYPE_ARM_SMMUV3, 40),
        ("v0", uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD, 24),
    ],
)
def test_hw_info_types_and_lengths(device: str, info_type: int, length: int) -> None:
    rig = Rig()
    dev = rig.bind(device)
    rc, out, data = hw_info(rig, dev, 64)
    assert rc == 0
    assert (out.data_type, out.data_len) == (info_type, length)
    assert data[length:] == bytes(64 - length)  # the tail of a bigger buffer is zeroed
    assert (out.out_capabilities, out.out_max_pasid_log2) == (0, 0)
    rc, out, short = hw_info(rig, dev, 8)
    assert (rc, out.data_len) == (0, length)  # the kernel's length, whatever the buffer
    assert short == data[:8]


def test_hw_info_register_values() -> None:
    rig = Rig()
    rc, _, data = hw_info(rig, rig.bind("a0"), 40)
    arm = uapi.decode(uapi.HwInfoArmSmmuv3, data)
    assert rc == 0
    assert arm.idr0 & (1 << 10)  # ATS
    assert arm.idr3 & (1 << 10)  # RIL
    rc, _, data = hw_info(rig, rig.bind("v0"), 24)
    vtd = uapi.decode(uapi.HwInfoVtd, data)
    assert vtd.ecap_reg & (1 << 26)  # nesting


def test_hw_info_errors() -> None:
    rig = Rig()
    dev = rig.bind("a0")
    assert hw_info(rig, dev, 0, uptr=0)[0] == 0  # data_len 0 with NULL is fine
    assert hw_info(rig, dev, 8, uptr=0)[0] == errno.EFAULT
    assert hw_info(rig, dev, 8, flags=2)[0] == errno.EOPNOTSUPP
    assert hw_info(rig, 99, 8)[0] == errno.ENOENT
    assert hw_info(rig, rig.ioas(), 8)[0] == errno.ENOENT
    input_type = uapi.IOMMU_HW_INFO_FLAG_INPUT_TYPE
    ok = hw_info(rig, dev, 8, flags=input_type, data_type=uapi.IOMMU_HW_INFO_TYPE_ARM_SMMUV3)
    assert ok[0] == 0
    bad = hw_info(rig, dev, 8, flags=input_type, data_type=uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD)
    assert bad[0] == errno.EOPNOTSUPP
    # without the flag the field is output only
    assert hw_info(rig, dev, 8, data_type=uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD)[0] == 0


def test_hw_info_of_a_mock_device() -> None:
    rig = MockRig()
    ioas = rig.ioas()
    _, _, dev = rig.mock_domain(ioas)
    _, _, nodirty = rig.mock_domain(ioas, dev_flags=uapi.MOCK_FLAGS_DEVICE_NO_DIRTY)
    addr = rig.be.memory.alloc(8)
    rc, out = rig.call(
        uapi.IOMMU_GET_HW_INFO, uapi.GetHwInfo(dev_id=dev, data_len=8, data_uptr=addr)
    )
    assert rc == 0
    assert out.data_type == uapi.IOMMU_HW_INFO_TYPE_SELFTEST
    assert out.out_capabilities == uapi.IOMMU_HW_CAP_DIRTY_TRACKING
    assert rig.be.memory.read(addr, 8) == struct.pack("<II", 0, 0xDEADBEEF)
    rc, out = rig.call(uapi.IOMMU_GET_HW_INFO, uapi.GetHwInfo(dev_id=nodirty))
    assert (rc, out.out_capabilities) == (0, 0)
    assert out.out_max_pasid_log2 == 0
    _, _, pasid_dev = rig.mock_domain(ioas, dev_flags=uapi.MOCK_FLAGS_DEVICE_PASID)
    rc, out = rig.call(uapi.IOMMU_GET_HW_INFO, uapi.GetHwInfo(dev_id=pasid_dev))
    assert (rc, out.out_max_pasid_log2) == (0, 20)


def test_mock_dirty_tracking_follows_the_device_flag() -> None:
    rig = MockRig()
    ioas = rig.ioas()
    _, _, dev = rig.mock_domain(ioas)
    stdev, _, nodirty = rig.mock_domain(ioas, dev_flags=uapi.MOCK_FLAGS_DEVICE_NO_DIRTY)
    dirty_flag = uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    rc, dirty = rig.hwpt_alloc(dev, ioas, dirty_flag)
    assert rc == 0
    assert rig.hwpt_alloc(nodirty, ioas, dirty_flag)[0] == errno.EOPNOTSUPP
    assert rig.replace(stdev, dirty) == errno.EINVAL  # mock_domain_nop_attach
    assert (
        rig.test_cmd(
            uapi.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS, ioas, uapi.TestMockDomain(dev_flags=1 << 9)
        )[0]
        == errno.EINVAL
    )


# ======================================================================================
# vEVENTQ on an ARM vIOMMU (§1.8, §3.5)
# ======================================================================================


def arm_veventq(rig: Rig, depth: int = 4) -> tuple[int, int, int]:
    topo = rig.arm_topology("a0", vsid=0x42)
    rc, out = rig.call(
        uapi.IOMMU_VEVENTQ_ALLOC,
        uapi.VeventqAlloc(viommu_id=topo.viommu, type=ARM_EVQ, veventq_depth=depth),
    )
    assert rc == 0
    return topo.viommu, out.out_veventq_id, out.out_veventq_fd


EVENT = struct.pack(
    "<QQQQ", 0x0000_0100_0000_0010, 0x1234, 0x1000_0000, 0
)  # F_TRANSLATION, SID 0x100


def test_arm_events_carry_the_vsid() -> None:
    rig = Rig()
    _, _, fd = arm_veventq(rig)
    assert testing.inject_event(rig.be, "a0", EVENT) == 0
    assert rig.be.poll(fd)
    rc, raw = rig.be.read(fd, 4096)
    assert rc == 0
    flags, seq, evt0, evt1, evt2, evt3 = struct.unpack("<IIQQQQ", raw)
    assert (flags, seq) == (0, 0)
    assert evt0 == 0x0000_0042_0000_0010
    assert (evt1, evt2, evt3) == (0x1234, 0x1000_0000, 0)
    assert not rig.be.poll(fd)


def test_arm_events_without_queue_or_vdevice() -> None:
    rig = Rig()
    rig.arm_topology("a0")
    assert testing.inject_event(rig.be, "a0", EVENT) == errno.EOPNOTSUPP
    rig.bind("a1")
    assert testing.inject_event(rig.be, "a1", EVENT) == errno.ENOENT


def test_veventq_alloc_checks() -> None:
    rig = Rig()
    topo = rig.arm_topology("a0")

    def alloc(**kw: int) -> int:
        fields = {"viommu_id": topo.viommu, "type": ARM_EVQ, "veventq_depth": 1}
        fields.update(kw)
        return rig.call(uapi.IOMMU_VEVENTQ_ALLOC, uapi.VeventqAlloc(**fields))[0]

    assert alloc(flags=1) == errno.EOPNOTSUPP
    assert alloc(reserved=1) == errno.EOPNOTSUPP
    assert alloc(type=0) == errno.EOPNOTSUPP
    assert alloc(veventq_depth=0) == errno.EINVAL
    assert alloc(viommu_id=topo.parent) == errno.ENOENT
    assert alloc() == 0
    assert alloc() == errno.EEXIST
    assert alloc(type=uapi.IOMMU_VEVENTQ_TYPE_SELFTEST) == 0  # the driver's types are not checked
    assert rig.destroy(topo.viommu) == errno.EBUSY


def test_veventq_read_keeps_records_that_do_not_fit() -> None:
    rig = Rig()
    _, _, fd = arm_veventq(rig)
    testing.inject_event(rig.be, "a0", EVENT)
    testing.inject_event(rig.be, "a0", EVENT)
    assert rig.be.read(fd, 39) == (0, b"")  # one record is 8 + 32 bytes
    rc, raw = rig.be.read(fd, 79)
    assert (rc, len(raw)) == (0, 40)
    rc, raw = rig.be.read(fd, 40)
    assert (rc, struct.unpack_from("<II", raw)) == (0, (0, 1))


def test_lost_events_header_moves_to_the_tail_and_is_dropped_by_a_new_event() -> None:
    queue = VeventqObject(1, 2, ARM_EVQ, depth=2)
    for _ in range(4):
        queue.report(b"\x01\x00\x00\x00")
    assert [(e.lost, e.sequence) for e in queue.deliver] == [(False, 0), (False, 1), (True, 3)]
    first = queue.read(12)  # frees one slot, the header stays at the tail
    assert struct.unpack_from("<II", first) == (0, 0)
    queue.report(b"\x02\x00\x00\x00")
    assert [(e.lost, e.sequence) for e in queue.deliver] == [(False, 1), (False, 4)]
    raw = queue.read(4096)
    assert [struct.unpack_from("<II", raw, off) for off in (0, 12)] == [(0, 1), (0, 4)]


def test_lost_events_header_is_read_without_payload() -> None:
    queue = VeventqObject(1, 2, ARM_EVQ, depth=1)
    queue.report(b"\x01\x00\x00\x00")
    queue.report(b"\x02\x00\x00\x00")
    assert queue.read(8) == b""  # the normal event needs 12
    raw = queue.read(20)
    assert struct.unpack("<IIIII", raw) == (0, 0, 1, LOST, 1)


def test_sequence_wraps_at_int_max() -> None:
    queue = VeventqObject(1, 2, ARM_EVQ, depth=8)
    queue.sequence = INT_MAX
    queue.report(b"")
    queue.report(b"")
    assert [e.sequence for e in queue.deliver] == [INT_MAX, 0]


def test_event_fd_file_semantics() -> None:
    rig = Rig()
    viommu, veventq, fd = arm_veventq(rig)
    assert rig.be.write(fd, b"x") == (errno.EINVAL, 0)  # no write on a vEVENTQ
    assert rig.be.ioctl(fd, uapi.IOMMU_DESTROY, uapi.encode(uapi.Destroy())) == errno.ENOTTY
    assert rig.be.read(999, 8) == (errno.EBADF, b"")
    assert rig.be.read(rig.fds["a0"], 8)[0] == errno.EINVAL
    assert rig.destroy(veventq) == errno.EBUSY
    rig.be.close_fd(fd)
    assert rig.destroy(veventq) == 0
    assert rig.destroy(viommu) == errno.EBUSY  # still the vDEVICE


# ======================================================================================
# FAULT queues (§1.10) with the mock's TRIGGER_IOPF
# ======================================================================================


def fault_scene() -> tuple[MockRig, int, int, int]:
    rig = MockRig()
    ioas = rig.ioas()
    stdev, _, dev = rig.mock_domain(ioas)
    rc, out = rig.call(uapi.IOMMU_FAULT_QUEUE_ALLOC, uapi.FaultQueueAlloc())
    assert rc == 0
    rc, hwpt = rig.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_FAULT_ID_VALID, fault_id=out.out_fault_id)
    assert rc == 0
    assert rig.replace(stdev, hwpt) == 0
    return rig, dev, out.out_fault_id, out.out_fault_fd


def iopf(rig: MockRig, dev: int, pasid: int = 0, grpid: int = 1) -> int:
    args = uapi.TestTriggerIopf(dev_id=dev, pasid=pasid, grpid=grpid, perm=3, addr=0x1234_5000)
    return rig.test_cmd(uapi.IOMMU_TEST_OP_TRIGGER_IOPF, 0, args)[0]


def test_fault_alloc_checks() -> None:
    rig = MockRig()
    assert (
        rig.call(uapi.IOMMU_FAULT_QUEUE_ALLOC, uapi.FaultQueueAlloc(flags=1))[0] == errno.EOPNOTSUPP
    )
    ioas = rig.ioas()
    _, _, dev = rig.mock_domain(ioas)
    rc, parent = rig.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    assert rc == 0
    # a FAULT object id is looked up by type: an IOAS id is ENOENT
    assert (
        rig.nested(dev, parent, flags=uapi.IOMMU_HWPT_FAULT_ID_VALID, fault_id=ioas)[0]
        == errno.ENOENT
    )


def test_faults_are_read_with_cookies_and_answered() -> None:
    rig, dev, fault_id, fd = fault_scene()
    assert iopf(rig, dev) == 0
    assert iopf(rig, dev, pasid=7, grpid=2) == 0
    assert rig.be.poll(fd)
    assert rig.be.read(fd, 41) == (errno.ESPIPE, b"")
    rc, raw = rig.be.read(fd, 80)
    assert rc == 0
    first = uapi.decode(uapi.HwptPgfault, raw[:40])
    second = uapi.decode(uapi.HwptPgfault, raw[40:])
    assert first == uapi.HwptPgfault(
        flags=uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE,
        dev_id=dev,
        grpid=1,
        perm=3,
        addr=0x1234_5000,
        cookie=1,
    )
    assert second.flags == uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE | uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID
    assert (second.pasid, second.cookie) == (7, 2)
    assert rig.be.write(fd, b"\x00" * 7) == (errno.ESPIPE, 0)
    assert rig.be.write(fd, struct.pack("<II", 9, 0)) == (errno.EINVAL, 0)
    answers = struct.pack("<IIII", 1, 0, 2, 5)  # the second has a bad code
    assert rig.be.write(fd, answers) == (0, 8)
    assert rig.be.write(fd, struct.pack("<II", 2, 1)) == (0, 8)
    assert rig.destroy(fault_id) == errno.EBUSY  # held by the HWPT and the fd


def test_fault_without_queue_is_dropped() -> None:
    rig = MockRig()
    ioas = rig.ioas()
    _, _, dev = rig.mock_domain(ioas)
    assert iopf(rig, dev) == 0
    assert (
        rig.test_cmd(uapi.IOMMU_TEST_OP_TRIGGER_IOPF, 0, uapi.TestTriggerIopf(dev_id=99))[0]
        == errno.ENOENT
    )


# ======================================================================================
# HW queues and test commands on drivers without them
# ======================================================================================


def test_arm_viommu_has_no_hw_queue() -> None:
    rig = Rig()
    topo = rig.arm_topology("a0")
    rc, _ = rig.call(
        uapi.IOMMU_HW_QUEUE_ALLOC,
        uapi.HwQueueAlloc(
            viommu_id=topo.viommu, type=uapi.IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV, length=4096
        ),
    )
    assert rc == errno.EOPNOTSUPP


def test_test_cmd_refusals() -> None:
    rig = MockRig()
    ioas = rig.ioas()
    stdev, auto, dev = rig.mock_domain(ioas)
    assert (
        rig.test_cmd(uapi.IOMMU_TEST_OP_ADD_RESERVED, ioas, uapi.TestCheckIotlb())[0]
        == errno.EOPNOTSUPP
    )
    assert (
        rig.test_cmd(uapi.IOMMU_TEST_OP_MD_CHECK_IOTLB, auto, uapi.TestCheckIotlb())[0]
        == errno.ENOENT
    )
    assert (
        rig.test_cmd(uapi.IOMMU_TEST_OP_DEV_CHECK_CACHE, dev, uapi.TestCheckDevCache(4, 0))[0]
        == errno.EINVAL
    )
    assert (
        rig.test_cmd(uapi.IOMMU_TEST_OP_DEV_CHECK_CACHE, ioas, uapi.TestCheckDevCache())[0]
        == errno.ENOENT
    )
    assert (
        rig.test_cmd(uapi.IOMMU_TEST_OP_TRIGGER_VEVENT, 0, uapi.TestTriggerVevent(dev))[0]
        == errno.ENOENT
    )
    assert (
        rig.test_cmd(uapi.IOMMU_TEST_OP_MOCK_DOMAIN, 99, uapi.TestMockDomain())[0] == errno.ENOENT
    )
    assert rig.be.live_objects() == [
        (ioas, "IOAS"),
        (stdev, "SELFTEST"),
        (dev, "DEVICE"),
        (auto, "HWPT_PAGING"),
    ]
    assert rig.replace(dev, ioas) == errno.ENOENT  # the id of the selftest object is needed
    assert rig.destroy(dev) == errno.EBUSY
    assert rig.destroy(stdev) == 0
    assert rig.be.live_objects() == [(ioas, "IOAS")]  # the auto domain left with the device


def test_mock_and_arm_units_side_by_side() -> None:
    from tests.backend.test_emulated import HOST

    rig = Rig(HOST, selftest=True)
    topo = rig.arm_topology("a0")
    ioas = rig.ioas()
    arg = uapi.encode(
        uapi.TestCmd.with_payload(uapi.IOMMU_TEST_OP_MOCK_DOMAIN, ioas, uapi.TestMockDomain())
    )
    assert rig.raw(uapi.IOMMU_TEST_CMD, arg) == 0
    mock_dev = uapi.decode(uapi.TestMockDomain, uapi.decode(uapi.TestCmd, arg).payload).out_idev_id
    assert rig.vdevice(topo.viommu, mock_dev, 9)[0] == errno.EINVAL  # another physical IOMMU
    assert rig.hwpt(mock_dev, topo.viommu, 0, ARM_DATA, cmd(STE_S1))[0] == errno.EINVAL
    rig.be.close()
    assert rig.be.live_objects() == []


# ======================================================================================
# Robustness: no input makes the selftest-enabled emulator raise
# ======================================================================================

NEW_REQUESTS = [
    uapi.IOMMU_IOAS_MAP,
    uapi.IOMMU_IOAS_UNMAP,
    uapi.IOMMU_GET_HW_INFO,
    uapi.IOMMU_VEVENTQ_ALLOC,
    uapi.IOMMU_HW_QUEUE_ALLOC,
    uapi.IOMMU_FAULT_QUEUE_ALLOC,
    uapi.IOMMU_TEST_CMD,
    uapi.IOMMU_HWPT_ALLOC,
    uapi.IOMMU_HWPT_INVALIDATE,
    uapi.IOMMU_VIOMMU_ALLOC,
    uapi.IOMMU_VDEVICE_ALLOC,
    uapi.IOMMU_DESTROY,
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(NEW_REQUESTS),
            st.binary(min_size=0, max_size=80),
            st.integers(0, 12),
            st.integers(0, 21),
        ),
        min_size=1,
        max_size=14,
    ),
    kernel=st.sampled_from(["mainline", "pending"]),
)
def test_selftest_emulator_never_raises(
    steps: list[tuple[int, bytes, int, int]], kernel: str
) -> None:
    rig = MockRig(kernel)
    ioas = rig.ioas()
    stdev, _, dev = rig.mock_domain(ioas)
    parent = rig.hwpt_alloc(dev, ioas, uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)[1]
    viommu = -rig.viommu(dev, parent)
    buf = rig.be.memory.alloc(8192)
    for request, raw, small_id, op in steps:
        arg = bytearray(raw)
        if len(arg) >= 12 and small_id:
            arg[4:8] = struct.pack("<I", op if request == uapi.IOMMU_TEST_CMD else small_id)
            arg[8:12] = struct.pack("<I", small_id)
        if len(arg) >= 24 and request == uapi.IOMMU_IOAS_MAP:
            arg[16:24] = struct.pack("<Q", buf)
        rc = rig.be.ioctl(rig.be.iommufd, request, arg)
        assert isinstance(rc, int)
        assert rc >= 0
        assert len(arg) == len(raw)
        for fd in list(rig.be._event_files):
            assert rig.be.read(fd, 64)[0] in (0, errno.ESPIPE)
    del stdev, viommu
    rig.be.close()
    assert rig.be.live_objects() == []
