"""One client's replay session: its vIOMMUs, whatever their models.

A session is what one VMM connection owns: one iommufd context on the backend (closing the
session frees everything, as closing /dev/iommu does) and any number of vIOMMU instances
(viommud.models). It is synchronous: the server feeds it records and sends back what it
returns.

``handle`` returns the guest-visible reply of a record (a frozen ``viommud.replies``
value; its JSON form is docs/trace-format.md "Responses"). ``RecordRefused`` means the
record cannot be part of a replayable trace at all (a doorbell for a vIOMMU that does not
exist, a doorbell that is not a whole number of commands); the replay stops there.
"""

from __future__ import annotations

from typing import Any, cast

from viommud import group_commit
from viommud.backend.base import Backend
from viommud.backend.calls import BackendCallError, CallLog, Iommufd
from viommud.dispatcher import DispatchStats
from viommud.group_commit import GroupCommit
from viommud.guest_memory import GuestResources
from viommud.journal import Journal
from viommud.models import (
    ModelContext,
    ModelError,
    RecordRefused,
    Viommu,
    factories,
)
from viommud.oracle.verifier import Verifier
from viommud.replies import (
    CONFIG_OK,
    ConfigReply,
    DoorbellReply,
    GuestEvent,
    Reply,
    RequestReply,
)
from viommud.topology import TopologyError
from viommud.trace import (
    Cmds,
    ContextEntry,
    DeviceAttach,
    DeviceDetach,
    PasidEntry,
    Record,
    Request,
    Ste,
    ViommuCreate,
    ViommuDestroy,
)

__all__ = ["RecordRefused", "Session"]


