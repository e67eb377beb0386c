"""The SMMUv3 vIOMMU model: CMDQ frontend + stream topology + per-doorbell dispatcher.

The one place that wires them: guest bytes go to the frontend, its events to the dispatcher,
and the dispatcher's ``Outcome`` back to the guest (replies) and, for what the host refused,
to the frontend (``host_failed``). Group commit takes plain doorbells through the screen,
the dispatcher's ``run_plain`` and the frontend's ``took_plain``.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

from protocols.models import HostIommu, ViommuModel
from protocols.smmuv3 import COMMAND_SIZE
from viommud.dispatcher.smmuv3 import SmmuDispatcher
from viommud.events import GuestError
from viommud.frontends.compat import QEMU
from viommud.frontends.smmuv3.frontend import (
    DoorbellSummary,
    FrameError,
    SmmuFeatures,
    SmmuV3Frontend,
)
from viommud.group_commit.smmuv3_coalesce import coalesce_tlb
from viommud.group_commit.smmuv3_screen import Screen, plain_syncs
from viommud.group_commit.smmuv3_screen import screen as screen_doorbells
from viommud.guest.smmuv3 import COMMAND, kind_name
from viommud.models.base import (
    ModelContext,
    ModelError,
    RecordRefused,
    batch_lines,
    check_host_iommus,
    log_group,
    viommu_log,
)
from viommud.replies import (
    CONFIG_OK,
    CommandError,
    ConfigReply,
    DoorbellReply,
    GuestEvent,
    RequestReply,
)
from viommud.topology import TopologyStatus
from viommud.topology.smmuv3 import SmmuTopology
from viommud.trace import DeviceAttach, DeviceDetach, Record, Ste, ViommuCreate


@dataclass(slots=True)
class SmmuV3Viommu:
    name: str
    frontend: SmmuV3Frontend
    topology: SmmuTopology
    dispatcher: SmmuDispatcher
    log: Any
    debug: bool
    batch: bool = True  # per-batch log lines wanted (models.base.batch_lines)
    # the per-doorbell fast path for plain doorbells (not under QEMU compatibility, whose
    # frontend rewrites fields first)
    fast: bool = True
    model: str = ViommuModel.SMMUV3
    group_commit: ClassVar[bool] = True  # screen/commit below (models.GroupCommit)

    @classmethod
    def create(cls, record: ViommuCreate, ctx: ModelContext) -> SmmuV3Viommu:
        check_host_iommus(record, ctx, HostIommu.ARM_SMMUV3)
        try:
            options = dict(record.options)
            if ctx.compat is not None:
                options.setdefault("compat", ctx.compat)
            features = SmmuFeatures.from_options(options)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        frontend = SmmuV3Frontend(features)
        topology = SmmuTopology(
            record.viommu,
            record.iommus,
            ctx.host,
            ctx.iommufd,
            ram_regions=ctx.ram,
            event_depth=ctx.event_depth,
        )
        dispatcher = SmmuDispatcher(topology, ctx.iommufd, ctx.stats)
        if ViommuModel.SMMUV3 in ctx.policies:
            dispatcher.policy = ctx.policies[ViommuModel.SMMUV3]
        log, debug = viommu_log(ctx, record.viommu)
        return cls(
            record.viommu,
            frontend,
            topology,
            dispatcher,
            log,
            debug,
            batch=batch_lines(log),
            fast=features.compat != QEMU,
        )

    def config(self, record: Record) -> ConfigReply:
        if isinstance(record, DeviceAttach):
            self.topology.attach(record.vid, record.device)
        elif isinstance(record, DeviceDetach):
            self.topology.detach(record.vid)
        elif isinstance(record, Ste):
            self.frontend.write_ste(record.vsid, record.data)
        else:
            raise ValueError(f"{type(record).__name__} records do not apply to an smmuv3 vIOMMU")
        return CONFIG_OK

    def doorbell(self, data: bytes) -> DoorbellReply:
        frontend = self.frontend
        calls = self.dispatcher.iommufd.log
        calls_before = calls.seq
        started = time.perf_counter() if self.batch else 0.0  # for the log line
        syncs = plain_syncs(data, frontend.features.ril) if self.fast else -1
        if syncs >= 0:
            # A plain doorbell (TLB invalidations and CMD_SYNCs, all valid): no events, the
            # frontend's counters as receive_data keeps them, the dispatcher's exact plan.
            outcome = self.dispatcher.run_tlb(data, syncs)
            summary = DoorbellSummary(len(data) // COMMAND_SIZE, syncs)
            frontend.took_plain(data, syncs, summary)
        else:
            try:
                frontend.receive_data(data)
            except FrameError as exc:
                raise RecordRefused(f"vIOMMU {self.name!r}: {exc}") from None
            outcome = self.dispatcher.run(frontend.events())
            summary = frontend.last
        if outcome.host_errors:
            frontend.host_failed(outcome.host_errors)
        errors = outcome.errors
        if self.log is not None and (errors or self.batch or self.debug):  # a line to log
            self._log_doorbell(data, summary, errors, calls.seq - calls_before, started)
        if not errors:
            return _clean_reply(summary.consumed, summary.syncs)
        return DoorbellReply(
            summary.consumed,
            summary.syncs,
            tuple(CommandError(e.index, e.code, e.reason) for e in errors),
        )

    def _log_doorbell(
        self,
        data: bytes,
        summary: DoorbellSummary,
        errors: tuple[GuestError, ...],
        backend_calls: int,
        started: float,
    ) -> None:
        log = self.log
        if self.debug:
            for index, (w0, w1) in enumerate(COMMAND.iter_unpack(data)):
                log.debug(
                    "command_decoded",
                    index=index,
                    kind=kind_name(w0 & 0xFF),
                    raw_hex=COMMAND.pack(w0, w1).hex(),
                )
        if self.batch:
            log.info(
                "batch_forwarded",
                commands=summary.consumed,
                syncs=summary.syncs,
                errors=len(errors),
                backend_calls=backend_calls,
                duration_ms=round((time.perf_counter() - started) * 1e3, 3),
            )
        for error in errors:
            log.warning(
                "guest_error",
                index=error.index,
                code=error.code,
                reason=error.reason,
                raw_hex=error.raw.hex(),
            )

    # -- group commit (docs/coalescing.md, "Group commit") --------------------------------
    def screen(self, doorbells: list[bytes]) -> Screen:
        """Which of these doorbells are plain (bulk.screen) — the ones ``commit`` takes."""
        return screen_doorbells(doorbells, self.frontend.features)

    def commit(self, screen: Screen, first: int, stop: int) -> list[DoorbellReply]:
        """Plain doorbells ``first`` to ``stop - 1`` of ``screen`` at once: their TLB work in
        one call per vIOMMU object, then each one's response. A host failure is CERROR_ILL
        in the reply of the doorbell whose command produced the failed entry, at that
        command's index, as ``doorbell`` reports it (docs/coalescing.md)."""
        commands = screen.commands(first, stop)
        syncs = screen.syncs[first:stop]
        total_syncs = sum(syncs)
        calls = self.dispatcher.iommufd.log
        calls_before = calls.seq
        started = time.perf_counter()
        outcome = self.dispatcher.run_plain(commands, total_syncs, coalesce_tlb)
        starts = [at - screen.starts[first] for at in screen.starts[first : stop + 1]]
        consumed = [b - a for a, b in pairwise(starts)]
        self.frontend.took_plain(commands, total_syncs, DoorbellSummary(consumed[-1], syncs[-1]))
        errors: list[list[CommandError]] = [[] for _ in consumed]
        if outcome.host_errors:
            self.frontend.host_failed(outcome.host_errors)
            for error in outcome.host_errors:  # run rows -> (doorbell, index in it)
                k = bisect_right(starts, error.index) - 1
                errors[k].append(CommandError(error.index - starts[k], error.code, error.reason))
        log = self.log
        if log is not None:
            if self.debug:
                for k in range(first, stop):
                    for index, raw in enumerate(_split(screen.commands(k, k + 1))):
                        log.debug(
                            "command_decoded",
                            index=index,
                            kind=kind_name(raw[0]),
                            raw_hex=raw.hex(),
                        )
            log_group(
                log,
                calls,
                calls_before,
                started,
                doorbells=stop - first,
                commands=len(commands) // COMMAND_SIZE,
                syncs=total_syncs,
            )
            for error in outcome.host_errors:
                log.warning(
                    "guest_error",
                    index=error.index - starts[bisect_right(starts, error.index) - 1],
                    code=error.code,
                    reason=error.reason,
                    raw_hex=error.raw.hex(),
                )
        return [
            DoorbellReply(n, s, tuple(e)) for n, s, e in zip(consumed, syncs, errors, strict=True)
        ]

    def request(self, data: bytes) -> RequestReply:
        raise RecordRefused(f"vIOMMU {self.name!r} is an smmuv3: it takes no virtio requests")

    def events(self) -> list[GuestEvent]:
        """The vEVENTQ records queued since the last call (docs/smmuv3.md, "Events")."""
        return [
            GuestEvent(self.name, self.model, iommu, sequence, lost, record)
            for iommu, sequence, lost, record in self.topology.read_events()
        ]

    def event_fds(self) -> list[int]:
        """The vEVENTQ fds of its vIOMMU objects (a poll loop watches them)."""
        return [s.veventq_fd for _, s in sorted(self.topology.slots.items()) if s.veventq_fd >= 0]

    def kind_counts(self) -> dict[str, int]:
        return self.frontend.kind_counts()

    def error_counts(self) -> dict[str, int]:
        return dict(self.frontend.error_counts)

    def status(self) -> TopologyStatus:
        return self.topology.describe()

    def destroy(self) -> None:
        self.topology.destroy()


_CLEAN: dict[tuple[int, int], DoorbellReply] = {}


def _clean_reply(consumed: int, syncs: int) -> DoorbellReply:
    """The reply of a doorbell without errors, shared (it is frozen): a guest's doorbells
    come in a few shapes, and building a 5-field frozen value costs ~1 µs."""
    reply = _CLEAN.get((consumed, syncs))
    if reply is None:
        reply = DoorbellReply(consumed, syncs)
        if len(_CLEAN) < 4096:
            _CLEAN[consumed, syncs] = reply
    return reply


def _split(commands: bytes) -> list[bytes]:
    return [commands[at : at + COMMAND_SIZE] for at in range(0, len(commands), COMMAND_SIZE)]
