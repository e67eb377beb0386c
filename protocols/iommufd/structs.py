"""The iommufd uAPI structures as frozen dataclasses over ``struct`` (the fast path), and
``encode`` / ``decode``; each names its construct declaration in ``LAYOUT``."""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from protocols.iommufd.layouts import (
    IOMMU_DESTROY_LAYOUT,
    IOMMU_FAULT_QUEUE_ALLOC_LAYOUT,
    IOMMU_HW_INFO_ARM_SMMUV3_LAYOUT,
    IOMMU_HW_INFO_LAYOUT,
    IOMMU_HW_INFO_VTD_LAYOUT,
    IOMMU_HW_QUEUE_ALLOC_LAYOUT,
    IOMMU_HWPT_ALLOC_LAYOUT,
    IOMMU_HWPT_ARM_SMMUV3_LAYOUT,
    IOMMU_HWPT_INVALIDATE_LAYOUT,
    IOMMU_HWPT_INVALIDATE_SELFTEST_LAYOUT,
    IOMMU_HWPT_PAGE_RESPONSE_LAYOUT,
    IOMMU_HWPT_PGFAULT_LAYOUT,
    IOMMU_HWPT_SELFTEST_LAYOUT,
    IOMMU_IOAS_ALLOC_LAYOUT,
    IOMMU_IOAS_MAP_FILE_LAYOUT,
    IOMMU_IOAS_MAP_LAYOUT,
    IOMMU_IOAS_UNMAP_LAYOUT,
    IOMMU_TEST_CHECK_DEV_CACHE_LAYOUT,
    IOMMU_TEST_CHECK_IOTLB_LAYOUT,
    IOMMU_TEST_CMD_LAYOUT,
    IOMMU_TEST_HW_INFO_LAYOUT,
    IOMMU_TEST_MOCK_DOMAIN_LAYOUT,
    IOMMU_TEST_MOCK_DOMAIN_REPLACE_LAYOUT,
    IOMMU_TEST_TRIGGER_IOPF_LAYOUT,
    IOMMU_TEST_TRIGGER_VEVENT_LAYOUT,
    IOMMU_VDEVICE_ALLOC_LAYOUT,
    IOMMU_VEVENT_ARM_SMMUV3_LAYOUT,
    IOMMU_VEVENT_HEADER_LAYOUT,
    IOMMU_VEVENT_SELFTEST_LAYOUT,
    IOMMU_VEVENTQ_ALLOC_LAYOUT,
    IOMMU_VIOMMU_ALLOC_LAYOUT,
    IOMMU_VIOMMU_ARM_SMMUV3_INVALIDATE_LAYOUT,
    IOMMU_VIOMMU_INVALIDATE_SELFTEST_LAYOUT,
    IOMMU_VIOMMU_SELFTEST_LAYOUT,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT_LAYOUT,
    VFIO_DEVICE_BIND_IOMMUFD_LAYOUT,
    VFIO_DEVICE_DETACH_IOMMUFD_PT_LAYOUT,
)
from protocols.vtd import (
    IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT,
    IOMMU_HWPT_VTD_S1_LAYOUT,
    VTD_S1_STRUCT,
)

# --------------------------------------------------------------------------------------
# Dataclasses (the fast path)
# --------------------------------------------------------------------------------------


class UapiStruct:
    """Base of every uAPI dataclass: the class-level layout facts ``encode``/``decode`` use."""

    __slots__ = ()

    FORMAT: ClassVar[struct.Struct]
    MIN_SIZE: ClassVar[int]
    LAYOUT: ClassVar[Any]  # the construct declaration
    PADDING: ClassVar[frozenset[str]] = frozenset()

    if TYPE_CHECKING:

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...


