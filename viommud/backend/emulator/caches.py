"""The translation and configuration caches of the emulated physical IOMMUs.

What the emulator keeps so that a test (and the verification oracle) can see what an
invalidation really removed:

* per physical IOMMU an **IOTLB** of ``TlbEntry`` values. An entry is tagged by ``tag``
  (the SMMUv3 VMID, or the VT-d domain ID) and ``asid`` (the SMMUv3 ASID or the VT-d
  PASID of a stage-1 / nested translation; ``None`` for a stage-2-only translation),
  covers ``[iova, iova + size)``, and is either a leaf (a final translation at
  ``level``) or a walk-cache entry (``leaf=False``: a cached table descriptor at
  ``level``, covering the region that table maps);
* per device an **ATC / device TLB** of ``AtcEntry`` values (range, PASID or none);
* per physical IOMMU a **configuration cache** of ``ConfigEntry`` values: SMMUv3 STEs,
  CDs and L1 CD descriptors; VT-d context and PASID entries.

Each host-side invalidation is applied exactly as the hardware does it, taking the
architectural minimum where the architecture lets an implementation remove more (so a
missed guest invalidation is never hidden by a generous model):

SMMUv3 commands (``smmu_command``, the command as issued on the host queue, after the
kernel's VMID insertion and vSID -> SID rewrite; SMMUv3 spec §4.4, reference smmuv3.md
§1.3-§1.4):

* ``TLBI_NH_ALL(VMID)``: every stage-1 / nested entry of the VMID (``asid is not None``);
  stage-2-only entries stay.
* ``TLBI_NH_ASID(VMID, ASID)``: the non-global entries of that ASID.
* ``TLBI_NH_VA(VMID, ASID, addr, ...)`` / ``TLBI_NH_VAA(VMID, addr, ...)``: entries of the
  ASID (or global ones; NH_VAA: any ASID) whose range meets the address range. ``TG=0``:
  a single address (NUM/SCALE/TTL ignored); else ``(NUM+1) << SCALE`` granules of
  ``4K/16K/64K`` from the address aligned down to the granule. ``Leaf=1`` removes leaf
  entries only (walk caches stay); ``Leaf=0`` also the walk-cache entries. ``TTL`` (only
  with ``TG != 0``) restricts the *leaf* entries removed to those of that level and
  granule; walk-cache entries removed by ``Leaf=0`` are not restricted by TTL.
* ``TLBI_S2_IPA(VMID, ...)``: stage-2-only entries in range (same range rules);
  ``TLBI_S12_VMALL(VMID)``: every entry of the VMID; ``TLBI_NSNH_ALL``: every entry.
* ``ATC_INV(SID, SSV, SSID, G, Size, addr)``: the device's ATC entries meeting the
  ``4K << Size`` span that contains ``addr`` (``Size >= 52``: everything). ``SSV=0``
  removes entries of every PASID (a PCIe invalidation without PASID prefix); ``SSV=1``
  those of ``SSID`` and, with ``G=1``, global entries of any PASID.
* ``CFGI_STE(SID)``: the STE and every CD / L1 CD cached through it;
  ``CFGI_STE_RANGE`` / ``CFGI_ALL``: the same for ``2^(Range+1)`` SIDs (Range 31: all);
  ``CFGI_CD(SID, SSID, Leaf)``: that CD, and with ``Leaf=0`` also the L1 CD descriptor
  covering it (index ``SSID >> 10``, 1024 CDs per L2 table); ``CFGI_CD_ALL(SID)``: every
  CD and L1 CD of the SID. ``CMD_SYNC`` and other opcodes touch no cache.

VT-d (``vtd_*``, reference vtd.md §5.3, iommufd.md §4.3):

* ``vtd_p_iotlb(DID, PASID, addr, am, ih)``: page-selective-within-PASID: stage-1 /
  nested entries of DID+PASID meeting ``[addr, addr + 4K << am)`` (leaf only with IH=1,
  global entries included); ``am=None``: PASID-selective, every non-global entry of
  DID+PASID.
* ``vtd_iotlb_psi(DID, addr, am, ih)``: the second-stage IOTLB form: stage-2-only
  entries of the DID in range, and every stage-1 / nested entry of the DID whatever its
  address (the hardware cannot match a stage-2 address against them);
  ``vtd_iotlb_dsi(DID)``: every entry of the DID.
* ``vtd_devtlb(device, addr, am)``: device-TLB entries meeting the range, any PASID
  (``am=None``: the whole device TLB).
* ``vtd_pasid_cache(SID, PASID)``: that PASID entry.

Every removal is appended to ``journal`` as a ``Removal`` (which cache, whose, the entry,
and the cause: the command or descriptor name, ``kernel:...`` for invalidations the kernel
makes on its own, e.g. at attach or IOAS_UNMAP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from protocols.smmuv3 import TLBI_RANGE_OPS, Opcode

__all__ = [
    "ATC_SIZE_ALL",
    "AtcEntry",
    "CacheModel",
    "CacheView",
    "ConfigEntry",
    "ConfigKind",
    "Removal",
    "TlbEntry",
    "granule_level_size",
    "tlbi_range",
]

PAGE = 4096
ATC_SIZE_ALL = 52
VTD_MASK_ALL = 52
CD_L2_SHIFT = 10  # 1024 context descriptors per L2 table (CTXDESC_SPLIT)
_ADDR_MASK = ~0xFFF & ((1 << 64) - 1)
_IPA_MASK = 0x000F_FFFF_FFFF_F000

ConfigKind = Literal["ste", "cd", "l1cd", "context", "pasid"]


@dataclass(frozen=True, slots=True)
class TlbEntry:
    """One IOTLB entry (see the module doc for the tag meanings)."""

    tag: int
    asid: int | None
    iova: int
    size: int
    leaf: bool = True
    level: int = 3
    granule: int = PAGE
    global_: bool = False

    @property
    def last(self) -> int:
        return self.iova + self.size - 1


@dataclass(frozen=True, slots=True)
class AtcEntry:
    """One ATC / device-TLB entry of a device; ``pasid`` None: requested without PASID."""

    iova: int
    size: int
    pasid: int | None = None
    global_: bool = False

    @property
    def last(self) -> int:
        return self.iova + self.size - 1


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    """A cached configuration structure: ``ste``/``cd``/``l1cd`` or ``context``/``pasid``."""

    kind: ConfigKind
    sid: int
    ssid: int = 0


CacheEntry = TlbEntry | AtcEntry | ConfigEntry


@dataclass(frozen=True, slots=True)
class Removal:
    """One cache entry removed by an invalidation."""

    cache: Literal["iotlb", "atc", "config"]
    owner: str  # physical IOMMU id (iotlb, config) or host device id (atc)
    entry: CacheEntry
    cause: str


@dataclass(frozen=True, slots=True)
class CacheView:
    """A snapshot of one physical IOMMU's caches and the ATCs of its devices."""

    iotlb: tuple[TlbEntry, ...]
    config: tuple[ConfigEntry, ...]
    atc: dict[str, tuple[AtcEntry, ...]]


