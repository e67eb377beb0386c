"""What the virtio-iommu frontend asks the host side to do, as plain values.

A request that passes every guest-visible check yields a short list of these, ending with a
``Barrier`` (the request's completion). They are ordered so that the step that can fail on
the host comes before the steps that cannot be undone: an endpoint moving to another domain
is ``EndpointAttached(previous=old)`` (an atomic replace on the host) *before*
``DomainDestroyed(old)``. Invalidations travel in the shared intermediate form
(``viommud.events.Invalidation``) wrapped with the domain they target.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from viommud.events import Barrier, Invalidation
from viommud.frontends.virtio.mappings import Mapping

__all__ = [
    "Barrier",
    "DomainCreated",
    "DomainDestroyed",
    "DomainKind",
    "EndpointAttached",
    "EndpointDetached",
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
    BYPASS = "bypass"  # ATTACH_F_BYPASS: identity, every access allowed
    TABLE = "table"  # ATTACH_TABLE: the guest's own stage-1 table (a nested HWPT)


@dataclass(frozen=True, slots=True)
class TableConfig:
    """A guest table handed over with ATTACH_TABLE, reduced to what the host needs.

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
    (None when it was unattached)."""

    endpoint: int
    domain: int
    previous: int | None = None


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