_DESTROY = struct.Struct("<II")
_IOAS_ALLOC = struct.Struct("<III")
_HW_INFO = struct.Struct("<IIIIQIB3sQ")
_HWPT_ALLOC = struct.Struct("<IIIIIIIIQII")
_VIOMMU_ALLOC = struct.Struct("<IIIIIIIIQ")
_VDEVICE_ALLOC = struct.Struct("<IIIIQ")
_HWPT_INVALIDATE = struct.Struct("<IIQIIII")
_TWO_U64 = struct.Struct("<QQ")
_VTD_S1 = VTD_S1_STRUCT
_VFIO_BIND = struct.Struct("<IIiI")
_VFIO_FOUR_U32 = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class Destroy(UapiStruct):
    """``struct iommu_destroy`` (iommufd.md §1.1)."""

    FORMAT: ClassVar[struct.Struct] = _DESTROY
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_DESTROY_LAYOUT

    size: int = _DESTROY.size
    id: int = 0


@dataclass(frozen=True, slots=True)
class IoasAlloc(UapiStruct):
    """``struct iommu_ioas_alloc`` (iommufd.md §1.2)."""

    FORMAT: ClassVar[struct.Struct] = _IOAS_ALLOC
    MIN_SIZE: ClassVar[int] = 12
    LAYOUT: ClassVar[Any] = IOMMU_IOAS_ALLOC_LAYOUT

    size: int = _IOAS_ALLOC.size
    flags: int = 0
    out_ioas_id: int = 0


@dataclass(frozen=True, slots=True)
class GetHwInfo(UapiStruct):
    """``struct iommu_hw_info`` (iommufd.md §1.3); ``reserved`` is the 3-byte __reserved."""

    FORMAT: ClassVar[struct.Struct] = _HW_INFO
    MIN_SIZE: ClassVar[int] = 32
    LAYOUT: ClassVar[Any] = IOMMU_HW_INFO_LAYOUT

    size: int = _HW_INFO.size
    flags: int = 0
    dev_id: int = 0
    data_len: int = 0
    data_uptr: int = 0
    data_type: int = 0
    out_max_pasid_log2: int = 0
    reserved: bytes = bytes(3)
    out_capabilities: int = 0


@dataclass(frozen=True, slots=True)
class HwptAlloc(UapiStruct):
    """``struct iommu_hwpt_alloc`` (iommufd.md §1.4)."""

    FORMAT: ClassVar[struct.Struct] = _HWPT_ALLOC
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_ALLOC_LAYOUT
    PADDING: ClassVar[frozenset[str]] = frozenset({"reserved2"})

    size: int = _HWPT_ALLOC.size
    flags: int = 0
    dev_id: int = 0
    pt_id: int = 0
    out_hwpt_id: int = 0
    reserved: int = 0
    data_type: int = 0
    data_len: int = 0
    data_uptr: int = 0
    fault_id: int = 0
    reserved2: int = 0


@dataclass(frozen=True, slots=True)
class ViommuAlloc(UapiStruct):
    """``struct iommu_viommu_alloc`` (iommufd.md §1.6)."""

    FORMAT: ClassVar[struct.Struct] = _VIOMMU_ALLOC
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_VIOMMU_ALLOC_LAYOUT
    PADDING: ClassVar[frozenset[str]] = frozenset({"reserved"})

    size: int = _VIOMMU_ALLOC.size
    flags: int = 0
    type: int = 0
    dev_id: int = 0
    hwpt_id: int = 0
    out_viommu_id: int = 0
    data_len: int = 0
    reserved: int = 0
    data_uptr: int = 0


@dataclass(frozen=True, slots=True)
class VdeviceAlloc(UapiStruct):
    """``struct iommu_vdevice_alloc`` (iommufd.md §1.7)."""

    FORMAT: ClassVar[struct.Struct] = _VDEVICE_ALLOC
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_VDEVICE_ALLOC_LAYOUT

    size: int = _VDEVICE_ALLOC.size
    viommu_id: int = 0
    dev_id: int = 0
    out_vdevice_id: int = 0
    virt_id: int = 0


