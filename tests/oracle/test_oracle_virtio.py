"""The oracle's virtio-iommu model against the real daemon: a vSVA INVALIDATE of a VA range on
an Arm PASID table, for each page size a guest table can have (docs/oracle.md,
"virtio-iommu")."""

from __future__ import annotations

import pytest

from protocols.virtio_iommu import (
    INV_B_F_ARCHID,
    INV_B_GRAN_VA,
    INV_B_TYPE_IOTLB,
    RequestType,
    build_request,
)
from tests.oracle.test_mutations import VIRTIO_HOST
from viommud.backend.emulator import EmulatedIommufd
from viommud.replies import CONFIG_OK
from viommud.session import Session
from viommud.trace import DeviceAttach, ViommuCreate

TABLE = {"format": 2, "s1dss": 2, "s1contextptr": 0x4000_1000, "s1cdmax": 4}


def verdict(page_log2: int) -> tuple[int, int]:
    session = Session(EmulatedIommufd(VIRTIO_HOST), verify=True)
    options = {"vsva": True, "bypass": 0}
    assert session.handle(ViommuCreate(1, "v", "virtio-iommu", (), options)) == CONFIG_OK
    assert session.handle(DeviceAttach(1, "v", 0x10, "0000:01:00.0")) == CONFIG_OK
    attach = build_request(RequestType.ATTACH_TABLE, "B", domain=2, endpoint=0x10, **TABLE)
    assert session.request("v", attach).status == "OK"
    invalidate = build_request(
        RequestType.INVALIDATE,
        "B",
        inv_gran=INV_B_GRAN_VA,
        inv_type=INV_B_TYPE_IOTLB,
        flags=INV_B_F_ARCHID,
        domain=2,
        archid=5,
        virt_start=1 << 42,
        nr_pages=2,
        granule=page_log2,
    )
    assert session.request("v", invalidate).status == "OK"
    report = session.report()["verify"]
    return report["missed"], report["over"]


@pytest.mark.parametrize(
    "page_log2",
    [
        12,  # 4 KiB pages
        21,  # 2 MiB blocks: a 4 KiB table, TG 1
        30,  # 1 GiB blocks: a 4 KiB table
        14,  # 16 KiB pages
        16,  # 64 KiB pages
        25,  # 32 MiB blocks: a 16 KiB table
        29,  # 512 MiB blocks: a 64 KiB table
    ],
)
def test_a_va_invalidate_of_each_page_size_verifies(page_log2: int) -> None:
    assert verdict(page_log2) == (0, 0)
