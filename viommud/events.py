"""The one intermediate form every frontend produces (DESIGN.md point 2).

A frontend turns guest bytes into these values; nothing downstream of a frontend looks at
guest encodings again, except ``Invalidation.raw`` which carries the guest's own command for
backends whose uAPI takes guest commands verbatim (the ARM vIOMMU invalidation array).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from viommud.backend.base import DeviceFault as DeviceFault  # noqa: PLC0414 - re-exported

if TYPE_CHECKING:
    from viommud.guest.vtd import PasidEntry, VtdContext


class Cache(enum.Flag):
    """Which caches an invalidation targets."""

    TLB = enum.auto()  # IOTLB / walk caches of the physical IOMMU
    DEVICE_TLB = enum.auto()  # ATS translation cache in the device (ATC / device-TLB)
    CONFIG = enum.auto()  # configuration caches (STE/CD, context / PASID entries)


class Scope(enum.Enum):
    """How much of the cache an invalidation covers."""

    ALL = "all"  # every entry of the VM (all ASIDs, all devices)
    ASID = "asid"  # every entry tagged with one ASID / PASID
    RANGE = "range"  # an address range, within one ASID or (asid None) all of them
    DEVICE = "device"  # one device (config and device-TLB invalidations)


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One guest invalidation, in the model's terms.

    ``index`` is the command's position in its doorbell. ``device`` is the guest's ID of the
    device for device-scoped work (vSID / source ID / endpoint ID). ``addr``/``size`` are bytes;
    ``size == 0`` means the whole scope. ``granule`` is the translation granule in bytes when
    the guest named one (0 otherwise). ``raw`` is the guest's encoding of the command.
    """

    index: int
    caches: Cache
    scope: Scope
    device: int | None = None
    asid: int | None = None
    addr: int = 0
    size: int = 0
    granule: int = 0
    leaf: bool = False
    raw: bytes = b""


_new_object = object.__new__
_INV_SETTERS = tuple(
    Invalidation.__dict__[name].__set__
    for name in (
        "index",
        "caches",
        "scope",
        "device",
        "asid",
        "addr",
        "size",
        "granule",
        "leaf",
        "raw",
    )
)


def new_invalidation(  # noqa: PLR0917 - every field, positionally, for speed
    index: int,
    caches: Cache,
    scope: Scope,
    device: int | None,
    asid: int | None,
    addr: int,
    size: int,
    granule: int,
    leaf: bool,
    raw: bytes,
) -> Invalidation:
    """``Invalidation(...)`` for the decode loops: the same frozen value (equal, hashed and
    printed alike), built through its slots without the dataclass ``__init__``'s
    ``object.__setattr__`` per field (a third of its cost)."""
    inv: Invalidation = _new_object(Invalidation)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _INV_SETTERS
    s0(inv, index)
    s1(inv, caches)
    s2(inv, scope)
    s3(inv, device)
    s4(inv, asid)
    s5(inv, addr)
    s6(inv, size)
    s7(inv, granule)
    s8(inv, leaf)
    s9(inv, raw)
    return inv


@dataclass(frozen=True, slots=True)
class StreamTableInvalidated:
    """SMMUv3 CFGI_STE / CFGI_STE_RANGE / CFGI_ALL (SMMUv3 §4.3): the VMM re-reads the vSTEs
    of the stream IDs ``first``..``last`` (inclusive) as the hardware would at this point.

    ``stes`` is what that read finds: ``(vSID, 64-byte guest STE)`` for every vSID of the
    range whose STE the guest has written, in vSID order, as the frontend saw it when it
    took the command."""

    index: int
    first: int
    last: int
    raw: bytes = b""
    stes: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Barrier:
    """A guest completion point (SMMUv3 CMD_SYNC, VT-d wait descriptor, virtio used buffer).

    Everything the guest issued before ``index`` must have completed on the host before the
    barrier is reported done."""

    index: int


