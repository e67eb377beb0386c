"""INVALIDATE (virtio-iommu.md §5): the three drafts' requests in one shape, then in the
shared intermediate form (``viommud.events.Invalidation``), one per tag space.

Draft A names its scope with a bitmask and CONFIG/LEAF flags, draft B with ``inv_gran`` /
``inv_type`` and PASID/ARCHID/LEAF flags, draft C with an enumerated scope and a cache set
(§5.1-§5.3). ``_normalise`` checks the reserved and unknown bits (INVAL) and the range
(INVAL / RANGE) and gives one ``_InvSpec``; ``_split_by_tag`` turns it into invalidations
for the domain's table format.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from protocols.models import HostIommu
from protocols.virtio_iommu import (
    INV_A_F_CONFIG,
    INV_A_F_LEAF,
    INV_A_SCOPE_DOMAIN,
    INV_A_SCOPE_PASID,
    INV_A_SCOPE_VA,
    INV_B_F_ARCHID,
    INV_B_F_LEAF,
    INV_B_F_PASID,
    INV_B_GRAN_DOMAIN,
    INV_B_GRAN_PASID,
    INV_B_GRAN_VA,
    INV_B_TYPE_DEV_IOTLB,
    INV_B_TYPE_IOTLB,
    INV_B_TYPE_PASID,
    INV_C_CACHE_PASID,
    INV_C_CACHE_TLB,
    INV_C_F_GLOBAL,
    INV_C_F_ID,
    INV_C_F_LEAF,
    INV_C_F_PASID,
    INV_C_SCOPE_ADDRESS,
    INV_C_SCOPE_DOMAIN,
    INV_C_SCOPE_PASID,
    Status,
)
from viommud.events import Cache, Invalidation, Scope
from viommud.frontends.virtio.domains import Domain
from viommud.frontends.virtio.request import Refused
from viommud.guest.virtio import Invalidate, InvalidateA, InvalidateB
from viommud.virtio_state import DomainKind, TableConfig, TableInvalidation

__all__ = ["table_invalidations"]

U64_MAX = (1 << 64) - 1
PASID_MAX = (1 << 20) - 1


def table_invalidations(
    req: Invalidate, raw: bytes, domains: dict[int, Domain]
) -> list[TableInvalidation]:
    """One INVALIDATE request: NOENT for an unknown domain, INVAL for one without a guest
    table, else its invalidations for the domain's table format."""
    spec = replace(_normalise(req), raw=raw)
    domain = domains.get(spec.domain)
    if domain is None:
        raise Refused(Status.NOENT, f"domain {spec.domain} does not exist")
    if domain.kind is not DomainKind.TABLE:
        raise Refused(Status.INVAL, f"domain {spec.domain} has no guest table to invalidate")
    if spec.scope is Scope.RANGE and spec.addr + spec.size - 1 > U64_MAX:
        raise Refused(Status.RANGE, "the invalidation range overflows")
    assert domain.table is not None
    return [TableInvalidation(domain.id, inv) for inv in _split_by_tag(spec, domain.table)]


@dataclass(frozen=True, slots=True)
class _InvSpec:
    domain: int
    scope: Scope  # ALL (domain), ASID (one PASID / ASID), RANGE (addresses)
    caches: Cache
    pasid: int | None
    archid: int | None
    addr: int = 0
    size: int = 0
    granule: int = 0
    leaf: bool = False
    raw: bytes = b""


def _scope_bit(value: int, bits: tuple[int, int, int]) -> Scope:
    domain, pasid, va = bits
    if value == domain:
        return Scope.ALL
    if value == pasid:
        return Scope.ASID
    if value == va:
        return Scope.RANGE
    raise Refused(Status.INVAL, f"invalid invalidation scope 0x{value:x}")


def _range(scope: Scope, start: int, nr_pages: int, log2: int) -> tuple[int, int, int]:
    if scope is not Scope.RANGE:
        return 0, 0, 0
    if not nr_pages or log2 > 63 or log2 < 12:
        raise Refused(Status.INVAL, "invalid invalidation range (nr_pages / granule)")
    granule = 1 << log2
    if start % granule:
        raise Refused(Status.INVAL, "invalidation address not aligned to its granule")
    size = nr_pages * granule
    if start + size - 1 > U64_MAX:
        raise Refused(Status.RANGE, "the invalidation range overflows")
    return start, size, granule


