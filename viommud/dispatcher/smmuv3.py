"""The SMMUv3 dispatcher: turns one doorbell's events into the fewest backend calls that
keep the guest's guarantees (DESIGN.md point 4), and maps host failures back to guest
commands.

Plan for one doorbell (``SmmuDispatcher.run``):

* forwarded invalidations (TLBI_NH_*, TLBI_NSNH_ALL, CFGI_CD, CFGI_CD_ALL, ATC_INV — the
  commands the kernel accepts, iommufd.md §3.3) are collected per iommufd vIOMMU object.
  Commands that name a stream go to the vIOMMU object on the physical SMMU of that stream's
  vDEVICE only (and are dropped, as QEMU drops them, when the vSID has no device); TLB
  invalidations go to every physical SMMU of the vSMMU where a device has had a stage-1
  vSTE (only there can stage-1 entries of this VM be cached; never by reading CDs);
* at the end of the doorbell each object's work is coalesced (smmuv3_coalesce) and sent as
  one ``IOMMU_HWPT_INVALIDATE`` array call. Several CMD_SYNCs may share a call: each
  completes once all work before it is done, which is when the doorbell's calls return;
* the kernel issues one call's entries without a sync between them, so where the guest put
  a CMD_SYNC between a step and a later step that depends on it (config before TLB before
  device TLB, e.g. TLBI + SYNC + ATC_INV), the pending work is sent before the later step
  is collected;
* CFGI_STE / CFGI_STE_RANGE / CFGI_ALL are handled by the VMM: the vSTEs the event carries
  (the guest's stream table as the frontend saw it) go to ``topology.install_ste`` for the
  vSIDs that have a vDEVICE; the work collected before them is sent first, so host order
  follows guest order;
* CMD_SYNC is never forwarded;
* a failed entry k becomes CERROR_ILL on the guest command that produced it. The ARM driver
  issues entries in groups of 63 and, on a bad entry, may not have issued the group's earlier
  entries although it counts them (iommufd.md §3.4), so everything from the start of that
  group is re-sent, minus the bad entry, until the call succeeds.

``run`` returns an ``Outcome``: the frontend's refusals passed through and the host's
refusals (``host_errors``), which the model hands to the frontend (``host_failed``); the
dispatcher itself never sees a frontend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from protocols import iommufd as uapi
from protocols.smmuv3 import CERROR_ILL, Opcode
from viommud.backend.calls import InvalidateResult, Iommufd
from viommud.dispatcher import NOTHING, DispatchStats, Outcome
from viommud.dispatcher.smmuv3_coalesce import (
    DEFAULT_FLOOD_PAGES,
    Entry,
    class_rank,
    coalesce,
    coalesce_tlb_array,
    coalesce_tlb_only,
    plain_entries,
    tlb_only_unchanged,
)
from viommud.events import (
    Barrier,
    Event,
    GuestError,
    Invalidation,
    Scope,
    StreamTableInvalidated,
)
from viommud.topology import TopologyError
from viommud.topology.smmuv3 import PiommuSlot, SmmuTopology

ARM_ISSUE_GROUP = 63  # CMDQ_BATCH_ENTRIES - 1 commands per host CMD_SYNC (iommufd.md §3.4)
ARM_ENTRY_LEN = 16
_SYNC = np.uint64(Opcode.CMD_SYNC)
_SYNC_OP = int(Opcode.CMD_SYNC)
_SYNC_BYTE = bytes([_SYNC_OP])

U64 = npt.NDArray[np.uint64]


class BulkCoalescer(Protocol):
    """The coalescing rules vectorised over (W0, W1) rows of TLB invalidations
    (``viommud.group_commit.smmuv3_coalesce.coalesce_tlb``), handed in by the model."""

    def __call__(self, words: U64, *, flood_pages: int) -> U64: ...


@dataclass(frozen=True, slots=True)
class DispatchPolicy:
    """How hard the dispatcher works to save calls (the benchmark compares them)."""

    coalesce: bool = True  # apply the smmuv3_coalesce rules within each call
    broadcast_all: bool = False  # TLBIs to every physical SMMU, not only stage-1 ones
    flood_pages: int = DEFAULT_FLOOD_PAGES
    # Group commit: fewer TLB commands than this go out as the guest wrote them. The
    # vectorised coalescer has a fixed cost of ~130 µs a call; below ~256 commands that is
    # 2.5-15 µs of daemon CPU per entry saved, far more than the host spends on an entry
    # (docs/coalescing.md has the measurements).
    bulk_coalesce_min: int = 256


@dataclass(slots=True)
class _Pending:
    """Entries collected for one vIOMMU object."""

    slot: PiommuSlot
    entries: list[Entry] = field(default_factory=list)


@dataclass(slots=True)
class SmmuDispatcher:
    topology: SmmuTopology
    iommufd: Iommufd
    stats: DispatchStats
    policy: DispatchPolicy = field(default_factory=DispatchPolicy)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _first_barrier: int = 0  # barrier number the pending work belongs to
    _broadcast: list[PiommuSlot] | None = None  # TLBI targets, valid until the STEs change
    _sealed: set[int] = field(default_factory=set)  # class ranks pending before a SYNC
    _open: set[int] = field(default_factory=set)  # class ranks pending since the last SYNC
    _written: list[Entry] | None = None  # the commands ``_send``'s entries were coalesced from

    def run(self, events: list[Event]) -> Outcome:
        """Execute one doorbell's events. The outcome's ``errors`` are the frontend's
        refusals (its ``GuestError`` events) and the host's (``host_errors``), merged in
        command order."""
        refused: list[GuestError] = []
        host: list[GuestError] = []  # what the host refused, as guest errors
        stats = self.stats
        self._broadcast = None  # config records may have changed the topology since
        for event in events:
            kind = type(event)
            if kind is Invalidation:
                assert isinstance(event, Invalidation)
                self._collect(event, host)
            elif kind is Barrier:
                stats.barriers += 1
                self._sealed |= self._open
                self._open = set()
            elif kind is StreamTableInvalidated:
                assert isinstance(event, StreamTableInvalidated)
                self._flush(host)
                self._install(event, host)
                self._broadcast = None
            else:
                assert isinstance(event, GuestError)
                refused.append(event)
        self._flush(host)
        if not host:
            return Outcome(tuple(refused)) if refused else NOTHING
        host.sort(key=_by_index)  # stable: failures of one command keep their order
        return Outcome(tuple(sorted(refused + host, key=_by_index)), tuple(host))

    # -- routing ------------------------------------------------------------------------
    def targets(self, inv: Invalidation) -> list[PiommuSlot]:
        """The vIOMMU objects (one per physical SMMU) that must see this invalidation."""
        topology = self.topology
        if inv.scope is Scope.DEVICE:
            assert inv.device is not None
            vdev = topology.vdevice(inv.device)
            return [] if vdev is None else [topology.slots[vdev.iommu]]
        return self.broadcast_targets()

    def broadcast_targets(self) -> list[PiommuSlot]:
        """Where TLB invalidations go: every physical SMMU of the vSMMU where a device has
        had a stage-1 vSTE (all of them under ``broadcast_all``)."""
        broadcast = self._broadcast
        if broadcast is None:
            slots = self.topology.slots.values()
            broadcast = self._broadcast = (
                list(slots) if self.policy.broadcast_all else [s for s in slots if s.s1_seen]
            )
        return broadcast

    def _collect(self, inv: Invalidation, errors: list[GuestError]) -> None:
        targets = self.targets(inv)
        stats = self.stats
        if inv.scope is Scope.DEVICE:
            stats.baseline_invalidate_calls += len(targets)
            if not targets:
                stats.dropped += 1
                return
        else:
            stats.baseline_invalidate_calls += len(self.topology.slots)
            if not targets:
                return
        rank = class_rank(inv.raw[0])
        sealed = self._sealed
        if sealed and min(sealed) < rank:
            self._flush(errors)  # a later step that depends on work sealed by a SYNC
        if not self._pending:
            self._first_barrier = stats.barriers + 1
        self._open.add(rank)
        stats.forwarded += 1
        pending = self._pending
        entry = Entry(inv.raw, inv.index)
        for slot in targets:
            bucket = pending.get(slot.iommu)
            if bucket is None:
                bucket = pending[slot.iommu] = _Pending(slot)
            bucket.entries.append(entry)

    # -- one plain doorbell ---------------------------------------------------------------
    def run_tlb(self, commands: bytes, syncs: int) -> Outcome:
        """One plain doorbell (``group_commit.smmuv3_screen.plain_syncs``: valid TLB
        invalidations and ``syncs`` CMD_SYNCs only) without events: what ``run`` does with
        its events, step for step — the same entries (origin = command index), counters,
        call barrier, coalescing and calls. TLB commands are all one class, so no SYNC
        among them splits the call; every CMD_SYNC completes when the call returns.

        When ``tlb_only_unchanged`` shows coalescing would send the commands as written
        (or the policy does not coalesce), the array goes out as it is; else
        ``coalesce_tlb_array`` coalesces it on the words, once for every target. Either
        way no ``Entry`` is built per command unless the host refuses a call: then the
        written entries and ``coalesce_tlb_only``'s (the same commands, with origins) go
        to ``_retry`` as ``_send`` hands them."""
        stats = self.stats
        self._broadcast = None  # config records may have changed the topology since
        targets = self.broadcast_targets()
        size = ARM_ENTRY_LEN
        ops = commands[::size]  # W0[7:0] is each command's first byte
        work = len(ops) - syncs
        stats.baseline_invalidate_calls += work * len(self.topology.slots)
        if not work or not targets:
            stats.barriers += syncs
            return NOTHING
        # the call's barrier: the first one after its first TLBI (the SYNCs before it count)
        self.iommufd.log.barrier = stats.barriers + len(ops) - len(ops.lstrip(_SYNC_BYTE)) + 1
        stats.barriers += syncs
        stats.forwarded += work
        if not syncs:
            array = commands
        elif syncs == 1 and ops[-1] == _SYNC_OP:
            array = commands[:-size]
        else:
            array = b"".join(
                commands[at : at + size]
                for at in range(0, len(commands), size)
                if commands[at] != _SYNC_OP
            )
        policy = self.policy
        host: list[GuestError] = []
        if work == 1 or not policy.coalesce or tlb_only_unchanged(array, policy.flood_pages):
            for slot in targets:
                result = self._invalidate(slot, array)
                if result.errno:
                    self._retry(slot, _entries(commands), result, host)
        else:
            # the coalesced array, worked out once on the words; the entries (with the
            # origins a host failure is mapped back with) only if the host refuses it
            sent = coalesce_tlb_array(array, policy.flood_pages)
            for slot in targets:
                result = self._invalidate(slot, sent)
                if result.errno:
                    written = _entries(commands)
                    entries = coalesce_tlb_only(written, flood_pages=policy.flood_pages)
                    self._retry(slot, entries, result, host, written)
        if not host:
            return NOTHING
        host.sort(key=_by_index)
        return Outcome(tuple(host), tuple(host))

    # -- group commit -------------------------------------------------------------------
    def run_plain(self, commands: bytes, syncs: int, bulk: BulkCoalescer) -> Outcome:
        """Execute consecutive plain doorbells at once (viommud.group_commit.smmuv3_screen: TLB
        invalidations and ``syncs`` CMD_SYNCs, all valid): their TLB work goes out as one
        call per vIOMMU object, coalesced by ``bulk`` when there is enough of it, and every
        sync among them completes when those calls return.

        A host failure is handled as ``_send`` handles one for a doorbell: CERROR_ILL on the
        guest command that produced the entry the kernel names, the rest of the call re-sent
        until it succeeds. The outcome's errors index the run's ``commands`` (rows, syncs
        included); the model splits them among its doorbells."""
        stats = self.stats
        work = len(commands) // ARM_ENTRY_LEN - syncs
        self._broadcast = None  # config records may have changed the topology since
        targets = self.broadcast_targets()
        host: list[GuestError] = []
        if work and targets:
            self.iommufd.log.barrier = stats.barriers + 1
            array = self._plain_array(commands, work, syncs, bulk)
            for slot in targets:
                result = self._invalidate(slot, array)
                if result.errno:
                    entries, written = plain_entries(commands, array)
                    self._retry(slot, entries, result, host, written)
            stats.forwarded += work
        stats.baseline_invalidate_calls += work * len(self.topology.slots)
        stats.barriers += syncs
        if not host:
            return NOTHING
        host.sort(key=_by_index)
        return Outcome(tuple(host), tuple(host))

    def _plain_array(self, commands: bytes, work: int, syncs: int, bulk: BulkCoalescer) -> bytes:
        """The entries of a run of plain doorbells: its TLB commands, coalesced when there
        are enough of them to pay for it (``DispatchPolicy.bulk_coalesce_min``)."""
        policy = self.policy
        if policy.coalesce and work >= policy.bulk_coalesce_min:
            words = np.frombuffer(commands, dtype="<u8").reshape(-1, 2)
            send = bulk(words, flood_pages=policy.flood_pages)  # syncs fold to one
            send = send[(send[:, 0] & np.uint64(0xFF)) != _SYNC]  # ... dropped here, cheaply
            return np.ascontiguousarray(send, dtype="<u8").tobytes()
        if not syncs:
            return commands
        size = ARM_ENTRY_LEN
        return b"".join(
            commands[at : at + size]
            for at in range(0, len(commands), size)
            if commands[at] != Opcode.CMD_SYNC
        )

    # -- execution ----------------------------------------------------------------------
    def _flush(self, errors: list[GuestError]) -> None:
        self._sealed.clear()
        self._open.clear()
        if not self._pending:
            return
        self.iommufd.log.barrier = self._first_barrier
        policy = self.policy
        for bucket in self._pending.values():
            entries = (
                coalesce(bucket.entries, flood_pages=policy.flood_pages)
                if policy.coalesce
                else bucket.entries
            )
            self._written = bucket.entries
            self._send(bucket.slot, entries, errors)
        self._written = None
        self._pending.clear()

    def _invalidate(self, slot: PiommuSlot, array: bytes) -> InvalidateResult:
        """One ``IOMMU_HWPT_INVALIDATE`` of ARM commands on ``slot``'s vIOMMU object."""
        return self.iommufd.invalidate_array(
            slot.iommu,
            object_kind="viommu",
            object_id=slot.viommu_id,
            data_type=uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
            entry_len=ARM_ENTRY_LEN,
            array=array,
        )

    def _send(self, slot: PiommuSlot, entries: list[Entry], errors: list[GuestError]) -> None:
        """Send ``entries`` (``_written``, coalesced) in one call (more after a failure);
        ``errors`` gets the guest error of each entry the host refused."""
        if entries:
            result = self._invalidate(slot, b"".join(e.raw for e in entries))
            if result.errno:
                self._retry(slot, entries, result, errors, self._written)

    def _retry(
        self,
        slot: PiommuSlot,
        entries: list[Entry],
        result: InvalidateResult,
        errors: list[GuestError],
        written: list[Entry] | None = None,
    ) -> None:
        """After the call of ``entries`` failed with ``result``: CERROR_ILL on the guest
        command of the entry the kernel names (``entry_num``), then what it may have left
        undone re-sent, until a call succeeds. ``written`` are the guest's commands as
        written, before coalescing: when coalescing changed them, a failed entry may have
        stood for several commands (a merged range, a promoted flood) or covered commands
        it replaced, so after the first failure every command but the one reported is
        re-sent as written."""
        while result.errno:
            bad = min(result.done, len(entries) - 1)
            origin = entries[bad].origin
            errors.append(
                GuestError(
                    origin,
                    CERROR_ILL,
                    f"host IOMMU_HWPT_INVALIDATE failed on this command (errno {result.errno})",
                    entries[bad].raw,
                )
            )
            if written is not None and [e.raw for e in written] != [e.raw for e in entries]:
                entries = [e for e in written if e.origin != origin]
            else:
                # Entries of the group holding the bad one may not have reached the hardware.
                certain = bad - bad % ARM_ISSUE_GROUP
                entries = entries[certain:bad] + entries[bad + 1 :]
            written = None
            if not entries:
                return
            result = self._invalidate(slot, b"".join(e.raw for e in entries))

    def _install(self, event: StreamTableInvalidated, errors: list[GuestError]) -> None:
        """Install the vSTEs the event carries, in vSID order. A vSID the guest never wrote
        an STE for is not among them: nothing to read (QEMU does the same); one without a
        vDEVICE has nothing to attach."""
        topology = self.topology
        vdevices = topology.vdevices
        failures: list[str] = []
        for vsid, ste in event.stes:
            if vsid not in vdevices:
                continue
            try:
                topology.install_ste(vsid, ste)
            except TopologyError as exc:
                failures.append(str(exc))
        if failures:
            errors.append(GuestError(event.index, CERROR_ILL, "; ".join(failures), event.raw))


def _entries(commands: bytes) -> list[Entry]:
    """The TLB commands of a plain doorbell as entries, each with its index (its origin)."""
    size = ARM_ENTRY_LEN
    return [
        Entry(commands[at : at + size], index)
        for index, at in enumerate(range(0, len(commands), size))
        if commands[at] != _SYNC_OP
    ]


def _by_index(error: GuestError) -> int:
    return error.index
