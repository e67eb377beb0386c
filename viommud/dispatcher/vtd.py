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
  QEMU does, from the snapshot of them the event carries (the frontend's, at that point),
  and move devices between HWPTs (viommud.topology.vtd); the work collected before them is
  sent first, so the host sees guest order.
* A wait descriptor completes when the calls for everything before it have returned. The
  guest sees completions only in the doorbell's reply (QEMU processes the queue inside the
  IQT write), so the waits of one doorbell share its calls: each HWPT gets one call per
  doorbell, the lower bound, and the status writes (SW=1) are reported in order after them.
* A failed entry becomes IQE at the guest descriptor that produced it (the earliest, when
  several were folded into it); the entries after it, and the folded descriptors, are sent
  again, so every descriptor reported without an error really was carried out. A device-TLB
  invalidation elided on the strength of an entry of its own batch is re-checked once the
  calls have returned and sent after all if that entry failed; a failure also makes the
  HWPT forget its earlier flushes for the elision rule. The IQEs the host caused are the
  ``Outcome``'s ``host_errors``: the model hands them to the frontend, which counts them.

Group commit (``VtdDispatcher.run_plain``, docs/coalescing.md): a run of consecutive plain
doorbells (viommud.group_commit.vtd_screen), planned by viommud.group_commit.vtd_plan as the
per-doorbell plan would decide and count it, sends everything it asks of a nested HWPT as one
call.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from operator import attrgetter

from protocols import iommufd as uapi
from protocols.vtd import (
    IOMMU_VTD_INV_FLAGS_LEAF,
    IQE,
    VTD_INV_ALL_PAGES,
    VTD_S1_SIZE,
    VTD_S1_STRUCT,
)
from viommud.backend.calls import InvalidateResult, Iommufd
from viommud.dispatcher import NOTHING, DispatchStats, Outcome
from viommud.events import (
    Barrier,
    CompletionInterrupt,
    ContextCacheInvalidated,
    DomainInvalidation,
    GuestError,
    Invalidation,
    PasidCacheInvalidated,
    StatusWrite,
    VtdEvent,
)
from viommud.guest.vtd import LegacyContext, PasidEntry, ScalableContext
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

__all__ = [
    "Batch",
    "PlainPlan",
    "VtdDispatcher",
    "device_tlb_is_redundant",
    "device_tlb_target",
]


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
            addr, npages = 0, VTD_INV_ALL_PAGES
        else:
            addr, npages = self.start, (self.end - self.start) >> 12
        return VTD_S1_STRUCT.pack(addr, npages, IOMMU_VTD_INV_FLAGS_LEAF if self.leaf else 0, 0)


@dataclass(slots=True)
class Batch:
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

    def pack(self) -> bytes:
        """The entries as one ``iommu_hwpt_vtd_s1_invalidate`` array, in order."""
        return b"".join(e.pack() for e in self.entries)


@dataclass(slots=True)
class _DeviceTlb:
    index: int
    vdev: VtdDevice
    hwpt: SharedHwpt
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Provenance:
    """What a planned call of a group commit stands for, worked out only when it fails:
    ``sent`` the descriptors it carries out (screen row, start, end in bytes, LEAF; a
    device-TLB invalidation counts as a LEAF span) and ``elided`` the device-TLB
    invalidations the plan elided on its HWPT (row, start, end)."""

    sent: list[tuple[int, int, int, bool]]
    elided: list[tuple[int, int, int]]


@dataclass(slots=True)
class PlainPlan:
    """A run of plain doorbells, planned (viommud.group_commit.vtd_plan): the calls to make
    and, once they have returned, the flush histories to keep (recorded at ``clock``, the
    tick of the run's calls) and what to count; per HWPT, how to find what a failed call
    stood for (``provenance``)."""

    clock: int
    sends: list[tuple[SharedHwpt, bytes]] = field(default_factory=list)
    provenance: dict[int, Callable[[], Provenance]] = field(default_factory=dict)
    histories: list[tuple[SharedHwpt, FlushHistory]] = field(default_factory=list)
    baseline: int = 0
    forwarded: int = 0
    dropped: int = 0
    elided: int = 0


