"""Topology: the guest-to-host mappings of each vIOMMU, as data (DESIGN.md point 3).

One module per vIOMMU model; what they share lives here.
"""

from __future__ import annotations

from dataclasses import dataclass


class TopologyError(Exception):
    """A topology change the daemon refuses; ``guest_code`` is what the guest sees, if any."""

    def __init__(self, message: str, guest_code: str | None = None) -> None:
        super().__init__(message)
        self.guest_code = guest_code


@dataclass(frozen=True, slots=True)
class PiommuStatus:
    """One physical IOMMU a vIOMMU spans: its iommufd vIOMMU object (None when the model
    makes none), the nesting parent and the nested HWPTs on it."""

    iommu: str
    viommu_id: int | None
    s2_hwpt_id: int | None
    nested_hwpts: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class VdeviceStatus:
    """One guest device: its guest ID, host device, physical IOMMU, vDEVICE object and the
    HWPT it is attached to (None where the model has no such object)."""

    vid: int
    device: str
    iommu: str
    vdevice_id: int | None = None
    hwpt_id: int | None = None


@dataclass(frozen=True, slots=True)
class TopologyStatus:
    """What a vIOMMU holds on the host, for ``viommud status`` (shell/status.py renders it)."""

    piommus: tuple[PiommuStatus, ...] = ()
    vdevices: tuple[VdeviceStatus, ...] = ()
    hwpts: int = 0  # nesting parents plus nested HWPTs
