"""The VT-d dispatcher: one doorbell's events -> the fewest ``IOMMU_HWPT_INVALIDATE`` calls
that keep the guest's guarantees (DESIGN.md point 4); host failures -> IQE.

Plan (``VtdDispatcher.run``), per doorbell (one IQT write; a *batch* is its work up to the
next context/PASID-cache invalidation or its end):

* IOTLB (global / domain / page-selective) and P_IOTLB (PASID / page-selective)
  invalidations become ``iommu_hwpt_vtd_s1_invalidate`` entries (``addr``, ``npages``,
  ``LEAF`` from IH; whole space = ``addr 0, npages U64_MAX``) on every nested HWPT bound to
  that domain (and, for P_IOTLB, that PASID). Entries are collected per HWPT: duplicates and
  entries covered by another one are folded into it, and each HWPT gets one array call when
  the batch ends (a QEMU-like VMM makes one call per descriptor and per device). Entries
  keep guest order in the array, and the kernel carries them out one after the other.
* Device-TLB and PASID device-TLB invalidations cost no call when
  ``device_tlb_is_redundant`` says so (the elision rule, docs/vtd.md); otherwise they become
  an entry on the device's HWPT covering their range (a host HWPT invalidation flushes the
  device TLBs of every device on it), after the batch's IOTLB-class entries.
* Context-cache and PASID-cache invalidations re-read the guest's entries they cover, as
  QEMU does, and move devices between HWPTs (viommud.topology.vtd); the work collected
  before them is sent first, so the host sees guest order.
* A wait descriptor completes when the calls for everything before it have returned. The
  guest sees completions only in the doorbell's reply (QEMU processes the queue inside the
  IQT write), so the waits of one doorbell share its calls: each HWPT gets one call per
  doorbell, the lower bound, and the status writes (SW=1) are reported in order after them.
* A failed entry becomes IQE at the guest descriptor that produced it (the earliest, when
  several were folded into it); the entries after it, and the folded descriptors, are sent
  again, so every descriptor reported without an error really was carried out. A device-TLB
  invalidation elided on the strength of an entry of its own batch is re-checked once the
  calls have returned and sent after all if that entry failed; a failure also makes the
  HWPT forget its earlier flushes for the elision rule.
"""

from __future__ import annotations

import errno as errno_mod
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from protocols import iommufd as uapi
from viommud.backend.calls import Iommufd
from viommud.dispatcher import DispatchStats
from viommud.events import (
    Barrier,
    ContextCacheInvalidated,
    DomainInvalidation,
    GuestError,
    Invalidation,
    PasidCacheInvalidated,
    StatusWrite,
)
from viommud.frontends.vtd.decode import (
    LegacyContext,
    PasidEntry,
    ScalableContext,
    decode_context_entry,
    decode_pasid_entry,
)
from viommud.frontends.vtd.frontend import IQE, VtdEvent, VtdFrontend
from viommud.topology import TopologyError
from viommud.topology.vtd import (
    BLOCKED_NOT_PRESENT,
    FULL_END,
    Binding,
    FlushHistory,
    SharedHwpt,
    VtdDevice,
    VtdTopology,
    legacy_binding,
    pasid_binding,
)

__all__ = ["DoorbellResult", "VtdDispatcher", "device_tlb_is_redundant"]

U64_MAX = (1 << 64) - 1
ENTRY_LEN = 24  # sizeof(struct iommu_hwpt_vtd_s1_invalidate)
_ENTRY = struct.Struct("<QQII")


