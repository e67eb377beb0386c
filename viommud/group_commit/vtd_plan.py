"""Planning a VT-d group commit: what a run of plain doorbells asks of each nested HWPT.

``plan_run`` turns a run's work (viommud.group_commit.vtd_screen: arrays for a large run,
the frontend's events per doorbell for a small one) and the vIOMMU's topology into a
``PlainPlan`` that ``VtdDispatcher.run_plain`` carries out: one ``IOMMU_HWPT_INVALIDATE`` per
nested HWPT for the whole run, coalesced (vtd_coalesce), the flush histories the per-doorbell
calls would have left, and the dispatcher's counts.

Decisions and counts are those of ``VtdDispatcher.run`` doorbell by doorbell (docs/vtd.md,
docs/coalescing.md). The topology cannot change within the run (no context- or PASID-cache
invalidation), so each descriptor reaches the HWPTs and devices it would reach alone
(``_collect`` and ``_collect_device_tlb`` routing); and the elision rule is replayed over each
HWPT's flush history as the per-doorbell calls would have left it (``_replay_elision``), so a
device-TLB invalidation is elided exactly when ``run`` would elide it, and everything ``run``
would send is covered by what is sent. Planning calls nothing and changes nothing.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from viommud.dispatcher.vtd import (
    Batch,
    PlainPlan,
    Provenance,
    device_tlb_is_redundant,
    device_tlb_target,
)
from viommud.events import DomainInvalidation, Invalidation, VtdEvent
from viommud.frontends.vtd.frontend import PAGE_SHIFT
from viommud.group_commit.vtd_coalesce import I64, Bools, coalesce, pack
from viommud.group_commit.vtd_screen import FULL_PAGES, NO_ID, PlainWork
from viommud.topology.vtd import FULL_END, HISTORY, FlushHistory, SharedHwpt, VtdTopology

__all__ = ["plan_run"]


def plan_run(
    topology: VtdTopology, work: PlainWork | list[list[VtdEvent]], rows: list[int]
) -> PlainPlan:
    """The plan of a run of plain doorbells on ``topology``: ``work`` is the run as arrays (a
    large screen; coalesced by vtd_coalesce) or as the frontend's events per doorbell (a
    small one; folded as ``Batch`` folds), ``rows`` the screen row of each doorbell's first
    descriptor (a failure is reported by row). Its flushes are recorded at the clock the
    run's calls will tick the topology to."""
    plan = PlainPlan(topology.clock + 1)
    if isinstance(work, PlainWork):
        _plan_bulk(topology, work, plan)
    else:
        _plan_events(topology, work, plan, rows)
    return plan


def _bytes(start: I64, end: I64) -> tuple[list[int], list[int]]:
    """Page spans as byte spans (``FULL_PAGES`` and beyond: ``FULL_END``)."""
    return (
        [a << PAGE_SHIFT for a in start.tolist()],
        [FULL_END if b >= FULL_PAGES else b << PAGE_SHIFT for b in end.tolist()],
    )


def _known(made: Provenance) -> Callable[[], Provenance]:
    return lambda: made


def _bulk_provenance(
    tlb: tuple[I64, I64, I64, Bools], dev: tuple[I64, I64, I64], kept: Bools
) -> Callable[[], Provenance]:
    """What a bulk-planned call stands for (``Provenance``), from the run's arrays."""

    def made() -> Provenance:
        rows, start, end, leaf = tlb
        sent = list(zip(rows.tolist(), *_bytes(start, end), leaf.tolist(), strict=True))
        d_rows, d_start, d_end = dev
        forwarded = zip(d_rows[kept].tolist(), *_bytes(d_start[kept], d_end[kept]), strict=True)
        sent += [(row, lo, hi, True) for row, lo, hi in forwarded]
        gone = ~kept
        elided = zip(d_rows[gone].tolist(), *_bytes(d_start[gone], d_end[gone]), strict=True)
        return Provenance(sorted(sent), list(elided))

    return made


@dataclass(slots=True)
class _HwptRun:
    """What a run of plain doorbells asks of one nested HWPT (group commit): rows of its
    ``TlbWork`` and ``DeviceTlbWork``, the latter with the join time of their device."""

    hwpt: SharedHwpt
    tlb: list[npt.NDArray[np.intp]] = field(default_factory=list)
    devices: list[tuple[npt.NDArray[np.intp], int]] = field(default_factory=list)


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


