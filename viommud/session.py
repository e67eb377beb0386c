"""One client's replay session: its vIOMMUs, their frontends, topologies and dispatchers.

A session is what one VMM connection owns: one iommufd context on the backend (closing the
session frees everything, as closing /dev/iommu does) and any number of vIOMMU instances.
It is synchronous: the server feeds it records and sends back what it returns.

``handle`` returns the guest-visible response of a record (spec/trace-format.md §3, without
the ``record`` key, which the client adds). ``RecordRefused`` means the record cannot be part
of a replayable trace at all (a doorbell for a vIOMMU that does not exist, a doorbell that is
not a whole number of commands); the replay stops there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from viommud.backend.base import Backend
from viommud.backend.calls import BackendCallError, CallLog, Iommufd
from viommud.dispatcher import DispatchStats, SmmuDispatcher
from viommud.frontends.smmuv3.decode import COMMAND, kind_name
from viommud.frontends.smmuv3.frontend import FrameError, SmmuFeatures, SmmuV3Frontend
from viommud.topology import SmmuTopology, TopologyError
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


class RecordRefused(Exception):  # noqa: N818 - it is a refusal, not an internal error
    """The record cannot be replayed at all; the message says why."""


@dataclass(slots=True)
class ViommuInstance:
    name: str
    model: str
    frontend: SmmuV3Frontend
    topology: SmmuTopology
    dispatcher: SmmuDispatcher


def _ok() -> dict[str, Any]:
    return {"ok": True}


def _failed(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


class Session:
    """All state of one client connection."""

    def __init__(self, backend: Backend, *, keep_calls: bool = False, log: Any = None) -> None:
        self.backend = backend
        self.calls = CallLog(keep=keep_calls)
        self.iommufd = Iommufd(backend, self.calls)
        self.stats = DispatchStats()
        self.viommus: dict[str, ViommuInstance] = {}
        self.config_errors = 0
        self._retired_kinds: dict[str, int] = {}
        self._retired_errors: dict[str, int] = {}
        self.log = log
        self._debug = bool(log is not None and _enabled(log, logging.DEBUG))
        self.closed = False

    # -- records --------------------------------------------------------------------------
    def handle(self, record: Record) -> dict[str, Any]:
        if isinstance(record, Cmds):
            return self.doorbell(record.viommu, record.data)
        if isinstance(record, Request):
            raise RecordRefused(
                f"vIOMMU {record.viommu!r}: virtio-iommu requests are not supported"
            )
        self.calls.barrier = self.stats.barriers + 1
        try:
            response = self._config(record)
        except (TopologyError, BackendCallError, ValueError) as exc:
            response = _failed(str(exc))
        if not response["ok"]:
            self.config_errors += 1
            if self.log is not None:
                self.log.warning(
                    "config_record_failed", op=type(record).__name__, error=response["error"]
                )
        return response

    def _config(self, record: Record) -> dict[str, Any]:
        if isinstance(record, ViommuCreate):
            return self._viommu_create(record)
        if isinstance(record, ContextEntry | PasidEntry):
            return _failed("VT-d context and PASID entries are not supported by this daemon yet")
        instance = self.viommus.get(record.viommu)
        if instance is None:
            return _failed(f"no vIOMMU named {record.viommu!r}")
        if isinstance(record, DeviceAttach):
            instance.topology.attach(record.vid, record.device)
            if self.log is not None:
                self.log.info(
                    "device_attached", viommu=record.viommu, vid=record.vid, device=record.device
                )
            return _ok()
        if isinstance(record, DeviceDetach):
            instance.topology.detach(record.vid)
            if self.log is not None:
                self.log.info("device_detached", viommu=record.viommu, vid=record.vid)
            return _ok()
        if isinstance(record, Ste):
            instance.frontend.write_ste(record.vsid, record.data)
            return _ok()
        assert isinstance(record, ViommuDestroy)
        self._retire(instance)
        instance.topology.destroy()
        if self.log is not None:
            self.log.info("viommu_destroyed", viommu=record.viommu)
        return _ok()

    def _viommu_create(self, record: ViommuCreate) -> dict[str, Any]:
        if record.viommu in self.viommus:
            return _failed(f"vIOMMU {record.viommu!r} already exists")
        if record.model != "smmuv3":
            return _failed(f"model {record.model!r} is not supported by this daemon yet")
        if not record.iommus:
            return _failed("an smmuv3 vIOMMU needs at least one host iommu")
        for iommu in record.iommus:
            try:
                model = self.backend.host.iommu(iommu).model
            except KeyError:
                return _failed(f"host iommu {iommu!r} does not exist")
            if model != "arm-smmuv3":
                return _failed(f"host iommu {iommu!r} is {model}, not arm-smmuv3")
        frontend = SmmuV3Frontend(SmmuFeatures.from_options(record.options))
        topology = SmmuTopology(record.viommu, record.iommus, self.backend.host, self.iommufd)
        dispatcher = SmmuDispatcher(frontend, topology, self.iommufd, self.stats)
        self.viommus[record.viommu] = ViommuInstance(
            record.viommu, record.model, frontend, topology, dispatcher
        )
        if self.log is not None:
            self.log.info(
                "viommu_created", viommu=record.viommu, model=record.model, iommus=record.iommus
            )
        return _ok()

    def _retire(self, instance: ViommuInstance) -> None:
        del self.viommus[instance.name]
        _merge(self._retired_kinds, instance.frontend.kind_counts())
        _merge(self._retired_errors, instance.frontend.error_counts)

    # -- doorbells ------------------------------------------------------------------------
    def doorbell(self, viommu: str, data: bytes) -> dict[str, Any]:
        """One guest doorbell: decode, dispatch, answer as the vIOMMU would."""
        instance = self.viommus.get(viommu)
        if instance is None:
            raise RecordRefused(f"no vIOMMU named {viommu!r}")
        frontend = instance.frontend
        calls_before = self.calls.seq
        try:
            frontend.receive_data(data)
        except FrameError as exc:
            raise RecordRefused(f"vIOMMU {viommu!r}: {exc}") from None
        errors = instance.dispatcher.run(frontend.events())
        summary = frontend.last
        if self.log is not None:
            if self._debug:
                self._log_commands(viommu, data)
            self.log.info(
                "batch_forwarded",
                viommu=viommu,
                commands=summary.consumed,
                syncs=summary.syncs,
                errors=len(errors),
                backend_calls=self.calls.seq - calls_before,
            )
            for error in errors:
                self.log.warning(
                    "guest_error",
                    viommu=viommu,
                    index=error.index,
                    code=error.code,
                    reason=error.reason,
                    raw_hex=error.raw.hex(),
                )
        return {
            "consumed": summary.consumed,
            "errors": [{"index": e.index, "code": e.code, "reason": e.reason} for e in errors],
            "syncs": summary.syncs,
        }

    def _log_commands(self, viommu: str, data: bytes) -> None:
        assert self.log is not None
        for index, (w0, w1) in enumerate(COMMAND.iter_unpack(data)):
            self.log.debug(
                "command_decoded",
                viommu=viommu,
                index=index,
                kind=kind_name(w0 & 0xFF),
                raw_hex=COMMAND.pack(w0, w1).hex(),
            )

    # -- reporting and teardown -----------------------------------------------------------
    def drain_calls(self) -> list[dict[str, Any]]:
        return self.calls.drain()

    def report(self) -> dict[str, Any]:
        """The session's totals, in the replay report's shape (spec §2)."""
        kinds = dict(self._retired_kinds)
        errors = dict(self._retired_errors)
        for instance in self.viommus.values():
            _merge(kinds, instance.frontend.kind_counts())
            _merge(errors, instance.frontend.error_counts)
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
            "config_errors": self.config_errors,
        }

    def close(self) -> None:
        """Free every backend object of the session, then close the iommufd."""
        if self.closed:
            return
        self.closed = True
        for instance in list(self.viommus.values()):
            try:
                instance.topology.destroy()
            except (TopologyError, BackendCallError) as exc:
                if self.log is not None:
                    self.log.error("teardown_failed", viommu=instance.name, error=str(exc))
        self.viommus.clear()
        self.backend.close()


def _merge(into: dict[str, int], other: dict[str, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


def _enabled(log: Any, level: int) -> bool:
    check = getattr(log, "is_enabled_for", None)
    return bool(check(level)) if check is not None else True