@dataclass(frozen=True, slots=True)
class GuestError:
    """A command the emulated IOMMU refuses; ``code`` is the guest-visible status."""

    index: int
    code: str  # e.g. "CERROR_ILL"
    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class DomainInvalidation:
    """An IOTLB-class invalidation scoped by the guest's domain ID (VT-d IOTLB / P_IOTLB).

    ``domain`` is the guest DID (None: every domain); ``pasid`` the PASID whose first-stage
    entries it covers (None: every PASID of the domain, and requests without PASID).
    ``addr``/``size`` are bytes, ``size == 0`` meaning the whole address space; ``leaf`` is
    the guest's hint that only leaf entries changed (VT-d IH)."""

    index: int
    domain: int | None
    pasid: int | None = None
    addr: int = 0
    size: int = 0
    leaf: bool = False
    raw: bytes = b""


def _no_entries() -> Mapping[Any, Any]:
    return _NO_ENTRIES


_NO_ENTRIES: Mapping[Any, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ContextCacheInvalidated:
    """VT-d context-cache invalidation: the VMM re-reads the context entries of the source
    IDs ``s`` with ``s & mask == sid & mask`` (``mask == 0``: every source ID), and the
    PASID entries they lead to, as the hardware would at this point. ``domain`` is the DID of
    a domain-selective request (informational: it is handled as global, as QEMU does).

    ``contexts`` (source ID -> context entry) and ``pasids`` ((source ID, PASID) -> PASID
    entry) are the guest's entries as the frontend held them at this point, decoded, the
    ones the guest never wrote left out; read-only snapshots the frontend never changes."""

    index: int
    sid: int = 0
    mask: int = 0
    domain: int | None = None
    raw: bytes = b""
    contexts: Mapping[int, VtdContext] = field(default_factory=_no_entries)
    pasids: Mapping[tuple[int, int], PasidEntry] = field(default_factory=_no_entries)


@dataclass(frozen=True, slots=True)
class PasidCacheInvalidated:
    """VT-d PASID-cache invalidation: re-read the PASID entries it covers. ``domain`` None
    means global; with ``pasid`` None, every PASID of ``domain`` (domain-selective).
    ``pasids`` is the guest's PASID entries at this point, as in ``ContextCacheInvalidated``
    (all of them: the entry a device reads is named by its cached context entry)."""

    index: int
    domain: int | None = None
    pasid: int | None = None
    raw: bytes = b""
    pasids: Mapping[tuple[int, int], PasidEntry] = field(default_factory=_no_entries)


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """A completion the guest observes in its memory (VT-d wait descriptor with SW=1): the
    32-bit ``data`` written at guest-physical ``addr`` once everything before ``index`` is
    done."""

    index: int
    addr: int
    data: int


@dataclass(frozen=True, slots=True)
class CompletionInterrupt:
    """A VT-d wait descriptor with IF=1 at ``index`` completed (VT-d §6.5.2.8): the hardware
    sets ICS.IWC and, when IWC was clear, signals the invalidation completion event as
    IECTL says (IM set: only IECTL.IP). Reported with the doorbell, as status writes are."""

    index: int


@dataclass(frozen=True, slots=True)
class PageResponse:
    """A VT-d page group response (VT-d §6.5.2.7) of a vIOMMU with ECAP.PRS: the guest
    answers page request group ``prgi`` of source ID ``rid`` (and ``pasid``, None without)
    with response code ``code`` (0 success, 1 invalid request, 0xF response failure)."""

    index: int
    rid: int
    pasid: int | None
    prgi: int
    code: int
    lpig: bool


Event = Invalidation | StreamTableInvalidated | Barrier | GuestError

#: What the VT-d frontend emits: the shared events plus the VT-d ones.
VtdEvent = (
    Event
    | DomainInvalidation
    | ContextCacheInvalidated
    | PasidCacheInvalidated
    | StatusWrite
    | CompletionInterrupt
    | PageResponse
)