@dataclass(frozen=True, slots=True)
class HwptInvalidate(UapiStruct):
    """``struct iommu_hwpt_invalidate`` (iommufd.md §2.1)."""

    FORMAT: ClassVar[struct.Struct] = _HWPT_INVALIDATE
    MIN_SIZE: ClassVar[int] = 32
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_INVALIDATE_LAYOUT

    size: int = _HWPT_INVALIDATE.size
    hwpt_id: int = 0
    data_uptr: int = 0
    data_type: int = 0
    entry_len: int = 0
    entry_num: int = 0
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class HwptArmSmmuv3(UapiStruct):
    """``struct iommu_hwpt_arm_smmuv3`` (iommufd.md §1.5, §3.1): the guest STE words 0-1."""

    FORMAT: ClassVar[struct.Struct] = _TWO_U64
    MIN_SIZE: ClassVar[int] = 16
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_ARM_SMMUV3_LAYOUT

    ste0: int = 0
    ste1: int = 0


@dataclass(frozen=True, slots=True)
class ViommuArmSmmuv3Invalidate(UapiStruct):
    """``struct iommu_viommu_arm_smmuv3_invalidate`` (iommufd.md §3.3): one raw command."""

    FORMAT: ClassVar[struct.Struct] = _TWO_U64
    MIN_SIZE: ClassVar[int] = 16
    LAYOUT: ClassVar[Any] = IOMMU_VIOMMU_ARM_SMMUV3_INVALIDATE_LAYOUT

    cmd0: int = 0
    cmd1: int = 0


@dataclass(frozen=True, slots=True)
class HwptVtdS1(UapiStruct):
    """``struct iommu_hwpt_vtd_s1`` (iommufd.md §1.5, §4.1)."""

    FORMAT: ClassVar[struct.Struct] = _VTD_S1
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_VTD_S1_LAYOUT

    flags: int = 0
    pgtbl_addr: int = 0
    addr_width: int = 0
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class HwptVtdS1Invalidate(UapiStruct):
    """``struct iommu_hwpt_vtd_s1_invalidate`` (iommufd.md §4.2)."""

    FORMAT: ClassVar[struct.Struct] = _VTD_S1
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT

    addr: int = 0
    npages: int = 0
    flags: int = 0
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class VfioDeviceBindIommufd(UapiStruct):
    """``struct vfio_device_bind_iommufd``; ``MIN_SIZE`` is the kernel's ``minsz``."""

    FORMAT: ClassVar[struct.Struct] = _VFIO_BIND
    MIN_SIZE: ClassVar[int] = 16
    LAYOUT: ClassVar[Any] = VFIO_DEVICE_BIND_IOMMUFD_LAYOUT

    argsz: int = _VFIO_BIND.size
    flags: int = 0
    iommufd: int = -1
    out_devid: int = 0


@dataclass(frozen=True, slots=True)
class VfioDeviceAttachIommufdPt(UapiStruct):
    """``struct vfio_device_attach_iommufd_pt``; ``minsz`` ends at ``pt_id``."""

    FORMAT: ClassVar[struct.Struct] = _VFIO_FOUR_U32
    MIN_SIZE: ClassVar[int] = 12
    LAYOUT: ClassVar[Any] = VFIO_DEVICE_ATTACH_IOMMUFD_PT_LAYOUT

    argsz: int = _VFIO_FOUR_U32.size
    flags: int = 0
    pt_id: int = 0
    pasid: int = 0


@dataclass(frozen=True, slots=True)
class VfioDeviceDetachIommufdPt(UapiStruct):
    """``struct vfio_device_detach_iommufd_pt``; ``minsz`` ends at ``flags``."""

    FORMAT: ClassVar[struct.Struct] = _VFIO_FOUR_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = VFIO_DEVICE_DETACH_IOMMUFD_PT_LAYOUT
    PADDING: ClassVar[frozenset[str]] = frozenset({"reserved"})

    argsz: int = _VFIO_FOUR_U32.size
    flags: int = 0
    pasid: int = 0
    reserved: int = 0