class Session:
    """All state of one client connection."""

    def __init__(
        self,
        backend: Backend,
        *,
        keep_calls: bool = False,
        verify: bool = False,
        log: Any = None,
        policies: dict[str, Any] | None = None,
        compat: str | None = None,
        event_depth: int = 0,
        journal: bool = True,
    ) -> None:
        """``event_depth``: each SMMUv3 vIOMMU object gets a vEVENTQ this deep (HELLO
        ``events``, docs/protocol.md); 0: no vEVENTQ, no events. ``journal``: keep what
        recreates the vIOMMUs, so the session can be saved (viommud.state; HELLO ``state``);
        it holds every live virtio-iommu mapping, so a session that will never be saved
        goes without."""
        self.backend = backend
        self.calls = CallLog(keep=keep_calls)
        self.verifier = Verifier(backend.host) if verify else None
        if self.verifier is not None:
            self.calls.listener = self.verifier.call
        self.iommufd = Iommufd(backend, self.calls)
        self.stats = DispatchStats()
        self.viommus: dict[str, Viommu] = {}
        self.config_errors = 0
        self._retired_kinds: dict[str, int] = {}
        self._retired_errors: dict[str, int] = {}
        self.log = log
        self.journal = Journal() if journal else None  # what recreates the vIOMMUs
        # Guest RAM memfds and device cdevs the VMM passed (docs/protocol.md); owned here.
        self.resources = GuestResources()
        self._context = ModelContext(
            backend.host,
            self.iommufd,
            self.stats,
            log,
            policies or {},
            compat,
            event_depth,
            self.resources,
        )
        self.use_resources(self.resources)
        self.closed = False

    def use_resources(self, resources: GuestResources) -> None:
        """Make ``resources`` the session's (STATE_LOAD moves them to the rebuilt session):
        the models read its RAM; a device whose cdev the VMM passed is bound through that
        fd (docs/backend.md)."""
        self.resources = resources
        self._context.resources = resources
        self.iommufd.take_device_fd = resources.take_device

    # -- records --------------------------------------------------------------------------
    def handle(self, record: Record) -> Reply:
        if isinstance(record, Cmds):
            return self.doorbell(record.viommu, record.data)
        if isinstance(record, Request):
            return self.request(record.viommu, record.data)
        self.calls.barrier = self.stats.barriers + 1
        verifier = self.verifier
        if verifier is not None:
            verifier.before(record)
        try:
            response = self._config(record)
        except (TopologyError, BackendCallError, ValueError) as exc:
            response = ConfigReply(False, str(exc))
        if verifier is not None:
            verifier.after(record, response.ok)
        if self.journal is not None:
            self.journal.config(record, response.ok)
        if not response.ok:
            self.config_errors += 1
            if self.log is not None:
                self.log.warning(
                    "config_record_failed", op=type(record).__name__, error=response.error
                )
        return response

    def doorbell(self, viommu: str, data: bytes) -> DoorbellReply:
        """One guest doorbell (a ``cmds`` record)."""
        response = self._doorbell(viommu, data)
        if self.journal is not None:
            self.journal.doorbell(viommu, data, response)
        return response

    def _doorbell(self, viommu: str, data: bytes) -> DoorbellReply:
        instance = self._instance(viommu)
        verifier = self.verifier
        if verifier is None:
            response = instance.doorbell(data)
        else:
            verifier.doorbell_begin(viommu, data)
            response = instance.doorbell(data)
            verifier.doorbell_end(viommu, {e.index for e in response.errors})
            self._log_missed(viommu)
        return response

    def request(self, viommu: str, data: bytes) -> RequestReply:
        """One virtio-iommu request (a ``request`` record): its own barrier."""
        instance = self._instance(viommu)
        verifier = self.verifier
        if verifier is None:
            reply = instance.request(data)
        else:
            verifier.request_begin(viommu, data)
            status = "DEVERR"
            try:
                reply = instance.request(data)
                status = reply.status
            finally:
                verifier.request_end(viommu, status)
            self._log_missed(viommu)
        if self.journal is not None:
            self.journal.request(viommu, data, reply)
        return reply

    def doorbells(self, viommu: str, doorbells: list[bytes]) -> list[DoorbellReply | Exception]:
        """Group commit (viommud.group_commit): consecutive doorbells of one vIOMMU that were
        already waiting in the input. Each answer is the reply ``doorbell`` would give, or
        the RecordRefused it would raise. Runs of plain doorbells share host calls; each
        run's calls return before any of its replies exists, so no sync completes early."""
        instance = self.viommus.get(viommu)
        if instance is None or not instance.group_commit:
            return [self._one(viommu, data) for data in doorbells]
        model = cast("GroupCommit", instance)  # what ``group_commit = True`` promises
        verifier = self.verifier
        if verifier is None:
            before = after = None
        else:

            def before(run: list[bytes]) -> None:  # the oracle sees a run as one doorbell
                verifier.doorbell_begin(viommu, b"".join(run))

            def after(replies: list[DoorbellReply]) -> None:
                failed: set[int] = set()
                offset = 0
                for reply in replies:
                    failed.update(e.index + offset for e in reply.errors)
                    offset += reply.consumed
                verifier.doorbell_end(viommu, failed)
                self._log_missed(viommu)

        def one(data: bytes) -> DoorbellReply | Exception:
            try:
                return self._doorbell(viommu, data)
            except RecordRefused as exc:
                return exc

        answers = group_commit.run(model, doorbells, one, before=before, after=after)
        journal = self.journal
        if journal is not None:
            for data, answer in zip(doorbells, answers, strict=True):  # in order, one by one
                if isinstance(answer, DoorbellReply):
                    journal.doorbell(viommu, data, answer)
        return answers

    def _one(self, viommu: str, data: bytes) -> DoorbellReply | Exception:
        try:
            return self.doorbell(viommu, data)
        except RecordRefused as exc:
            return exc

    def _log_missed(self, viommu: str) -> None:
        verifier = self.verifier
        if verifier is None or self.log is None or not verifier.ledger.missed:
            return
        for missed in verifier.missed_needs():
            self.log.error("verify_missed", viommu=viommu, need=missed)
        verifier.ledger.missed_needs.clear()

    def _instance(self, name: str) -> Viommu:
        instance = self.viommus.get(name)
        if instance is None:
            raise RecordRefused(f"no vIOMMU named {name!r}")
        return instance

    def _config(self, record: Record) -> ConfigReply:
        if isinstance(record, ViommuCreate):
            return self._viommu_create(record)
        instance = self.viommus.get(record.viommu)
        if instance is None:
            return ConfigReply(False, f"no vIOMMU named {record.viommu!r}")
        if isinstance(record, ViommuDestroy):
            self._retire(instance)
            instance.destroy()
            if self.log is not None:
                self.log.info("viommu_destroyed", viommu=record.viommu)
            return CONFIG_OK
        response = instance.config(record)
        if self.log is not None and response.ok:
            self.log.info(
                _CONFIG_EVENTS[type(record)], viommu=record.viommu, **_config_keys(record)
            )
        return response

    def _viommu_create(self, record: ViommuCreate) -> ConfigReply:
        if record.viommu in self.viommus:
            return ConfigReply(False, f"vIOMMU {record.viommu!r} already exists")
        factory = factories().get(record.model)
        if factory is None:
            return ConfigReply(False, f"model {record.model!r} is not supported by this daemon yet")
        try:
            instance = factory(record, self._context)
        except ModelError as exc:
            return ConfigReply(False, str(exc))
        self.viommus[record.viommu] = instance
        if self.log is not None:
            self.log.info(
                "viommu_created", viommu=record.viommu, model=record.model, iommus=record.iommus
            )
        return CONFIG_OK

    def _retire(self, instance: Viommu) -> None:
        del self.viommus[instance.name]
        _merge(self._retired_kinds, instance.kind_counts())
        _merge(self._retired_errors, instance.error_counts())

    # -- events (docs/protocol.md, EVENT) ---------------------------------------------------
    def events(self) -> list[GuestEvent]:
        """Host events queued for the guest since the last call, vIOMMU by vIOMMU in name
        order (an empty list when the session has no vEVENTQ)."""
        if not self._context.event_depth:
            return []
        out: list[GuestEvent] = []
        for _, instance in sorted(self.viommus.items()):
            drain = getattr(instance, "events", None)
            if drain is not None:
                out += drain()
        return out

    def event_fds(self) -> list[int]:
        """The fds of the session's event queues (vEVENTQ, FAULT), for a poll loop."""
        if not self._context.event_depth:
            return []
        out: list[int] = []
        for _, instance in sorted(self.viommus.items()):
            fds = getattr(instance, "event_fds", None)
            if fds is not None:
                out += fds()
        return out

    # -- migration (viommud.state) --------------------------------------------------------
    @property
    def compat(self) -> str | None:
        """The session's default compatibility policy (HELLO ``compat``)."""
        return self._context.compat

    def set_compat(self, compat: str | None) -> None:
        self._context.compat = compat

    def sibling(self, backend: Backend, *, compat: str | None) -> Session:
        """A new, empty session on ``backend`` with this one's options."""
        return Session(
            backend,
            keep_calls=self.calls.keep,
            verify=self.verifier is not None,
            log=self.log,
            policies=self._context.policies,
            compat=compat,
            event_depth=self._context.event_depth,
        )

    def restore_totals(self, saved: dict[str, Any]) -> None:
        """Make the report's totals those of a saved session (``viommud.state``): the
        commands, errors, barriers, baseline, config errors and oracle verdict become the
        saved ones; the backend counts add the saved ones to the calls made here."""
        kinds: dict[str, int] = {}
        errors: dict[str, int] = {}
        for instance in self.viommus.values():
            _merge(kinds, instance.kind_counts())
            _merge(errors, instance.error_counts())
        self._retired_kinds = _less(saved["by_kind"], kinds)
        self._retired_errors = _less(saved["by_code"], errors)
        self.stats.barriers = saved["barriers"]
        self.stats.baseline_invalidate_calls = saved["baseline"]
        self.config_errors = saved["config_errors"]
        calls = self.calls
        _merge(calls.calls, saved["calls"])
        _merge(calls.errnos, saved["errnos"])
        calls.invalidation_entries += saved["invalidation_entries"]
        if self.verifier is not None:
            ledger = self.verifier.ledger
            ledger.missed = saved["missed"]
            ledger.over = saved["over"]
            ledger.missed_needs.clear()

    # -- reporting and teardown -----------------------------------------------------------
    def drain_calls(self) -> list[dict[str, Any]]:
        return self.calls.drain()

    def report(self) -> dict[str, Any]:
        """The session's totals, in the replay report's shape (docs/trace-format.md §3)."""
        kinds = dict(self._retired_kinds)
        errors = dict(self._retired_errors)
        for instance in self.viommus.values():
            _merge(kinds, instance.kind_counts())
            _merge(errors, instance.error_counts())
        return {
            "commands": {"total": sum(kinds.values()), "by_kind": dict(sorted(kinds.items()))},
            "errors": {"total": sum(errors.values()), "by_code": dict(sorted(errors.items()))},
            "barriers": self.stats.barriers,
            "backend": {
                "calls": dict(sorted(self.calls.calls.items())),
                "invalidation_entries": self.calls.invalidation_entries,
                "errnos": dict(sorted(self.calls.errnos.items())),
            },
            "baseline": {"invalidate_calls": self.stats.baseline_invalidate_calls},
            "verify": (
                self.verifier.report()
                if self.verifier is not None
                else {"enabled": False, "missed": 0, "over": 0}
            ),
            "config_errors": self.config_errors,
        }

    def close(self) -> None:
        """Free every backend object of the session, then close the iommufd."""
        if self.closed:
            return
        self.closed = True
        for instance in list(self.viommus.values()):
            try:
                instance.destroy()
            except (TopologyError, BackendCallError) as exc:
                if self.log is not None:
                    self.log.error("teardown_failed", viommu=instance.name, error=str(exc))
        self.viommus.clear()
        self.backend.close()
        self.resources.close()


_CONFIG_EVENTS: dict[type, str] = {
    DeviceAttach: "device_attached",
    DeviceDetach: "device_detached",
    Ste: "ste_written",
    ContextEntry: "context_entry_written",
    PasidEntry: "pasid_entry_written",
}


def _config_keys(record: Record) -> dict[str, Any]:
    """The log keys of a config record (its identifying fields, not its data)."""
    if isinstance(record, DeviceAttach):
        return {"vid": record.vid, "device": record.device}
    if isinstance(record, DeviceDetach):
        return {"vid": record.vid}
    if isinstance(record, Ste):
        return {"vid": record.vsid}
    if isinstance(record, ContextEntry):
        return {"sid": record.sid}
    if isinstance(record, PasidEntry):
        return {"sid": record.sid, "pasid": record.pasid}
    return {}


def _merge(into: dict[str, int], other: dict[str, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


def _less(total: dict[str, int], part: dict[str, int]) -> dict[str, int]:
    """``total - part`` per key, leaving out zeros (counts the report adds to ``part``)."""
    out = {key: value - part.get(key, 0) for key, value in total.items()}
    for key, value in part.items():
        if key not in total:
            out[key] = -value
    return {key: value for key, value in out.items() if value}