def device_tlb_is_redundant(
    flushes: FlushHistory,
    joined: int,
    start: int,
    end: int,
    pending: Iterable[tuple[int, int]] = (),
) -> bool:
    """The device-TLB elision rule (docs/vtd.md, "Device-TLB elision").

    A guest device-TLB invalidation of ``[start, end)`` for a device that joined its nested
    HWPT at clock ``joined`` needs no host call when an IOTLB-class invalidation covering the
    whole range was carried out on that HWPT after the device joined it (``flushes``), or is
    in the same batch (``pending`` ranges, sent before the batch's wait completes).

    Why: a host ``VTD_S1`` HWPT invalidation flushes the IOTLB and then the device TLB of
    every device attached to the HWPT. A correct guest changes a translation, then
    invalidates the IOTLB for it, then the device TLBs; the IOTLB-class invalidation after
    the change reached this HWPT, so the device TLB lost every entry of the range cached
    before it, and whatever the device cached since came from a clean IOTLB and the new page
    table. If the device moved to another HWPT since, the flush may have reached the wrong
    one: forwarded.
    """
    if flushes.full > joined:
        return True
    for clock, lo, hi in flushes.recent:
        if clock > joined and lo <= start and end <= hi:
            return True
    return any(lo <= start and end <= hi for lo, hi in pending)


@dataclass(slots=True)
class _Entry:
    """One ``iommu_hwpt_vtd_s1_invalidate`` and the guest descriptors it carries out."""

    start: int
    end: int  # exclusive; FULL_END = the whole address space
    leaf: bool
    origins: list[int]

    def covers(self, start: int, end: int, leaf: bool) -> bool:
        return self.start <= start and end <= self.end and (leaf or not self.leaf)

    def pack(self) -> bytes:
        if self.start == 0 and self.end >= FULL_END:
            addr, npages = 0, U64_MAX
        else:
            addr, npages = self.start, (self.end - self.start) >> 12
        return _ENTRY.pack(addr, npages, uapi.IOMMU_VTD_INV_FLAGS_LEAF if self.leaf else 0, 0)


@dataclass(slots=True)
class _Batch:
    """Entries collected for one nested HWPT."""

    hwpt: SharedHwpt
    entries: list[_Entry] = field(default_factory=list)

    def add(self, start: int, end: int, leaf: bool, origin: int) -> None:
        """Add an entry, folding it into one that covers it, or folding those it covers."""
        entries = self.entries
        for entry in entries:
            if entry.covers(start, end, leaf):
                if origin not in entry.origins:
                    entry.origins.append(origin)
                    entry.origins.sort()
                return
        new = _Entry(start, end, leaf, [origin])
        kept: list[_Entry] = []
        at = len(entries)
        for entry in entries:
            if new.covers(entry.start, entry.end, entry.leaf):
                at = min(at, len(kept))
                new.origins.extend(entry.origins)
            else:
                kept.append(entry)
        new.origins = sorted(set(new.origins))
        kept.insert(at, new)
        self.entries = kept


@dataclass(slots=True)
class _DeviceTlb:
    index: int
    vdev: VtdDevice
    hwpt: SharedHwpt
    start: int
    end: int


@dataclass(slots=True)
class DoorbellResult:
    """What one doorbell produced for the guest: errors and status writes, in order."""

    errors: list[GuestError] = field(default_factory=list)
    status_writes: list[StatusWrite] = field(default_factory=list)