def _plan_bulk(topology: VtdTopology, work: PlainWork, plan: PlainPlan) -> None:
    """``plan_run`` for a run as arrays: each HWPT's work replayed by ``_replay_elision``,
    then what it sends coalesced (vtd_coalesce)."""
    tlb, dev = work.tlb, work.device_tlb
    runs = _plain_targets(topology, work, plan)
    clock = plan.clock
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
            plan.provenance[run.hwpt.hwpt_id] = _bulk_provenance(
                (tlb.row[t], tlb.start[t], tlb.end[t], tlb.leaf[t]),
                (dev.row[d], dev.start[d], dev.end[d]),
                kept,
            )


def _plan_events(
    topology: VtdTopology, doorbells: list[list[VtdEvent]], plan: PlainPlan, rows: list[int]
) -> None:
    """``_plan_bulk`` for a few doorbells, from the frontend's events: routed as
    ``_collect`` and ``_collect_device_tlb`` route them, replayed doorbell by doorbell
    (``_replay_doorbell``), and each HWPT's entries folded into one ``Batch``."""
    reach: dict[tuple[int | None, int | None], tuple[list[SharedHwpt], int]] = {}
    work: dict[int, tuple[SharedHwpt, dict[int, _DoorbellWork]]] = {}
    origin: dict[tuple[int, int], tuple[list[int], list[int]]] = {}  # (HWPT, k) -> rows
    for k, events in enumerate(doorbells):
        base = rows[k]
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
                    origin.setdefault((hwpt.hwpt_id, k), ([], []))[0].append(base + event.index)
            elif type(event) is Invalidation:
                assert event.device is not None
                vdev = topology.vdevice(event.device)
                if vdev is None:
                    plan.dropped += 1
                    continue
                target = device_tlb_target(vdev, event.asid)
                if target is None:
                    continue
                end = event.addr + event.size if event.size else FULL_END
                _work_of(work, target, k)[1].append((event.addr, end, vdev.joined))
                origin.setdefault((target.hwpt_id, k), ([], []))[1].append(base + event.index)
    clock = plan.clock
    for hwpt, per_doorbell in work.values():
        history = FlushHistory(hwpt.flushes.full, deque(hwpt.flushes.recent, HISTORY))
        batch = Batch(hwpt)  # what the run sends to this HWPT
        made = Provenance([], [])
        for k, (tlb, device_tlbs) in per_doorbell.items():
            sent = _replay_doorbell(hwpt, history, clock, tlb, device_tlbs)
            tlb_rows, dev_rows = origin[hwpt.hwpt_id, k]
            for (start, end, leaf), row in zip(tlb, tlb_rows, strict=True):
                batch.add(start, end, leaf, 0)
                made.sent.append((row, start, end, leaf))
            for (start, end, _), keep, row in zip(device_tlbs, sent, dev_rows, strict=True):
                if keep:
                    batch.add(start, end, True, 0)
                    made.sent.append((row, start, end, True))
                else:
                    made.elided.append((row, start, end))
            plan.forwarded += sum(sent)
            plan.elided += len(sent) - sum(sent)
        plan.histories.append((hwpt, history))
        if batch.entries:
            plan.sends.append((hwpt, batch.pack()))
            made.sent.sort()
            plan.provenance[hwpt.hwpt_id] = _known(made)


def _plain_targets(topology: VtdTopology, work: PlainWork, plan: PlainPlan) -> dict[int, _HwptRun]:
    """The nested HWPTs a run's invalidations reach, as ``_collect`` and
    ``_collect_device_tlb`` route them (each distinct domain/PASID and device looked up
    once); counts into ``plan`` the baseline calls, the IOTLB-class descriptors forwarded
    and the device-TLB descriptors dropped."""
    tlb, dev = work.tlb, work.device_tlb
    runs: dict[int, _HwptRun] = {}
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
            target = device_tlb_target(vdev, None if pasid == NO_ID else pasid)
            if target is None:
                continue
            run = runs.setdefault(target.hwpt_id, _HwptRun(target))
            run.devices.append((rows, vdev.joined))
    return runs


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
    of its device-TLB invalidations, both in guest order. Per doorbell, as the dispatcher's
    ``_flush`` does: the IOTLB-class entries are folded into a batch (``Batch``); a
    device-TLB invalidation is elided when its batch so far or ``device_tlb_is_redundant`` on
    the history before the doorbell covers it, and otherwise joins the batch; then the batch
    is recorded. Every call of the run succeeds or the run is not counted at all, so an
    invalidation elided on the strength of its own batch stays elided (``_flush``'s
    re-check); and every flush of the run is later than any device's join (the topology does
    not change within it).

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
    batch = Batch(hwpt)
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
