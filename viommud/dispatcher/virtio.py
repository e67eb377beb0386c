"""The virtio-iommu dispatcher: one request's events -> backend calls (DESIGN.md point 4).

Every virtio request is its own barrier (its used buffer is the completion the guest waits
for), so the plan covers one request:

* domain and endpoint events become topology operations (IOAS / HWPT / vDEVICE / attach),
  MAP and UNMAP become one ``IOMMU_IOAS_MAP`` / ``IOMMU_IOAS_UNMAP`` each (an UNMAP that
  removes several mappings is one call over the span they cover: iommufd unmaps whole areas
  only, and every area inside that span is one of them);
* ``TableInvalidation`` values (the shared intermediate form) are collected and sent when the
  barrier arrives, one ``IOMMU_HWPT_INVALIDATE`` array per backend object: on an Arm SMMU
  the iommufd vIOMMU (TLBI_NH_* by ASID / VA, CFGI_CD / CFGI_CD_ALL and ATC_INV per
  endpoint with vSID = endpoint ID; the kernel writes the VMID and the physical SID), on
  VT-d the domain's nested HWPT (``iommu_hwpt_vtd_s1_invalidate``; device TLBs follow);
  identical entries are sent once and a flood of page invalidations becomes a wider one;
* a failed call maps to the guest status of the request (``errno_status``) and nothing
  after it runs: ``run`` returns an ``Outcome`` with one ``GuestError`` (index 0, ``code``
  the status name). The model then has the frontend undo the request's guest-visible
  effects and passes the resulting ``GuestView`` to ``resync``, which rebuilds the host side
  of what the request touched.

The dispatcher holds no frontend: what it needs of the guest-visible state travels in the
events (``EndpointAttached.mappings``) or in the ``GuestView``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import Any

from protocols import iommufd as uapi
from protocols.models import HostIommu
from protocols.smmuv3 import Opcode, build_command
from protocols.virtio_iommu import RequestType, Status
from protocols.vtd import IOMMU_VTD_INV_FLAGS_LEAF, VTD_INV_ALL_PAGES
from viommud.backend.calls import BackendCallError, Iommufd
from viommud.dispatcher import NOTHING, DispatchStats, Outcome
from viommud.dispatcher.smmuv3_coalesce import class_rank
from viommud.events import Barrier, Cache, GuestError, Invalidation, Scope
from viommud.topology import TopologyError
from viommud.topology.virtio import NotGuestRam, VirtioTopology
from viommud.virtio_state import (
    DomainCreated,
    DomainDestroyed,
    EndpointAttached,
    EndpointDetached,
    GuestView,
    Mapped,
    TableAttached,
    TableInvalidation,
    Unmapped,
    VirtioEvent,
)

__all__ = ["VirtioDispatcher", "errno_status", "host_failure"]

ARM_ENTRY_LEN = 16
VTD_ENTRY_LEN = 24
ATC_SIZE_ALL = 52
MAX_RANGE_COMMANDS = 8  # more TLBI range commands than this: one TLBI_NH_ASID instead
_VTD_ENTRY = struct.Struct("<QQII")


def errno_status(request_type: int, err: int, ioctl: str = "") -> Status:
    """The virtio status for a host call ``ioctl`` failing with ``err`` during
    ``request_type``.

    ENOMEM/ENOSPC: NOMEM (insufficient resources). EFAULT: FAULT (bad address).
    EOPNOTSUPP: UNSUPP. ATTACH_TABLE refused by the kernel (EIO for STE fields it rejects,
    EINVAL): INVAL, the guest's descriptor is invalid. IOAS_MAP EINVAL/EOVERFLOW (an IOVA
    or size the host's page size cannot express): RANGE for a MAP; for an ATTACH, whose
    domain's existing mappings are replayed into the device's new IOAS, UNSUPP (the
    endpoint is incompatible with the domain, §3.2 ATTACH rule 7), and so is EADDRINUSE
    (HWPT_ALLOC on an IOAS whose areas the device's page size cannot hold). Anything else:
    DEVERR.
    """
    if err == errno.EADDRINUSE:
        return Status.UNSUPP
    if err in (errno.ENOMEM, errno.ENOSPC):
        return Status.NOMEM
    if err == errno.EFAULT:
        return Status.FAULT
    if err == errno.EOPNOTSUPP:
        return Status.UNSUPP
    if request_type == RequestType.ATTACH_TABLE and err in (errno.EIO, errno.EINVAL):
        return Status.INVAL
    if ioctl == "IOMMU_IOAS_MAP" and err in (errno.EINVAL, errno.EOVERFLOW):
        return Status.RANGE if request_type == RequestType.MAP else Status.UNSUPP
    if err == errno.EEXIST:
        return Status.INVAL
    return Status.DEVERR


# Ordering steps of one request's host work (``VirtioDispatcher._flush``): the SMMUv3
# coalescer's class ranks (``class_rank``: 0 configuration, 1 TLB, 2 device TLB).
STEP_CONFIG, STEP_TLB, STEP_ATC = 0, 1, 2


@dataclass(slots=True)
class _Bucket:
    """Entries for one backend object at this barrier."""

    iommu: str
    kind: str  # "viommu" | "hwpt"
    object_id: int
    data_type: int
    entry_len: int
    # entries per ordering step: configuration, then TLB, then ATC (see ``_flush``)
    steps: tuple[list[bytes], list[bytes], list[bytes]] = field(
        default_factory=lambda: ([], [], [])
    )

    def add(self, entry: bytes, step: int) -> None:
        entries = self.steps[step]
        if entry not in entries:
            entries.append(entry)


def host_failure(status: Status, reason: str) -> Outcome:
    """The outcome of a request the host refused: one error, at index 0, named by its
    virtio status (the frontend has not counted it yet)."""
    error = GuestError(0, status.name, reason, b"")
    return Outcome(errors=(error,), host_errors=(error,))


@dataclass(slots=True)
class VirtioDispatcher:
    topology: VirtioTopology
    iommufd: Iommufd
    stats: DispatchStats = field(default_factory=DispatchStats)
    touched_endpoints: set[int] = field(default_factory=set)
    touched_domains: set[int] = field(default_factory=set)
    _buckets: dict[tuple[str, int], _Bucket] = field(default_factory=dict)

    def run(self, request_type: int, events: list[VirtioEvent]) -> Outcome:
        """Carry out one request's events (``request_type`` 0: a change that is not a
        request); ``NOTHING``, or the host's refusal (``host_failure``)."""
        self.touched_endpoints.clear()
        self.touched_domains.clear()
        self._buckets.clear()
        invalidated = False
        counted = False  # this request's barrier was counted
        try:
            for event in events:
                if type(event) is TableInvalidation:
                    assert isinstance(event, TableInvalidation)
                    self._collect(event.domain, event.invalidation)
                    invalidated = True
                elif type(event) is Barrier:
                    self.stats.barriers += 1
                    counted = True
                    if invalidated:
                        self.stats.forwarded += 1
                        # what a VMM without coalescing must still issue: one call per
                        # ordering step per backend object (the steps cannot share a call)
                        self.stats.baseline_invalidate_calls += sum(
                            1 for b in self._buckets.values() for step in b.steps if step
                        )
                    if self._buckets:
                        self._flush()
                else:
                    self.apply(event)
        except BackendCallError as exc:
            failure = host_failure(errno_status(request_type, exc.errno, exc.ioctl), str(exc))
        except NotGuestRam as exc:
            failure = host_failure(Status.FAULT, str(exc))
        except TopologyError as exc:
            failure = host_failure(Status.DEVERR, str(exc))
        else:
            return NOTHING
        self._buckets.clear()
        if not counted and any(type(event) is Barrier for event in events):
            self.stats.barriers += 1  # the request still completes (with an error status)
        return failure

    # -- configuration and mappings -------------------------------------------------------
    def apply(self, event: VirtioEvent) -> None:
        """One non-invalidation event on the host side (raises on a refused call)."""
        topology = self.topology
        if isinstance(event, Mapped):
            self.touched_domains.add(event.domain)
            topology.map(event.domain, event.mapping)
        elif isinstance(event, Unmapped):
            self.touched_domains.add(event.domain)
            topology.unmap(event.domain, event.mappings)
        elif isinstance(event, EndpointAttached):
            self.touched_endpoints.add(event.endpoint)
            self.touched_domains.add(event.domain)
            # the frontend's store itself: the replay builds one Mapping at a time
            mappings = event.mappings
            topology.attach(event.endpoint, event.domain, lambda: mappings)
        elif isinstance(event, EndpointDetached):
            self.touched_endpoints.add(event.endpoint)
            if event.domain is not None:
                self.touched_domains.add(event.domain)
            topology.unattached(event.endpoint, event.bypass)
        elif isinstance(event, DomainCreated):
            self.touched_domains.add(event.domain)
            topology.domain_created(event.domain, event.kind, event.table)
        elif isinstance(event, DomainDestroyed):
            self.touched_domains.add(event.domain)
            topology.domain_destroyed(event.domain)
        elif isinstance(event, TableAttached):
            self.touched_domains.add(event.domain)
            topology.table_attached(event.domain, event.table)

    def resync(self, guest: GuestView) -> list[str]:
        """After the frontend undid a refused request: make the host match the guest-visible
        state ``guest`` again for every domain and endpoint the request touched. Returns
        problems."""
        topology = self.topology
        domains = guest.domains
        problems: list[str] = []
        for domain in sorted(self.touched_domains):
            if domain not in domains and domain in topology.domains:
                for vid in sorted(topology.domains[domain].endpoints):
                    self.touched_endpoints.add(vid)
                    _quietly(problems, lambda v=vid: topology.unattached(v, bypass=False))
                _quietly(problems, lambda d=domain: topology.domain_destroyed(d))
            elif domain in domains and domain not in topology.domains:
                view = domains[domain]
                topology.domain_created(domain, view.kind, view.table)
        for vid in sorted(self.touched_endpoints):
            target = guest.attached.get(vid)
            if target is None:
                _quietly(problems, lambda v=vid: topology.unattached(v, guest.bypass))
            else:
                dom = domains[target]
                _quietly(
                    problems,
                    lambda v=vid, t=target, d=dom: topology.attach(v, t, lambda: d.mappings),
                )
        return problems

    # -- invalidations --------------------------------------------------------------------
    def _bucket(
        self, iommu: str, kind: str, object_id: int, data_type: int, entry_len: int
    ) -> _Bucket:
        bucket = self._buckets.get((kind, object_id))
        if bucket is None:
            bucket = _Bucket(iommu, kind, object_id, data_type, entry_len)
            self._buckets[(kind, object_id)] = bucket
        return bucket

    def _collect(self, domain: int, inv: Invalidation) -> None:
        topology = self.topology
        nested = topology.nested_hwpts(domain)
        if not nested:
            self.stats.dropped += 1  # no host device walks this table: nothing cached
            return
        endpoints = topology.host_endpoints(domain)
        for _key, hwpt_id, iommu in nested:
            model = topology.host.iommu(iommu).model
            if model == HostIommu.INTEL_VTD:
                bucket = self._bucket(
                    iommu,
                    "hwpt",
                    hwpt_id,
                    uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                    VTD_ENTRY_LEN,
                )
                for entry in vtd_entries(inv):
                    bucket.add(entry, STEP_TLB)
                continue
            viommu_id = topology.viommu_id(iommu)
            assert viommu_id is not None
            bucket = self._bucket(
                iommu,
                "viommu",
                viommu_id,
                uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                ARM_ENTRY_LEN,
            )
            on_unit = [ep for ep in endpoints if ep.iommu == iommu]
            for entry in arm_entries(
                inv,
                [ep.vid for ep in on_unit if ep.vdevice],
                {ep.vid for ep in on_unit if ep.pdev.ats},
            ):
                bucket.add(entry, class_rank(entry[0]))

    def _flush(self) -> None:
        """Send the collected entries. The kernel issues the entries of one
        ``IOMMU_HWPT_INVALIDATE`` call with no sync between them, so work that must be
        ordered goes in separate calls, each returning before the next is made: every
        object's configuration invalidations (CFGI_CD*), then its TLB invalidations, then its
        ATC invalidations (the vSVA invalidate's order: a TLB refill must not use a stale
        CD, an ATC must not refill from a stale IOTLB)."""
        for step in (STEP_CONFIG, STEP_TLB, STEP_ATC):
            for bucket in self._buckets.values():
                entries = bucket.steps[step]
                if not entries:
                    continue
                result = self.iommufd.invalidate(
                    bucket.iommu,
                    object_kind=bucket.kind,
                    object_id=bucket.object_id,
                    data_type=bucket.data_type,
                    entry_len=bucket.entry_len,
                    entries=entries,
                )
                if result.errno:
                    raise BackendCallError(
                        "IOMMU_HWPT_INVALIDATE",
                        result.errno,
                        {"object_id": bucket.object_id, "done": result.done},
                    )
        self._buckets.clear()


