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

Group commit (``VtdDispatcher.run_plain``, docs/coalescing.md): a run of consecutive plain
doorbells (viommud.group_commit.vtd_screen) sends everything it asks of a nested HWPT as one call,
coalesced across the run (vtd_bulk), and decides and counts as the per-doorbell plan would.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocols import iommufd as uapi
from viommud.backend.calls import InvalidateResult, Iommufd
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
from viommud.frontends.vtd.frontend import IQE, PAGE_SHIFT, VtdEvent, VtdFrontend
from viommud.group_commit.vtd_coalesce import I64, Bools, coalesce, pack
from viommud.group_commit.vtd_screen import FULL_PAGES, NO_ID, PlainWork
from viommud.guest.vtd import (
    LegacyContext,
    PasidEntry,
    ScalableContext,
    decode_context_entry,
    decode_pasid_entry,
)
from viommud.topology import TopologyError
from viommud.topology.vtd import (
    BLOCKED_NOT_PRESENT,
    FULL_END,
    HISTORY,
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
    for clock, lo, hi in reversed(flushes.recent):  # the cover is usually the latest flush
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
class _HwptRun:
    """What a run of plain doorbells asks of one nested HWPT (group commit): rows of its
    ``TlbWork`` and ``DeviceTlbWork``, the latter with the join time of their device."""

    hwpt: SharedHwpt
    tlb: list[npt.NDArray[np.intp]] = field(default_factory=list)
    devices: list[tuple[npt.NDArray[np.intp], int]] = field(default_factory=list)


@dataclass(slots=True)
class _Plan:
    """A run of plain doorbells, planned (group commit): the calls to make and, once they
    have all succeeded, the flush histories to keep and what to count."""

    sends: list[tuple[SharedHwpt, bytes]] = field(default_factory=list)
    histories: list[tuple[SharedHwpt, FlushHistory]] = field(default_factory=list)
    baseline: int = 0
    forwarded: int = 0
    dropped: int = 0
    elided: int = 0


# One doorbell's work on one HWPT: IOTLB-class (start, end, IH) and device-TLB (start, end,
# join time) spans in bytes, guest order.
_DoorbellWork = tuple[list[tuple[int, int, bool]], list[tuple[int, int, int]]]


def _work_of(
    work: dict[int, tuple[SharedHwpt, dict[int, _DoorbellWork]]], hwpt: SharedHwpt, k: int
) -> _DoorbellWork:
    per_doorbell = work.setdefault(hwpt.hwpt_id, (hwpt, {}))[1]
    found = per_doorbell.get(k)
    if found is None:
        found = per_doorbell[k] = ([], [])
    return found


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
        hwpt = _device_tlb_target(vdev, inv.asid)
        if hwpt is None:
            return
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

    def _invalidate(self, hwpt: SharedHwpt, array: bytes) -> InvalidateResult:
        """One ``IOMMU_HWPT_INVALIDATE`` of ``iommu_hwpt_vtd_s1_invalidate`` entries."""
        return self.iommufd.invalidate_array(
            hwpt.iommu,
            object_kind="hwpt",
            object_id=hwpt.hwpt_id,
            data_type=uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
            entry_len=ENTRY_LEN,
            array=array,
        )

    def _send(self, batch: _Batch) -> None:
        hwpt = batch.hwpt
        entries = batch.entries
        topology = self.topology
        while entries:
            result = self._invalidate(hwpt, b"".join(e.pack() for e in entries))
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

    # -- group commit -------------------------------------------------------------------
    def run_plain(self, work: PlainWork | list[list[VtdEvent]], waits: int) -> bool:
        """Execute a run of consecutive plain doorbells (viommud.group_commit.vtd_screen) at once:
        one call per nested HWPT for all of them, every wait of the run completing when those
        calls have returned. ``work`` is the run as arrays (a large screen; coalesced by
        vtd_bulk) or as the frontend's events per doorbell (a small one; folded as ``_Batch``
        folds).

        Decisions and counts are those of ``run`` doorbell by doorbell. The topology cannot
        change within the run (no context- or PASID-cache invalidation), so each descriptor
        reaches the HWPTs and devices it would reach alone; and the elision rule is replayed
        over each HWPT's flush history as the per-doorbell calls would have left it
        (``_replay_elision``), so a device-TLB invalidation is elided exactly when ``run``
        would elide it, and everything ``run`` would send is covered by what is sent.

        Returns False when a host call fails, having counted and recorded nothing: the caller
        then runs the doorbells one by one (``run``), which maps the failure to its guest
        descriptor and sends the rest again (invalidations are idempotent)."""
        plan = self._plan_bulk(work) if isinstance(work, PlainWork) else self._plan_events(work)
        stats = self.stats
        if plan.sends:
            self.iommufd.log.barrier = stats.barriers + 1
        for hwpt, array in plan.sends:
            result = self._invalidate(hwpt, array)
            if result.errno:
                return False
        if plan.sends:
            self.topology.tick()  # the clock the plan recorded its flushes at
        for hwpt, history in plan.histories:
            hwpt.flushes = history
        stats.baseline_invalidate_calls += plan.baseline
        stats.forwarded += plan.forwarded
        stats.dropped += plan.dropped
        stats.barriers += waits
        self.elided += plan.elided
        return True

    def _plan_bulk(self, work: PlainWork) -> _Plan:
        tlb, dev = work.tlb, work.device_tlb
        runs, plan = self._plain_targets(work)
        clock = self.topology.clock + 1  # the one tick of this run's calls
        for run in runs.values():
            t = np.sort(np.concatenate(run.tlb)) if run.tlb else np.zeros(0, dtype=np.intp)
            d, joined = t[:0], np.zeros(0, dtype=np.int64)
            if run.devices:
                d = np.concatenate([rows for rows, _ in run.devices])
                joined = np.repeat([at for _, at in run.devices], [len(r) for r, _ in run.devices])
                order = np.argsort(d, kind="stable")
                d, joined = d[order], joined[order]
            spans = (tlb.start[t], tlb.end[t], tlb.leaf[t])
            kept, history = _replay_elision(
                run.hwpt,
                clock,
                (work.doorbell[tlb.row[t]], *spans),
                (work.doorbell[dev.row[d]], dev.start[d], dev.end[d], joined),
            )
            sent = d[kept]
            plan.elided += len(d) - len(sent)
            plan.forwarded += len(sent)
            plan.histories.append((run.hwpt, history))
            if len(t) or len(sent):
                spans = coalesce(
                    np.concatenate((spans[0], dev.start[sent])),
                    np.concatenate((spans[1], dev.end[sent])),
                    np.concatenate((spans[2], np.ones(len(sent), dtype=np.bool_))),
                )
                plan.sends.append((run.hwpt, pack(*spans)))
        return plan

    def _plan_events(self, doorbells: list[list[VtdEvent]]) -> _Plan:
        """``_plan_bulk`` for a few doorbells, from the frontend's events: routed as
        ``_collect`` and ``_collect_device_tlb`` route them, replayed doorbell by doorbell
        (``_replay_doorbell``), and each HWPT's entries folded into one ``_Batch``."""
        topology, plan = self.topology, _Plan()
        reach: dict[tuple[int | None, int | None], tuple[list[SharedHwpt], int]] = {}
        work: dict[int, tuple[SharedHwpt, dict[int, _DoorbellWork]]] = {}
        for k, events in enumerate(doorbells):
            for event in events:
                if type(event) is DomainInvalidation:
                    key = (event.domain, event.pasid)
                    found = reach.get(key)
                    if found is None:
                        found = reach[key] = topology.nested_in(*key)
                    hwpts, devices = found
                    plan.baseline += devices
                    plan.forwarded += bool(hwpts)
                    end = event.addr + event.size if event.size else FULL_END
                    for hwpt in hwpts:
                        _work_of(work, hwpt, k)[0].append((event.addr, end, event.leaf))
                elif type(event) is Invalidation:
                    assert event.device is not None
                    vdev = topology.vdevice(event.device)
                    if vdev is None:
                        plan.dropped += 1
                        continue
                    target = _device_tlb_target(vdev, event.asid)
                    if target is None:
                        continue
                    end = event.addr + event.size if event.size else FULL_END
                    _work_of(work, target, k)[1].append((event.addr, end, vdev.joined))
        clock = topology.clock + 1
        for hwpt, per_doorbell in work.values():
            history = FlushHistory(hwpt.flushes.full, deque(hwpt.flushes.recent, HISTORY))
            batch = _Batch(hwpt)  # what the run sends to this HWPT
            for tlb, device_tlbs in per_doorbell.values():
                sent = _replay_doorbell(hwpt, history, clock, tlb, device_tlbs)
                for start, end, leaf in tlb:
                    batch.add(start, end, leaf, 0)
                for (start, end, _), keep in zip(device_tlbs, sent, strict=True):
                    if keep:
                        batch.add(start, end, True, 0)
                plan.forwarded += sum(sent)
                plan.elided += len(sent) - sum(sent)
            plan.histories.append((hwpt, history))
            if batch.entries:
                plan.sends.append((hwpt, b"".join(e.pack() for e in batch.entries)))
        return plan

    def _plain_targets(self, work: PlainWork) -> tuple[dict[int, _HwptRun], _Plan]:
        """The nested HWPTs a run's invalidations reach, as ``_collect`` and
        ``_collect_device_tlb`` route them (each distinct domain/PASID and device looked up
        once), and a plan counting the baseline calls, the IOTLB-class descriptors forwarded
        and the device-TLB descriptors dropped."""
        topology = self.topology
        tlb, dev = work.tlb, work.device_tlb
        runs: dict[int, _HwptRun] = {}
        plan = _Plan()
        if len(tlb.row):
            for key, rows in _groups((tlb.domain + 1) << 21 | (tlb.pasid + 1)):
                did, pasid = (key >> 21) - 1, (key & 0x1FFFFF) - 1
                hwpts, devices = topology.nested_in(
                    None if did == NO_ID else did, None if pasid == NO_ID else pasid
                )
                plan.baseline += devices * len(rows)  # one call per descriptor and device
                if hwpts:
                    plan.forwarded += len(rows)
                for hwpt in hwpts:
                    runs.setdefault(hwpt.hwpt_id, _HwptRun(hwpt)).tlb.append(rows)
        if len(dev.row):
            for key, rows in _groups(dev.device << 21 | (dev.pasid + 1)):
                sid, pasid = key >> 21, (key & 0x1FFFFF) - 1
                vdev = topology.vdevice(sid)
                if vdev is None:
                    plan.dropped += len(rows)  # no such device: nothing can be cached for it
                    continue
                target = _device_tlb_target(vdev, None if pasid == NO_ID else pasid)
                if target is None:
                    continue
                run = runs.setdefault(target.hwpt_id, _HwptRun(target))
                run.devices.append((rows, vdev.joined))
        return runs, plan

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


def _device_tlb_target(vdev: VtdDevice, pasid: int | None) -> SharedHwpt | None:
    """The nested HWPT whose devices' TLBs a device-TLB invalidation of ``vdev`` (for
    ``pasid``, or every PASID) must reach, or None: a pass-through or blocked device, or one
    without an ATC on the host, has no stage-1 entry to drop, and a PASID this VMM does not
    nest has no entries on the host device."""
    binding, hwpt = vdev.binding, vdev.hwpt
    if hwpt is None or binding is None or not vdev.ats:
        return None
    if pasid is not None and pasid != binding.pasid:
        return None
    return hwpt


def _groups(keys: I64) -> list[tuple[int, npt.NDArray[np.intp]]]:
    """The distinct keys, ascending, each with the positions holding it (ascending)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    cuts = (np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist()
    firsts = [0, *cuts]
    return list(zip(ordered[firsts].tolist(), np.split(order, cuts), strict=True))


def _replay_elision(
    hwpt: SharedHwpt,
    clock: int,
    tlb: tuple[I64, I64, I64, Bools],
    devices: tuple[I64, I64, I64, I64],
) -> tuple[Bools, FlushHistory]:
    """The per-doorbell plan of a run of plain doorbells on one nested HWPT, replayed without
    its calls: which device-TLB invalidations it would send, and the flush history it would
    leave on the HWPT (every call of the run recorded at ``clock``).

    ``tlb`` is ``(doorbell, start page, end page, IH)`` of the run's IOTLB-class
    invalidations on the HWPT and ``devices`` ``(doorbell, start page, end page, join time)``
    of its device-TLB invalidations, both in guest order. Per doorbell, as ``_flush`` does:
    the IOTLB-class entries are folded into a batch (``_Batch``); a device-TLB invalidation
    is elided when its batch so far or ``device_tlb_is_redundant`` on the history before the
    doorbell covers it, and otherwise joins the batch; then the batch is recorded. Every call
    of the run succeeds or the run is not counted at all, so an invalidation elided on the
    strength of its own batch stays elided (``_flush``'s re-check); and every flush of the run
    is later than any device's join (the topology does not change within it).

    The common doorbell (a strict unmap: one IOTLB-class entry on the HWPT that covers each
    of its device-TLB invalidations) elides them all and records that one entry whatever the
    history holds, so a long run of such doorbells leaves just its last flushes (found with
    numpy); the others are replayed one by one.
    """
    history = FlushHistory(hwpt.flushes.full, deque(hwpt.flushes.recent, HISTORY))
    t_doorbell, starts, ends, leaves = tlb
    d_doorbell, dev_starts, dev_ends, joins = devices
    doorbells = np.concatenate((t_doorbell, d_doorbell))
    doorbells.sort()
    doorbells = doorbells[np.concatenate(([True], doorbells[1:] != doorbells[:-1]))]
    t_cut = np.searchsorted(t_doorbell, doorbells, side="right")
    d_cut = np.searchsorted(d_doorbell, doorbells, side="right")
    t_first = np.concatenate(([0], t_cut[:-1]))
    single = t_cut - t_first == 1
    simple = single  # no IOTLB-class entry at all: nothing is simple
    if len(d_doorbell) and len(t_doorbell):
        at = np.searchsorted(doorbells, d_doorbell)
        one = np.minimum(t_first[at], len(starts) - 1)
        covered = single[at] & (starts[one] <= dev_starts) & (dev_ends <= ends[one])
        simple = single & (np.bincount(at[~covered], minlength=len(doorbells)) == 0)
    kept = np.zeros(len(d_doorbell), dtype=np.bool_)
    edges = np.flatnonzero(simple[1:] != simple[:-1]) + 1
    bounds = [0, *edges.tolist(), len(doorbells)]
    t_cuts, d_cuts, t_firsts = t_cut.tolist(), d_cut.tolist(), t_first.tolist()
    spans = [a.tolist() for a in (starts, ends, leaves)]
    dev_spans = [a.tolist() for a in (dev_starts, dev_ends, joins)]
    for lo, hi in itertools.pairwise(bounds):
        t_lo, t_hi = t_firsts[lo], t_cuts[hi - 1]
        if simple[lo] and hi - lo > HISTORY:  # one entry each, recorded in order: the last
            first, last = starts[t_lo:t_hi], ends[t_lo:t_hi]  # full flush and what follows
            whole = np.flatnonzero((first == 0) & (last >= FULL_PAGES))
            if len(whole):
                history.record(clock, 0, FULL_END)
                first, last = first[whole[-1] + 1 :], last[whole[-1] + 1 :]
            for a, b in zip(first[-HISTORY:].tolist(), last[-HISTORY:].tolist(), strict=True):
                history.recent.append((clock, a << PAGE_SHIFT, b << PAGE_SHIFT))
        elif simple[lo]:
            for a, b in zip(spans[0][t_lo:t_hi], spans[1][t_lo:t_hi], strict=True):
                history.record(clock, a << PAGE_SHIFT, b << PAGE_SHIFT)
        else:
            d_lo = d_cuts[lo - 1] if lo else 0
            for k in range(lo, hi):
                t_hi, d_hi = t_cuts[k], d_cuts[k]
                tlb_spans = [
                    (a << PAGE_SHIFT, b << PAGE_SHIFT, leaf)
                    for a, b, leaf in zip(*(f[t_lo:t_hi] for f in spans), strict=True)
                ]
                dev = [
                    (a << PAGE_SHIFT, b << PAGE_SHIFT, joined)
                    for a, b, joined in zip(*(f[d_lo:d_hi] for f in dev_spans), strict=True)
                ]
                kept[d_lo:d_hi] = _replay_doorbell(hwpt, history, clock, tlb_spans, dev)
                t_lo, d_lo = t_hi, d_hi
    return kept, history


def _replay_doorbell(
    hwpt: SharedHwpt,
    history: FlushHistory,
    clock: int,
    tlb: list[tuple[int, int, bool]],
    devices: list[tuple[int, int, int]],
) -> list[bool]:
    """One doorbell of ``_replay_elision``: ``tlb`` its IOTLB-class spans (bytes) on the
    HWPT, ``devices`` its device-TLB invalidations ``(start, end, join time)``. Returns which
    of those it would send, and records its batch in ``history``."""
    batch = _Batch(hwpt)
    for start, end, leaf in tlb:
        batch.add(start, end, leaf, 0)
    sent = []
    for start, end, joined in devices:
        ranges = [(e.start, e.end) for e in batch.entries]
        redundant = device_tlb_is_redundant(history, joined, start, end, ranges)
        sent.append(not redundant)
        if not redundant:
            batch.add(start, end, True, 0)
    for entry in batch.entries:
        history.record(clock, entry.start, entry.end)
    return sent


def _errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, str(err))