_IOAS_MAP = struct.Struct("<IIIIQQQ")
_IOAS_UNMAP = struct.Struct("<IIQQ")
_IOAS_MAP_FILE = struct.Struct("<IIIiQQQ")
_VEVENTQ_ALLOC = struct.Struct("<IIIIIIII")
_HW_QUEUE_ALLOC = struct.Struct("<IIIIIIQQ")
_FOUR_U32 = struct.Struct("<IIII")
_TEST_CMD = struct.Struct("<IIII48sII")
_ONE_U32 = struct.Struct("<I")
_TWO_U32 = struct.Struct("<II")
_THREE_U32 = struct.Struct("<III")
_HW_INFO_VTD = struct.Struct("<IIQQ")
_TEN_U32 = struct.Struct("<IIIIIIIIII")
_FOUR_U64 = struct.Struct("<QQQQ")
_PGFAULT = struct.Struct("<IIIIIIQII")
_TRIGGER_IOPF = struct.Struct("<IIIIQ")


@dataclass(frozen=True, slots=True)
class IoasMap(UapiStruct):
    """``struct iommu_ioas_map``: map ``length`` bytes of ``user_va`` at ``iova``."""

    FORMAT: ClassVar[struct.Struct] = _IOAS_MAP
    MIN_SIZE: ClassVar[int] = 40
    LAYOUT: ClassVar[Any] = IOMMU_IOAS_MAP_LAYOUT

    size: int = _IOAS_MAP.size
    flags: int = 0
    ioas_id: int = 0
    reserved: int = 0
    user_va: int = 0
    length: int = 0
    iova: int = 0


@dataclass(frozen=True, slots=True)
class IoasMapFile(UapiStruct):
    """``struct iommu_ioas_map_file``: map ``length`` bytes of file ``fd`` from byte
    ``start`` at ``iova`` (IOMMU_IOAS_MAP_FILE; pages are pinned from the file)."""

    FORMAT: ClassVar[struct.Struct] = _IOAS_MAP_FILE
    MIN_SIZE: ClassVar[int] = 40
    LAYOUT: ClassVar[Any] = IOMMU_IOAS_MAP_FILE_LAYOUT

    size: int = _IOAS_MAP_FILE.size
    flags: int = 0
    ioas_id: int = 0
    fd: int = -1
    start: int = 0
    length: int = 0
    iova: int = 0


@dataclass(frozen=True, slots=True)
class IoasUnmap(UapiStruct):
    """``struct iommu_ioas_unmap``: unmap whole areas inside ``[iova, iova + length)``."""

    FORMAT: ClassVar[struct.Struct] = _IOAS_UNMAP
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_IOAS_UNMAP_LAYOUT

    size: int = _IOAS_UNMAP.size
    ioas_id: int = 0
    iova: int = 0
    length: int = 0


@dataclass(frozen=True, slots=True)
class VeventqAlloc(UapiStruct):
    """``struct iommu_veventq_alloc`` (iommufd.md §1.8)."""

    FORMAT: ClassVar[struct.Struct] = _VEVENTQ_ALLOC
    MIN_SIZE: ClassVar[int] = 28
    LAYOUT: ClassVar[Any] = IOMMU_VEVENTQ_ALLOC_LAYOUT

    size: int = _VEVENTQ_ALLOC.size
    flags: int = 0
    viommu_id: int = 0
    type: int = 0
    veventq_depth: int = 0
    out_veventq_id: int = 0
    out_veventq_fd: int = 0
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class HwQueueAlloc(UapiStruct):
    """``struct iommu_hw_queue_alloc`` (iommufd.md §1.9)."""

    FORMAT: ClassVar[struct.Struct] = _HW_QUEUE_ALLOC
    MIN_SIZE: ClassVar[int] = 40
    LAYOUT: ClassVar[Any] = IOMMU_HW_QUEUE_ALLOC_LAYOUT

    size: int = _HW_QUEUE_ALLOC.size
    flags: int = 0
    viommu_id: int = 0
    type: int = 0
    index: int = 0
    out_hw_queue_id: int = 0
    nesting_parent_iova: int = 0
    length: int = 0


@dataclass(frozen=True, slots=True)
class FaultQueueAlloc(UapiStruct):
    """``struct iommu_fault_alloc`` (iommufd.md §1.10)."""

    FORMAT: ClassVar[struct.Struct] = _FOUR_U32
    MIN_SIZE: ClassVar[int] = 16
    LAYOUT: ClassVar[Any] = IOMMU_FAULT_QUEUE_ALLOC_LAYOUT

    size: int = _FOUR_U32.size
    flags: int = 0
    out_fault_id: int = 0
    out_fault_fd: int = 0


