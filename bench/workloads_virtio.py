"""Synthetic virtio-iommu guest traces: Linux's virtio-iommu driver under the DMA API.

``map_unmap(requests)`` returns trace records (docs/trace-format.md §2) as JSON-ready
dicts, header first, and the index of the first timed record. Set-up: the vIOMMU (the Linux
session's
options of fixtures/generate_virtio.py: 48-bit input range, bypass off, 2 GiB of guest RAM),
its endpoints (host devices behind dmar0), a PROBE of each (``viommu_probe_endpoint``) and
an ATTACH of each to the DMA domain (``viommu_attach_dev``). Timed: ``requests`` MAP and
UNMAP requests, one ``request`` record per virtqueue buffer (so one REQUEST frame each):

* a DMA map (``iommu_dma_map_page`` / ``_sg``) is one MAP per physically contiguous
  segment (``viommu_map_pages``): single pages mostly, larger buffers, and scatter-gather
  lists of 2-4 segments mapped piecewise into one IOVA range; READ for a transmit buffer,
  WRITE for a receive buffer, both for a bidirectional one;
* a DMA unmap is one UNMAP of the whole IOVA range (``viommu_unmap_pages`` of
  ``__iommu_dma_unmap``), sg lists included, with strict (synchronous) invalidation: the
  request is the invalidation.

Each endpoint keeps a few buffers in flight and unmaps them mostly in order. IOVAs come from
the top-down, size-aligned allocator of fixtures/generate_virtio.py (iova.c), which hands
freed ranges out again. Requests are packed with ``struct`` (checked against the construct
declarations of protocols/virtio_iommu.py at import): a million of them would take a minute
through construct.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from fixtures.generate_virtio import (
    HOST,
    LINUX_DEVICES,
    LINUX_OPTIONS,
    PAGE,
    SIZES,
    IovaAllocator,
    _split,
)
from protocols.virtio_iommu import MapFlag, RequestType, build_request

# virtio_iommu_req_map / _unmap, readable parts (virtio-iommu.md §2.4, §2.5)
MAP = struct.Struct("<B3xIQQQI")
UNMAP = struct.Struct("<B3xIQQI")
IOVA_LIMIT = 0xFEE00000  # 32-bit DMA mask first (iova.c), below the MSI window
RAM_TOP = 0x80000000  # LINUX_OPTIONS' guest RAM
INFLIGHT = 8  # buffers an endpoint keeps mapped before it unmaps more than it maps
R, W = int(MapFlag.READ), int(MapFlag.WRITE)

assert MAP.pack(RequestType.MAP, 1, 0x1000, 0x1FFF, 0x2000, 3) == build_request(
    RequestType.MAP, domain=1, virt_start=0x1000, virt_end=0x1FFF, phys_start=0x2000, flags=3
)
assert UNMAP.pack(RequestType.UNMAP, 1, 0x1000, 0x1FFF, 0) == build_request(
    RequestType.UNMAP, domain=1, virt_start=0x1000, virt_end=0x1FFF
)


def request(viommu: str, data: bytes) -> dict[str, Any]:
    return {"op": "request", "viommu": viommu, "data": data.hex()}


def map_unmap(
    requests: int,
    *,
    domains: int = 1,
    seed: int = 4,
    viommu: str = "p",
) -> tuple[list[dict[str, Any]], int]:
    """(records, index of the first timed record). The endpoints of LINUX_DEVICES are spread
    over ``domains`` DMA domains (1: one domain with both attached, as one IOMMU group;
    2: Linux's default of one domain per device); ``requests`` MAP/UNMAP requests follow."""
    endpoints = list(LINUX_DEVICES)
    domain_of = {vid: 1 + i % domains for i, vid in enumerate(endpoints)}
    records: list[dict[str, Any]] = [
        {"format": "viommud-trace", "version": 1, "name": "virtio-map-unmap", "host": HOST},
        {
            "op": "viommu_create",
            "viommu": viommu,
            "model": "virtio-iommu",
            "iommus": [],
            "options": LINUX_OPTIONS,
        },
    ]
    for vid, device in LINUX_DEVICES.items():
        records.append({"op": "device_attach", "viommu": viommu, "vid": vid, "device": device})
    for vid in endpoints:
        records.append(request(viommu, build_request(RequestType.PROBE, endpoint=vid)))
        records.append(
            request(viommu, build_request(RequestType.ATTACH, domain=domain_of[vid], endpoint=vid))
        )
    first_timed = len(records)

    rng = random.Random(seed)
    sizes, weights = zip(*SIZES, strict=True)
    allocators = {d: IovaAllocator(IOVA_LIMIT) for d in set(domain_of.values())}
    live: dict[int, list[tuple[int, int]]] = {vid: [] for vid in endpoints}
    sent = 0
    while sent < requests:
        vid = rng.choice(endpoints)
        domain = domain_of[vid]
        queue = live[vid]
        if len(queue) < INFLIGHT or (rng.random() < 0.45 and len(queue) < 4 * INFLIGHT):
            pages = rng.choices(sizes, weights)[0]
            iova = allocators[domain].alloc(pages)
            flags = rng.choice((R, W, R | W))
            for start, piece in _segments(rng, iova, pages):
                phys = rng.randrange(0x100000 // PAGE, RAM_TOP // PAGE - piece) * PAGE
                if piece == 512:
                    phys &= ~0x1FFFFF  # a 2 MiB buffer is a huge page
                end = start + piece * PAGE - 1
                records.append(
                    request(viommu, MAP.pack(RequestType.MAP, domain, start, end, phys, flags))
                )
                sent += 1
            queue.append((iova, pages))
        else:
            iova, pages = queue.pop(0 if rng.random() < 0.7 else rng.randrange(len(queue)))
            end = iova + pages * PAGE - 1
            records.append(request(viommu, UNMAP.pack(RequestType.UNMAP, domain, iova, end, 0)))
            allocators[domain].free(iova)
            sent += 1
    del records[first_timed + requests :]  # the last sg list may have run over
    return records, first_timed


def _segments(rng: random.Random, iova: int, pages: int) -> list[tuple[int, int]]:
    """(IOVA, pages) of each MAP of a buffer: one, or for some buffers of 2-32 pages a
    scatter-gather list of 2-4 physically discontiguous segments (the fixture's split)."""
    if not 1 < pages <= 32 or rng.random() >= 0.3:
        return [(iova, pages)]
    out = []
    for piece in _split(rng, pages):
        out.append((iova, piece))
        iova += piece * PAGE
    return out
