"""Faults (virtio-iommu.md §4): what a DMA access does in the guest's view, and the
``virtio_iommu_fault`` record the device reports for a fault the host saw.

The reason and flags follow QEMU's emitter: an unknown endpoint is UNKNOWN, an unattached
one DOMAIN (unless in bypass), anything else MAPPING with the access's direction.
"""

from __future__ import annotations

from protocols.virtio_iommu import FaultFlag, FaultReason, MapFlag, ResvMemSubtype, build_fault
from viommud.frontends.virtio.domains import DomainState
from viommud.virtio_state import DomainKind

__all__ = ["access", "fault_record"]


def access(
    state: DomainState, bypass: bool, endpoint: int, addr: int, *, write: bool
) -> int | tuple[FaultReason, int]:
    """What a DMA access of ``endpoint`` at ``addr`` does (``bypass``: unattached endpoints
    are in bypass): the output address, or ``(reason, flags)`` of the fault it raises."""
    info = state.endpoints.get(endpoint)
    if info is None:
        if bypass:
            return addr
        return FaultReason.UNKNOWN, int(FaultFlag.ADDRESS)
    for region in info.resv:
        if region.start <= addr <= region.end:
            if region.subtype == ResvMemSubtype.MSI:
                return addr  # the doorbell: reaches the interrupt controller
            return FaultReason.MAPPING, int(FaultFlag.ADDRESS | _access_flag(write))
    domain_id = state.attached.get(endpoint)
    if domain_id is None:
        if bypass:
            return addr
        return FaultReason.DOMAIN, int(FaultFlag.ADDRESS)
    domain = state.domains[domain_id]
    if domain.kind is DomainKind.BYPASS:
        return addr
    if domain.kind is DomainKind.TABLE:
        return FaultReason.MAPPING, int(FaultFlag.ADDRESS | _access_flag(write))
    mapping = domain.mappings.lookup(addr)
    if mapping is None:
        return FaultReason.MAPPING, int(FaultFlag.ADDRESS | _access_flag(write))
    needed = MapFlag.WRITE if write else MapFlag.READ
    if not mapping.flags & needed:
        return FaultReason.MAPPING, int(FaultFlag.ADDRESS | _access_flag(write))
    return mapping.translate(addr)


def fault_record(
    state: DomainState,
    bypass: bool,
    endpoint: int,
    address: int | None,
    *,
    read: bool = False,
    write: bool = False,
    pasid: int | None = None,
    translation: bool = True,
) -> bytes:
    """The 24-byte ``virtio_iommu_fault`` for a fault the host reported (§4); ``pasid`` is
    reported only by a device offering vSVA (None otherwise)."""
    flags = 0
    reason = FaultReason.UNKNOWN
    if translation and address is not None:
        result = access(state, bypass, endpoint, address, write=write and not read)
        if isinstance(result, tuple):
            reason, flags = result
        else:  # the host faulted where the guest's view allows the access
            reason, flags = FaultReason.MAPPING, int(FaultFlag.ADDRESS)
        flags &= ~int(FaultFlag.READ | FaultFlag.WRITE)
        if reason is FaultReason.MAPPING:
            flags |= (FaultFlag.READ if read else 0) | (FaultFlag.WRITE if write else 0)
    elif address is not None:
        flags = int(FaultFlag.ADDRESS)
    pasid_field = 0
    if pasid is not None:
        flags |= FaultFlag.PASID
        pasid_field = pasid
    return build_fault(reason, flags, endpoint, address or 0, pasid_field)


def _access_flag(write: bool) -> FaultFlag:
    return FaultFlag.WRITE if write else FaultFlag.READ
