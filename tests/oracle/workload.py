"""Builds sessions over generated SMMUv3 topologies and Linux-shaped command streams
(the guest's RIL encoder is bench/workloads.tlbi_range)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from protocols.smmuv3 import Opcode, build_command
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.session import Session
from viommud.trace import DeviceAttach, Ste, ViommuCreate

SYNC = build_command(Opcode.CMD_SYNC, cs=2, msh=3, msi_attr=0xF)


def host(n_iommus: int, devices_per_iommu: int, ats: bool) -> HostConfig:
    return HostConfig.from_json(
        {
            "iommus": [{"id": f"smmu{i}", "model": "arm-smmuv3"} for i in range(n_iommus)],
            "devices": [
                {
                    "id": f"0000:{i:02x}:{d:02x}.0",
                    "iommu": f"smmu{i}",
                    "sid": 256 * i + d,
                    "ats": ats,
                }
                for i in range(n_iommus)
                for d in range(devices_per_iommu)
            ],
        }
    )


def vste(cd_table: int, *, ats: bool) -> bytes:
    d1 = 0xD6 | (1 << 28 if ats else 0)
    return struct.pack("<8Q", 0xB | cd_table << 6, d1, 0, 0, 0, 0, 0, 0)


@dataclass
class Rig:
    session: Session
    backend: EmulatedIommufd
    vids: dict[str, list[int]]  # vIOMMU -> its vSIDs

    def doorbell(self, viommu: str, *commands: bytes) -> dict[str, Any]:
        return as_json(self.session.doorbell(viommu, b"".join(commands)))


BYPASS_STE = struct.pack("<8Q", 0x9, 0, 0, 0, 0, 0, 0, 0)


def build(
    hostcfg: HostConfig,
    layout: dict[str, list[str]],
    *,
    ats: bool = True,
    verify: bool = True,
    bypass: frozenset[str] = frozenset(),
) -> Rig:
    """``layout``: vIOMMU name -> host iommus it spans; every device of those iommus joins it,
    gets a translate vSTE (CD table per device; bypass behind the iommus in ``bypass``) and
    a CFGI_STE."""
    backend = EmulatedIommufd(hostcfg)
    session = Session(backend, verify=verify, keep_calls=True)
    vids: dict[str, list[int]] = {}
    line = 2
    for name, iommus in layout.items():
        assert as_json(session.handle(ViommuCreate(line, name, "smmuv3", tuple(iommus)))) == {
            "ok": True
        }
        vids[name] = []
        for dev in hostcfg.devices:
            if dev.iommu not in iommus:
                continue
            vid = 8 * (len(vids[name]) + 1)
            assert as_json(session.handle(DeviceAttach(line, name, vid, dev.id))) == {"ok": True}
            data = BYPASS_STE if dev.iommu in bypass else vste(0x1000 + vid, ats=ats)
            as_json(session.handle(Ste(line, name, vid, data)))
            answer = as_json(
                session.doorbell(name, build_command(Opcode.CFGI_STE, sid=vid, leaf=1) + SYNC)
            )
            assert answer["errors"] == [], answer
            vids[name].append(vid)
    session.drain_calls()
    return Rig(session, backend, vids)