def _normalise(req: Invalidate) -> _InvSpec:
    """One draft's INVALIDATE fields -> scope, caches, tags and range (INVAL on bad bits)."""
    if isinstance(req, InvalidateA):
        if any(req.reserved) or req.flags & ~(INV_A_F_CONFIG | INV_A_F_LEAF):
            raise Refused(Status.INVAL, "INVALIDATE reserved bits set")
        scope = _scope_bit(req.scope, (INV_A_SCOPE_DOMAIN, INV_A_SCOPE_PASID, INV_A_SCOPE_VA))
        caches = Cache.CONFIG if req.flags & INV_A_F_CONFIG else Cache.TLB | Cache.DEVICE_TLB
        addr, size, granule = _range(scope, req.virt_start, req.nr_pages, req.granule)
        tagged = scope is not Scope.ALL
        return _InvSpec(
            req.domain,
            scope,
            caches,
            req.pasid if tagged else None,
            req.id if tagged else None,
            addr,
            size,
            granule,
            bool(req.flags & INV_A_F_LEAF),
        )
    if isinstance(req, InvalidateB):
        types = INV_B_TYPE_IOTLB | INV_B_TYPE_DEV_IOTLB | INV_B_TYPE_PASID
        flag_bits = INV_B_F_PASID | INV_B_F_ARCHID | INV_B_F_LEAF
        if (
            req.reserved1
            or req.reserved2
            or any(req.reserved3)
            or req.inv_type & ~types
            or not req.inv_type
            or req.flags & ~flag_bits
        ):
            raise Refused(Status.INVAL, "INVALIDATE reserved or unknown bits set")
        scope = _scope_bit(req.inv_gran, (INV_B_GRAN_DOMAIN, INV_B_GRAN_PASID, INV_B_GRAN_VA))
        caches = Cache(0)
        if req.inv_type & INV_B_TYPE_IOTLB:
            caches |= Cache.TLB
        if req.inv_type & INV_B_TYPE_DEV_IOTLB:
            caches |= Cache.DEVICE_TLB
        if req.inv_type & INV_B_TYPE_PASID:
            caches |= Cache.CONFIG
        pasid = req.pasid if req.flags & INV_B_F_PASID else None
        if scope is Scope.ASID and pasid is None and not req.flags & INV_B_F_ARCHID:
            raise Refused(Status.INVAL, "a PASID invalidation names neither PASID nor ARCHID")
        addr, size, granule = _range(scope, req.virt_start, req.nr_pages, req.granule)
        return _InvSpec(
            req.domain,
            scope,
            caches,
            pasid,
            req.archid if req.flags & INV_B_F_ARCHID else None,
            addr,
            size,
            granule,
            bool(req.flags & INV_B_F_LEAF),
        )
    flag_bits = INV_C_F_LEAF | INV_C_F_PASID | INV_C_F_ID | INV_C_F_GLOBAL
    if (
        any(req.reserved)
        or req.flags & ~flag_bits
        or req.caches & ~(INV_C_CACHE_PASID | INV_C_CACHE_TLB)
        or not req.caches
    ):
        raise Refused(Status.INVAL, "INVALIDATE reserved or unknown bits set")
    scopes = {
        INV_C_SCOPE_DOMAIN: Scope.ALL,
        INV_C_SCOPE_PASID: Scope.ASID,
        INV_C_SCOPE_ADDRESS: Scope.RANGE,
    }
    scope_c = scopes.get(req.scope)
    if scope_c is None:
        raise Refused(Status.INVAL, f"invalid invalidation scope {req.scope}")
    caches = Cache(0)
    if req.caches & INV_C_CACHE_TLB:
        caches |= Cache.TLB | Cache.DEVICE_TLB
    if req.caches & INV_C_CACHE_PASID:
        caches |= Cache.CONFIG
    pasid = req.pasid if req.flags & INV_C_F_PASID else None
    archid = req.id & 0xFFFF if req.flags & INV_C_F_ID and not req.flags & INV_C_F_GLOBAL else None
    addr, size, granule = _range(scope_c, req.address, req.nr_pages, req.page_size)
    return _InvSpec(
        req.domain,
        scope_c,
        caches,
        pasid,
        archid,
        addr,
        size,
        granule,
        bool(req.flags & INV_C_F_LEAF),
    )


def _split_by_tag(spec: _InvSpec, table: TableConfig) -> list[Invalidation]:
    """The intermediate form of one INVALIDATE: one ``Invalidation`` per tag space.

    Arm tables tag TLB entries with the ASID (``archid``), and the CD cache and ATS requests
    with the PASID (SSID). The VMM never reads guest CD tables, so a tag the guest did not
    give widens the scope: a PASID-scoped TLB invalidation without an ASID covers the whole
    domain, a device-TLB one without a PASID the whole device TLB. A VT-d nested table has
    one tag (its HWPT), and invalidating it also flushes device TLBs (iommufd.md §4.3); its
    configuration lives in the HWPT, so a CONFIG-only invalidation needs no host work.
    """
    pasid = spec.pasid
    if pasid is not None and pasid > PASID_MAX:
        raise Refused(Status.RANGE, f"PASID {pasid} exceeds 20 bits")

    def make(caches: Cache, scope: Scope, tag: int | None) -> Invalidation:
        if scope is Scope.RANGE:
            return Invalidation(
                0,
                caches,
                scope,
                asid=tag,
                addr=spec.addr,
                size=spec.size,
                granule=spec.granule,
                leaf=spec.leaf,
                raw=spec.raw,
            )
        return Invalidation(0, caches, scope, asid=tag, leaf=spec.leaf, raw=spec.raw)

    out: list[Invalidation] = []
    if table.model == HostIommu.INTEL_VTD:
        if spec.caches & (Cache.TLB | Cache.DEVICE_TLB):
            scope = Scope.RANGE if spec.scope is Scope.RANGE else Scope.ALL
            out.append(make(Cache.TLB | Cache.DEVICE_TLB, scope, None))
        return out
    if spec.caches & Cache.TLB:
        if spec.scope is Scope.ALL or (spec.scope is Scope.ASID and spec.archid is None):
            out.append(make(Cache.TLB, Scope.ALL, None))
        else:
            out.append(make(Cache.TLB, spec.scope, spec.archid))
    if spec.caches & Cache.DEVICE_TLB:
        if spec.scope is Scope.ALL or pasid is None:
            out.append(make(Cache.DEVICE_TLB, Scope.ALL, None))
        else:
            out.append(make(Cache.DEVICE_TLB, spec.scope, pasid))
    if spec.caches & Cache.CONFIG:
        if spec.scope is Scope.ALL or pasid is None:
            out.append(make(Cache.CONFIG, Scope.ALL, None))
        else:
            out.append(make(Cache.CONFIG, Scope.ASID, pasid))
    return out
