"""Synthetic VT-d guest traces in the shape Linux's intel-iommu driver produces in strict mode.

``strict_ats(unmaps)`` returns trace records (docs/trace-format.md §2) as JSON-ready
dicts, header first, and the index of the first timed record: everything before it is set-up (the
vIOMMU, its devices, their context and PASID entries and the invalidations that bind them),
everything from it on is the guest's stream of strict unmaps, one doorbell each.

The shape is Linux 6.12's ``cache_tag_flush_range`` for an unmap (``iommu.strict=1``), all
descriptors of one flush in one batch (``qi_batch``) published with one IQT write
(``qi_submit_sync``):

* one page-selective IOTLB invalidation of the domain: in scalable mode (the default, as
  QEMU's ``x-flts=on`` needs) a PASID-based IOTLB invalidation (P_IOTLB, G=3, PASID 0 =
  RID_PASID) because DMA domains use first-stage tables; in legacy mode an IOTLB PSI
  (type 2, G=3). ADDR/AM cover the unmapped range aligned to a power of two pages
  (``calculate_psi_aligned_address``); IH set unless a page-table page was freed;
* one device-TLB invalidation (type 3) per ATS device of the domain, same range in the PCIe
  ATS size encoding (``qi_flush_dev_iotlb``: S=1 and the low address bits set for more than
  one page); PFSID 0 (the vIOMMU has no ECAP.DIT), MIP 0 (queue depth 32);
* an invalidation wait with SW=1 writing QI_DONE (2) to ``desc_status[wait_index]``, the
  status dword of the wait's own queue slot (256 slots, as Linux's QI_LENGTH).

Maps cost nothing in scalable mode (first-stage domains need no caching-mode flush of new
PTEs: ``cache_tag_flush_range_np``); in legacy mode (second stage, and QEMU's vIOMMU has
caching mode) each map is flushed with its own [IOTLB PSI, wait] doorbell.

Devices and domains: the host of fixtures/generate_vtd.py (three ATS functions, a device
without ATS on dmar0, an ATS device on dmar1). The three ATS functions share one DMA domain
(one IOMMU group, as a multi-function device without ACS has), the others have a domain of
their own, so a flush carries 3, 0 or 1 device-TLB invalidations. IOVAs come from the same
top-down, size-aligned allocator Linux's iova.c is modelled with in
fixtures/generate_virtio.py, so freed IOVAs are handed out again as the rcaches do.

Descriptors and entries are built with the construct declarations of protocols/vtd.py
(memoised: a strict stream repeats the same few thousand descriptors).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

from fixtures.generate_virtio import SIZES, IovaAllocator
from fixtures.generate_vtd import GUEST, HOST, attach, create, legacy_ctx, pasid, sm_ctx
from protocols.vtd import DescType, build_descriptor

PAGE_SHIFT = 12
QI_LENGTH = 256  # descriptors in Linux's invalidation queue; one status dword per slot
QI_DONE = 2
STATUS_BASE = 0x7F000000  # guest-physical address of desc_status[0]
IOVA_LIMIT = 0xFEE00000  # 32-bit DMA mask, below the interrupt window iova.c reserves
INFLIGHT = 16  # DMA buffers a device keeps mapped before the driver unmaps the oldest


@dataclass(frozen=True)
class Domain:
    did: int
    devices: tuple[str, ...]  # host device ids (fixtures/generate_vtd.py HOST)
    table: int  # guest-physical root of its page table


DOMAINS = (
    Domain(2, ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"), 0x40000000),
    Domain(3, ("0000:04:00.0",), 0x40100000),
    Domain(4, ("0000:81:00.0",), 0x40200000),
)
HOST_DEVICES = cast("list[dict[str, Any]]", HOST["devices"])
ATS = {device["id"]: bool(device["ats"]) for device in HOST_DEVICES}


@lru_cache(maxsize=1 << 16)
def _descriptor(kind: int, width: int, fields: tuple[tuple[str, int], ...]) -> bytes:
    return build_descriptor(kind, width=width, **dict(fields))


def descriptor(kind: int, width: int, **fields: int) -> bytes:
    """``protocols.vtd.build_descriptor``, memoised (on the fields in the caller's order)."""
    return _descriptor(kind, width, tuple(fields.items()))


class Queue:
    """One vIOMMU's invalidation queue as Linux fills it: slots, batches, waits."""

    def __init__(self, viommu: str, width: int) -> None:
        self.viommu = viommu
        self.width = width
        self.head = 0  # qi->free_head

    def submit(self, *descs: bytes) -> dict[str, Any]:
        """``qi_submit_sync``: the batch, then a wait writing QI_DONE into the status dword
        of the wait's own slot; one doorbell."""
        slot = (self.head + len(descs)) % QI_LENGTH
        self.head = (slot + 1) % QI_LENGTH
        wait = descriptor(
            DescType.INV_WAIT,
            self.width,
            sw=1,
            status_data=QI_DONE,
            status_addr=(STATUS_BASE + 4 * slot) >> 2,
        )
        return {"op": "cmds", "viommu": self.viommu, "data": b"".join((*descs, wait)).hex()}


def psi_range(iova: int, pages: int) -> tuple[int, int]:
    """(first page, AM): the smallest naturally aligned power-of-two block of pages that
    covers ``pages`` pages from ``iova`` (``calculate_psi_aligned_address``)."""
    first = iova >> PAGE_SHIFT
    last = first + pages - 1
    mask = max(0, (pages - 1).bit_length())
    while (first >> mask) != (last >> mask):
        mask += 1
    return first & ~((1 << mask) - 1), mask


def dev_tlb_addr(page: int, mask: int) -> tuple[int, int]:
    """(ADDR, S) of a device-TLB invalidation of 2^mask pages from ``page``: PCIe ATS
    encoding, the bits below the size set (``qi_flush_dev_iotlb``)."""
    if not mask:
        return page, 0
    addr = (page << PAGE_SHIFT) | ((1 << (PAGE_SHIFT + mask - 1)) - 1)
    return addr >> PAGE_SHIFT, 1


def _setup(
    name: str, viommu: str, scalable: bool
) -> tuple[list[dict[str, Any]], Queue, dict[str, Domain]]:
    width = 32 if scalable else 16
    q = Queue(viommu, width)
    records: list[dict[str, Any]] = [
        {"format": "viommud-trace", "version": 1, "name": name, "host": HOST},
        create(viommu, ["dmar0", "dmar1"], width * 8),
    ]
    domain_of: dict[str, Domain] = {}
    for domain in DOMAINS:
        for device in domain.devices:
            domain_of[device] = domain
            sid = GUEST[device]
            records += attach(viommu, device)
            if scalable:
                # intel_pasid_setup_sm_context, then domain_setup_first_level for RID_PASID;
                # the guest sees caching mode, so every change is followed by its flush
                records += [
                    sm_ctx(viommu, sid, dte=int(ATS[device])),
                    pasid(viommu, sid, domain.did, domain.table),
                    q.submit(descriptor(DescType.CC_INV, width, g=3, sid=sid)),
                    q.submit(descriptor(DescType.PC_INV, width, g=1, did=domain.did)),
                    q.submit(descriptor(DescType.P_IOTLB_INV, width, g=2, did=domain.did)),
                ]
            else:
                # domain_context_mapping_one: TT=1 (device TLB) for ATS devices, then the
                # caching-mode flushes of the context and the domain
                records += [
                    legacy_ctx(viommu, sid, domain.did, domain.table, tt=int(ATS[device])),
                    q.submit(descriptor(DescType.CC_INV, width, g=3, sid=sid)),
                    q.submit(descriptor(DescType.IOTLB_INV, width, g=2, did=domain.did)),
                ]
    return records, q, domain_of


def strict_ats(
    unmaps: int, *, scalable: bool = True, seed: int = 3, viommu: str = "v"
) -> tuple[list[dict[str, Any]], int]:
    """(records, index of the first timed record): set-up, then ``unmaps`` strict unmaps,
    each [IOTLB PSI, device-TLB per ATS device of the domain, wait] in one doorbell."""
    name = "vtd-strict-ats" if scalable else "vtd-legacy-strict-ats"
    records, q, _ = _setup(name, viommu, scalable)
    first_timed = len(records)
    width = q.width
    rng = random.Random(seed)
    sizes, weights = zip(*SIZES, strict=True)
    allocators = {domain.did: IovaAllocator(IOVA_LIMIT) for domain in DOMAINS}
    live: dict[int, list[tuple[int, int]]] = {domain.did: [] for domain in DOMAINS}
    ats_sids = {domain.did: [GUEST[d] for d in domain.devices if ATS[d]] for domain in DOMAINS}
    done = 0
    while done < unmaps:
        domain = rng.choice(DOMAINS)
        did = domain.did
        queue = live[did]
        while len(queue) < INFLIGHT:  # dma_map
            pages = rng.choices(sizes, weights)[0]
            iova = allocators[did].alloc(pages)
            queue.append((iova, pages))
            if not scalable:  # caching mode, second stage: the new PTEs are flushed too
                page, mask = psi_range(iova, pages)
                iotlb = descriptor(DescType.IOTLB_INV, width, g=3, did=did, addr=page, am=mask)
                records.append(q.submit(iotlb))
        index = 0 if rng.random() < 0.7 else rng.randrange(len(queue))
        iova, pages = queue.pop(index)
        allocators[did].free(iova)
        page, mask = psi_range(iova, pages)
        ih = int(pages < 512)  # a 2 MiB unmap frees a page-table page: no IH
        kind = DescType.P_IOTLB_INV if scalable else DescType.IOTLB_INV
        iotlb = descriptor(kind, width, g=3, did=did, addr=page, am=mask, ih=ih)
        addr, size = dev_tlb_addr(page, mask)
        devtlb = [
            descriptor(DescType.DEV_TLB_INV, width, sid=sid, addr=addr, s=size)
            for sid in ats_sids[did]
        ]
        records.append(q.submit(iotlb, *devtlb))
        done += 1
    return records, first_timed