def _quietly(problems: list[str], action: Any) -> None:
    try:
        action()
    except (BackendCallError, TopologyError, NotGuestRam) as exc:
        problems.append(str(exc))


# -- intermediate form -> uAPI entries ---------------------------------------------------------


def vtd_entries(inv: Invalidation) -> list[bytes]:
    """``iommu_hwpt_vtd_s1_invalidate`` entries (iommufd.md §4.2) for one invalidation."""
    if inv.scope is Scope.RANGE and inv.size:
        first = inv.addr & ~0xFFF
        last = inv.addr + inv.size - 1
        npages = ((last - first) >> 12) + 1
        flags = IOMMU_VTD_INV_FLAGS_LEAF if inv.leaf else 0
        return [_VTD_ENTRY.pack(first, npages, flags, 0)]
    return [_VTD_ENTRY.pack(0, VTD_INV_ALL_PAGES, 0, 0)]


def arm_entries(inv: Invalidation, vsids: list[int], ats: set[int]) -> list[bytes]:
    """SMMUv3 commands (iommufd.md §3.3) for one invalidation of a table domain whose
    endpoints on this SMMU are ``vsids`` (those in ``ats`` have ATS enabled)."""
    out: list[bytes] = []
    if inv.caches & Cache.CONFIG:
        for sid in vsids:
            if inv.scope is Scope.ASID and inv.asid is not None:
                out.append(build_command(Opcode.CFGI_CD, sid=sid, ssid=inv.asid, leaf=1))
            else:
                out.append(build_command(Opcode.CFGI_CD_ALL, sid=sid))
    if inv.caches & Cache.TLB:
        out.extend(_tlbi(inv))
    if inv.caches & Cache.DEVICE_TLB:
        for sid in vsids:
            if sid in ats:
                out.append(_atc_inv(inv, sid))
    return out


