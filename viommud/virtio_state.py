"""virtio-iommu state as values: domain kinds, guest tables, the frontend's events, snapshots.

A core value module (the frontend produces these, the topology and the dispatcher consume
them), so no layer has to import another one's internals.

Events: a request that passes every guest-visible check yields a short list of them, ending
with a ``Barrier`` (the request's completion; virtio-iommu.md §2.1). They are ordered so
that the step that can fail on the host comes before the steps that cannot be undone: an
endpoint moving to another domain is ``EndpointAttached(previous=old)`` (an atomic replace
on the host) *before* ``DomainDestroyed(old)``. Invalidations travel in the shared
intermediate form (``viommud.events.Invalidation``) wrapped with the domain they target.

Snapshots: after the host refused a request and the frontend undid it, ``GuestView`` is
what the host side must match again (the dispatcher's re-sync).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from collections.abc import Mapping as ReadOnlyDict
from dataclasses import dataclass, field

from viommud.events import Barrier, Invalidation
from viommud.mappings import Mapping

__all__ = [
    "DomainCreated",
    "DomainDestroyed",
    "DomainKind",
    "DomainView",
    "EndpointAttached",
    "EndpointDetached",
    "GuestView",
    "Mapped",
    "TableAttached",
    "TableConfig",
    "TableInvalidation",
    "Unmapped",
    "VirtioEvent",
]


class DomainKind(enum.Enum):
    """What a domain translates with."""

    MAPPING = "mapping"  # MAP/UNMAP: the device keeps the page table (an IOAS on the host)
    BYPASS = "bypass"  # ATTACH_F_BYPASS: identity, every access allowed (§2.2)
    TABLE = "table"  # ATTACH_TABLE: the guest's own stage-1 table (a nested HWPT, §5)


@dataclass(frozen=True, slots=True)
class TableConfig:
    """A guest table handed over with ATTACH_TABLE (§5), reduced to what the host needs.

    ``model`` is the host IOMMU model that can walk it. Arm: the first two STE words
    (S1-translate, the CD table pointer; EATS left for the host side to decide per device
    unless the guest gave raw STE words). VT-d: ``iommu_hwpt_vtd_s1``'s fields.
    """

    model: str  # a HostIommu value (protocols.models)
    ste0: int = 0
    ste1: int = 0
    raw_ste: bool = False  # draft C: the guest wrote the STE words itself (EATS included)
    vtd_flags: int = 0
    pgtbl_addr: int = 0
    addr_width: int = 0


# -- events (frontend -> dispatcher) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainCreated:
    domain: int
    kind: DomainKind
    table: TableConfig | None = None


@dataclass(frozen=True, slots=True)
class DomainDestroyed:
    """The domain's last endpoint left: it and its mappings are gone."""

    domain: int


@dataclass(frozen=True, slots=True)
class EndpointAttached:
    """``endpoint`` now translates through ``domain``; ``previous`` is the domain it left
    (None when it was unattached).

    ``mappings`` are the domain's mappings, for the host to replay when this endpoint is
    the domain's first host device: the frontend's store itself, read while the request is
    dispatched (no copy), and left out of comparisons (it is the domain's content, not part
    of what happened).
    """

    endpoint: int
    domain: int
    previous: int | None = None
    mappings: Iterable[Mapping] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class EndpointDetached:
    """``endpoint`` left ``domain`` and is now unattached: in bypass when ``bypass``, else
    blocked (it must not reach guest memory)."""

    endpoint: int
    domain: int | None
    bypass: bool


@dataclass(frozen=True, slots=True)
class TableAttached:
    """An existing MAP domain without mappings becomes a table domain (draft A's flow:
    ATTACH, then ATTACH_TABLE on the same domain)."""

    domain: int
    table: TableConfig


@dataclass(frozen=True, slots=True)
class Mapped:
    domain: int
    mapping: Mapping


@dataclass(frozen=True, slots=True)
class Unmapped:
    domain: int
    mappings: tuple[Mapping, ...]


@dataclass(frozen=True, slots=True)
class TableInvalidation:
    """An INVALIDATE request, in the intermediate form, for the table domain ``domain``."""

    domain: int
    invalidation: Invalidation


VirtioEvent = (
    DomainCreated
    | DomainDestroyed
    | EndpointAttached
    | EndpointDetached
    | TableAttached
    | Mapped
    | Unmapped
    | TableInvalidation
    | Barrier
)


# -- snapshot (frontend -> dispatcher, after a refused request) ----------------------------------


@dataclass(frozen=True, slots=True)
class DomainView:
    """One guest domain as the host must build it; ``mappings`` is the frontend's store,
    read at once (not a copy)."""

    kind: DomainKind
    table: TableConfig | None
    mappings: Iterable[Mapping]


@dataclass(frozen=True, slots=True)
class GuestView:
    """The guest-visible state the host side re-syncs to: every domain, every attached
    endpoint (endpoint -> domain) and whether unattached endpoints are in bypass (§1.3)."""

    domains: ReadOnlyDict[int, DomainView]
    attached: ReadOnlyDict[int, int]
    bypass: bool
