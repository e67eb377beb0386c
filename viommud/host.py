"""The physical side of a machine: its IOMMUs and the devices behind them.

This is the ``host`` section of a trace header (docs/trace-format.md §2.2). The emulated
backend builds exactly this host; a daemon started with a fixed host checks that a
client's host is part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocols.models import CONFIGURABLE_HOST_IOMMUS

IOMMU_MODELS = CONFIGURABLE_HOST_IOMMUS


class HostConfigError(ValueError):
    """The host description is malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class PhysicalIommu:
    id: str
    model: str  # a HostIommu value (protocols.models)


@dataclass(frozen=True, slots=True)
class PhysicalDevice:
    id: str  # e.g. PCI BDF "0000:01:00.0"
    iommu: str  # id of the PhysicalIommu it sits behind
    sid: int  # physical StreamID (SMMUv3) or source ID (VT-d)
    ats: bool = False


@dataclass(frozen=True, slots=True)
class HostConfig:
    iommus: tuple[PhysicalIommu, ...]
    devices: tuple[PhysicalDevice, ...]

    def iommu(self, iommu_id: str) -> PhysicalIommu:
        for item in self.iommus:
            if item.id == iommu_id:
                return item
        raise KeyError(iommu_id)

    def device(self, device_id: str) -> PhysicalDevice:
        for item in self.devices:
            if item.id == device_id:
                return item
        raise KeyError(device_id)

    @classmethod
    def from_json(cls, obj: Any) -> HostConfig:
        """Validate and convert the JSON ``host`` object of a trace header."""
        if not isinstance(obj, dict):
            raise HostConfigError("host must be an object")
        iommus_raw = obj.get("iommus")
        devices_raw = obj.get("devices", [])
        if not isinstance(iommus_raw, list) or not isinstance(devices_raw, list):
            raise HostConfigError("host.iommus and host.devices must be lists")
        iommus: list[PhysicalIommu] = []
        for i, item in enumerate(iommus_raw):
            if not isinstance(item, dict):
                raise HostConfigError(f"host.iommus[{i}] must be an object")
            iid, model = item.get("id"), item.get("model")
            if not isinstance(iid, str) or not iid:
                raise HostConfigError(f"host.iommus[{i}].id must be a non-empty string")
            if model not in IOMMU_MODELS:
                raise HostConfigError(
                    f"host.iommus[{i}].model must be one of {', '.join(IOMMU_MODELS)}"
                )
            if any(x.id == iid for x in iommus):
                raise HostConfigError(f"host.iommus: duplicate id {iid!r}")
            iommus.append(PhysicalIommu(iid, str(model)))
        devices: list[PhysicalDevice] = []
        for i, item in enumerate(devices_raw):
            if not isinstance(item, dict):
                raise HostConfigError(f"host.devices[{i}] must be an object")
            did, iommu, sid, ats = (
                item.get("id"),
                item.get("iommu"),
                item.get("sid"),
                item.get("ats", False),
            )
            if not isinstance(did, str) or not did:
                raise HostConfigError(f"host.devices[{i}].id must be a non-empty string")
            if not any(x.id == iommu for x in iommus):
                raise HostConfigError(f"host.devices[{i}].iommu {iommu!r} is not a host iommu")
            if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < 2**32:
                raise HostConfigError(f"host.devices[{i}].sid must be an integer in [0, 2^32)")
            if not isinstance(ats, bool):
                raise HostConfigError(f"host.devices[{i}].ats must be a boolean")
            if any(x.id == did for x in devices):
                raise HostConfigError(f"host.devices: duplicate id {did!r}")
            if any(x.iommu == iommu and x.sid == sid for x in devices):
                raise HostConfigError(f"host.devices[{i}]: sid {sid} already used on {iommu}")
            devices.append(PhysicalDevice(did, str(iommu), sid, ats))
        return cls(tuple(iommus), tuple(devices))

    def to_json(self) -> dict[str, Any]:
        return {
            "iommus": [{"id": x.id, "model": x.model} for x in self.iommus],
            "devices": [
                {"id": d.id, "iommu": d.iommu, "sid": d.sid, "ats": d.ats} for d in self.devices
            ],
        }

    def missing_from(self, other: HostConfig) -> list[str]:
        """What this host requires that ``other`` (a daemon's fixed host) lacks."""
        problems: list[str] = []
        for iommu in self.iommus:
            try:
                theirs = other.iommu(iommu.id)
            except KeyError:
                problems.append(f"iommu {iommu.id} not present")
                continue
            if theirs.model != iommu.model:
                problems.append(f"iommu {iommu.id} is {theirs.model}, not {iommu.model}")
        for dev in self.devices:
            try:
                theirs_dev = other.device(dev.id)
            except KeyError:
                problems.append(f"device {dev.id} not present")
                continue
            if theirs_dev != dev:
                problems.append(f"device {dev.id} differs: {theirs_dev} vs {dev}")
        return problems
