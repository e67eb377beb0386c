"""The iommufd selftest mock driver and IOMMU_TEST_CMD (reference iommufd.md §5).

Mirrors ``drivers/iommu/iommufd/selftest.c``. Loaded by ``EmulatedIommufd(...,
selftest=True)``, the emulator's stand-in for a kernel built with CONFIG_IOMMUFD_TEST.
The mock IOMMU is one physical IOMMU (named ``HostIommu.SELFTEST``, like its model)
whose devices are created by ``IOMMU_TEST_OP_MOCK_DOMAIN``: each is bound to the iommufd
and owned by a SELFTEST object (destroying that object unbinds the device). Its state is
the one the selftest checks:

* every mock nested HWPT has ``iotlb[4]`` (``MockNestedData``), all set from the alloc data;
* every mock device has ``cache[4]``, all ``IOMMU_TEST_DEV_CACHE_DEFAULT`` at creation;
* ``IOMMU_HWPT_INVALIDATE`` on a mock nested HWPT zeroes IOTLB entries entry by entry
  (per-entry copy helper), on a mock vIOMMU zeroes device cache entries (whole-array copy);
* ``MD_CHECK_IOTLB`` / ``DEV_CHECK_CACHE`` compare one entry (EINVAL on mismatch),
  ``TRIGGER_VEVENT`` queues a vEVENT with the device's virt_id, ``TRIGGER_IOPF`` an I/O
  page fault; HW queues of type ``IOMMU_HW_QUEUE_TYPE_SELFTEST``, at most 2, allocated in
  ascending and destroyed in descending index order.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import ClassVar

from protocols import iommufd as uapi
from protocols.models import HostIommu
from viommud.backend.base import UserFault
from viommud.backend.emulator.context import IommufdContext
from viommud.backend.emulator.driver import IommuDriver, IommufdCore
from viommud.backend.emulator.objects import (
    DeviceObject,
    HwptNestedObject,
    HwptPagingObject,
    IommufdObject,
    MockNestedData,
    SelftestObject,
    ViommuObject,
)
from viommud.backend.emulator.usercopy import (
    ENOERR,
    KMALLOC_MAX_SIZE,
    Call,
    IoctlError,
    UserArray,
    UserData,
    copy_array_entry,
    copy_data_from_user,
    copy_full_array,
)

__all__ = ["MockDriver", "test_cmd"]

MOCK_IO_PAGE_SIZE = 4096 // 2  # the mock domain's pgsize_bitmap (PAGE_SIZE / 2)
MOCK_PASID_WIDTH = 20
MOCK_DEV_FLAGS = (
    uapi.MOCK_FLAGS_DEVICE_NO_DIRTY
    | uapi.MOCK_FLAGS_DEVICE_HUGE_IOVA
    | uapi.MOCK_FLAGS_DEVICE_PASID
)


class MockDriver(IommuDriver):
    """The selftest mock IOMMU driver (``drivers/iommu/iommufd/selftest.c``)."""

    model: ClassVar[str] = HostIommu.SELFTEST
    has_domain_alloc_nested: ClassVar[bool] = True
    pgsize: ClassVar[int] = MOCK_IO_PAGE_SIZE
    aperture: ClassVar[tuple[int, int]] = (uapi.MOCK_APERTURE_START, uapi.MOCK_APERTURE_LAST)

    def dirty_capable(self, dev: DeviceObject) -> bool:
        return not dev.mock_flags & uapi.MOCK_FLAGS_DEVICE_NO_DIRTY

    def max_pasid_log2(self, dev: DeviceObject) -> int:
        return MOCK_PASID_WIDTH if dev.mock_flags & uapi.MOCK_FLAGS_DEVICE_PASID else 0

    def hw_info(self, core: IommufdCore, dev: DeviceObject, in_type: int) -> tuple[int, bytes]:
        if in_type not in (uapi.IOMMU_HW_INFO_TYPE_NONE, uapi.IOMMU_HW_INFO_TYPE_SELFTEST):
            raise IoctlError(errno.EOPNOTSUPP)
        info = uapi.HwInfoSelftest(0, uapi.IOMMU_HW_INFO_SELFTEST_REGVAL)
        return uapi.IOMMU_HW_INFO_TYPE_SELFTEST, bytes(uapi.encode(info))

    def paging_alloc(
        self, core: IommufdCore, dev: DeviceObject, flags: int, data: UserData | None
    ) -> None:
        # mock_domain_alloc_paging_flags: its own data type only
        if data is not None and data.type != uapi.IOMMU_HWPT_DATA_SELFTEST:
            raise IoctlError(errno.EOPNOTSUPP)

    @staticmethod
    def _alloc_nested(core: IommufdCore, data: UserData) -> MockNestedData:
        """``__mock_domain_alloc_nested``: type first (EOPNOTSUPP), then the copy."""
        if data.type != uapi.IOMMU_HWPT_DATA_SELFTEST:
            raise IoctlError(errno.EOPNOTSUPP)
        cfg = copy_data_from_user(
            core.memory, uapi.HwptSelftest, data, uapi.IOMMU_HWPT_DATA_SELFTEST, 4
        )
        return MockNestedData([cfg.iotlb] * uapi.MOCK_NESTED_DOMAIN_IOTLB_NUM)

    def domain_alloc_nested(
        self,
        core: IommufdCore,
        dev: DeviceObject,
        parent: HwptPagingObject,
        flags: int,
        data: UserData,
    ) -> MockNestedData:
        if flags & ~uapi.IOMMU_HWPT_ALLOC_PASID:
            raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - the core refuses first
        return self._alloc_nested(core, data)

    def viommu_supported(self, viommu_type: int) -> bool:
        return viommu_type == uapi.IOMMU_VIOMMU_TYPE_SELFTEST

    def viommu_init(
        self,
        core: IommufdCore,
        dev: DeviceObject,
        parent: HwptPagingObject,
        data: UserData | None,
    ) -> None:
        if parent.model != HostIommu.SELFTEST:
            raise IoctlError(errno.EINVAL)
        if data is None:
            return
        # mock_viommu_init: loop in_data back to out_data
        arg = copy_data_from_user(
            core.memory, uapi.ViommuSelftest, data, uapi.IOMMU_VIOMMU_TYPE_SELFTEST, 8
        )
        out = bytes(uapi.encode(replace(arg, out_data=arg.in_data)))
        try:
            core.memory.write(data.uptr, out[: min(data.len, len(out))])
        except UserFault:
            raise IoctlError(errno.EFAULT) from None

    def viommu_alloc_domain_nested(
        self, core: IommufdCore, viommu: ViommuObject, flags: int, data: UserData
    ) -> MockNestedData:
        if flags & ~uapi.IOMMU_HWPT_ALLOC_PASID:
            raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - the core refuses first
        return self._alloc_nested(core, data)

    def attach_paging(self, core: IommufdCore, dev: DeviceObject, hwpt: HwptPagingObject) -> int:
        # mock_domain_nop_attach: a dirty-tracking domain needs a dirty-capable device
        if hwpt.dirty and dev.mock_flags & uapi.MOCK_FLAGS_DEVICE_NO_DIRTY:
            return errno.EINVAL
        return ENOERR

    def attach_nested(self, core: IommufdCore, dev: DeviceObject, hwpt: HwptNestedObject) -> int:
        # a nested domain of a vIOMMU needs the device's vDEVICE on that vIOMMU first
        if hwpt.viommu_id:
            viommu = core.lookup(hwpt.viommu_id)
            assert isinstance(viommu, ViommuObject)
            if dev.id not in core.viommu_device_ids(viommu):
                return errno.ENOENT
        return ENOERR

    def hwpt_cache_invalidate(
        self, core: IommufdCore, hwpt: HwptNestedObject, array: UserArray
    ) -> tuple[int, int]:
        """``mock_domain_cache_invalidate_user`` (§5.2): entry by entry."""
        if array.type != uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST:
            return errno.EINVAL, 0
        assert isinstance(hwpt.data, MockNestedData)
        iotlb = hwpt.data.iotlb
        done = 0
        for index in range(array.entry_num):
            try:
                inv = copy_array_entry(
                    core.memory,
                    uapi.HwptInvalidateSelftest,
                    array,
                    uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
                    index=index,
                    min_len=8,
                )
            except IoctlError as exc:
                return exc.errno, done
            if inv.flags & ~uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL:
                return errno.EOPNOTSUPP, done
            if inv.iotlb_id > uapi.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX:
                return errno.EINVAL, done
            if inv.flags & uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL:
                iotlb[:] = [0] * len(iotlb)
            else:
                iotlb[inv.iotlb_id] = 0
            done += 1
        return ENOERR, done

    def viommu_cache_invalidate(
        self, core: IommufdCore, viommu: ViommuObject, array: UserArray
    ) -> tuple[int, int]:
        """``mock_viommu_cache_invalidate`` (§5.2): whole-array copy, then in order."""
        if array.entry_num == 0 and array.type == uapi.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST:
            return ENOERR, 0  # a zero-length array probes the type
        if array.entry_num * 12 > KMALLOC_MAX_SIZE:
            return errno.ENOMEM, 0
        try:
            cmds = copy_full_array(
                core.memory,
                uapi.ViommuInvalidateSelftest,
                array,
                uapi.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST,
            )
        except IoctlError as exc:
            return exc.errno, 0
        for index, inv in enumerate(cmds):
            if inv.flags & ~uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL:
                return errno.EOPNOTSUPP, index
            if inv.cache_id > uapi.MOCK_DEV_CACHE_ID_MAX:
                return errno.EINVAL, index
            dev = core.vsid_to_device(viommu, inv.vdev_id)
            if dev is None or dev.mock_cache is None:
                return errno.EINVAL, index
            if inv.flags & uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL:
                dev.mock_cache[:] = [0] * len(dev.mock_cache)
            else:
                dev.mock_cache[inv.cache_id] = 0
        return ENOERR, len(cmds)

    def hw_queue_supported(self, viommu: ViommuObject, queue_type: int) -> bool:
        return queue_type == uapi.IOMMU_HW_QUEUE_TYPE_SELFTEST

    def hw_queue_init(self, core: IommufdCore, viommu: ViommuObject, index: int) -> int:
        """``mock_hw_queue_init_phys``: bounded index, no reuse, ascending order."""
        if index >= uapi.IOMMU_TEST_HW_QUEUE_MAX:
            raise IoctlError(errno.EINVAL)
        if index in viommu.hw_queues:
            raise IoctlError(errno.EEXIST)
        if index:
            prev = viommu.hw_queues.get(index - 1)
            if prev is None:
                raise IoctlError(errno.EIO)
            return prev
        return 0


# ======================================================================================
# IOMMU_TEST_CMD
# ======================================================================================


def test_cmd(core: IommufdContext, call: Call[uapi.TestCmd]) -> int:
    """``iommufd_test``: dispatch on ``op``; unknown (or not emulated) ops EOPNOTSUPP."""
    cmd = call.cmd
    op = cmd.op
    if op in (uapi.IOMMU_TEST_OP_MOCK_DOMAIN, uapi.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS):
        return _mock_domain(core, call)
    if op == uapi.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE:
        return _mock_domain_replace(core, call)
    if op == uapi.IOMMU_TEST_OP_MD_CHECK_IOTLB:
        return _md_check_iotlb(core, cmd)
    if op == uapi.IOMMU_TEST_OP_DEV_CHECK_CACHE:
        return _dev_check_cache(core, cmd)
    if op == uapi.IOMMU_TEST_OP_TRIGGER_VEVENT:
        return _trigger_vevent(core, cmd)
    if op == uapi.IOMMU_TEST_OP_TRIGGER_IOPF:
        return _trigger_iopf(core, cmd)
    return errno.EOPNOTSUPP


test_cmd.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def _mock_domain(core: IommufdContext, call: Call[uapi.TestCmd]) -> int:
    """MOCK_DOMAIN(_FLAGS): create a mock device, bind it, attach it to ``id``."""
    cmd = call.cmd
    args = uapi.decode(uapi.TestMockDomain, cmd.payload)
    flags = args.dev_flags if cmd.op == uapi.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS else 0
    if flags & ~MOCK_DEV_FLAGS:
        return errno.EINVAL
    sobj = core._insert(lambda obj_id: SelftestObject(obj_id, 0))
    assert isinstance(sobj, SelftestObject)
    pdev = core.new_mock_device()
    cache = [uapi.IOMMU_TEST_DEV_CACHE_DEFAULT] * uapi.MOCK_DEV_CACHE_NUM
    dev = core._insert(
        lambda obj_id: DeviceObject(obj_id, pdev, -1, mock_flags=flags, mock_cache=cache)
    )
    assert isinstance(dev, DeviceObject)
    sobj.dev_id = dev.id
    rc, hwpt_id = core.attach_pt(dev, cmd.id)
    if rc:
        core._destroy(sobj)  # unbinds the device again
        return rc
    out = replace(
        args, out_stdev_id=sobj.id, out_hwpt_id=hwpt_id, out_idev_id=dev.id, dev_flags=flags
    )
    raw = bytes(uapi.encode(out))
    if call.respond(replace(cmd, payload=raw + cmd.payload[len(raw) :])):
        core._destroy(sobj)  # pragma: no cover - respond cannot fault here
        return errno.EFAULT  # pragma: no cover
    return ENOERR


def _stdev(core: IommufdContext, stdev_id: int) -> DeviceObject:
    sobj = core.lookup(stdev_id)
    if not isinstance(sobj, SelftestObject):
        raise IoctlError(errno.ENOENT)
    dev = core.lookup(sobj.dev_id)
    assert isinstance(dev, DeviceObject)
    return dev


def _mock_domain_replace(core: IommufdContext, call: Call[uapi.TestCmd]) -> int:
    """MOCK_DOMAIN_REPLACE: ``iommufd_device_replace(idev, pt_id)``; writes pt_id back."""
    cmd = call.cmd
    dev = _stdev(core, cmd.id)
    args = uapi.decode(uapi.TestMockDomainReplace, cmd.payload)
    if not dev.hwpt_id:
        return errno.EINVAL  # replace needs an existing attachment
    rc, hwpt_id = core.attach_pt(dev, args.pt_id)
    if rc:
        return rc
    raw = bytes(uapi.encode(replace(args, pt_id=hwpt_id)))
    if call.respond(replace(cmd, payload=raw + cmd.payload[len(raw) :])):
        return errno.EFAULT  # pragma: no cover - respond cannot fault here
    return ENOERR


def _mock_object(core: IommufdContext, obj_id: int, kind: type[IommufdObject]) -> IommufdObject:
    obj = core.lookup(obj_id)
    if not isinstance(obj, kind):
        raise IoctlError(errno.ENOENT)
    return obj


def _md_check_iotlb(core: IommufdContext, cmd: uapi.TestCmd) -> int:
    hwpt = _mock_object(core, cmd.id, HwptNestedObject)
    assert isinstance(hwpt, HwptNestedObject)
    if not isinstance(hwpt.data, MockNestedData):
        return errno.EINVAL
    check = uapi.decode(uapi.TestCheckIotlb, cmd.payload)
    if check.id > uapi.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX:
        return errno.EINVAL
    return ENOERR if hwpt.data.iotlb[check.id] == check.iotlb else errno.EINVAL


def _dev_check_cache(core: IommufdContext, cmd: uapi.TestCmd) -> int:
    dev = _mock_object(core, cmd.id, DeviceObject)
    assert isinstance(dev, DeviceObject)
    if dev.mock_cache is None:
        return errno.EINVAL
    check = uapi.decode(uapi.TestCheckDevCache, cmd.payload)
    if check.id > uapi.MOCK_DEV_CACHE_ID_MAX:
        return errno.EINVAL
    return ENOERR if dev.mock_cache[check.id] == check.cache else errno.EINVAL


def _trigger_vevent(core: IommufdContext, cmd: uapi.TestCmd) -> int:
    args = uapi.decode(uapi.TestTriggerVevent, cmd.payload)
    dev = _mock_object(core, args.dev_id, DeviceObject)
    assert isinstance(dev, DeviceObject)
    if dev.pdev.iommu != HostIommu.SELFTEST or not dev.vdevice_id:
        return errno.ENOENT
    vdev = core.lookup(dev.vdevice_id)
    viommu = core.lookup(getattr(vdev, "viommu_id", 0))
    assert isinstance(viommu, ViommuObject)
    payload = bytes(uapi.encode(uapi.VeventSelftest(getattr(vdev, "virt_id", 0) & 0xFFFF_FFFF)))
    return core.report_vevent(viommu, uapi.IOMMU_VEVENTQ_TYPE_SELFTEST, payload)


def _trigger_iopf(core: IommufdContext, cmd: uapi.TestCmd) -> int:
    args = uapi.decode(uapi.TestTriggerIopf, cmd.payload)
    dev = _mock_object(core, args.dev_id, DeviceObject)
    assert isinstance(dev, DeviceObject)
    flags = uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE
    if args.pasid:
        flags |= uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID
    fault = uapi.HwptPgfault(
        flags=flags, pasid=args.pasid, grpid=args.grpid, perm=args.perm, addr=args.addr
    )
    core.report_fault(dev, fault)
    return ENOERR