def granule_level_size(granule: int, level: int) -> int:
    """Bytes mapped by one descriptor at ``level`` (3 = last) with ``granule`` pages."""
    bits_per_level = granule.bit_length() - 1 - 3
    return granule << (bits_per_level * (3 - level))


def tlbi_range(cmd0: int, cmd1: int, *, ipa: bool = False) -> tuple[int, int, int, int]:
    """``(first, last, ttl, granule)`` of a VA/IPA TLBI; ``ttl``/``granule`` 0: no hint."""
    addr = cmd1 & (_IPA_MASK if ipa else _ADDR_MASK)
    tg = (cmd1 >> 10) & 0x3
    if tg == 0:
        return addr, addr, 0, 0
    granule = 1 << (tg * 2 + 10)
    num = (cmd0 >> 12) & 0x1F
    scale = (cmd0 >> 20) & 0x1F
    first = addr & ~(granule - 1)
    span = ((num + 1) << scale) * granule
    ttl = (cmd1 >> 8) & 0x3
    return first, min(first + span - 1, (1 << 64) - 1), ttl, granule


def _meets(entry: TlbEntry | AtcEntry, first: int, last: int) -> bool:
    return entry.iova <= last and first <= entry.last


@dataclass(slots=True)
class CacheModel:
    """All cache state of one emulated host, plus the journal of removals."""

    iotlb: dict[str, list[TlbEntry]] = field(default_factory=dict)
    config: dict[str, list[ConfigEntry]] = field(default_factory=dict)
    atc: dict[str, list[AtcEntry]] = field(default_factory=dict)
    journal: list[Removal] = field(default_factory=list)

    # -- filling ("as DMA would") --------------------------------------------------------
    def add_iotlb(self, unit: str, entry: TlbEntry) -> None:
        entries = self.iotlb.setdefault(unit, [])
        if entry not in entries:
            entries.append(entry)

    def add_atc(self, device: str, entry: AtcEntry) -> None:
        entries = self.atc.setdefault(device, [])
        if entry not in entries:
            entries.append(entry)

    def add_config(self, unit: str, entry: ConfigEntry) -> None:
        entries = self.config.setdefault(unit, [])
        if entry not in entries:
            entries.append(entry)

    def view(self, unit: str, devices: list[str]) -> CacheView:
        return CacheView(
            tuple(self.iotlb.get(unit, ())),
            tuple(self.config.get(unit, ())),
            {dev: tuple(self.atc.get(dev, ())) for dev in devices},
        )

    def holds_stage1(self, unit: str, tag: int) -> bool:
        """Whether ``unit``'s IOTLB has a stage-1 / nested entry (``asid`` set) of ``tag``.

        Those are the only entries ``TLBI_NH_ALL`` / ``_ASID`` / ``_VA`` / ``_VAA`` of VMID
        ``tag`` can remove (see ``smmu_command``); when this is False they remove nothing.
        """
        return any(e.tag == tag and e.asid is not None for e in self.iotlb.get(unit, ()))

    def clear(self) -> None:
        self.iotlb.clear()
        self.config.clear()
        self.atc.clear()
        self.journal.clear()

    # -- removal primitives ----------------------------------------------------------------
    def drop_iotlb(self, unit: str, match: Callable[[TlbEntry], bool], cause: str) -> None:
        entries = self.iotlb.get(unit)
        if not entries:
            return
        keep: list[TlbEntry] = []
        for entry in entries:
            if match(entry):
                self.journal.append(Removal("iotlb", unit, entry, cause))
            else:
                keep.append(entry)
        self.iotlb[unit] = keep

    def drop_atc(self, device: str, match: Callable[[AtcEntry], bool], cause: str) -> None:
        entries = self.atc.get(device)
        if not entries:
            return
        keep: list[AtcEntry] = []
        for entry in entries:
            if match(entry):
                self.journal.append(Removal("atc", device, entry, cause))
            else:
                keep.append(entry)
        self.atc[device] = keep

    def drop_config(self, unit: str, match: Callable[[ConfigEntry], bool], cause: str) -> None:
        entries = self.config.get(unit)
        if not entries:
            return
        keep: list[ConfigEntry] = []
        for entry in entries:
            if match(entry):
                self.journal.append(Removal("config", unit, entry, cause))
            else:
                keep.append(entry)
        self.config[unit] = keep

    # -- SMMUv3 ------------------------------------------------------------------------------
    def smmu_command(
        self, unit: str, cmd0: int, cmd1: int, sid_to_device: Mapping[int, str], cause: str = ""
    ) -> None:
        """Apply one host command-queue entry of physical SMMU ``unit``."""
        op = cmd0 & 0xFF
        name = cause or _SMMU_NAMES.get(op, f"op{op:#04x}")
        vmid = (cmd0 >> 32) & 0xFFFF
        asid = (cmd0 >> 48) & 0xFFFF
        sid = cmd0 >> 32
        if op == 0x10:  # TLBI_NH_ALL
            self.drop_iotlb(unit, lambda e: e.tag == vmid and e.asid is not None, name)
        elif op == 0x11:  # TLBI_NH_ASID
            self.drop_iotlb(
                unit, lambda e: e.tag == vmid and e.asid == asid and not e.global_, name
            )
        elif op in TLBI_RANGE_OPS:  # TLBI_NH_VA, TLBI_NH_VAA
            any_asid = op == 0x13
            self._tlbi_va(
                unit,
                cmd0,
                cmd1,
                lambda e: (
                    e.tag == vmid
                    and e.asid is not None
                    and (any_asid or e.asid == asid or e.global_)
                ),
                cause=name,
            )
        elif op == 0x2A:  # TLBI_S2_IPA
            self._tlbi_va(
                unit, cmd0, cmd1, lambda e: e.tag == vmid and e.asid is None, cause=name, ipa=True
            )
        elif op == 0x28:  # TLBI_S12_VMALL
            self.drop_iotlb(unit, lambda e: e.tag == vmid, name)
        elif op == 0x30:  # TLBI_NSNH_ALL
            self.drop_iotlb(unit, lambda e: True, name)
        elif op == 0x40:  # ATC_INV
            device = sid_to_device.get(sid)
            if device is not None:
                self._atc_inv(device, cmd0, cmd1, name)
        elif op == 0x03:  # CFGI_STE
            self.drop_config(unit, lambda e: e.kind in ("ste", "cd", "l1cd") and e.sid == sid, name)
        elif op == 0x04:  # CFGI_STE_RANGE / CFGI_ALL
            rng = cmd1 & 0x1F
            if rng >= 31:
                self.drop_config(unit, lambda e: e.kind in ("ste", "cd", "l1cd"), name)
            else:
                count = 1 << (rng + 1)
                base = sid & ~(count - 1)
                self.drop_config(
                    unit,
                    lambda e: e.kind in ("ste", "cd", "l1cd") and base <= e.sid < base + count,
                    name,
                )
        elif op == 0x05:  # CFGI_CD
            ssid = (cmd0 >> 12) & 0xFFFFF
            leaf = bool(cmd1 & 1)
            self.drop_config(
                unit,
                lambda e: (
                    e.sid == sid
                    and (
                        (e.kind == "cd" and e.ssid == ssid)
                        or (not leaf and e.kind == "l1cd" and e.ssid == ssid >> CD_L2_SHIFT)
                    )
                ),
                name,
            )
        elif op == 0x06:  # CFGI_CD_ALL
            self.drop_config(unit, lambda e: e.kind in ("cd", "l1cd") and e.sid == sid, name)

    def _tlbi_va(
        self,
        unit: str,
        cmd0: int,
        cmd1: int,
        scope: Callable[[TlbEntry], bool],
        *,
        cause: str,
        ipa: bool = False,
    ) -> None:
        first, last, ttl, granule = tlbi_range(cmd0, cmd1, ipa=ipa)
        leaf_only = bool(cmd1 & 1)

        def match(e: TlbEntry) -> bool:
            if not scope(e) or not _meets(e, first, last):
                return False
            if not e.leaf:
                return not leaf_only
            return not ttl or (e.level == ttl and e.granule == granule)

        self.drop_iotlb(unit, match, cause)

    def _atc_inv(self, device: str, cmd0: int, cmd1: int, cause: str) -> None:
        size = cmd1 & 0x3F
        ssv = bool(cmd0 & (1 << 11))
        ssid = (cmd0 >> 12) & 0xFFFFF
        glob = bool(cmd0 & (1 << 9))
        if size >= ATC_SIZE_ALL:
            first, last = 0, (1 << 64) - 1
        else:
            span = PAGE << size
            first = cmd1 & _ADDR_MASK & ~(span - 1)
            last = first + span - 1

        def match(e: AtcEntry) -> bool:
            if not _meets(e, first, last):
                return False
            return not ssv or e.pasid == ssid or (glob and e.global_)

        self.drop_atc(device, match, cause)

    def atc_flush_all(self, device: str, cause: str) -> None:
        self.drop_atc(device, lambda e: True, cause)

    # -- VT-d ------------------------------------------------------------------------------
    def vtd_p_iotlb(
        self, unit: str, did: int, pasid: int, *, addr: int, am: int | None, ih: bool, cause: str
    ) -> None:
        if am is None or am >= VTD_MASK_ALL:
            self.drop_iotlb(
                unit, lambda e: e.tag == did and e.asid == pasid and not e.global_, cause
            )
            return
        first = addr & ~((PAGE << am) - 1)
        last = first + (PAGE << am) - 1
        self.drop_iotlb(
            unit,
            lambda e: (
                e.tag == did and e.asid == pasid and _meets(e, first, last) and (e.leaf or not ih)
            ),
            cause,
        )

    def vtd_iotlb_psi(
        self, unit: str, did: int, *, addr: int, am: int, ih: bool, cause: str
    ) -> None:
        first = addr & ~((PAGE << am) - 1)
        last = first + (PAGE << am) - 1
        self.drop_iotlb(
            unit,
            lambda e: (
                e.tag == did
                and (e.asid is not None or (_meets(e, first, last) and (e.leaf or not ih)))
            ),
            cause,
        )

    def vtd_iotlb_dsi(self, unit: str, did: int, cause: str) -> None:
        self.drop_iotlb(unit, lambda e: e.tag == did, cause)

    def vtd_devtlb(self, device: str, addr: int, am: int | None, cause: str) -> None:
        if am is None or am >= VTD_MASK_ALL:
            self.atc_flush_all(device, cause)
            return
        first = addr & ~((PAGE << am) - 1)
        last = first + (PAGE << am) - 1
        self.drop_atc(device, lambda e: _meets(e, first, last), cause)

    def vtd_pasid_cache(self, unit: str, sid: int, pasid: int, cause: str) -> None:
        self.drop_config(
            unit, lambda e: e.kind == "pasid" and e.sid == sid and e.ssid == pasid, cause
        )