def _tlbi(inv: Invalidation) -> list[bytes]:
    if inv.scope is Scope.ALL:
        return [build_command(Opcode.TLBI_NH_ALL)]
    if inv.scope is Scope.ASID:
        assert inv.asid is not None
        return [build_command(Opcode.TLBI_NH_ASID, asid=inv.asid)]
    op = Opcode.TLBI_NH_VA if inv.asid is not None else Opcode.TLBI_NH_VAA
    asid = {"asid": inv.asid} if inv.asid is not None else {}
    leaf = 1 if inv.leaf else 0
    granule = _TABLE_GRANULE.get(inv.granule)
    if granule is None:  # no Arm translation granule has leaves of this size
        return _widen(inv)
    first = inv.addr & ~(granule - 1)
    pages = -(-(inv.addr + inv.size - first) // granule)
    if pages <= 1:
        return [build_command(op, leaf=leaf, addr=first >> 12, **asid)]
    # range invalidation (SMMUv3 §4.4.1.1): chunks of (NUM + 1) << SCALE pages
    out: list[bytes] = []
    addr, left = first, pages
    while left:
        scale = (left & -left).bit_length() - 1
        num = (left >> scale) & 0x1F
        if scale > 31 or len(out) == MAX_RANGE_COMMANDS:
            return _widen(inv)
        if num == 1 and scale == 0:  # NUM = SCALE = TTL = 0 is reserved: a plain VA
            out.append(build_command(op, leaf=leaf, addr=addr >> 12, **asid))
        else:
            out.append(
                build_command(
                    op,
                    leaf=leaf,
                    tg=_TG[granule],
                    num=num - 1,
                    scale=scale,
                    addr=addr >> 12,
                    **asid,
                )
            )
        covered = num << scale
        addr += covered * granule
        left -= covered
    return out


_TG = {4096: 1, 16384: 2, 65536: 3}
# The request's page size -> the granule of the table whose leaves have that size (VMSAv8-64
# block sizes: 4 KiB tables have 2 MiB, 1 GiB and (LPA2) 512 GiB blocks, 16 KiB tables 32 MiB
# and 64 GiB, 64 KiB tables 512 MiB and 4 TiB). A range TLBI's TG must be the table's granule
# (SMMUv3 §4.4.1.1), not 4 KiB whatever the table, or entries of a 16/64 KiB table may stay.
_TABLE_GRANULE = {
    **dict.fromkeys((1 << 12, 1 << 21, 1 << 30, 1 << 39), 4096),
    **dict.fromkeys((1 << 14, 1 << 25, 1 << 36), 16384),
    **dict.fromkeys((1 << 16, 1 << 29, 1 << 42), 65536),
}


def _widen(inv: Invalidation) -> list[bytes]:
    """A range too long to encode: the VM's whole TLB. Not TLBI_NH_ASID, which would spare
    the range's global (nG=0) entries that the guest's ranged invalidation removes."""
    return [build_command(Opcode.TLBI_NH_ALL)]


def _atc_inv(inv: Invalidation, sid: int) -> bytes:
    ssid = {"ssv": 1, "ssid": inv.asid} if inv.asid is not None else {}
    if inv.scope is not Scope.RANGE or not inv.size:
        return build_command(Opcode.ATC_INV, sid=sid, size=ATC_SIZE_ALL, **ssid)
    # the smallest naturally aligned 2^n-page span holding [addr, addr + size) (SMMUv3 §4.5.1)
    first = inv.addr >> 12
    last = (inv.addr + inv.size - 1) >> 12
    span = max((first ^ last).bit_length(), 0)
    if span >= ATC_SIZE_ALL:
        return build_command(Opcode.ATC_INV, sid=sid, size=ATC_SIZE_ALL, **ssid)
    base = first & ~((1 << span) - 1)
    return build_command(Opcode.ATC_INV, sid=sid, size=span, addr=base, **ssid)
