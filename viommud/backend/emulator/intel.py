"""The Intel VT-d driver behind the emulated iommufd (reference §4).

Mirrors ``drivers/iommu/intel/nested.c`` (``intel_iommu_domain_alloc_nested`` and
``intel_nested_cache_invalidate_user``) with the GET_HW_INFO of ``intel/iommu.c``; there
is no vIOMMU, nested HWPTs sit directly on a nesting parent. The hooks for the cache model
play the flushes ``intel/cache.c`` and ``intel/pasid.c`` make on their own (PASID-entry
teardown at attach, ``cache_tag_flush_range`` at unmap).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import ClassVar

from protocols import iommufd as uapi
from protocols.models import HostIommu
from protocols.vtd import (
    IOMMU_VTD_INV_FLAGS_LEAF,
    IOMMU_VTD_S1_EAFE,
    IOMMU_VTD_S1_SRE,
    VTD_INV_ALL_PAGES,
)
from viommud.backend.emulator.caches import vtd_psi_mask
from viommud.backend.emulator.driver import IommuDriver, IommufdCore
from viommud.backend.emulator.objects import (
    DeviceObject,
    HwptNestedObject,
    HwptPagingObject,
    IommufdObject,
)
from viommud.backend.emulator.usercopy import (
    ENOERR,
    PAGE_SIZE,
    IoctlError,
    UserArray,
    UserData,
    copy_array_entry,
    copy_data_from_user,
)
from viommud.host import PhysicalDevice

__all__ = ["VTD_CAP_MAMV", "VTD_HW_INFO", "IntelVtdDriver", "VtdFlush", "nested_setup_errno"]

# GET_HW_INFO register values of the emulated units (see NOTES in kernel.py)
VTD_CAP_MAMV = 18
VTD_HW_INFO = uapi.HwInfoVtd(
    flags=0,
    # ND=64K domains, SAGAW 4-level, MGAW 48, SLLPS 2M/1G, PSI, MAMV, DWD, DRD, FL1GP
    cap_reg=6
    | (0x4 << 8)
    | (47 << 16)
    | (0x3 << 34)
    | (1 << 39)
    | (VTD_CAP_MAMV << 48)
    | (1 << 54)
    | (1 << 55)
    | (1 << 56),
    # C QI DT IR EIM PT SC NEST PSS=19 PASID SMTS SLTS FLTS SMPWCS
    ecap_reg=1
    | (1 << 1)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 6)
    | (1 << 7)
    | (1 << 26)
    | (19 << 35)
    | (1 << 40)
    | (1 << 43)
    | (1 << 46)
    | (1 << 47)
    | (1 << 48),
)


# Register bits the nested path reads (Linux include/linux/intel-iommu.h / intel/iommu.h)
ECAP_NEST = 1 << 26  # ecap_nest: nested translation (nested_supported)
ECAP_SRS = 1 << 31  # ecap_srs: supervisor requests
ECAP_EAFS = 1 << 34  # ecap_eafs: extended accessed flag
CAP_FL5LP = 1 << 60  # cap_fl5lp_support: 5-level first stage
ADDR_WIDTH_4LEVEL = 48
ADDR_WIDTH_5LEVEL = 57


def nested_setup_errno(s1: uapi.HwptVtdS1, hw: uapi.HwInfoVtd) -> int:
    """The checks ``intel_pasid_setup_nested`` makes on the stage-1 configuration when a
    device attaches to a nested domain, in the kernel's order; ENOERR if it passes.

    * ``addr_width`` 48 (4-level), or 57 with CAP.FL5LP; anything else: EINVAL;
    * ``IOMMU_VTD_S1_SRE`` without ECAP.SRS: EINVAL;
    * ``IOMMU_VTD_S1_EAFE`` without ECAP.EAFS: EINVAL.

    Nothing else is checked: unknown flag bits and ``__reserved`` are neither refused at
    allocation nor at attach, and WPE is used only together with SRE."""
    if s1.addr_width == ADDR_WIDTH_5LEVEL:
        if not hw.cap_reg & CAP_FL5LP:
            return errno.EINVAL
    elif s1.addr_width != ADDR_WIDTH_4LEVEL:
        return errno.EINVAL
    if s1.flags & IOMMU_VTD_S1_SRE and not hw.ecap_reg & ECAP_SRS:
        return errno.EINVAL
    if s1.flags & IOMMU_VTD_S1_EAFE and not hw.ecap_reg & ECAP_EAFS:
        return errno.EINVAL
    return ENOERR


@dataclass(frozen=True, slots=True)
class VtdFlush:
    """One VT-d stage-1 invalidation that was carried out (§4.2, §4.3)."""

    hwpt_id: int
    addr: int
    npages: int
    leaf: bool
    iommus: tuple[str, ...]  # physical units of the devices attached at that moment


class IntelVtdDriver(IommuDriver):
    """intel-iommu nesting (§4): nested HWPTs directly on a nest parent; no vIOMMU."""

    model: ClassVar[str] = HostIommu.INTEL_VTD
    has_domain_alloc_nested: ClassVar[bool] = True
    regs: ClassVar[uapi.HwInfoVtd] = VTD_HW_INFO  # every emulated unit's CAP / ECAP

    def hw_info(self, core: IommufdCore, dev: DeviceObject, in_type: int) -> tuple[int, bytes]:
        if in_type not in (uapi.IOMMU_HW_INFO_TYPE_NONE, uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD):
            raise IoctlError(errno.EOPNOTSUPP)
        return uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD, bytes(uapi.encode(self.regs))

    def domain_alloc_nested(
        self,
        core: IommufdCore,
        dev: DeviceObject,
        parent: HwptPagingObject,
        flags: int,
        data: UserData,
    ) -> uapi.HwptVtdS1:
        # intel_iommu_domain_alloc_nested (§4.1)
        if not self.regs.ecap_reg & ECAP_NEST:
            raise IoctlError(errno.EOPNOTSUPP)  # nested_supported()
        if flags & ~uapi.IOMMU_HWPT_ALLOC_PASID:
            raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - the core refuses first
        if data.type != uapi.IOMMU_HWPT_DATA_VTD_S1:
            raise IoctlError(errno.EOPNOTSUPP)
        if not parent.nest_parent or parent.model != HostIommu.INTEL_VTD:
            raise IoctlError(errno.EINVAL)  # pragma: no cover - the core refuses first
        return copy_data_from_user(
            core.memory, uapi.HwptVtdS1, data, uapi.IOMMU_HWPT_DATA_VTD_S1, 24
        )

    def paging_compatible(self, hwpt: HwptPagingObject, pdev: PhysicalDevice) -> bool:
        return True  # identical emulated units: any VT-d domain fits any VT-d device

    def attach_nested(self, core: IommufdCore, dev: DeviceObject, hwpt: HwptNestedObject) -> int:
        # intel_nested_attach_dev: the width check against the parent's AGAW and
        # paging_domain_compatible always pass between identical units; then
        # intel_pasid_setup_nested checks the stage-1 configuration. On failure the core
        # puts the device back where it was (iommu_group_replace_domain).
        assert isinstance(hwpt.data, uapi.HwptVtdS1)
        return nested_setup_errno(hwpt.data, self.regs)

    def hwpt_cache_invalidate(
        self, core: IommufdCore, hwpt: HwptNestedObject, array: UserArray
    ) -> tuple[int, int]:
        """``intel_nested_cache_invalidate_user`` (§4.2): entry by entry."""
        if array.type != uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1:
            return errno.EINVAL, 0
        done = 0
        for index in range(array.entry_num):
            try:
                inv = copy_array_entry(
                    core.memory,
                    uapi.HwptVtdS1Invalidate,
                    array,
                    uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                    index=index,
                    min_len=24,
                )
            except IoctlError as exc:
                return exc.errno, done
            if inv.flags & ~IOMMU_VTD_INV_FLAGS_LEAF or inv.reserved:
                return errno.EOPNOTSUPP, done
            if inv.addr % PAGE_SIZE or (inv.npages == VTD_INV_ALL_PAGES and inv.addr):
                return errno.EINVAL, done
            unit = core.unit(hwpt.iommu)
            if unit.faults:
                err = unit.entry_fault(bytes(uapi.encode(inv)), "entry")
                if err:
                    return err, done  # injected: refused as a bad entry would be
            core.record_vtd_flush(hwpt, inv)
            done += 1
        return ENOERR, done

    # -- cache model hooks ---------------------------------------------------------------------
    def ats_enabled(self, dev: DeviceObject, hwpt: IommufdObject | None) -> bool:
        return dev.pdev.ats and hwpt is not None

    def dma_tags(
        self, core: IommufdCore, dev: DeviceObject, hwpt: IommufdObject, asid: int
    ) -> tuple[int, int | None]:
        did = core.unit(dev.pdev.iommu).did(hwpt.id)
        if isinstance(hwpt, HwptNestedObject):
            return did, 0  # first-stage (nested) entries of the RID's PASID 0
        return did, None

    def attach_changed(
        self, core: IommufdCore, dev: DeviceObject, old: IommufdObject | None
    ) -> None:
        # intel_pasid_tear_down_entry / replace: PASID cache, IOTLB DSI, full device TLB
        if old is None:
            return  # a first attach with CM=0 only flushes the write buffer
        unit = dev.pdev.iommu
        sid = dev.pdev.sid
        core.cache_model.vtd_pasid_cache(unit, sid, 0, "kernel:attach PASID-cache")
        old_did = core.unit(unit).dids.get(old.id)
        if old_did is not None:
            core.cache_model.vtd_iotlb_dsi(unit, old_did, "kernel:attach IOTLB-DSI")
        core.cache_model.vtd_devtlb(dev.pdev.id, 0, None, "kernel:attach DEVTLB")

    def unmap_flush(self, core: IommufdCore, hwpt: HwptPagingObject, first: int, last: int) -> None:
        # cache_tag_flush_range on the parent: IOTLB / NESTING_IOTLB / DEVTLB / NESTING_DEVTLB
        addr, am = vtd_psi_mask(first, last)
        direct, nested = core.attached_devices(hwpt)
        users = {dev.pdev.iommu: dev for dev in direct}
        for unit in sorted(users):
            did = core.unit(unit).dids.get(hwpt.id)
            if did is None:  # pragma: no cover - an attached device's unit has a DID
                continue
            if am is None or am > VTD_CAP_MAMV:
                core.cache_model.vtd_iotlb_dsi(unit, did, "kernel:IOAS_UNMAP IOTLB-DSI")
            else:
                core.cache_model.vtd_iotlb_psi(
                    unit, did, addr=addr, am=am, ih=False, cause="kernel:IOAS_UNMAP IOTLB-PSI"
                )
        for dev in nested:
            did = core.unit(dev.pdev.iommu).dids.get(dev.hwpt_id)
            if did is not None:
                core.cache_model.vtd_iotlb_dsi(
                    dev.pdev.iommu, did, "kernel:IOAS_UNMAP NESTING-IOTLB"
                )
        for dev in direct:
            if self.ats_enabled(dev, hwpt):
                core.cache_model.vtd_devtlb(dev.pdev.id, addr, am, "kernel:IOAS_UNMAP DEVTLB")
        for dev in nested:
            if self.ats_enabled(dev, hwpt):
                core.cache_model.vtd_devtlb(
                    dev.pdev.id, 0, None, "kernel:IOAS_UNMAP NESTING-DEVTLB"
                )
