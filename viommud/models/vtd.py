"""The Intel VT-d vIOMMU model: queued-invalidation frontend + context/PASID topology +
per-wait dispatcher.

The one place they meet: the frontend's events go to the dispatcher, the dispatcher's
``Outcome`` comes back as the reply, and the IQEs the host caused reach the frontend through
``host_failed``. Group commit: vtd_screen screens, vtd_plan plans against the topology, the
dispatcher carries the plan out, and the frontend counts the run through ``took_in_bulk``."""

from __future__ import annotations

import struct
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, ClassVar

from protocols.models import HostIommu, ViommuModel
from viommud.backend.calls import BackendCallError
from viommud.dispatcher.vtd import VtdDispatcher
from viommud.events import PageResponse, StatusWrite
from viommud.frontends.vtd.frontend import (
    DoorbellSummary,
    FrameError,
    VtdFeatures,
    VtdFrontend,
)
from viommud.group_commit.vtd_plan import plan_run
from viommud.group_commit.vtd_screen import (
    Screen,
    interrupts,
    nothing_plain,
    plain_work,
    status_writes,
)
from viommud.group_commit.vtd_screen import screen as screen_doorbells
from viommud.guest.vtd import descriptor_type, kind_name
from viommud.models.base import (
    ModelContext,
    ModelError,
    RecordRefused,
    batch_lines,
    check_host_iommus,
    log_group,
    viommu_log,
)
from viommud.models.vtd_prq import PageRequests
from viommud.replies import (
    CONFIG_OK,
    CommandError,
    ConfigReply,
    DoorbellReply,
    GuestEvent,
    RequestReply,
)
from viommud.topology import TopologyStatus
from viommud.topology.vtd import VtdTopology
from viommud.trace import ContextEntry, DeviceAttach, DeviceDetach, PasidEntry, Record, ViommuCreate