@dataclass(slots=True)
class VtdDispatcher:
    frontend: VtdFrontend
    topology: VtdTopology
    iommufd: Iommufd
    stats: DispatchStats = field(default_factory=DispatchStats)
    elided: int = 0  # device-TLB invalidations that cost no call
    _pending: dict[int, _Batch] = field(default_factory=dict)
    _device_tlbs: list[_DeviceTlb] = field(default_factory=list)
    _raw: dict[int, bytes] = field(default_factory=dict)  # index -> descriptor, this doorbell
    _errors: dict[int, GuestError] = field(default_factory=dict)
    _first_barrier: int = 0  # barrier number the pending work belongs to

    def run(self, events: list[VtdEvent]) -> DoorbellResult:
        """Execute one doorbell's events."""
        result = DoorbellResult()
        self._errors = {}
        self._raw = {}
        stats = self.stats
        for event in events:
            if isinstance(event, DomainInvalidation):
                self._raw[event.index] = event.raw
                self._collect(event)
            elif isinstance(event, Invalidation):
                self._raw[event.index] = event.raw
                self._collect_device_tlb(event)
            elif isinstance(event, Barrier):
                stats.barriers += 1  # completes with the doorbell's calls (see the plan)
            elif isinstance(event, StatusWrite):
                result.status_writes.append(event)
            elif isinstance(event, ContextCacheInvalidated):
                self._flush()
                self._context_invalidated(event)
            elif isinstance(event, PasidCacheInvalidated):
                self._flush()
                self._pasid_invalidated(event)
            elif isinstance(event, GuestError):
                self._errors.setdefault(event.index, event)
        self._flush()
        result.errors = [self._errors[index] for index in sorted(self._errors)]
        return result

    # -- collecting ---------------------------------------------------------------------
    def _begin_work(self) -> None:
        if not self._pending and not self._device_tlbs:
            self._first_barrier = self.stats.barriers + 1

    def _collect(self, inv: DomainInvalidation) -> None:
        hwpts, devices = self.topology.nested_in(inv.domain, inv.pasid)
        self.stats.baseline_invalidate_calls += devices  # one call per descriptor and device
        if not hwpts:
            return
        self._begin_work()
        self.stats.forwarded += 1
        end = inv.addr + inv.size if inv.size else FULL_END
        for hwpt in hwpts:
            self._batch(hwpt).add(inv.addr, end, inv.leaf, inv.index)

    def _collect_device_tlb(self, inv: Invalidation) -> None:
        assert inv.device is not None
        vdev = self.topology.vdevice(inv.device)
        if vdev is None:
            self.stats.dropped += 1  # no such device: nothing can be cached for it
            return
        binding, hwpt = vdev.binding, vdev.hwpt
        if hwpt is None or binding is None or not vdev.ats:
            return  # pass-through, blocked or no ATC on the host: no stage-1 entry to drop
        if inv.asid is not None and inv.asid != binding.pasid:
            return  # a PASID this VMM does not nest: the host device has no such entries
        self._begin_work()
        end = inv.addr + inv.size if inv.size else FULL_END
        self._device_tlbs.append(_DeviceTlb(inv.index, vdev, hwpt, inv.addr, end))

    def _batch(self, hwpt: SharedHwpt) -> _Batch:
        batch = self._pending.get(hwpt.hwpt_id)
        if batch is None:
            batch = self._pending[hwpt.hwpt_id] = _Batch(hwpt)
        return batch

    # -- execution ----------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending and not self._device_tlbs:
            return
        self.iommufd.log.barrier = self._first_barrier
        recheck: list[_DeviceTlb] = []
        for dev in self._device_tlbs:
            batch = self._pending.get(dev.hwpt.hwpt_id)
            ranges = [(e.start, e.end) for e in batch.entries] if batch is not None else []
            if device_tlb_is_redundant(dev.hwpt.flushes, dev.vdev.joined, dev.start, dev.end):
                self.elided += 1
            elif ranges and device_tlb_is_redundant(
                FlushHistory(), dev.vdev.joined, dev.start, dev.end, ranges
            ):
                recheck.append(dev)  # elided if its batch's covering entry succeeds
            else:
                self.stats.forwarded += 1
                self._batch(dev.hwpt).add(dev.start, dev.end, True, dev.index)
        self._device_tlbs = []
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            self._send(batch)
        for dev in recheck:
            if device_tlb_is_redundant(dev.hwpt.flushes, dev.vdev.joined, dev.start, dev.end):
                self.elided += 1
            else:  # the entry it counted on failed: it is sent on its own
                self.stats.forwarded += 1
                self._batch(dev.hwpt).add(dev.start, dev.end, True, dev.index)
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        hwpt = batch.hwpt
        entries = batch.entries
        topology = self.topology
        while entries:
            result = self.iommufd.invalidate(
                hwpt.iommu,
                object_kind="hwpt",
                object_id=hwpt.hwpt_id,
                data_type=uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                entry_len=ENTRY_LEN,
                entries=[e.pack() for e in entries],
            )
            if result.errno == 0:
                clock = topology.tick()
                for entry in entries:
                    hwpt.flushes.record(clock, entry.start, entry.end)
                return
            # Some guest change may now be in no host flush: forget what earlier flushes
            # covered, so device-TLB invalidations are sent again until new flushes cover them.
            hwpt.flushes = FlushHistory()
            done = min(result.done, len(entries) - 1)
            bad = entries[done]
            first, rest = bad.origins[0], bad.origins[1:]
            self._fail(
                first,
                f"host IOMMU_HWPT_INVALIDATE on HWPT {hwpt.hwpt_id} failed "
                f"(errno {_errno_name(result.errno)})",
            )
            retry = [_Entry(bad.start, bad.end, bad.leaf, rest)] if rest else []
            entries = retry + entries[done + 1 :]

    def _fail(self, index: int, reason: str) -> None:
        if index in self._errors:
            return
        self.frontend.record_error(IQE)
        self._errors[index] = GuestError(index, IQE, reason, self._raw.get(index, b""))

    # -- context and PASID caches (re-read as QEMU does) --------------------------------
    def _context_invalidated(self, event: ContextCacheInvalidated) -> None:
        self.iommufd.log.barrier = self.stats.barriers + 1
        frontend, topology = self.frontend, self.topology
        failures: list[str] = []
        for vid in sorted(topology.vdevices):
            if vid & event.mask != event.sid & event.mask:
                continue
            raw = frontend.context_table.get(vid)
            if raw is None:
                continue  # never written: nothing to read, the device is left alone
            vdev = topology.vdevices[vid]
            ctx = decode_context_entry(raw)
            entry: PasidEntry | None = None
            if isinstance(ctx, LegacyContext):
                binding = legacy_binding(ctx)
            elif not ctx.present or ctx.reserved:
                binding = BLOCKED_NOT_PRESENT
            else:  # the device's PASID cache is re-read too (QEMU: PASID-cache devsi)
                entry = self._read_pasid(vid, ctx)
                binding = pasid_binding(entry, ctx.rid_pasid)
            if self._bind(vdev, binding, failures):
                vdev.context, vdev.pasid_entry = ctx, entry
        self._report(event.index, event.raw, failures)

    def _pasid_invalidated(self, event: PasidCacheInvalidated) -> None:
        self.iommufd.log.barrier = self.stats.barriers + 1
        topology = self.topology
        failures: list[str] = []
        for vid in sorted(topology.vdevices):
            vdev = topology.vdevices[vid]
            ctx = vdev.context
            if not isinstance(ctx, ScalableContext) or not ctx.present:
                continue  # PASID entries are reached through a scalable-mode context
            new = self._read_pasid(vid, ctx)
            cached = vdev.pasid_entry
            if new is None:
                if cached is None:
                    continue
                binding = BLOCKED_NOT_PRESENT  # gone: whatever the granularity (QEMU)
            else:
                if event.domain is not None:
                    if event.pasid is not None and event.pasid != ctx.rid_pasid:
                        continue
                    did = cached.did if cached is not None else new.did
                    if did != event.domain:
                        continue
                if cached is not None and cached.key == new.key:
                    continue
                binding = pasid_binding(new, ctx.rid_pasid)
            if self._bind(vdev, binding, failures):
                vdev.pasid_entry = new
        self._report(event.index, event.raw, failures)

    def _read_pasid(self, vid: int, ctx: ScalableContext) -> PasidEntry | None:
        raw = self.frontend.pasid_table.get((vid, ctx.rid_pasid))
        if raw is None:
            return None  # never written: reads as not present
        entry = decode_pasid_entry(raw)
        return entry if entry.present else None

    def _bind(self, vdev: VtdDevice, binding: Binding, failures: list[str]) -> bool:
        try:
            self.topology.bind(vdev.vid, binding)
        except TopologyError as exc:
            failures.append(str(exc))
            return False
        return True

    def _report(self, index: int, raw: bytes, failures: list[str]) -> None:
        if failures:
            self._raw[index] = raw
            self._fail(index, "; ".join(failures))


def _errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, str(err))