@dataclass(frozen=True, slots=True)
class TestCmd(UapiStruct):
    """``struct iommu_test_cmd`` (iommufd.md §5.1); ``payload`` is the per-op union."""

    __test__ = False  # not a pytest class

    FORMAT: ClassVar[struct.Struct] = _TEST_CMD
    MIN_SIZE: ClassVar[int] = 68
    LAYOUT: ClassVar[Any] = IOMMU_TEST_CMD_LAYOUT
    PADDING: ClassVar[frozenset[str]] = frozenset({"pad"})

    size: int = _TEST_CMD.size
    op: int = 0
    id: int = 0
    reserved: int = 0
    payload: bytes = bytes(48)
    last: int = 0
    pad: int = 0

    @classmethod
    def with_payload(cls, op: int, obj_id: int, payload: UapiStruct) -> TestCmd:
        """A test command whose union holds ``payload`` (zero-padded to 48 bytes)."""
        raw = bytes(encode(payload))
        return cls(op=op, id=obj_id, payload=raw + bytes(48 - len(raw)))


@dataclass(frozen=True, slots=True)
class HwInfoVtd(UapiStruct):
    """``struct iommu_hw_info_vtd`` (iommufd.md §1.3)."""

    FORMAT: ClassVar[struct.Struct] = _HW_INFO_VTD
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_HW_INFO_VTD_LAYOUT

    flags: int = 0
    reserved: int = 0
    cap_reg: int = 0
    ecap_reg: int = 0


@dataclass(frozen=True, slots=True)
class HwInfoArmSmmuv3(UapiStruct):
    """``struct iommu_hw_info_arm_smmuv3`` (iommufd.md §1.3)."""

    FORMAT: ClassVar[struct.Struct] = _TEN_U32
    MIN_SIZE: ClassVar[int] = 40
    LAYOUT: ClassVar[Any] = IOMMU_HW_INFO_ARM_SMMUV3_LAYOUT

    flags: int = 0
    reserved: int = 0
    idr0: int = 0
    idr1: int = 0
    idr2: int = 0
    idr3: int = 0
    idr4: int = 0
    idr5: int = 0
    iidr: int = 0
    aidr: int = 0


@dataclass(frozen=True, slots=True)
class HwInfoSelftest(UapiStruct):
    """``struct iommu_test_hw_info`` (iommufd_test.h)."""

    FORMAT: ClassVar[struct.Struct] = _TWO_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_TEST_HW_INFO_LAYOUT

    flags: int = 0
    test_reg: int = 0


@dataclass(frozen=True, slots=True)
class HwptSelftest(UapiStruct):
    """``struct iommu_hwpt_selftest`` (iommufd.md §1.5)."""

    FORMAT: ClassVar[struct.Struct] = _ONE_U32
    MIN_SIZE: ClassVar[int] = 4
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_SELFTEST_LAYOUT

    iotlb: int = 0


@dataclass(frozen=True, slots=True)
class HwptInvalidateSelftest(UapiStruct):
    """``struct iommu_hwpt_invalidate_selftest`` (iommufd.md §5.1)."""

    FORMAT: ClassVar[struct.Struct] = _TWO_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_INVALIDATE_SELFTEST_LAYOUT

    flags: int = 0
    iotlb_id: int = 0


@dataclass(frozen=True, slots=True)
class ViommuInvalidateSelftest(UapiStruct):
    """``struct iommu_viommu_invalidate_selftest`` (iommufd.md §5.1)."""

    FORMAT: ClassVar[struct.Struct] = _THREE_U32
    MIN_SIZE: ClassVar[int] = 12
    LAYOUT: ClassVar[Any] = IOMMU_VIOMMU_INVALIDATE_SELFTEST_LAYOUT

    flags: int = 0
    vdev_id: int = 0
    cache_id: int = 0


