"""ATTACH_TABLE descriptors (virtio-iommu.md §5): the guest's table, checked field by field
and reduced to what the host needs (``TableConfig``).

Drafts A/B hand over an SMMUv3 PASID (CD) table, which becomes the two STE words of an
S1-translate nested vSTE (smmuv3.md §3, iommufd.md §3.1), or a VT-d first-stage table
(``iommu_hwpt_vtd_s1``, iommufd.md §1.5); draft C hands over the STE words themselves. A
single Arm LPAE page table cannot be nested by iommufd: UNSUPP.
"""

from __future__ import annotations

from protocols.models import HostIommu
from protocols.virtio_iommu import Status
from protocols.vtd import IOMMU_VTD_S1_FLAGS
from viommud.frontends.virtio.request import Refused
from viommud.guest.virtio import ArmPgtTable, ArmPstTable, ArmSteTable, OpaqueTable, Table
from viommud.virtio_state import TableConfig

__all__ = ["table_config"]

# SMMUv3 STE words for an S1-translate nested vSTE (SMMUv3 §5.2)
STE0_V = 1
STE0_CFG_S1_TRANS = 0b101 << 1
STE0_S1CTXPTR_MASK = ((1 << 52) - 1) & ~0x3F  # bits 51:6
STE1_LINUX_CACHEABILITY = 0xD4  # S1CIR = S1COR = WBRA (1), S1CSH = inner shareable (3)
VTD_ADDR_WIDTHS = frozenset({39, 48, 57})


def table_config(fmt: int, t: Table) -> TableConfig:
    """Field checks of an ATTACH_TABLE descriptor of format ``fmt`` (§5.5): INVAL, or
    UNSUPP for a format no host IOMMU model of this daemon can walk."""
    if isinstance(t, OpaqueTable):
        raise Refused(Status.INVAL, f"unknown table format {fmt}")
    if isinstance(t, ArmPgtTable):
        if any(t.reserved):
            raise Refused(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
        raise Refused(Status.UNSUPP, "single Arm LPAE page tables cannot be nested by iommufd")
    if isinstance(t, ArmPstTable):
        if any(t.reserved):
            raise Refused(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
        if t.s1fmt > 2 or t.s1dss > 2 or t.s1cdmax > 20:
            raise Refused(Status.INVAL, "invalid PASID-table format fields")
        if t.s1contextptr & ~STE0_S1CTXPTR_MASK:
            raise Refused(Status.INVAL, "s1contextptr is not a 64-byte aligned 52-bit address")
        ste0 = STE0_V | STE0_CFG_S1_TRANS | t.s1fmt << 4 | t.s1contextptr | t.s1cdmax << 59
        return TableConfig(HostIommu.ARM_SMMUV3, ste0, STE1_LINUX_CACHEABILITY | t.s1dss)
    if isinstance(t, ArmSteTable):
        if any(t.reserved0) or any(t.reserved):
            raise Refused(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
        if not t.ste0 & STE0_V or (t.ste0 >> 1) & 0x7 != 0b101:
            raise Refused(Status.INVAL, "the STE is not a valid stage-1 translate STE")
        return TableConfig(HostIommu.ARM_SMMUV3, t.ste0, t.ste1, raw_ste=True)
    if t.reserved0 not in (0, bytes(3)) or any(t.reserved):
        raise Refused(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
    if (
        t.vtd_flags & ~IOMMU_VTD_S1_FLAGS
        or t.addr_width not in VTD_ADDR_WIDTHS
        or t.pgtbl_addr & 0xFFF
    ):
        raise Refused(Status.INVAL, "invalid VT-d table fields")
    return TableConfig(
        HostIommu.INTEL_VTD,
        vtd_flags=t.vtd_flags,
        pgtbl_addr=t.pgtbl_addr,
        addr_width=t.addr_width,
    )
