"""PROBE (virtio-iommu.md §2.6): the properties area of an endpoint.

RESV_MEM for every reserved region, in address order; with the vSVA drafts A/B, also the
table formats the endpoint's host IOMMU can walk (PASID_TABLE_FMT / PAGE_TABLE_FMT, §5.2).
"""

from __future__ import annotations

import struct

from protocols.models import HostIommu
from protocols.virtio_iommu import ProbeType, TableFormat, build_resv_mem
from viommud.frontends.virtio.options import EndpointInfo, VirtioFeatures

__all__ = ["probe_properties"]

# struct virtio_iommu_probe_{page,pasid}_table_format: type, length (4), format, reserved
_TABLE_FMT = struct.Struct("<HHH2x")

# What drafts A/B advertise for an endpoint behind each host IOMMU model (§5.2)
_FORMAT_PROPERTY: dict[str, bytes] = {
    HostIommu.ARM_SMMUV3: _TABLE_FMT.pack(ProbeType.PASID_TABLE_FMT, 4, TableFormat.ARM_SMMUV3_PST),
    HostIommu.INTEL_VTD: _TABLE_FMT.pack(ProbeType.PAGE_TABLE_FMT, 4, TableFormat.VTD),
}


def probe_properties(info: EndpointInfo, features: VirtioFeatures) -> bytes:
    """The properties an endpoint's PROBE returns, without the zero padding."""
    out = [
        build_resv_mem(region.subtype, region.start, region.end)
        for region in sorted(info.resv, key=lambda r: (r.start, r.end))
    ]
    if features.vsva and features.vsva_draft in ("A", "B") and info.host:
        out.extend(_FORMAT_PROPERTY[model] for model in sorted(info.table_models))
    return b"".join(out)
