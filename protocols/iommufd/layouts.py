"""The iommufd uAPI structures declared with construct: the readable specification."""

from __future__ import annotations

from construct import Bytes, Int8ul, Int32sl, Int32ul, Int64ul, Padding, Struct

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

IOMMU_IOAS_MAP_FILE_LAYOUT = (
    Struct(
        "size" / Int32ul,
        "flags" / Int32ul * "FIXED_IOVA | WRITEABLE | READABLE; others EOPNOTSUPP",
        "ioas_id" / Int32ul,
        "fd" / Int32sl * "the file to map (a memfd: shmem or hugetlbfs)",
        "start" / Int64ul * "byte offset in the file of the first byte mapped",
        "length" / Int64ul,
        "iova" / Int64ul * "in with FIXED_IOVA; out: the IOVA chosen",
    )
    * "struct iommu_ioas_map_file, 40 bytes, min_size 40 (include/uapi/linux/iommufd.h)"
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