@dataclass(slots=True)
class VtdViommu:
    name: str
    frontend: VtdFrontend
    topology: VtdTopology
    dispatcher: VtdDispatcher
    log: Any
    debug: bool
    model: str = ViommuModel.VTD
    # HELLO ``events`` with option ``prs``: the FAULT object whose page requests reach the
    # guest (docs/vtd.md, "Page requests")
    page_requests: PageRequests | None = None
    batch: bool = True  # per-batch log lines wanted (models.base.batch_lines)
    group_commit: ClassVar[bool] = True  # screen/commit below (models.GroupCommit)

    @classmethod
    def create(cls, record: ViommuCreate, ctx: ModelContext) -> VtdViommu:
        check_host_iommus(record, ctx, HostIommu.INTEL_VTD)
        try:
            options = dict(record.options)
            if ctx.compat is not None:
                options.setdefault("compat", ctx.compat)
            features = VtdFeatures.from_options(options)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        frontend = VtdFrontend(features)
        page_requests = None
        if ctx.event_depth and features.prs:
            try:
                page_requests = PageRequests.open(ctx.iommufd, ctx.event_depth)
            except BackendCallError as exc:
                raise ModelError(f"page requests: {exc}") from None
        topology = VtdTopology(
            record.viommu,
            record.iommus,
            ctx.host,
            ctx.iommufd,
            fault_id=page_requests.fault_id if page_requests is not None else 0,
            ram_regions=ctx.ram,
        )
        dispatcher = VtdDispatcher(topology, ctx.iommufd, ctx.stats)
        log, debug = viommu_log(ctx, record.viommu)
        return cls(
            record.viommu,
            frontend,
            topology,
            dispatcher,
            log,
            debug,
            page_requests=page_requests,
            batch=batch_lines(log),
        )

    def config(self, record: Record) -> ConfigReply:
        if isinstance(record, DeviceAttach):
            self.topology.attach(record.vid, record.device)
        elif isinstance(record, DeviceDetach):
            self.topology.detach(record.vid)
        elif isinstance(record, ContextEntry):
            self.frontend.write_context_entry(record.sid, record.data)
        elif isinstance(record, PasidEntry):
            self.frontend.write_pasid_entry(record.sid, record.pasid, record.data)
        else:
            raise ValueError(f"{type(record).__name__} records do not apply to a vtd vIOMMU")
        return CONFIG_OK

    def doorbell(self, data: bytes) -> DoorbellReply:
        frontend = self.frontend
        dispatcher = self.dispatcher
        calls = dispatcher.iommufd.log
        calls_before = calls.seq
        elided_before = dispatcher.elided
        try:
            frontend.receive_data(data)
        except FrameError as exc:
            raise RecordRefused(f"vIOMMU {self.name!r}: {exc}") from None
        events = frontend.events()
        responses: list[PageResponse] = []
        if frontend.features.prs:  # page group responses go to the host, not the dispatcher
            responses = [e for e in events if isinstance(e, PageResponse)]
            if responses:
                events = [e for e in events if not isinstance(e, PageResponse)]
        outcome = dispatcher.run(events)
        if outcome.host_errors:
            frontend.host_failed(outcome.host_errors)
        if responses:
            self._respond(responses)
        summary = frontend.last
        log = self.log
        if log is not None:
            if self.debug:
                size = frontend.features.desc_size
                for index in range(len(data) // size):
                    raw = data[index * size : (index + 1) * size]
                    (qw0,) = struct.unpack_from("<Q", raw)
                    log.debug(
                        "descriptor_decoded",
                        index=index,
                        kind=kind_name(descriptor_type(qw0)),
                        raw_hex=raw.hex(),
                    )
            if self.batch:
                log.info(
                    "batch_forwarded",
                    commands=summary.consumed,
                    syncs=summary.syncs,
                    errors=len(outcome.errors),
                    backend_calls=calls.seq - calls_before,
                    device_tlb_elided=dispatcher.elided - elided_before,
                )
            for error in outcome.errors:
                log.warning(
                    "guest_error",
                    index=error.index,
                    code=error.code,
                    reason=error.reason,
                    raw_hex=error.raw.hex(),
                )
        return DoorbellReply(
            summary.consumed,
            summary.syncs,
            tuple(CommandError(e.index, e.code, e.reason) for e in outcome.errors)
            if outcome.errors
            else (),
            outcome.status_writes,
            outcome.interrupts,
        )

    # -- group commit (docs/coalescing.md, "Group commit") --------------------------------
    def screen(self, doorbells: list[bytes]) -> Screen:
        """Which of these doorbells are plain (vtd_screen.screen) — the ones ``commit`` takes. A
        lone doorbell has nothing to share: it takes the per-doorbell path."""
        features = self.frontend.features
        if len(doorbells) < 2:
            return nothing_plain(doorbells, features)
        return screen_doorbells(doorbells, features)

    def commit(self, screen: Screen, first: int, stop: int) -> list[DoorbellReply]:
        """Plain doorbells ``first`` to ``stop - 1`` of ``screen`` at once: their work in one
        call per nested HWPT, then each one's response — what ``doorbell`` answers for it,
        status writes included. A host failure is IQE in the reply of the doorbell whose
        descriptor produced the failed entry, at its index, as ``doorbell`` reports it
        (docs/coalescing.md)."""
        if stop - first == 1:  # nothing to share: the per-doorbell path itself
            return [self.doorbell(screen.doorbells[first])]
        lo, hi = screen.rows(first, stop)
        syncs = screen.syncs[first:stop]
        dispatcher = self.dispatcher
        calls = dispatcher.iommufd.log
        calls_before = calls.seq
        started = time.perf_counter()
        starts = screen.starts
        plan = plan_run(self.topology, plain_work(screen, first, stop), starts[first:stop])
        outcome = dispatcher.run_plain(plan, sum(syncs), screen.descriptor)
        consumed = [starts[k + 1] - starts[k] for k in range(first, stop)]
        self.frontend.took_in_bulk(
            screen.kind_counts(first, stop), sum(syncs), DoorbellSummary(consumed[-1], syncs[-1])
        )
        errors: list[list[CommandError]] = [[] for _ in consumed]
        if outcome.host_errors:
            self.frontend.host_failed(outcome.host_errors)
            for error in outcome.host_errors:  # screen rows -> (doorbell, index in it)
                k = bisect_right(starts, error.index) - 1
                errors[k - first].append(
                    CommandError(error.index - starts[k], error.code, error.reason)
                )
        log = self.log
        if log is not None:
            if self.debug:
                size = screen.desc_size
                for k in range(first, stop):
                    data = screen.doorbells[k]
                    for index, kind in enumerate(screen.kinds(k)):
                        log.debug(
                            "descriptor_decoded",
                            index=index,
                            kind=kind_name(kind),
                            raw_hex=data[index * size : (index + 1) * size].hex(),
                        )
            log_group(
                log,
                calls,
                calls_before,
                started,
                doorbells=stop - first,
                commands=hi - lo,
                syncs=sum(syncs),
            )
            for error in outcome.host_errors:
                k = bisect_right(starts, error.index) - 1
                log.warning(
                    "guest_error",
                    index=error.index - starts[k],
                    code=error.code,
                    reason=error.reason,
                    raw_hex=error.raw.hex(),
                )
        writes = status_writes(screen, first, stop)
        raised = interrupts(screen, first, stop)
        return [
            DoorbellReply(n, s, tuple(e), tuple(StatusWrite(i, a, d) for i, a, d in w), tuple(r))
            for n, s, e, w, r in zip(consumed, syncs, errors, writes, raised, strict=True)
        ]

    def request(self, data: bytes) -> RequestReply:
        raise RecordRefused(f"vIOMMU {self.name!r} is a vtd: it takes no virtio requests")

    def kind_counts(self) -> dict[str, int]:
        return self.frontend.kind_counts()

    def error_counts(self) -> dict[str, int]:
        return dict(self.frontend.error_counts)

    def status(self) -> TopologyStatus:
        return self.topology.describe()

    def events(self) -> list[GuestEvent]:
        """Page requests read since the last call, as the guest's page request descriptors
        (docs/vtd.md, "Page requests"); none without ``prs`` and HELLO ``events``."""
        prq = self.page_requests
        if prq is None:
            return []
        prq.read(self.topology)
        return [
            GuestEvent(self.name, self.model, iommu, sequence, lost, record)
            for iommu, sequence, lost, record in prq.queue.drain()
        ]

    def _respond(self, responses: list[PageResponse]) -> None:
        """After the doorbell's invalidations are done (descriptors complete in order), the
        guest's page group responses reach the host (docs/vtd.md, "Page requests")."""
        prq = self.page_requests
        if prq is None:
            return  # no FAULT object (no HELLO events): nothing waits on the host
        try:
            stray = prq.respond(responses)
        except BackendCallError as exc:
            if self.log is not None:
                self.log.error("page_response_failed", viommu=self.name, error=str(exc))
            return
        if stray and self.log is not None:
            self.log.info("page_response_unmatched", viommu=self.name, count=len(stray))

    def event_fds(self) -> list[int]:
        prq = self.page_requests
        return [prq.fd] if prq is not None else []

    def destroy(self) -> None:
        try:
            self.topology.destroy()
        finally:
            if self.page_requests is not None:
                self.page_requests.close()  # after the HWPTs that held it
                self.page_requests = None
