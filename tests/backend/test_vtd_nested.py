"""What the emulated Intel driver refuses when a VT-d nested HWPT is allocated and attached.

One case per check of ``intel_iommu_domain_alloc_nested`` (drivers/iommu/intel/nested.c)
and of ``intel_pasid_setup_nested`` (drivers/iommu/intel/pasid.c, reached from
``intel_nested_attach_dev``), with the errno the kernel returns; also the fields the kernel
does NOT check, which must be accepted. The copy rules (length, pointer, data type) and the
parent checks are rows of ``HWPT_ROWS`` in test_emulated.py.

Each case allocates on a nesting parent of unit ``vtd0`` with the unit's CAP / ECAP as the
case gives them, then attaches device ``v0``; a refused attach leaves ``v0`` on the parent.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace

import pytest

from protocols import iommufd as uapi
from protocols.vtd import IOMMU_VTD_S1_EAFE, IOMMU_VTD_S1_SRE, IOMMU_VTD_S1_WPE
from tests.backend.test_emulated import NEST_PARENT, Rig
from viommud.backend.emulator.intel import (
    CAP_FL5LP,
    ECAP_EAFS,
    ECAP_NEST,
    ECAP_SRS,
    VTD_HW_INFO,
    IntelVtdDriver,
)

SRE, EAFE, WPE = IOMMU_VTD_S1_SRE, IOMMU_VTD_S1_EAFE, IOMMU_VTD_S1_WPE


@dataclass(frozen=True)
class Case:
    flags: int = 0
    addr_width: int = 48
    reserved: int = 0
    cap_add: int = 0  # CAP bits the unit has on top of the emulated ones
    ecap_add: int = 0
    ecap_drop: int = 0  # ECAP bits the unit lacks
    alloc: int = 0  # expected errno of IOMMU_HWPT_ALLOC
    attach: int = 0  # expected errno of the attach (when the allocation succeeded)


CASES: dict[str, Case] = {
    # intel_iommu_domain_alloc_nested: nested_supported() (ECAP.NEST) -> EOPNOTSUPP
    "alloc-without-ecap-nest": Case(ecap_drop=ECAP_NEST, alloc=errno.EOPNOTSUPP),
    # ... the configuration itself is only copied: nothing below fails at allocation.
    # intel_pasid_setup_nested, address width: 48, or 57 with CAP.FL5LP; else EINVAL
    "width-48": Case(addr_width=48),
    "width-57-without-fl5lp": Case(addr_width=57, attach=errno.EINVAL),
    "width-57-with-fl5lp": Case(addr_width=57, cap_add=CAP_FL5LP),
    "width-39": Case(addr_width=39, attach=errno.EINVAL),  # a legacy 3-level width
    "width-0": Case(addr_width=0, attach=errno.EINVAL),
    "width-64": Case(addr_width=64, attach=errno.EINVAL),
    # SRE needs ECAP.SRS
    "sre-without-srs": Case(flags=SRE, attach=errno.EINVAL),
    "sre-with-srs": Case(flags=SRE, ecap_add=ECAP_SRS),
    "sre-wpe-with-srs": Case(flags=SRE | WPE, ecap_add=ECAP_SRS),
    # EAFE needs ECAP.EAFS
    "eafe-without-eafs": Case(flags=EAFE, attach=errno.EINVAL),
    "eafe-with-eafs": Case(flags=EAFE, ecap_add=ECAP_EAFS),
    # the width is checked first: a bad width fails even when the flags are fine
    "width-39-sre-with-srs": Case(addr_width=39, flags=SRE, ecap_add=ECAP_SRS, attach=errno.EINVAL),
    # not checked by the kernel: WPE alone (used only with SRE), unknown flags, __reserved
    "wpe-alone": Case(flags=WPE),
    "unknown-flag-bits": Case(flags=1 << 3 | 1 << 63),
    "reserved-set": Case(reserved=0xFFFFFFFF),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_vtd_s1_alloc_and_attach(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    regs = replace(
        VTD_HW_INFO,
        cap_reg=VTD_HW_INFO.cap_reg | case.cap_add,
        ecap_reg=(VTD_HW_INFO.ecap_reg | case.ecap_add) & ~case.ecap_drop,
    )
    monkeypatch.setattr(IntelVtdDriver, "regs", regs)
    rig = Rig()
    dev = rig.bind("v0")
    parent = rig.ok_hwpt(dev, rig.ioas(), NEST_PARENT)
    assert rig.attach("v0", parent) == (0, parent)
    data = bytes(
        uapi.encode(
            uapi.HwptVtdS1(
                flags=case.flags,
                pgtbl_addr=0x1000,
                addr_width=case.addr_width,
                reserved=case.reserved,
            )
        )
    )
    rc, nested = rig.hwpt(dev, parent, 0, uapi.IOMMU_HWPT_DATA_VTD_S1, data)
    assert rc == case.alloc
    if rc:
        return
    rc, _ = rig.attach("v0", nested)
    assert rc == case.attach
    device = rig.be.lookup(dev)
    assert device is not None
    assert device.holds() == ((parent,) if case.attach else (nested,))


def test_the_emulated_units_have_neither_srs_nor_eafs_nor_fl5lp() -> None:
    # What the cases above without a cap_add / ecap_add assume about the default unit.
    assert VTD_HW_INFO.ecap_reg & ECAP_NEST
    assert not VTD_HW_INFO.ecap_reg & (ECAP_SRS | ECAP_EAFS)
    assert not VTD_HW_INFO.cap_reg & CAP_FL5LP
