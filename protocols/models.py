"""The names of IOMMU models, defined once.

``HostIommu`` is the kind of a physical IOMMU in a host configuration (and of the iommufd
driver behind it); ``ViommuModel`` is the guest-visible model of a vIOMMU in a trace's
``viommu_create`` record. Both are ``StrEnum``s: they compare equal to the strings that
appear in trace files and HELLO payloads, and serialise as those strings.
"""

from __future__ import annotations

import enum


class HostIommu(enum.StrEnum):
    """A physical IOMMU's kind (host configuration ``iommus[].model``)."""

    ARM_SMMUV3 = "arm-smmuv3"  # drivers/iommu/arm/arm-smmu-v3
    INTEL_VTD = "intel-vtd"  # drivers/iommu/intel
    SELFTEST = "iommufd-selftest"  # drivers/iommu/iommufd/selftest.c (mock devices)


class ViommuModel(enum.StrEnum):
    """A vIOMMU's guest-visible model (trace ``viommu_create.model``)."""

    SMMUV3 = "smmuv3"
    VTD = "vtd"
    VIRTIO_IOMMU = "virtio-iommu"


#: The host IOMMU kinds a host configuration may list (the selftest mock is the emulator's own).
CONFIGURABLE_HOST_IOMMUS = (HostIommu.ARM_SMMUV3, HostIommu.INTEL_VTD)