@dataclass(slots=True)
class VtdDispatcher:
    """One VT-d vIOMMU's dispatcher: events and its topology in, host calls out."""

    topology: VtdTopology
    iommufd: Iommufd
    stats: DispatchStats = field(default_factory=DispatchStats)
    elided: int = 0  # device-TLB invalidations that cost no call
    _pending: dict[int, Batch] = field(default_factory=dict)
    _device_tlbs: list[_DeviceTlb] = field(default_factory=list)
    _raw: dict[int, bytes] = field(default_factory=dict)  # index -> descriptor, this doorbell
    _errors: dict[int, GuestError] = field(default_factory=dict)
    _host_errors: list[GuestError] = field(default_factory=list)
    _first_barrier: int = 0  # barrier number the pending work belongs to
    _failed: list[tuple[int, int, int]] = field(default_factory=list)  # HWPT, failed span

    def run(self, events: Iterable[VtdEvent]) -> Outcome:
        """Execute one doorbell's events: its errors in descriptor order (the frontend's
        and the host's), the IQEs the host caused, and its status writes in order."""
        writes: list[StatusWrite] = []
        interrupts: list[int] = []
        self._errors = {}
        self._host_errors = []
        self._raw = {}
        self._failed = []
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
                writes.append(event)
            elif isinstance(event, CompletionInterrupt):
                interrupts.append(event.index)
            elif isinstance(event, ContextCacheInvalidated):
                self._flush()
                self._context_invalidated(event)
            elif isinstance(event, PasidCacheInvalidated):
                self._flush()
                self._pasid_invalidated(event)
            elif isinstance(event, GuestError):
                self._errors.setdefault(event.index, event)
        self._flush()
        errors = self._errors
        if not errors and not writes and not interrupts:
            return NOTHING
        host = self._host_errors
        return Outcome(
            tuple(errors[index] for index in sorted(errors)),
            tuple(sorted(host, key=attrgetter("index"))),
            tuple(writes),
            tuple(interrupts),
        )

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
        hwpt = device_tlb_target(vdev, inv.asid)
        if hwpt is None:
            return
        self._begin_work()
        end = inv.addr + inv.size if inv.size else FULL_END
        self._device_tlbs.append(_DeviceTlb(inv.index, vdev, hwpt, inv.addr, end))

    def _batch(self, hwpt: SharedHwpt) -> Batch:
        batch = self._pending.get(hwpt.hwpt_id)
        if batch is None:
            batch = self._pending[hwpt.hwpt_id] = Batch(hwpt)
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
            entry_len=VTD_S1_SIZE,
            array=array,
        )

    def _send(self, batch: Batch) -> None:
        hwpt = batch.hwpt
        entries = batch.entries
        if not entries:
            return
        result = self._invalidate(hwpt, b"".join(e.pack() for e in entries))
        if result.errno:
            entries = self._retry(hwpt, entries, result)
            if not entries:
                return
        clock = self.topology.tick()
        for entry in entries:
            hwpt.flushes.record(clock, entry.start, entry.end)

    def _retry(
        self, hwpt: SharedHwpt, entries: list[_Entry], result: InvalidateResult
    ) -> list[_Entry]:
        """After the call of ``entries`` failed with ``result``: IQE at the guest descriptor
        of the entry the kernel names (the earliest, when several were folded into it),
        then the entries after it and the other descriptors folded into it sent again,
        until a call succeeds. Returns the entries of that call ([] when none was left)."""
        while result.errno:
            # Some guest change may now be in no host flush: forget what earlier flushes
            # covered, so device-TLB invalidations are sent again until new flushes cover them.
            hwpt.flushes = FlushHistory()
            done = min(result.done, len(entries) - 1)
            bad = entries[done]
            self._failed.append((hwpt.hwpt_id, bad.start, bad.end))
            first, rest = bad.origins[0], bad.origins[1:]
            self._fail(
                first,
                f"host IOMMU_HWPT_INVALIDATE on HWPT {hwpt.hwpt_id} failed "
                f"(errno {_errno_name(result.errno)})",
            )
            retry = [_Entry(bad.start, bad.end, bad.leaf, rest)] if rest else []
            entries = retry + entries[done + 1 :]
            if not entries:
                return []
            result = self._invalidate(hwpt, b"".join(e.pack() for e in entries))
        return entries

    # -- group commit -------------------------------------------------------------------
    def run_plain(self, plan: PlainPlan, waits: int, raw: Callable[[int], bytes]) -> Outcome:
        """Execute a run of consecutive plain doorbells at once, as planned by
        viommud.group_commit.vtd_plan from this dispatcher's topology: one call per nested
        HWPT for all of them, every one of the run's ``waits`` completing when those calls
        (and any re-sends) have returned. Plain doorbells hold no error of their own and no
        configuration change (their status writes are the screen's).

        A host failure is handled as ``_send`` handles one for a doorbell: IQE at the
        descriptor whose entry the kernel names (screen rows here; the model splits them
        among its doorbells, ``raw`` gives a row's bytes), the rest re-sent; a device-TLB
        invalidation the plan elided on the HWPT over the failed entry's range is sent on
        its own, and the HWPT forgets its earlier flushes."""
        stats = self.stats
        self._errors, self._host_errors, self._raw, self._failed = {}, [], {}, []
        if plan.sends:
            assert plan.clock == self.topology.clock + 1, "planned against another topology"
            self.iommufd.log.barrier = stats.barriers + 1
        failed: dict[int, tuple[SharedHwpt, Provenance]] = {}
        for hwpt, array in plan.sends:
            result = self._invalidate(hwpt, array)
            if result.errno:
                made = plan.provenance[hwpt.hwpt_id]()
                failed[hwpt.hwpt_id] = (hwpt, made)
                self._retry(hwpt, _entries_of(array, made), result)
        if plan.sends:
            self.topology.tick()  # the clock the plan recorded its flushes at
        for hwpt, history in plan.histories:
            hwpt.flushes = FlushHistory() if hwpt.hwpt_id in failed else history
        stats.baseline_invalidate_calls += plan.baseline
        stats.forwarded += plan.forwarded
        stats.dropped += plan.dropped
        stats.barriers += waits
        self.elided += plan.elided
        if not failed:
            return NOTHING
        bad = self._failed
        for hwpt, made in failed.values():
            batch = Batch(hwpt)
            spans = [(lo, hi) for hwpt_id, lo, hi in bad if hwpt_id == hwpt.hwpt_id]
            for row, start, end in made.elided:
                if any(start < hi and lo < end for lo, hi in spans):
                    self.elided -= 1
                    stats.forwarded += 1
                    batch.add(start, end, True, row)
            self._send(batch)
        host = sorted(self._host_errors, key=attrgetter("index"))
        errors = tuple(replace(e, raw=raw(e.index)) for e in host)
        return Outcome(errors, errors)

    def _fail(self, index: int, reason: str) -> None:
        if index in self._errors:
            return
        error = GuestError(index, IQE, reason, self._raw.get(index, b""))
        self._errors[index] = error
        self._host_errors.append(error)

    # -- context and PASID caches (re-read as QEMU does) --------------------------------
    def _context_invalidated(self, event: ContextCacheInvalidated) -> None:
        self.iommufd.log.barrier = self.stats.barriers + 1
        topology, contexts, pasids = self.topology, event.contexts, event.pasids
        failures: list[str] = []
        for vid in sorted(topology.vdevices):
            if vid & event.mask != event.sid & event.mask:
                continue
            ctx = contexts.get(vid)
            if ctx is None:
                continue  # never written: nothing to read, the device is left alone
            vdev = topology.vdevices[vid]
            entry: PasidEntry | None = None
            if isinstance(ctx, LegacyContext):
                binding = legacy_binding(ctx)
            elif not ctx.present or ctx.reserved:
                binding = BLOCKED_NOT_PRESENT
            else:  # the device's PASID cache is re-read too (QEMU: PASID-cache devsi)
                entry = _present(pasids.get((vid, ctx.rid_pasid)))
                binding = pasid_binding(entry, ctx.rid_pasid)
            if self._bind(vdev, binding, failures):
                vdev.context, vdev.pasid_entry = ctx, entry
        self._report(event.index, event.raw, failures)

    def _pasid_invalidated(self, event: PasidCacheInvalidated) -> None:
        self.iommufd.log.barrier = self.stats.barriers + 1
        topology, pasids = self.topology, event.pasids
        failures: list[str] = []
        for vid in sorted(topology.vdevices):
            vdev = topology.vdevices[vid]
            ctx = vdev.context
            if not isinstance(ctx, ScalableContext) or not ctx.present:
                continue  # PASID entries are reached through a scalable-mode context
            new = _present(pasids.get((vid, ctx.rid_pasid)))
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


def device_tlb_target(vdev: VtdDevice, pasid: int | None) -> SharedHwpt | None:
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


def _present(entry: PasidEntry | None) -> PasidEntry | None:
    """A PASID entry as the hardware reads it: one never written, or not present, is None."""
    return entry if entry is not None and entry.present else None


def _errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, str(err))


def _entries_of(array: bytes, made: Provenance) -> list[_Entry]:
    """The entries of a group commit's failed call with the descriptors each stands for:
    those whose span it covers, as ``Batch`` folds them (or, for a block of a merged span,
    meets), earliest first."""
    out: list[_Entry] = []
    for addr, npages, flags, _ in VTD_S1_STRUCT.iter_unpack(array):
        end = FULL_END if npages == VTD_INV_ALL_PAGES else addr + (npages << 12)
        entry = _Entry(addr, end, bool(flags & IOMMU_VTD_INV_FLAGS_LEAF), [])
        origins = [row for row, lo, hi, leaf in made.sent if entry.covers(lo, hi, leaf)]
        if not origins:
            origins = [row for row, lo, hi, _ in made.sent if lo < end and addr < hi]
        entry.origins = sorted(set(origins)) or [min(row for row, *_ in made.sent)]
        out.append(entry)
    return out
