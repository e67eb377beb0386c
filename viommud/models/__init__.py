"""vIOMMU models: each wires a frontend, a topology and a dispatcher behind one interface.

A session holds ``Viommu`` instances by name and does not know which model each one is:
``viommu_create`` picks the factory from ``factories()``; every later record for that
vIOMMU goes to the instance. Adding a model = one module here plus one line in
``factories()``.
"""

from __future__ import annotations

from protocols.models import ViommuModel
from viommud.models.base import (
    Factory,
    ModelContext,
    ModelError,
    RecordRefused,
    Viommu,
    check_host_iommus,
)
from viommud.models.smmuv3 import SmmuV3Viommu
from viommud.models.virtio import VirtioViommu
from viommud.models.vtd import VtdViommu

__all__ = [
    "Factory",
    "ModelContext",
    "ModelError",
    "RecordRefused",
    "Viommu",
    "check_host_iommus",
    "factories",
]


def factories() -> dict[str, Factory]:
    """The models this daemon implements, by trace ``model`` name."""
    return {
        ViommuModel.VTD: VtdViommu.create,
        ViommuModel.SMMUV3: SmmuV3Viommu.create,
        ViommuModel.VIRTIO_IOMMU: VirtioViommu.create,
    }