@dataclass(frozen=True, slots=True)
class ViommuSelftest(UapiStruct):
    """``struct iommu_viommu_selftest`` (iommufd.md §1.6)."""

    FORMAT: ClassVar[struct.Struct] = _TWO_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_VIOMMU_SELFTEST_LAYOUT

    in_data: int = 0
    out_data: int = 0


@dataclass(frozen=True, slots=True)
class VeventHeader(UapiStruct):
    """``struct iommufd_vevent_header``: precedes every record read from a vEVENTQ."""

    FORMAT: ClassVar[struct.Struct] = _TWO_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_VEVENT_HEADER_LAYOUT

    flags: int = 0
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class VeventSelftest(UapiStruct):
    """``struct iommu_viommu_event_selftest``: the mock's vEVENT payload."""

    FORMAT: ClassVar[struct.Struct] = _ONE_U32
    MIN_SIZE: ClassVar[int] = 4
    LAYOUT: ClassVar[Any] = IOMMU_VEVENT_SELFTEST_LAYOUT

    virt_id: int = 0


@dataclass(frozen=True, slots=True)
class VeventArmSmmuv3(UapiStruct):
    """``struct iommu_vevent_arm_smmuv3``: a raw SMMUv3 event record with the vSID."""

    FORMAT: ClassVar[struct.Struct] = _FOUR_U64
    MIN_SIZE: ClassVar[int] = 32
    LAYOUT: ClassVar[Any] = IOMMU_VEVENT_ARM_SMMUV3_LAYOUT

    evt0: int = 0
    evt1: int = 0
    evt2: int = 0
    evt3: int = 0


@dataclass(frozen=True, slots=True)
class HwptPgfault(UapiStruct):
    """``struct iommu_hwpt_pgfault``: one record read from a FAULT fd (iommufd.md §1.10)."""

    FORMAT: ClassVar[struct.Struct] = _PGFAULT
    MIN_SIZE: ClassVar[int] = 40
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_PGFAULT_LAYOUT

    flags: int = 0
    dev_id: int = 0
    pasid: int = 0
    grpid: int = 0
    perm: int = 0
    reserved: int = 0
    addr: int = 0
    length: int = 0
    cookie: int = 0


@dataclass(frozen=True, slots=True)
class HwptPageResponse(UapiStruct):
    """``struct iommu_hwpt_page_response``: one record written to a FAULT fd."""

    FORMAT: ClassVar[struct.Struct] = _TWO_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_HWPT_PAGE_RESPONSE_LAYOUT

    cookie: int = 0
    code: int = 0


@dataclass(frozen=True, slots=True)
class TestMockDomain(UapiStruct):
    """``iommu_test_cmd.mock_domain_flags`` (``mock_domain`` is its first 12 bytes)."""

    __test__ = False

    FORMAT: ClassVar[struct.Struct] = _FOUR_U32
    MIN_SIZE: ClassVar[int] = 16
    LAYOUT: ClassVar[Any] = IOMMU_TEST_MOCK_DOMAIN_LAYOUT

    out_stdev_id: int = 0
    out_hwpt_id: int = 0
    out_idev_id: int = 0
    dev_flags: int = 0


@dataclass(frozen=True, slots=True)
class TestMockDomainReplace(UapiStruct):
    """``iommu_test_cmd.mock_domain_replace``."""

    __test__ = False

    FORMAT: ClassVar[struct.Struct] = _ONE_U32
    MIN_SIZE: ClassVar[int] = 4
    LAYOUT: ClassVar[Any] = IOMMU_TEST_MOCK_DOMAIN_REPLACE_LAYOUT

    pt_id: int = 0


@dataclass(frozen=True, slots=True)
class TestCheckIotlb(UapiStruct):
    """``iommu_test_cmd.check_iotlb``."""

    __test__ = False

    FORMAT: ClassVar[struct.Struct] = _TWO_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_TEST_CHECK_IOTLB_LAYOUT

    id: int = 0
    iotlb: int = 0


