"""A trace of one vSMMU over two physical SMMUs, for the migration tests: devices on both
(ATS on one), translate vSTEs, range TLBIs, ATC invalidations, a TLBI whose CMD_SYNC comes
in the next doorbell, an STE written long before its CFGI_STE, and a device that moves from
translate to abort and back."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

from bench.workloads import SYNC, cmds, tlbi_range
from protocols.smmuv3 import Opcode, build_command

HOST = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}, {"id": "smmu1", "model": "arm-smmuv3"}],
    "devices": [
        {"id": "0000:00:01.0", "iommu": "smmu0", "sid": 8, "ats": False},
        {"id": "0000:00:02.0", "iommu": "smmu0", "sid": 16, "ats": True},
        {"id": "0000:01:01.0", "iommu": "smmu1", "sid": 8, "ats": True},
        {"id": "0000:01:02.0", "iommu": "smmu1", "sid": 16, "ats": False},
    ],
}
DEVICES = [
    (8, "0000:00:01.0", 1),
    (16, "0000:00:02.0", 2),
    (24, "0000:01:01.0", 3),
    (32, "0000:01:02.0", 4),
]
ABORT_STE = struct.pack("<8Q", 0x1, 0, 0, 0, 0, 0, 0, 0)


def translate_ste(vid: int, ats: bool = True) -> bytes:
    d1 = 0xD6 | (1 << 28 if ats else 0)  # EATS=0b01 when the device has ATS
    return struct.pack("<8Q", 0xB | (0x40000 + vid) << 6, d1, 0, 0, 0, 0, 0, 0)


def cfgi(vid: int) -> bytes:
    return build_command(Opcode.CFGI_STE, sid=vid, leaf=1)


def two_smmu_records(seed: int = 7, rounds: int = 60) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [
        {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0", "smmu1"]}
    ]
    for vid, device, _asid in DEVICES:
        out.append({"op": "device_attach", "viommu": "v", "vid": vid, "device": device})
        out.append({"op": "ste", "viommu": "v", "vsid": vid, "data": translate_ste(vid).hex()})
    out.append(cmds("v", *[cfgi(vid) for vid, _, _ in DEVICES], SYNC))
    page = 0x10000
    for i in range(rounds):
        vid, _device, asid = DEVICES[i % len(DEVICES)]
        pages = rng.choice((1, 2, 4, 16))
        body = tlbi_range(asid, page, pages)
        page += pages + 1
        if i % 7 == 3:  # the sync comes with the next doorbell
            out.append(cmds("v", *body))
            out.append(cmds("v", build_command(Opcode.ATC_INV, sid=vid, size=52), SYNC))
        else:
            out.append(cmds("v", *body, SYNC))
        if i == 20:  # written now, read at the CFGI_STE ten rounds later
            out.append({"op": "ste", "viommu": "v", "vsid": 16, "data": ABORT_STE.hex()})
        if i == 30:
            out.append(cmds("v", cfgi(16), SYNC))
        if i == 40:
            out.append({"op": "ste", "viommu": "v", "vsid": 16, "data": translate_ste(16).hex()})
            out.append(cmds("v", cfgi(16), build_command(Opcode.TLBI_NH_ASID, asid=2), SYNC))
        if i == 45:
            out.append({"op": "device_detach", "viommu": "v", "vid": 32})
        if i == 50:
            out.append({"op": "device_attach", "viommu": "v", "vid": 32, "device": DEVICES[3][1]})
            out.append(cmds("v", cfgi(32), SYNC))
    out.append({"op": "viommu_destroy", "viommu": "v"})
    return out


def write_two_smmu(path: Path) -> Path:
    header = {"format": "viommud-trace", "version": 1, "name": "smmuv3-two-smmu", "host": HOST}
    lines = [json.dumps(header), *(json.dumps(r) for r in two_smmu_records())]
    path.write_text("\n".join(lines) + "\n")
    return path
