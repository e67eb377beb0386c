"""Synthetic SMMUv3 guest traces in the shapes Linux's arm-smmu-v3 driver produces.

Each function returns trace records (docs/trace-format.md §2) as JSON-ready dicts, header
first, so benchmarks can replay them in process or write them to a file. Shapes (smmuv3.md §6):

* ``strict_ril``: ``iommu.strict=1`` with range invalidation: one TLBI_NH_VA range (+ SYNC)
  per unmap, one doorbell each; ``per_doorbell`` > 1 models CPUs racing for the queue;
* ``strict_noril``: the same guest without RIL (``ril: false``): one TLBI per page, 64 per
  doorbell before the SYNC (CMDQ_BATCH_ENTRIES);
* ``lazy``: flush queue: TLBI_NH_ASID + SYNC, then ATC_INV(all) per ATS master + SYNC.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

from protocols.smmuv3 import Opcode, build_command

SYNC = build_command(Opcode.CMD_SYNC, cs=2, msh=3, msi_attr=0xF)
BATCH = 64  # CMDQ_BATCH_ENTRIES


def host(iommus: int, devices_per_iommu: int, *, ats: bool) -> dict[str, Any]:
    return {
        "iommus": [{"id": f"smmu{i}", "model": "arm-smmuv3"} for i in range(iommus)],
        "devices": [
            {
                "id": f"0000:{i:02x}:{d:02x}.0",
                "iommu": f"smmu{i}",
                "sid": 256 * i + 8 * d,
                "ats": ats,
            }
            for i in range(iommus)
            for d in range(devices_per_iommu)
        ],
    }


def setup(
    name: str, hostcfg: dict[str, Any], layout: dict[str, list[str]], options: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, int]]]]:
    """Header, vIOMMUs, devices with translate vSTEs. Returns records and, per vIOMMU,
    (vSID, ASID) of its devices (one ASID per device, as Linux's DMA domains have)."""
    records: list[dict[str, Any]] = [
        {"format": "viommud-trace", "version": 1, "name": name, "host": hostcfg}
    ]
    devices: dict[str, list[tuple[int, int]]] = {}
    asid = 0
    for viommu, iommus in layout.items():
        records.append(
            {
                "op": "viommu_create",
                "viommu": viommu,
                "model": "smmuv3",
                "iommus": iommus,
                "options": options,
            }
        )
        devices[viommu] = []
        for dev in hostcfg["devices"]:
            if dev["iommu"] not in iommus:
                continue
            vid = 8 * (len(devices[viommu]) + 1)
            asid += 1
            d1 = 0xD6 | (1 << 28 if dev["ats"] else 0)
            ste = struct.pack("<8Q", 0xB | (0x40000 + vid) << 6, d1, 0, 0, 0, 0, 0, 0)
            records += [
                {"op": "device_attach", "viommu": viommu, "vid": vid, "device": dev["id"]},
                {"op": "ste", "viommu": viommu, "vsid": vid, "data": ste.hex()},
                cmds(viommu, build_command(Opcode.CFGI_STE, sid=vid, leaf=1), SYNC),
            ]
            devices[viommu].append((vid, asid))
    return records, devices


def cmds(viommu: str, *commands: bytes) -> dict[str, Any]:
    return {"op": "cmds", "viommu": viommu, "data": b"".join(commands).hex()}


def tlbi_range(asid: int, page: int, pages: int, *, leaf: bool = True) -> list[bytes]:
    """Linux's RIL encoding of an unmap of ``pages`` 4 KiB pages from ``page`` (smmuv3.md
    §1.4): leaf with TTL=3, or a walk-cache flush (TTL=0, one page more when the count would
    end in the reserved NUM=SCALE=0 encoding, as Linux does since 2023)."""
    out = []
    if not leaf and pages & 31 == 1:
        pages += 1
    while pages:
        scale = (pages & -pages).bit_length() - 1
        num = (pages >> scale) & 31
        out.append(
            build_command(
                Opcode.TLBI_NH_VA,
                asid=asid,
                num=num - 1,
                scale=scale,
                leaf=int(leaf),
                ttl=3 if leaf else 0,
                tg=1,
                addr=page,
            )
        )
        pages -= num << scale
        page += num << scale
    return out


def _unmaps(rng: random.Random, devices: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(asid, first page, pages) of a stream of DMA unmaps of mixed sizes."""
    cursor: dict[int, int] = {}
    while True:
        _vid, asid = rng.choice(devices)
        pages = rng.choice((1, 1, 1, 2, 4, 8, 16, 32))
        page = cursor.get(asid, 0x10000)
        cursor[asid] = page + pages + rng.choice((0, 0, 1, 7))
        yield asid, page, pages


def strict_ril(
    unmaps: int,
    *,
    layout: dict[str, list[str]] | None = None,
    iommus: int = 1,
    devices: int = 3,
    per_doorbell: int = 1,
    seed: int = 1,
    sync_each: bool = True,
) -> list[dict[str, Any]]:
    """``per_doorbell`` unmaps per CMDQ_PROD write, each followed by a CMD_SYNC, or with
    ``sync_each=False`` one CMD_SYNC after all of them (a batched flush)."""
    layout = layout or {"v": [f"smmu{i}" for i in range(iommus)]}
    records, devs = setup("strict-ril", host(iommus, devices, ats=False), layout, {})
    rng = random.Random(seed)
    for viommu, members in devs.items():  # ``unmaps`` in all, shared among the vIOMMUs
        stream = _unmaps(rng, members)
        for _ in range(unmaps // len(devs) // per_doorbell):
            body: list[bytes] = []
            for _ in range(per_doorbell):
                asid, page, pages = next(stream)
                body += tlbi_range(asid, page, pages)
                if sync_each:
                    body.append(SYNC)
            if not sync_each:
                body.append(SYNC)
            records.append(cmds(viommu, *body))
    return records


def strict_noril(
    unmaps: int, *, devices: int = 3, gather: int = 1, seed: int = 2
) -> list[dict[str, Any]]:
    """``gather`` batches of 64 per doorbell model CPUs racing: the queue owner publishes
    everything gathered meanwhile with one CMDQ_PROD write (smmuv3.md §6.1)."""
    records, devs = setup(
        "strict-noril", host(1, devices, ats=False), {"v": ["smmu0"]}, {"ril": False}
    )
    rng = random.Random(seed)
    stream = _unmaps(rng, devs["v"])
    pending: list[bytes] = []
    batches = 0
    for _ in range(unmaps):
        asid, page, pages = next(stream)
        pages *= 16  # bigger unmaps: the case where per-page commands flood the queue
        commands = [
            build_command(Opcode.TLBI_NH_VA, asid=asid, leaf=1, addr=page + i) for i in range(pages)
        ]
        for start in range(0, len(commands), BATCH):
            pending += commands[start : start + BATCH]
            if start + BATCH >= len(commands):
                pending.append(SYNC)
            batches += 1
            if batches % gather == 0:
                records.append(cmds("v", *pending))
                pending = []
    if pending:
        records.append(cmds("v", *pending))
    return records


def lazy(flushes: int, *, devices: int = 3) -> list[dict[str, Any]]:
    records, devs = setup("lazy-ats", host(1, devices, ats=True), {"v": ["smmu0"]}, {})
    for i in range(flushes):
        vid, asid = devs["v"][i % len(devs["v"])]
        records.append(
            cmds(
                "v",
                build_command(Opcode.TLBI_NH_ASID, asid=asid),
                SYNC,
                build_command(Opcode.ATC_INV, sid=vid, size=52),
                SYNC,
            )
        )
    return records
