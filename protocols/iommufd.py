"""The Linux iommufd uAPI (``/dev/iommu``) and the VFIO cdev calls that feed it, declared.

Reference: the Linux iommufd uAPI (``include/uapi/linux/iommufd.h``, ``drivers/iommu/iommufd/``);
the "iommufd.md §n" numbering is listed in docs/backend.md.

Every structure is declared twice and a test proves both agree:

* a construct ``Struct`` (``*_LAYOUT``), the readable specification with the reference
  section in its doc string. Reserved fields the kernel never reads are ``Padding``; reserved
  fields the kernel checks (and answers EOPNOTSUPP for) are named fields, because their
  value matters;
* a frozen, slotted dataclass with the same field names (``__reserved`` becomes
  ``reserved``, ``__reserved2`` becomes ``reserved2``; ``ste[2]`` / ``cmd[2]`` become
  ``ste0``/``ste1`` and ``cmd0``/``cmd1``), a ``FORMAT`` (``struct.Struct``) for the fast
  path, ``MIN_SIZE`` (the kernel's minimum user size) and ``PADDING`` (the dataclass fields
  the construct declaration treats as ``Padding``). Every field has a default; ``size`` /
  ``argsz`` default to the full structure size.

``encode(obj)`` and ``decode(cls, buf)`` convert between dataclasses and packed bytes; no
construct ``Container`` leaves this module.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from construct import Bytes, Int8ul, Int32sl, Int32ul, Int64ul, Padding, Struct

__all__ = [
    "INVALIDATE_DATA_NAMES",
    "IOCTL_NAMES",
    "STRUCTS",
    "Destroy",
    "FaultQueueAlloc",
    "GetHwInfo",
    "HwInfoArmSmmuv3",
    "HwInfoSelftest",
    "HwInfoVtd",
    "HwQueueAlloc",
    "HwptAlloc",
    "HwptArmSmmuv3",
    "HwptInvalidate",
    "HwptInvalidateSelftest",
    "HwptPageResponse",
    "HwptPgfault",
    "HwptSelftest",
    "HwptVtdS1",
    "HwptVtdS1Invalidate",
    "IoasAlloc",
    "IoasMap",
    "IoasUnmap",
    "TestCheckDevCache",
    "TestCheckIotlb",
    "TestCmd",
    "TestMockDomain",
    "TestMockDomainReplace",
    "TestTriggerIopf",
    "TestTriggerVevent",
    "UapiStruct",
    "VdeviceAlloc",
    "VeventArmSmmuv3",
    "VeventHeader",
    "VeventSelftest",
    "VeventqAlloc",
    "VfioDeviceAttachIommufdPt",
    "VfioDeviceBindIommufd",
    "VfioDeviceDetachIommufdPt",
    "ViommuAlloc",
    "ViommuArmSmmuv3Invalidate",
    "ViommuInvalidateSelftest",
    "ViommuSelftest",
    "decode",
    "encode",
]

# --------------------------------------------------------------------------------------
# ioctl request numbers (iommufd.md §0.1): _IO(';', nr) == 0x3B00 | nr
# --------------------------------------------------------------------------------------

IOMMUFD_TYPE = 0x3B

IOMMU_DESTROY = 0x3B80
IOMMU_IOAS_ALLOC = 0x3B81
IOMMU_IOAS_ALLOW_IOVAS = 0x3B82
IOMMU_IOAS_COPY = 0x3B83
IOMMU_IOAS_IOVA_RANGES = 0x3B84
IOMMU_IOAS_MAP = 0x3B85
IOMMU_IOAS_UNMAP = 0x3B86
IOMMU_OPTION = 0x3B87
IOMMU_VFIO_IOAS = 0x3B88
IOMMU_HWPT_ALLOC = 0x3B89
IOMMU_GET_HW_INFO = 0x3B8A
IOMMU_HWPT_SET_DIRTY_TRACKING = 0x3B8B
IOMMU_HWPT_GET_DIRTY_BITMAP = 0x3B8C
IOMMU_HWPT_INVALIDATE = 0x3B8D
IOMMU_FAULT_QUEUE_ALLOC = 0x3B8E
IOMMU_IOAS_MAP_FILE = 0x3B8F
IOMMU_VIOMMU_ALLOC = 0x3B90
IOMMU_VDEVICE_ALLOC = 0x3B91
IOMMU_IOAS_CHANGE_PROCESS = 0x3B92
IOMMU_VEVENTQ_ALLOC = 0x3B93
IOMMU_HW_QUEUE_ALLOC = 0x3B94
IOMMU_TEST_CMD = 0x3BA0  # only with CONFIG_IOMMUFD_TEST

# VFIO cdev ioctls (include/uapi/linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + 18..20)).
VFIO_DEVICE_BIND_IOMMUFD = 0x3B76
VFIO_DEVICE_ATTACH_IOMMUFD_PT = 0x3B77
VFIO_DEVICE_DETACH_IOMMUFD_PT = 0x3B78

IOCTL_NAMES: dict[int, str] = {
    IOMMU_DESTROY: "IOMMU_DESTROY",
    IOMMU_IOAS_ALLOC: "IOMMU_IOAS_ALLOC",
    IOMMU_IOAS_ALLOW_IOVAS: "IOMMU_IOAS_ALLOW_IOVAS",
    IOMMU_IOAS_COPY: "IOMMU_IOAS_COPY",
    IOMMU_IOAS_IOVA_RANGES: "IOMMU_IOAS_IOVA_RANGES",
    IOMMU_IOAS_MAP: "IOMMU_IOAS_MAP",
    IOMMU_IOAS_UNMAP: "IOMMU_IOAS_UNMAP",
    IOMMU_OPTION: "IOMMU_OPTION",
    IOMMU_VFIO_IOAS: "IOMMU_VFIO_IOAS",
    IOMMU_HWPT_ALLOC: "IOMMU_HWPT_ALLOC",
    IOMMU_GET_HW_INFO: "IOMMU_GET_HW_INFO",
    IOMMU_HWPT_SET_DIRTY_TRACKING: "IOMMU_HWPT_SET_DIRTY_TRACKING",
    IOMMU_HWPT_GET_DIRTY_BITMAP: "IOMMU_HWPT_GET_DIRTY_BITMAP",
    IOMMU_HWPT_INVALIDATE: "IOMMU_HWPT_INVALIDATE",
    IOMMU_FAULT_QUEUE_ALLOC: "IOMMU_FAULT_QUEUE_ALLOC",
    IOMMU_IOAS_MAP_FILE: "IOMMU_IOAS_MAP_FILE",
    IOMMU_VIOMMU_ALLOC: "IOMMU_VIOMMU_ALLOC",
    IOMMU_VDEVICE_ALLOC: "IOMMU_VDEVICE_ALLOC",
    IOMMU_IOAS_CHANGE_PROCESS: "IOMMU_IOAS_CHANGE_PROCESS",
    IOMMU_VEVENTQ_ALLOC: "IOMMU_VEVENTQ_ALLOC",
    IOMMU_HW_QUEUE_ALLOC: "IOMMU_HW_QUEUE_ALLOC",
    IOMMU_TEST_CMD: "IOMMU_TEST_CMD",
    VFIO_DEVICE_BIND_IOMMUFD: "VFIO_DEVICE_BIND_IOMMUFD",
    VFIO_DEVICE_ATTACH_IOMMUFD_PT: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    VFIO_DEVICE_DETACH_IOMMUFD_PT: "VFIO_DEVICE_DETACH_IOMMUFD_PT",
}

# --------------------------------------------------------------------------------------
# Flags and type values
# --------------------------------------------------------------------------------------

# IOMMU_HWPT_ALLOC flags (iommufd.md §1.4)
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3

# enum iommu_hwpt_data_type (iommufd.md §1.4, §1.5)
IOMMU_HWPT_DATA_NONE = 0
IOMMU_HWPT_DATA_VTD_S1 = 1
IOMMU_HWPT_DATA_ARM_SMMUV3 = 2
IOMMU_HWPT_DATA_AMD_GUEST = 3
IOMMU_HWPT_DATA_SELFTEST = 0xDEAD

# enum iommu_viommu_type (iommufd.md §1.6)
IOMMU_VIOMMU_TYPE_DEFAULT = 0
IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1
IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV = 2
IOMMU_VIOMMU_TYPE_SELFTEST = 0xDEADBEEF

# enum iommu_hwpt_invalidate_data_type (iommufd.md §2.1); 0 is a real type (VT-d)
IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0
IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF

INVALIDATE_DATA_NAMES: dict[int, str] = {
    IOMMU_HWPT_INVALIDATE_DATA_VTD_S1: "HWPT_VTD_S1",
    IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3: "VIOMMU_ARM_SMMUV3",
}

# iommu_hwpt_vtd_s1 flags (iommufd.md §1.5) and invalidation flags (§4.2)
IOMMU_VTD_S1_SRE = 1 << 0
IOMMU_VTD_S1_EAFE = 1 << 1
IOMMU_VTD_S1_WPE = 1 << 2
IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0

# enum iommu_hw_info_type (iommufd.md §1.3)
IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2
IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = 3
IOMMU_HW_INFO_FLAG_INPUT_TYPE = 1 << 0

IOMMU_HW_INFO_TYPE_AMD = 4
IOMMU_HW_INFO_TYPE_SELFTEST = 0xFEEDBEEF  # iommufd_test.h
IOMMU_HW_INFO_SELFTEST_REGVAL = 0xDEADBEEF
# out_capabilities (iommufd.md §1.3)
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1
IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2

# IOMMU_IOAS_MAP flags (include/uapi/linux/iommufd.h)
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# vEVENTQ (iommufd.md §1.8)
IOMMU_VEVENTQ_TYPE_DEFAULT = 0
IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = 1
IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV = 2
IOMMU_VEVENTQ_TYPE_SELFTEST = 0xBEEFBEEF
IOMMU_VEVENTQ_FLAG_LOST_EVENTS = 1 << 0

# HW queues (iommufd.md §1.9)
IOMMU_HW_QUEUE_TYPE_DEFAULT = 0
IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV = 1
IOMMU_HW_QUEUE_TYPE_SELFTEST = 0xDEADBEEF
IOMMU_TEST_HW_QUEUE_MAX = 2

# FAULT queue records (iommufd.md §1.10)
IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0
IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1
IOMMU_PGFAULT_PERM_READ = 1 << 0
IOMMU_PGFAULT_PERM_WRITE = 1 << 1
IOMMU_PGFAULT_PERM_EXEC = 1 << 2
IOMMU_PGFAULT_PERM_PRIV = 1 << 3
IOMMUFD_PAGE_RESP_SUCCESS = 0
IOMMUFD_PAGE_RESP_INVALID = 1

# The selftest mock driver (drivers/iommu/iommufd/iommufd_test.h, iommufd.md §5.1)
IOMMU_TEST_OP_ADD_RESERVED = 1
IOMMU_TEST_OP_MOCK_DOMAIN = 2
IOMMU_TEST_OP_MD_CHECK_MAP = 3
IOMMU_TEST_OP_MD_CHECK_REFS = 4
IOMMU_TEST_OP_CREATE_ACCESS = 5
IOMMU_TEST_OP_DESTROY_ACCESS_PAGES = 6
IOMMU_TEST_OP_ACCESS_PAGES = 7
IOMMU_TEST_OP_ACCESS_RW = 8
IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT = 9
IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE = 10
IOMMU_TEST_OP_ACCESS_REPLACE_IOAS = 11
IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS = 12
IOMMU_TEST_OP_DIRTY = 13
IOMMU_TEST_OP_MD_CHECK_IOTLB = 14
IOMMU_TEST_OP_TRIGGER_IOPF = 15
IOMMU_TEST_OP_DEV_CHECK_CACHE = 16
IOMMU_TEST_OP_TRIGGER_VEVENT = 17
IOMMU_TEST_OP_PASID_ATTACH = 18
IOMMU_TEST_OP_PASID_REPLACE = 19
IOMMU_TEST_OP_PASID_DETACH = 20
IOMMU_TEST_OP_PASID_CHECK_HWPT = 21
MOCK_FLAGS_DEVICE_NO_DIRTY = 1 << 0
MOCK_FLAGS_DEVICE_HUGE_IOVA = 1 << 1
MOCK_FLAGS_DEVICE_PASID = 1 << 2
MOCK_NESTED_DOMAIN_IOTLB_ID_MAX = 3
MOCK_NESTED_DOMAIN_IOTLB_NUM = 4
MOCK_DEV_CACHE_ID_MAX = 3
MOCK_DEV_CACHE_NUM = 4
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1
IOMMU_TEST_IOTLB_DEFAULT = 0xBADBEEF
IOMMU_TEST_DEV_CACHE_DEFAULT = 0xBADDAD
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_TEST_INVALIDATE_FLAG_ALL = 1 << 0

# VFIO cdev flags
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0

# --------------------------------------------------------------------------------------
# construct declarations (the readable specification)
# --------------------------------------------------------------------------------------

IOMMU_DESTROY_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "id" / Int32ul,
    )
    * "struct iommu_destroy, 8 bytes, min_size 8 (iommufd.md §1.1)"
)

IOMMU_IOAS_ALLOC_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "must be 0, else EOPNOTSUPP",
        "out_ioas_id" / Int32ul,
    )
    * "struct iommu_ioas_alloc, 12 bytes, min_size 12 (iommufd.md §1.2)"
)

IOMMU_IOAS_MAP_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "FIXED_IOVA | WRITEABLE | READABLE; others EOPNOTSUPP",
        "ioas_id" / Int32ul,
        "reserved" / Int32ul * "__reserved: non-zero gives EOPNOTSUPP",
        "user_va" / Int64ul * "process virtual address of the memory to map",
        "length" / Int64ul,
        "iova" / Int64ul * "in with FIXED_IOVA; out: the IOVA chosen",
    )
    * "struct iommu_ioas_map, 40 bytes, min_size 40 (include/uapi/linux/iommufd.h)"
)

IOMMU_IOAS_UNMAP_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "ioas_id" / Int32ul,
        "iova" / Int64ul * "iova 0 with length U64_MAX unmaps everything",
        "length" / Int64ul * "in: bytes to unmap; out: bytes unmapped",
    )
    * "struct iommu_ioas_unmap, 24 bytes, min_size 24 (include/uapi/linux/iommufd.h)"
)

IOMMU_VEVENTQ_ALLOC_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "must be 0",
        "viommu_id" / Int32ul,
        "type" / Int32ul * "enum iommu_veventq_type",
        "veventq_depth" / Int32ul,
        "out_veventq_id" / Int32ul,
        "out_veventq_fd" / Int32ul,
        "reserved" / Int32ul * "__reserved: non-zero gives EOPNOTSUPP",
    )
    * "struct iommu_veventq_alloc, 32 bytes, min_size 28 (iommufd.md §1.8)"
)

IOMMU_HW_QUEUE_ALLOC_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "must be 0",
        "viommu_id" / Int32ul,
        "type" / Int32ul * "enum iommu_hw_queue_type",
        "index" / Int32ul,
        "out_hw_queue_id" / Int32ul,
        "nesting_parent_iova" / Int64ul * "guest PA of the queue, mapped in the IOAS",
        "length" / Int64ul,
    )
    * "struct iommu_hw_queue_alloc, 40 bytes, min_size 40 (iommufd.md §1.9)"
)

IOMMU_FAULT_QUEUE_ALLOC_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "must be 0, else EOPNOTSUPP",
        "out_fault_id" / Int32ul,
        "out_fault_fd" / Int32ul,
    )
    * "struct iommu_fault_alloc, 16 bytes, min_size 16 (iommufd.md §1.10)"
)

IOMMU_TEST_CMD_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "op" / Int32ul * "IOMMU_TEST_OP_*",
        "id" / Int32ul,
        "reserved" / Int32ul * "__reserved",
        "payload" / Bytes(48) * "the per-op union (largest member: dirty, 48 bytes)",
        "last" / Int32ul,
        Padding(4) * "alignment of the union's u64 members",
    )
    * "struct iommu_test_cmd, 72 bytes, min_size 68 (iommufd_test.h, iommufd.md §5.1)"
)

IOMMU_HW_INFO_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "bit0 IOMMU_HW_INFO_FLAG_INPUT_TYPE",
        "dev_id" / Int32ul,
        "data_len" / Int32ul * "in: buffer length; out: length the kernel has",
        "data_uptr" / Int64ul,
        "data_type" / Int32ul * "union in_data_type / out_data_type",
        "out_max_pasid_log2" / Int8ul,
        "reserved" / Bytes(3) * "__reserved[3]",
        "out_capabilities" / Int64ul,
    )
    * "struct iommu_hw_info, 40 bytes, min_size 32 (iommufd.md §1.3)"
)

IOMMU_HWPT_ALLOC_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "NEST_PARENT | DIRTY_TRACKING | FAULT_ID_VALID | ALLOC_PASID",
        "dev_id" / Int32ul,
        "pt_id" / Int32ul * "IOAS, HWPT_PAGING or VIOMMU id",
        "out_hwpt_id" / Int32ul,
        "reserved" / Int32ul * "__reserved: non-zero gives EOPNOTSUPP",
        "data_type" / Int32ul * "enum iommu_hwpt_data_type",
        "data_len" / Int32ul,
        "data_uptr" / Int64ul,
        "fault_id" / Int32ul * "used only with IOMMU_HWPT_FAULT_ID_VALID",
        Padding(4) * "__reserved2: not checked by the kernel",
    )
    * "struct iommu_hwpt_alloc, 48 bytes, min_size 24 (iommufd.md §1.4)"
)

IOMMU_VIOMMU_ALLOC_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "must be 0",
        "type" / Int32ul * "enum iommu_viommu_type",
        "dev_id" / Int32ul,
        "hwpt_id" / Int32ul * "nesting-parent HWPT_PAGING",
        "out_viommu_id" / Int32ul,
        "data_len" / Int32ul,
        Padding(4) * "__reserved: not checked by the kernel",
        "data_uptr" / Int64ul,
    )
    * "struct iommu_viommu_alloc, 40 bytes, min_size 24 (iommufd.md §1.6)"
)

IOMMU_VDEVICE_ALLOC_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "viommu_id" / Int32ul,
        "dev_id" / Int32ul,
        "out_vdevice_id" / Int32ul,
        "virt_id" / Int64ul * "vSID (SMMUv3), vDeviceID (AMD), vRID (VT-d)",
    )
    * "struct iommu_vdevice_alloc, 24 bytes, min_size 24 (iommufd.md §1.7)"
)

IOMMU_HWPT_INVALIDATE_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "hwpt_id" / Int32ul * "a nested HWPT id or a vIOMMU id",
        "data_uptr" / Int64ul,
        "data_type" / Int32ul * "enum iommu_hwpt_invalidate_data_type",
        "entry_len" / Int32ul,
        "entry_num" / Int32ul * "in: entries; out: entries handled",
        "reserved" / Int32ul * "__reserved: non-zero gives EOPNOTSUPP",
    )
    * "struct iommu_hwpt_invalidate, 32 bytes, min_size 32 (iommufd.md §2.1)"
)

IOMMU_HWPT_ARM_SMMUV3_LAYOUT = (
    Struct(
        "ste0" / Int64ul * "ste[0]: the guest STE word 0",
        "ste1" / Int64ul * "ste[1]: the guest STE word 1",
    )
    * "struct iommu_hwpt_arm_smmuv3, 16 bytes (iommufd.md §1.5, §3.1)"
)

IOMMU_VIOMMU_ARM_SMMUV3_INVALIDATE_LAYOUT = (
    Struct(
        "cmd0" / Int64ul * "cmd[0]: command word 0 (opcode in bits 7:0)",
        "cmd1" / Int64ul * "cmd[1]: command word 1",
    )
    * "struct iommu_viommu_arm_smmuv3_invalidate, 16 bytes (iommufd.md §2.1, §3.3)"
)

IOMMU_HWPT_VTD_S1_LAYOUT = (
    Struct(
        "flags" / Int64ul * "bit0 SRE, bit1 EAFE, bit2 WPE",
        "pgtbl_addr" / Int64ul * "guest stage-1 root (GPA)",
        "addr_width" / Int32ul,
        "reserved" / Int32ul * "__reserved: not checked at allocation, maybe at attach",
    )
    * "struct iommu_hwpt_vtd_s1, 24 bytes, min_len 24 (iommufd.md §1.5, §4.1)"
)

IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT = (
    Struct(
        "addr" / Int64ul * "start, 4 KiB aligned",
        "npages" / Int64ul * "4 KiB pages; U64_MAX = everything",
        "flags" / Int32ul * "bit0 IOMMU_VTD_INV_FLAGS_LEAF",
        "reserved" / Int32ul * "__reserved: non-zero gives EOPNOTSUPP",
    )
    * "struct iommu_hwpt_vtd_s1_invalidate, 24 bytes (iommufd.md §4.2)"
)

IOMMU_HW_INFO_VTD_LAYOUT = (
    Struct(
        "flags" / Int32ul * "bit0 IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17",
        "reserved" / Int32ul * "__reserved",
        "cap_reg" / Int64ul,
        "ecap_reg" / Int64ul,
    )
    * "struct iommu_hw_info_vtd, 24 bytes (iommufd.md §1.3)"
)

IOMMU_HW_INFO_ARM_SMMUV3_LAYOUT = (
    Struct(
        "flags" / Int32ul,
        "reserved" / Int32ul * "__reserved",
        "idr0" / Int32ul,
        "idr1" / Int32ul,
        "idr2" / Int32ul,
        "idr3" / Int32ul,
        "idr4" / Int32ul,
        "idr5" / Int32ul,
        "iidr" / Int32ul,
        "aidr" / Int32ul,
    )
    * "struct iommu_hw_info_arm_smmuv3, 40 bytes (iommufd.md §1.3)"
)

IOMMU_TEST_HW_INFO_LAYOUT = (
    Struct(
        "flags" / Int32ul,
        "test_reg" / Int32ul * "IOMMU_HW_INFO_SELFTEST_REGVAL",
    )
    * "struct iommu_test_hw_info, 8 bytes (iommufd_test.h)"
)

IOMMU_HWPT_SELFTEST_LAYOUT = (
    Struct("iotlb" / Int32ul * "initial value of the 4 mock IOTLB entries")
    * "struct iommu_hwpt_selftest, 4 bytes, min_len 4 (iommufd.md §1.5)"
)

IOMMU_HWPT_INVALIDATE_SELFTEST_LAYOUT = (
    Struct(
        "flags" / Int32ul * "bit0 IOMMU_TEST_INVALIDATE_FLAG_ALL",
        "iotlb_id" / Int32ul,
    )
    * "struct iommu_hwpt_invalidate_selftest, 8 bytes, min_len 8 (iommufd.md §5.1)"
)

IOMMU_VIOMMU_INVALIDATE_SELFTEST_LAYOUT = (
    Struct(
        "flags" / Int32ul * "bit0 IOMMU_TEST_INVALIDATE_FLAG_ALL",
        "vdev_id" / Int32ul * "a vDEVICE virt_id of the vIOMMU",
        "cache_id" / Int32ul,
    )
    * "struct iommu_viommu_invalidate_selftest, 12 bytes (iommufd.md §5.1)"
)

IOMMU_VIOMMU_SELFTEST_LAYOUT = (
    Struct(
        "in_data" / Int32ul,
        "out_data" / Int32ul * "written back equal to in_data",
    )
    * "struct iommu_viommu_selftest, 8 bytes (iommufd.md §1.6)"
)

IOMMU_VEVENT_HEADER_LAYOUT = (
    Struct(
        "flags" / Int32ul * "bit0 IOMMU_VEVENTQ_FLAG_LOST_EVENTS",
        "sequence" / Int32ul * "0..INT_MAX, then 0",
    )
    * "struct iommufd_vevent_header, 8 bytes (iommufd.md §1.8)"
)

IOMMU_VEVENT_SELFTEST_LAYOUT = (
    Struct("virt_id" / Int32ul) * "struct iommu_viommu_event_selftest, 4 bytes (iommufd_test.h)"
)

IOMMU_VEVENT_ARM_SMMUV3_LAYOUT = (
    Struct(
        "evt0" / Int64ul * "evt[0]; StreamID [63:32] replaced by the vSID",
        "evt1" / Int64ul,
        "evt2" / Int64ul,
        "evt3" / Int64ul,
    )
    * "struct iommu_vevent_arm_smmuv3, 32 bytes (iommufd.md §1.8)"
)

IOMMU_HWPT_PGFAULT_LAYOUT = (
    Struct(
        "flags" / Int32ul * "bit0 PASID_VALID, bit1 LAST_PAGE",
        "dev_id" / Int32ul,
        "pasid" / Int32ul,
        "grpid" / Int32ul,
        "perm" / Int32ul * "READ 1, WRITE 2, EXEC 4, PRIV 8",
        "reserved" / Int32ul * "__reserved",
        "addr" / Int64ul,
        "length" / Int32ul,
        "cookie" / Int32ul,
    )
    * "struct iommu_hwpt_pgfault, 40 bytes (iommufd.md §1.10)"
)

IOMMU_HWPT_PAGE_RESPONSE_LAYOUT = (
    Struct(
        "cookie" / Int32ul,
        "code" / Int32ul * "0 SUCCESS, 1 INVALID",
    )
    * "struct iommu_hwpt_page_response, 8 bytes (iommufd.md §1.10)"
)

IOMMU_TEST_MOCK_DOMAIN_LAYOUT = (
    Struct(
        "out_stdev_id" / Int32ul,
        "out_hwpt_id" / Int32ul,
        "out_idev_id" / Int32ul,
        "dev_flags" / Int32ul * "only read by IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS",
    )
    * "iommu_test_cmd.mock_domain_flags (iommufd_test.h)"
)

IOMMU_TEST_MOCK_DOMAIN_REPLACE_LAYOUT = (
    Struct("pt_id" / Int32ul) * "iommu_test_cmd.mock_domain_replace (iommufd_test.h)"
)

IOMMU_TEST_CHECK_IOTLB_LAYOUT = (
    Struct("id" / Int32ul, "iotlb" / Int32ul) * "iommu_test_cmd.check_iotlb (iommufd_test.h)"
)

IOMMU_TEST_CHECK_DEV_CACHE_LAYOUT = (
    Struct("id" / Int32ul, "cache" / Int32ul) * "iommu_test_cmd.check_dev_cache (iommufd_test.h)"
)

IOMMU_TEST_TRIGGER_VEVENT_LAYOUT = (
    Struct("dev_id" / Int32ul) * "iommu_test_cmd.trigger_vevent (iommufd_test.h)"
)

IOMMU_TEST_TRIGGER_IOPF_LAYOUT = (
    Struct(
        "dev_id" / Int32ul,
        "pasid" / Int32ul,
        "grpid" / Int32ul,
        "perm" / Int32ul,
        "addr" / Int64ul,
    )
    * "iommu_test_cmd.trigger_iopf (iommufd_test.h)"
)

VFIO_DEVICE_BIND_IOMMUFD_LAYOUT = (
    Struct(
        "argsz" / Int32ul,
        "flags" / Int32ul * "must be 0",
        "iommufd" / Int32sl * "the /dev/iommu fd",
        "out_devid" / Int32ul * "the device's iommufd object id",
    )
    * "struct vfio_device_bind_iommufd, 16 bytes, minsz 16 (include/uapi/linux/vfio.h)"
)

VFIO_DEVICE_ATTACH_IOMMUFD_PT_LAYOUT = (
    Struct(
        "argsz" / Int32ul,
        "flags" / Int32ul * "bit0 VFIO_DEVICE_ATTACH_PASID",
        "pt_id" / Int32ul * "in: IOAS or HWPT id; out: the HWPT attached",
        "pasid" / Int32ul * "read only with VFIO_DEVICE_ATTACH_PASID",
    )
    * "struct vfio_device_attach_iommufd_pt, 16 bytes, minsz 12 (include/uapi/linux/vfio.h)"
)

VFIO_DEVICE_DETACH_IOMMUFD_PT_LAYOUT = (
    Struct(
        "argsz" / Int32ul,
        "flags" / Int32ul * "bit0 VFIO_DEVICE_DETACH_PASID",
        "pasid" / Int32ul * "read only with VFIO_DEVICE_DETACH_PASID",
        Padding(4) * "__reserved: never read by the kernel",
    )
    * "struct vfio_device_detach_iommufd_pt, 16 bytes, minsz 8 (include/uapi/linux/vfio.h)"
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
_VTD_S1 = struct.Struct("<QQII")
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