@dataclass(frozen=True, slots=True)
class TestCheckDevCache(UapiStruct):
    """``iommu_test_cmd.check_dev_cache``."""

    __test__ = False

    FORMAT: ClassVar[struct.Struct] = _TWO_U32
    MIN_SIZE: ClassVar[int] = 8
    LAYOUT: ClassVar[Any] = IOMMU_TEST_CHECK_DEV_CACHE_LAYOUT

    id: int = 0
    cache: int = 0


@dataclass(frozen=True, slots=True)
class TestTriggerVevent(UapiStruct):
    """``iommu_test_cmd.trigger_vevent``."""

    __test__ = False

    FORMAT: ClassVar[struct.Struct] = _ONE_U32
    MIN_SIZE: ClassVar[int] = 4
    LAYOUT: ClassVar[Any] = IOMMU_TEST_TRIGGER_VEVENT_LAYOUT

    dev_id: int = 0


@dataclass(frozen=True, slots=True)
class TestTriggerIopf(UapiStruct):
    """``iommu_test_cmd.trigger_iopf``."""

    __test__ = False

    FORMAT: ClassVar[struct.Struct] = _TRIGGER_IOPF
    MIN_SIZE: ClassVar[int] = 24
    LAYOUT: ClassVar[Any] = IOMMU_TEST_TRIGGER_IOPF_LAYOUT

    dev_id: int = 0
    pasid: int = 0
    grpid: int = 0
    perm: int = 0
    addr: int = 0


STRUCTS: tuple[type[UapiStruct], ...] = (
    Destroy,
    IoasAlloc,
    GetHwInfo,
    HwptAlloc,
    ViommuAlloc,
    VdeviceAlloc,
    HwptInvalidate,
    HwptArmSmmuv3,
    ViommuArmSmmuv3Invalidate,
    HwptVtdS1,
    HwptVtdS1Invalidate,
    VfioDeviceBindIommufd,
    VfioDeviceAttachIommufdPt,
    VfioDeviceDetachIommufdPt,
    IoasMap,
    IoasMapFile,
    IoasUnmap,
    VeventqAlloc,
    HwQueueAlloc,
    FaultQueueAlloc,
    TestCmd,
    HwInfoVtd,
    HwInfoArmSmmuv3,
    HwInfoSelftest,
    HwptSelftest,
    HwptInvalidateSelftest,
    ViommuInvalidateSelftest,
    ViommuSelftest,
    VeventHeader,
    VeventSelftest,
    VeventArmSmmuv3,
    HwptPgfault,
    HwptPageResponse,
    TestMockDomain,
    TestMockDomainReplace,
    TestCheckIotlb,
    TestCheckDevCache,
    TestTriggerVevent,
    TestTriggerIopf,
)

# --------------------------------------------------------------------------------------
# encode / decode
# --------------------------------------------------------------------------------------

T = TypeVar("T", bound=UapiStruct)

_GETTERS: dict[type[UapiStruct], Callable[[Any], Any]] = {}


def _getter(cls: type[UapiStruct]) -> Callable[[Any], Any]:
    getter = _GETTERS.get(cls)
    if getter is None:
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        single = operator.attrgetter(names[0])
        getter = operator.attrgetter(*names) if len(names) > 1 else lambda o: (single(o),)
        _GETTERS[cls] = getter
    return getter


def encode(obj: UapiStruct) -> bytearray:
    """Pack ``obj`` into a new ``bytearray`` of the full kernel structure size."""
    cls = type(obj)
    return bytearray(cls.FORMAT.pack(*_getter(cls)(obj)))


def decode(cls: type[T], buf: bytes | bytearray | memoryview) -> T:
    """Unpack ``cls`` from ``buf``: reads ``min(len(buf), size)`` bytes, zero-filling the rest."""
    fmt = cls.FORMAT
    if len(buf) >= fmt.size:
        return cls(*fmt.unpack_from(buf))
    return cls(*fmt.unpack(bytes(buf) + bytes(fmt.size - len(buf))))


def field_names(cls: type[UapiStruct]) -> tuple[str, ...]:
    """The dataclass field names of ``cls`` in layout order."""
    return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
