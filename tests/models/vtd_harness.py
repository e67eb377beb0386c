"""A VT-d session on the emulated backend, with builders for descriptors and entries."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from protocols import iommufd as uapi
from protocols.vtd import (
    DescType,
    build_context_entry,
    build_descriptor,
    build_pasid_entry,
    build_scalable_context_entry,
)
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.models.vtd import VtdViommu
from viommud.session import Session
from viommud.trace import ContextEntry, DeviceAttach, DeviceDetach, PasidEntry, ViommuCreate

T = DescType
HOST = HostConfig.from_json(
    {
        "iommus": [{"id": "dmar0", "model": "intel-vtd"}, {"id": "dmar1", "model": "intel-vtd"}],
        "devices": [
            {"id": "0000:01:00.0", "iommu": "dmar0", "sid": 0x100, "ats": True},
            {"id": "0000:02:00.0", "iommu": "dmar0", "sid": 0x200, "ats": True},
            {"id": "0000:03:00.0", "iommu": "dmar0", "sid": 0x300, "ats": False},
            {"id": "0000:81:00.0", "iommu": "dmar1", "sid": 0x8100, "ats": True},
        ],
    }
)
DEVICES = {0x10: "0000:01:00.0", 0x18: "0000:02:00.0", 0x20: "0000:03:00.0", 0x30: "0000:81:00.0"}
A, B, N, R = 0x10, 0x18, 0x20, 0x30  # N: no ATS on the host; R: behind dmar1
PAGE = 0x40000  # ADDR[63:12] of IOVA 0x40000000
U64_MAX = (1 << 64) - 1
_ENTRY = struct.Struct("<QQII")


def entry(addr: int = 0, npages: int = U64_MAX, leaf: bool = False) -> str:
    """The hex of one iommu_hwpt_vtd_s1_invalidate as the call log shows it."""
    return _ENTRY.pack(addr, npages, uapi.IOMMU_VTD_INV_FLAGS_LEAF if leaf else 0, 0).hex()


def legacy(did: int, table: int, **fields: int) -> bytes:
    values = {"p": 1, "tt": 1, "aw": 2, "did": did, "slptptr": table >> 12}
    values.update(fields)
    return build_context_entry(**values)


def scalable(rid_pasid: int = 0, **fields: int) -> bytes:
    values = {"p": 1, "dte": 1, "pasiddirptr": 0x77, "rid_pasid": rid_pasid}
    values.update(fields)
    return build_scalable_context_entry(**values)


def first_stage(did: int, table: int, **fields: int) -> bytes:
    values = {"p": 1, "pgtt": 1, "did": did, "flptptr": table >> 12}
    values.update(fields)
    return build_pasid_entry(**values)


@dataclass
class Vm:
    """One VT-d vIOMMU ``v`` in a session on an emulated backend."""

    dw: int = 128
    options: dict[str, Any] = field(default_factory=dict)
    backend: EmulatedIommufd = field(default_factory=lambda: EmulatedIommufd(HOST))
    verify: bool = False  # run the oracle (docs/oracle.md) over the session
    session: Session = field(init=False)
    waits: int = 0

    def __post_init__(self) -> None:
        self.session = Session(self.backend, keep_calls=True, verify=self.verify)
        options = {"dw": self.dw, **self.options}
        assert as_json(
            self.session.handle(ViommuCreate(2, "v", "vtd", ("dmar0", "dmar1"), options))
        ) == {"ok": True}

    @property
    def viommu(self) -> VtdViommu:
        instance = self.session.viommus["v"]
        assert isinstance(instance, VtdViommu)
        return instance

    # -- records ------------------------------------------------------------------------
    def attach(self, *vids: int) -> None:
        for vid in vids:
            assert as_json(self.session.handle(DeviceAttach(3, "v", vid, DEVICES[vid]))) == {
                "ok": True
            }

    def detach(self, vid: int) -> dict[str, Any]:
        return as_json(self.session.handle(DeviceDetach(3, "v", vid)))

    def context(self, sid: int, data: bytes) -> None:
        assert as_json(self.session.handle(ContextEntry(4, "v", sid, data))) == {"ok": True}

    def pasid(self, sid: int, data: bytes, pasid: int = 0) -> None:
        assert as_json(self.session.handle(PasidEntry(5, "v", sid, pasid, data))) == {"ok": True}

    # -- descriptors --------------------------------------------------------------------
    def d(self, kind: int, **fields: int) -> bytes:
        return build_descriptor(kind, width=self.dw // 8, **fields)

    def wait(self, **fields: int) -> bytes:
        self.waits += 1
        values = {"sw": 1, "status_data": 2, "status_addr": 0x1000 + self.waits}
        values.update(fields)
        return self.d(T.INV_WAIT, **values)

    def doorbell(self, *descs: bytes) -> dict[str, Any]:
        return as_json(self.session.doorbell("v", b"".join(descs)))

    def run(self, *descs: bytes) -> list[dict[str, Any]]:
        """Ring one doorbell that must succeed; returns the calls it made."""
        self.session.drain_calls()
        response = self.doorbell(*descs)
        assert response["errors"] == [], response
        return self.session.drain_calls()

    def bind_legacy(self, sid: int, did: int, table: int, **fields: int) -> None:
        """A legacy context entry read at a device-selective context-cache invalidation
        (translating ones block the device: docs/vtd.md, "Legacy mode")."""
        self.context(sid, legacy(did, table, **fields))
        self.run(self.d(T.CC_INV, g=3, sid=sid), self.wait())

    def bind_first_stage(self, sid: int, did: int, table: int, **fields: int) -> None:
        """A scalable-mode context entry and its RID_PASID entry with a first-stage table
        (PGTT=1), read at a device-selective context-cache invalidation: a nested HWPT."""
        self.context(sid, scalable())
        self.pasid(sid, first_stage(did, table, **fields))
        self.run(self.d(T.CC_INV, g=3, sid=sid), self.wait())

    # -- what happened ------------------------------------------------------------------
    def hwpt_of(self, sid: int) -> int | None:
        vdev = self.viommu.topology.vdevices[sid]
        return vdev.hwpt.hwpt_id if vdev.hwpt is not None else None

    def report(self) -> dict[str, Any]:
        return self.session.report()


def invalidations(calls: list[dict[str, Any]]) -> list[tuple[int, list[str]]]:
    """``(hwpt id, entries)`` of each IOMMU_HWPT_INVALIDATE in ``calls``."""
    return [
        (c["object"]["id"], c["entries"]) for c in calls if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"
    ]


def ioctls(calls: list[dict[str, Any]]) -> list[str]:
    return [c["ioctl"] for c in calls]
