"""The journal of a session: the records that recreate its vIOMMUs (docs/state-format.md §2).

Every configuration record the session applied and every piece of guest work that changed
configuration, in order, less what changed nothing a later record can see: doorbells made
only of TLB / ATC / CD-cache invalidations, prefetches and syncs that end with their own
barrier (and follow no doorbell whose needs still wait for one), virtio-iommu requests
answered with an error, PROBE and INVALIDATE requests, and everything of a vIOMMU that was
destroyed. ``viommud.state`` turns it into the state document and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.models import ViommuModel
from protocols.smmuv3 import Opcode
from protocols.virtio_iommu import RequestType
from protocols.vtd import DescType
from viommud.guest.virtio import MAP_SIZE, UNMAP_SIZE, unpack_map, unpack_unmap
from viommud.replies import DoorbellReply, RequestReply
from viommud.trace import Cmds, Record, Request, ViommuCreate, ViommuDestroy

__all__ = ["Journal"]

# SMMUv3 commands that change no state a later command can see (SMMUv3 §4.3-§4.5: TLB,
# ATC and CD-cache invalidations, prefetches, syncs); CFGI_STE* and CFGI_ALL are kept.
_SMMU_PLAIN = bytes(
    sorted(
        {
            Opcode.PREFETCH_CONFIG,
            Opcode.PREFETCH_ADDR,
            Opcode.CFGI_CD,
            Opcode.CFGI_CD_ALL,
            Opcode.TLBI_NH_ALL,
            Opcode.TLBI_NH_ASID,
            Opcode.TLBI_NH_VA,
            Opcode.TLBI_NH_VAA,
            Opcode.TLBI_NSNH_ALL,
            Opcode.ATC_INV,
            Opcode.CMD_SYNC,
        }
    )
)
# VT-d descriptors of the same kind (VT-d §6.5.2): IOTLB and device-TLB invalidations and
# waits; context-cache, PASID-cache and interrupt-entry-cache invalidations are kept.
_VTD_PLAIN = frozenset(
    {
        DescType.IOTLB_INV,
        DescType.DEV_TLB_INV,
        DescType.INV_WAIT,
        DescType.P_IOTLB_INV,
        DescType.P_DEV_TLB_INV,
    }
)
# A doorbell is plain when deleting these byte values from its commands' first bytes (the
# SMMUv3 opcode; VT-d qw0[7:0] and qw0[15:8], whose bits 3:0 and 11:9 are the type) leaves
# nothing.
_VTD_LO_PLAIN = bytes(b for b in range(256) if b & 0xF in _VTD_PLAIN)  # qw0[3:0]
_VTD_HI_PLAIN = bytes(b for b in range(256) if not b & 0x0E)  # qw0[11:9] = 0
_VIRTIO_PLAIN = frozenset({RequestType.PROBE, RequestType.INVALIDATE})
_MAP = int(RequestType.MAP)
_UNMAP = int(RequestType.UNMAP)


@dataclass(slots=True)
class _Live:
    """What the journal knows of one live vIOMMU."""

    incarnation: int
    model: str
    width: int  # bytes per command (smmuv3 16, vtd 16 or 32); 0 for virtio-iommu
    smmu: bool = False  # an smmuv3 (else a vtd, when ``width``)
    open: bool = False  # a kept doorbell left needs waiting for a later barrier
    # virtio-iommu: (domain, virt_start, virt_end) -> the journal key of the MAP that made
    # that mapping, while the mapping is known to be live (docs/state-format.md §2)
    maps: dict[tuple[int, int, int], int] = field(default_factory=dict)
    unindexed: int = 0  # MAPs in the journal whose mapping is not in ``maps``

    def forget(self) -> None:
        """The mappings may have changed in ways the journal does not follow."""
        self.unindexed += len(self.maps)
        self.maps.clear()


@dataclass(slots=True)
class Journal:
    """The records that recreate a session's vIOMMUs, compacted as they arrive."""

    # key (arrival order) -> (incarnation of its vIOMMU, record); a virtio-iommu request is
    # kept as its bytes alone (one per live mapping: no Request object), ``records`` makes
    # the Request
    entries: dict[int, tuple[int, Record | bytes]] = field(default_factory=dict)
    live: dict[str, _Live] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # incarnation -> vIOMMU name
    _next: int = 0
    _key: int = 0

    def _add(self, live: _Live, record: Record | bytes) -> int:
        self._key += 1
        self.entries[self._key] = (live.incarnation, record)
        return self._key

    def config(self, record: Record, ok: bool) -> None:
        """A configuration record was answered (``ok``: applied)."""
        if not ok:
            return
        if isinstance(record, ViommuCreate):
            self._next += 1
            width = 0
            if record.model == ViommuModel.SMMUV3:
                width = 16
            elif record.model == ViommuModel.VTD:
                width = 32 if record.options.get("dw") == 256 else 16
            made = _Live(self._next, record.model, width, record.model == ViommuModel.SMMUV3)
            self.live[record.viommu] = made
            self.names[made.incarnation] = record.viommu
            self._add(made, record)
            return
        live = self.live.get(record.viommu)
        if live is None:
            return
        if isinstance(record, ViommuDestroy):
            del self.live[record.viommu]
            gone = live.incarnation
            del self.names[gone]
            self.entries = {k: e for k, e in self.entries.items() if e[0] != gone}
            return
        # (a device_detach may destroy a domain with its mappings; the domain can only come
        # back through an ATTACH, which makes the journal forget them: see ``request``)
        self._add(live, record)

    def doorbell(self, viommu: str, data: bytes, reply: DoorbellReply) -> None:
        """A doorbell was answered with ``reply`` (on every doorbell: kept cheap)."""
        live = self.live.get(viommu)
        if live is None:
            return
        width = live.width
        if not width or len(data) < width:
            return
        at = len(data) - width  # the last command
        if live.smmu:
            ends = data[at] == Opcode.CMD_SYNC
            plain = ends and not data[::width].translate(None, _SMMU_PLAIN)
        else:
            ends = data[at] & 0xF == DescType.INV_WAIT and not data[at + 1] & 0xE
            plain = (
                ends
                and not data[::width].translate(None, _VTD_LO_PLAIN)
                and not data[1::width].translate(None, _VTD_HI_PLAIN)
            )
        errors = reply.errors
        if errors and ends:
            last = at // width
            ends = all(e.index != last for e in errors)
        if plain and ends and not live.open:
            return  # its needs were settled by its own barrier, and it configured nothing
        self._add(live, Cmds(0, viommu, bytes(data)))
        live.open = not ends

    def request(self, viommu: str, data: bytes, reply: RequestReply) -> None:
        """A virtio-iommu request was answered with ``reply``."""
        live = self.live.get(viommu)
        if live is None or reply.status != "OK" or not data or data[0] in _VIRTIO_PLAIN:
            return
        kind = data[0]
        if kind == _MAP and len(data) == MAP_SIZE:  # what ``decode`` makes a Map of
            _, domain, start, end, _, _ = unpack_map(data)
            key = self._add(live, bytes(data))
            live.maps[domain, start, end] = key
            return
        if kind == _UNMAP and len(data) == UNMAP_SIZE:  # an Unmap
            _, domain, start, end, _ = unpack_unmap(data)
            if not self._unmapped(live, domain, start, end):
                self._add(live, bytes(data))
            return
        live.forget()  # ATTACH, DETACH, ATTACH_TABLE may destroy a domain and its mappings
        self._add(live, bytes(data))

    def _unmapped(self, live: _Live, domain: int, start: int, end: int) -> bool:
        """An UNMAP of ``[start, end]`` in ``domain`` answered OK: drop the MAPs of what it
        removed. Returns whether the UNMAP itself can go too: it removed exactly the
        mappings of MAPs in the journal (virtio-iommu §2.4: every mapping inside the range),
        and the journal knows every live one (none straddles the range)."""
        maps = live.maps
        exact = maps.pop((domain, start, end), None)
        if exact is not None:  # live mappings do not overlap: it removed that one only
            del self.entries[exact]
            return True
        inside: list[tuple[int, int, int]] = []
        straddle = False
        for at in maps:
            if at[0] == domain and at[1] <= end and start <= at[2]:
                if start <= at[1] and at[2] <= end:
                    inside.append(at)
                else:
                    straddle = True
        if straddle or live.unindexed:
            for at in [k for k in maps if k[0] == domain and k[1] <= end and start <= k[2]]:
                del maps[at]
                live.unindexed += 1  # gone, or no longer known to be whole
            return False
        for at in inside:
            del self.entries[maps.pop(at)]
        return True

    def records(self) -> list[Record]:
        names = self.names
        return [
            Request(0, names[incarnation], record) if isinstance(record, bytes) else record
            for incarnation, record in self.entries.values()
        ]
