"""What every vIOMMU model shares: the ``Viommu`` protocol the session uses, the context a
model gets from its session, its errors and logging helpers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from viommud.backend.calls import CallLog, Iommufd
from viommud.dispatcher import DispatchStats
from viommud.guest_memory import GuestResources, RamRegion
from viommud.host import HostConfig
from viommud.replies import ConfigReply, DoorbellReply, RequestReply
from viommud.topology import TopologyStatus
from viommud.trace import Record, ViommuCreate


class RecordRefused(Exception):  # noqa: N818 - it is a refusal, not an internal error
    """The record cannot be replayed at all (not a guest error); the message says why."""


class ModelError(ValueError):
    """A vIOMMU cannot be created as asked (bad options, host IOMMUs of the wrong kind)."""


@dataclass(slots=True)
class ModelContext:
    """What a vIOMMU instance gets from its session."""

    host: HostConfig
    iommufd: Iommufd
    stats: DispatchStats
    log: Any  # a structlog bound logger, or None
    # Per-model dispatch policies by model name (benchmarks compare them); models use
    # their defaults for a name that is not here.
    policies: dict[str, Any] = field(default_factory=dict)
    # The session's default compatibility policy (HELLO ``compat``) for every model
    # (smmuv3, vtd, virtio-iommu); a vIOMMU's own ``compat`` option wins. None: the model's
    # default ("architecture").
    compat: str | None = None
    # Depth of the vEVENTQ each vIOMMU object gets (HELLO ``events``); 0: no events.
    event_depth: int = 0
    # Guest RAM memfds and device cdevs the VMM passed (the session owns them); None or
    # empty: synthetic memory, devices opened by name.
    resources: GuestResources | None = None

    @property
    def ram(self) -> tuple[RamRegion, ...]:
        """The passed guest RAM regions (empty: none passed)."""
        return self.resources.regions if self.resources is not None else ()


class Viommu(Protocol):
    """One guest-visible virtual IOMMU."""

    name: str
    model: str

    def config(self, record: Record) -> ConfigReply:
        """device_attach / device_detach / ste / context_entry / pasid_entry.

        Returns the response (docs/trace-format.md §4); raises TopologyError, BackendCallError or
        ValueError for a refused change (the session answers ``ok: false``)."""
        ...

    def doorbell(self, data: bytes) -> DoorbellReply:
        """A ``cmds`` record: the guest's commands of one doorbell; raises RecordRefused."""
        ...

    def request(self, data: bytes) -> RequestReply:
        """A ``request`` record (virtio-iommu); raises RecordRefused on other models."""
        ...

    #: True when the model also implements ``viommud.group_commit.GroupCommit``.
    group_commit: ClassVar[bool]

    def kind_counts(self) -> dict[str, int]:
        """Commands seen, keyed ``model:NAME`` (docs/trace-format.md §3.2 ``by_kind``)."""
        ...

    def error_counts(self) -> dict[str, int]:
        """Guest-visible errors by code (docs/trace-format.md §3.2 ``by_code``)."""
        ...

    def status(self) -> TopologyStatus:
        """What the vIOMMU holds on the host, for ``viommud status``."""
        ...

    def destroy(self) -> None:
        """Free everything this vIOMMU holds on the backend."""
        ...


Factory = Callable[[ViommuCreate, ModelContext], Viommu]


def check_host_iommus(
    record: ViommuCreate, ctx: ModelContext, model: str | None, *, at_least_one: bool = True
) -> None:
    """The vIOMMU's host IOMMUs exist and (``model`` given) are all of that kind."""
    if at_least_one and not record.iommus:
        raise ModelError(f"a {record.model} vIOMMU needs at least one host iommu")
    for iommu in record.iommus:
        try:
            found = ctx.host.iommu(iommu).model
        except KeyError:
            raise ModelError(f"host iommu {iommu!r} does not exist") from None
        if model is not None and found != model:
            raise ModelError(f"host iommu {iommu!r} is {found}, not {model}")


def viommu_log(ctx: ModelContext, viommu: str) -> tuple[Any, bool]:
    """The session's logger bound to ``viommu``, and whether DEBUG lines are wanted."""
    if ctx.log is None:
        return None, False
    log = ctx.log.bind(viommu=viommu)
    check = getattr(log, "is_enabled_for", None)
    return log, bool(check(logging.DEBUG)) if check is not None else True


def batch_lines(log: Any) -> bool:
    """Whether the model's per-batch lines (``batch_forwarded``, ``group_forwarded``,
    ``request_completed``) can reach the output: a session's logger lowers them to DEBUG
    and says so (``SessionLogger.batch_lines``); any other logger gets them. Building a
    line nobody keeps costs a doorbell ~2 µs."""
    return log is not None and bool(getattr(log, "batch_lines", True))


def log_group(
    log: Any,
    calls: CallLog,
    calls_before: int,
    started: float,
    *,
    doorbells: int,
    commands: int,
    syncs: int,
) -> None:
    """The ``group_forwarded`` line of a group commit: the run's figures, the calls made
    since ``calls_before`` and the time since ``started``."""
    log.info(
        "group_forwarded",
        doorbells=doorbells,
        commands=commands,
        syncs=syncs,
        backend_calls=calls.seq - calls_before,
        duration_ms=round((time.perf_counter() - started) * 1e3, 3),
    )
