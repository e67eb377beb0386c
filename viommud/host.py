"""The physical side of a machine: its IOMMUs and the devices behind them.

This is the ``host`` section of a trace header (docs/trace-format.md §2.2). The emulated
backend builds exactly this host; a daemon started with a fixed host checks that a
client's host is part of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocols.models import CONFIGURABLE_HOST_IOMMUS


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
    # Lookups by id (built once: a host of thousands of devices is checked in linear time).
    _iommus: dict[str, PhysicalIommu] = field(init=False, repr=False, compare=False)
    _devices: dict[str, PhysicalDevice] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_iommus", {x.id: x for x in self.iommus})
        object.__setattr__(self, "_devices", {x.id: x for x in self.devices})

    def iommu(self, iommu_id: str) -> PhysicalIommu:
        """The physical IOMMU ``iommu_id``; KeyError when the host has none."""
        return self._iommus[iommu_id]

    def device(self, device_id: str) -> PhysicalDevice:
        """The physical device ``device_id``; KeyError when the host has none."""
        return self._devices[device_id]

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
        iommu_ids: set[str] = set()  # sets, not scans: validation stays linear in the host
        for i, item in enumerate(iommus_raw):
            if not isinstance(item, dict):
                raise HostConfigError(f"host.iommus[{i}] must be an object")
            iid, model = item.get("id"), item.get("model")
            if not isinstance(iid, str) or not iid:
                raise HostConfigError(f"host.iommus[{i}].id must be a non-empty string")
            if model not in CONFIGURABLE_HOST_IOMMUS:
                raise HostConfigError(
                    f"host.iommus[{i}].model must be one of {', '.join(CONFIGURABLE_HOST_IOMMUS)}"
                )
            if iid in iommu_ids:
                raise HostConfigError(f"host.iommus: duplicate id {iid!r}")
            iommu_ids.add(iid)
            iommus.append(PhysicalIommu(iid, str(model)))
        devices: list[PhysicalDevice] = []
        device_ids: set[str] = set()
        sids: set[tuple[str, int]] = set()
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
            if not isinstance(iommu, str) or iommu not in iommu_ids:  # a list is no id
                raise HostConfigError(f"host.devices[{i}].iommu {iommu!r} is not a host iommu")
            if not isinstance(sid, int) or isinstance(sid, bool) or not 0 <= sid < 2**32:
                raise HostConfigError(f"host.devices[{i}].sid must be an integer in [0, 2^32)")
            if not isinstance(ats, bool):
                raise HostConfigError(f"host.devices[{i}].ats must be a boolean")
            if did in device_ids:
                raise HostConfigError(f"host.devices: duplicate id {did!r}")
            if (str(iommu), sid) in sids:
                raise HostConfigError(f"host.devices[{i}]: sid {sid} already used on {iommu}")
            device_ids.add(did)
            sids.add((str(iommu), sid))
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