def vtd_psi_mask(start: int, last: int) -> tuple[int, int | None]:
    """``calculate_psi_aligned_address``: ``(addr, am)``; am None: the whole range.

    ``[start, last]`` is widened to one naturally aligned power-of-two block of 4 KiB
    pages; a range from 0 to the top of the address space, or one needing a mask of 52
    bits or more, becomes "everything" (reference vtd.md §5.3, iommufd.md §4.3).
    """
    top = (1 << 64) - 1
    if start == 0 and last == top:
        return 0, None
    pfn = start >> 12
    size = (last - start + 1) & top  # unsigned long arithmetic: a wrapped range is huge
    pages = (((start & 0xFFF) + size + 0xFFF) & top) >> 12
    # __roundup_pow_of_two: 1UL << fls_long(pages - 1); x86 shifts by 64 as by 0
    aligned = 1 << (((pages - 1) & top).bit_length() % 64)
    mask = aligned.bit_length() - 1
    bitmask = aligned - 1
    if pfn & bitmask:
        end_pfn = (pfn + pages - 1) & top
        shared = ~(pfn ^ end_pfn) & ~bitmask & ((1 << 64) - 1)
        mask = (shared & -shared).bit_length() - 1 if shared else 64
    if mask >= VTD_MASK_ALL:
        return 0, None
    return start & ~((PAGE << mask) - 1), mask


_SMMU_NAMES = {int(op): op.name for op in Opcode}
