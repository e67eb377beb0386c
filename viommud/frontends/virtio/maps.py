"""MAP (virtio-iommu.md §2.4) and UNMAP (§2.5): a MAP/UNMAP domain's mappings.

Checks in the §3.2 order: flags (INVAL) -> domain existence (NOENT) and kind (INVAL) ->
order, alignment, input range and overflow (RANGE) -> reserved-region overlap (INVAL) ->
mapping overlap (INVAL) -> the per-domain cap (NOMEM). UNMAP removes every mapping inside
its range, or nothing when one would be split (RANGE).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.virtio_iommu import MAP_FLAGS_MASK, MapFlag, Status
from viommud.frontends.compat import QEMU
from viommud.frontends.virtio.domains import DomainState
from viommud.frontends.virtio.options import DevicePolicy, VirtioFeatures
from viommud.frontends.virtio.request import Pending, Refused
from viommud.mappings import Mapping, SplitError
from viommud.virtio_state import Mapped, Unmapped

__all__ = ["MapRules", "map_fields", "unmap_fields"]

U64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class MapRules:
    """The device configuration MAP and UNMAP are checked against (§1.2), fixed at
    creation."""

    granule: int  # the lowest bit of page_size_mask
    input_start: int
    input_end: int
    flags: int  # the MAP flags the device accepts (MMIO only with F_MMIO)
    max_mappings: int
    unmap_reserved_inval: bool
    check_input_range: bool = True  # MAP outside input_range: RANGE (not under qemu)

    @classmethod
    def of(
        cls,
        page_size_mask: int,
        input_range: tuple[int, int],
        features: VirtioFeatures,
        policy: DevicePolicy,
    ) -> MapRules:
        return cls(
            page_size_mask & -page_size_mask,
            input_range[0],
            input_range[1],
            MAP_FLAGS_MASK
            if features.mmio or policy.compat == QEMU
            else int(MapFlag.READ | MapFlag.WRITE),
            policy.max_mappings,
            policy.unmap_reserved_inval,
            policy.compat != QEMU,
        )


def map_fields(
    state: DomainState, rules: MapRules, pending: Pending, fields: tuple[int, ...]
) -> None:
    """MAP of a request's fields: ``(type, domain, virt_start, virt_end, phys_start, flags)``
    as ``guest.virtio.unpack_map`` gives them."""
    _, domain_id, start, end, phys, flags = fields
    if flags & ~rules.flags:
        raise Refused(Status.INVAL, f"MAP flags 0x{flags:x}: unknown bits")
    domain = state.mapping_domain(domain_id)
    if end < start:
        raise Refused(Status.RANGE, "MAP virt_end is below virt_start")
    granule = rules.granule
    if start % granule or phys % granule or (end + 1) % granule:
        raise Refused(Status.RANGE, f"MAP is not aligned to the {granule:#x}-byte granule")
    if rules.check_input_range and (start < rules.input_start or end > rules.input_end):
        raise Refused(Status.RANGE, "MAP is outside input_range")
    if phys + (end - start) > U64_MAX:
        raise Refused(Status.RANGE, "MAP phys_start + size overflows")
    endpoints = state.endpoints
    for endpoint in sorted(domain.endpoints):
        for region in endpoints[endpoint].resv:
            if region.start <= end and start <= region.end:
                raise Refused(
                    Status.INVAL,
                    f"MAP overlaps a reserved region of endpoint {endpoint} "
                    f"[{region.start:#x}, {region.end:#x}]",
                )
    mapping = Mapping(start, end, phys, flags)
    mappings = domain.mappings
    if len(mappings) >= rules.max_mappings:
        if mappings.overlaps(start, end):
            raise Refused(Status.INVAL, "MAP overlaps an existing mapping")
        raise Refused(Status.NOMEM, "too many mappings in the domain")
    if not mappings.add(mapping):
        raise Refused(Status.INVAL, "MAP overlaps an existing mapping")
    pending.undo.append(lambda: mappings.discard(mapping))
    state.events.append(Mapped(domain.id, mapping))


def unmap_fields(
    state: DomainState, rules: MapRules, pending: Pending, fields: tuple[int, ...]
) -> None:
    """UNMAP of a request's fields: ``(type, domain, virt_start, virt_end, reserved)`` as
    ``guest.virtio.unpack_unmap`` gives them."""
    _, domain_id, start, end, reserved = fields
    if reserved and rules.unmap_reserved_inval:
        raise Refused(Status.INVAL, "UNMAP reserved bytes are not zero")
    domain = state.mapping_domain(domain_id)
    if end < start:
        raise Refused(Status.RANGE, "UNMAP virt_end is below virt_start")
    mappings = domain.mappings
    try:
        removed = mappings.remove_range(start, end)
    except SplitError as exc:
        raise Refused(Status.RANGE, f"UNMAP: mapping {exc}") from None
    if not removed:
        return

    def undo() -> None:
        for mapping in removed:
            mappings.add(mapping)

    pending.undo.append(undo)
    state.events.append(Unmapped(domain.id, tuple(removed)))
