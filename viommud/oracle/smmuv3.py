"""The oracle's SMMUv3 models: what the guest asked for, and what a host call removed.

Both sides read commands and STEs through the construct declarations of ``protocols.smmuv3``
(Arm IHI 0070 §4 commands, §5.2 STE), never through the daemon's decoders.

Guest side (``SmmuGuest``, one per vSMMU): the guest's devices, the STEs it wrote and, from
its CFGI_STE / CFGI_STE_RANGE commands (§4.3.1, §4.3.2), the STE each device translates
with: Config 0b101 with V=1 is stage-1 translation (§5.2, STE.Config); EATS 0b01 enables ATS
(§5.2, STE.EATS). Then per command the daemon did not refuse:

* TLBI_NH_VA / NH_VAA / NH_ASID / NH_ALL / NSNH_ALL (§4.4): the IOTLB of every physical
  SMMU where a device of this vSMMU has translated through stage 1 must lose the matching
  entries;
* ATC_INV (§4.5): the device's ATC (if the device has ATS and its vSTE enabled it, EATS=1);
* CFGI_CD / CFGI_CD_ALL (§4.3.3, §4.3.4): the configuration cache entries of that device's
  CDs (once the device has had a stage-1 vSTE).

A refused command (its index is in the response's errors) asks for nothing: the guest was
told it did not complete.

Host side (``SmmuHost``): the objects behind the ids in the call log (bound devices,
vIOMMU objects and their physical SMMU, vDEVICEs), and per ``IOMMU_HWPT_INVALIDATE`` on an
ARM vIOMMU the entries the kernel really issued: all of them on success; on failure at entry
k only the groups of 63 before k's group (iommufd.md §3.4). The entries are SMMUv3 commands
too, read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocols.smmuv3 import (
    COMMAND_SIZE,
    SID_OPS,
    STE_SIZE,
    TLBI_RANGE_OPS,
    TLBI_VM_WIDE_OPS,
    Opcode,
    parse_command,
    parse_ste,
)
from viommud.host import HostConfig
from viommud.oracle import CONFIG, DEVTLB, FULL, GLOBAL, IOTLB, Handle, Ledger, Need, Removal

PAGE_SHIFT = 12
ATC_SIZE_ALL = 52  # ATC_INV Size >= 52: the whole ATC (§4.5)
STE_CONFIG_S1 = 0b101  # STE.Config: stage 1 translates, stage 2 bypass (§5.2)
STE_EATS_FULL = 0b01  # STE.EATS: full ATS (§5.2)
_CACHE_LIMIT = 1 << 14  # decoded commands remembered (a guest reuses few distinct ones)


_commands: dict[bytes, dict[str, int]] = {}
_stes: dict[bytes, dict[str, int]] = {}
_guest_tlbis: dict[tuple[bytes, tuple[str, str]], list[Need]] = {}  # (command, place) ->
_host_tlbis: dict[tuple[str, tuple[str, str]], tuple[Removal, ...]] = {}  # (hex, place) ->


def command(raw: bytes) -> dict[str, int]:
    """The fields of one 16-byte command (``protocols.smmuv3.parse_command``), memoized."""
    fields = _commands.get(raw)
    if fields is None:
        if len(_commands) >= _CACHE_LIMIT:
            _commands.clear()
        fields = _commands[raw] = parse_command(raw)
    return fields


def ste(raw: bytes) -> dict[str, int]:
    """The fields of a 64-byte STE (``protocols.smmuv3.parse_ste``), memoized."""
    fields = _stes.get(raw)
    if fields is None:
        if len(_stes) >= _CACHE_LIMIT:
            _stes.clear()
        fields = _stes[raw] = parse_ste(raw)
    return fields


def tlb_span(f: dict[str, int]) -> tuple[int, int, bool, int, int]:
    """(lo, hi, leaf_only, level, granule) of a TLBI_NH_VA / NH_VAA (§4.4.1.1 range
    invalidation): TG=0 names the entries that hold Address, whatever their granule;
    otherwise (NUM+1) * 2^SCALE granules of 2^(10 + 2*TG) bytes from it, with TTL as the
    level hint. Entries of another granule than TG, or another level than a non-zero TTL,
    might not be invalidated (§4.4.1.1, TG and TTL): the granule and level a removal names
    must be the need's."""
    addr = f["addr"] << PAGE_SHIFT
    leaf = bool(f["leaf"])
    if f["tg"] == 0:
        return addr, addr + 1, leaf, 0, 0  # every entry that contains this address
    granule = f["tg"] * 2 + 10
    pages = (f["num"] + 1) << f["scale"]
    return addr, addr + (pages << granule), leaf, f["ttl"], granule


# Which TLB entries each TLBI removes (§4.4, per command; tagging and global entries §3.17):
# entries are tagged with the VMID (the place: one vIOMMU object on one physical SMMU) and,
# unless global (nG=0, which a lookup with any ASID may hit), the ASID.
#  * CMD_TLBI_NH_ALL, CMD_TLBI_NSNH_ALL (and CMD_TLBI_S12_VMALL, which this vSMMU refuses: no
#    stage 2): every entry of the VMID, global ones included;
#  * CMD_TLBI_NH_ASID: the entries of the ASID, but of the last level only the non-global
#    ones (as Arm ARM TLBI ASIDE1): global entries are spared;
#  * CMD_TLBI_NH_VA: the entries of the range tagged with the ASID, and the global ones of
#    the range whatever the ASID;
#  * CMD_TLBI_NH_VAA: the entries of the range of every ASID, global ones included.
VM_WIDE_OPS = TLBI_VM_WIDE_OPS | {Opcode.TLBI_S12_VMALL}


def tlb_effect(f: dict[str, int], place: tuple[Any, ...]) -> list[Need]:
    """The IOTLB entries a TLBI command covers at ``place`` (none for other opcodes): one
    need per tag space (a TLBI_NH_VA names its ASID's entries and the global ones)."""
    op = f["opcode"]
    if op in VM_WIDE_OPS:
        return [Need(IOTLB, place, None, *FULL)]
    if op == Opcode.TLBI_NH_ASID:
        return [Need(IOTLB, place, f["asid"], *FULL)]
    if op in TLBI_RANGE_OPS:
        lo, hi, leaf, level, granule = tlb_span(f)
        tags = (f["asid"], GLOBAL) if op == Opcode.TLBI_NH_VA else (None,)
        return [Need(IOTLB, place, tag, lo, hi, leaf, level, granule) for tag in tags]
    return []


def atc_span(f: dict[str, int]) -> tuple[int, int]:
    """ATC_INV (§4.5): 2^Size pages holding Address, aligned to that size; Size 52 = all."""
    if f["size"] >= ATC_SIZE_ALL:
        return FULL
    span = 1 << (PAGE_SHIFT + f["size"])
    lo = (f["addr"] << PAGE_SHIFT) & ~(span - 1)
    return lo, lo + span


def device_effect(f: dict[str, int], device: str) -> Need | None:
    """The ATC or config entries an ATC_INV / CFGI_CD(_ALL) covers for ``device``."""
    op = f["opcode"]
    if op == Opcode.ATC_INV:
        tag = f["ssid"] if f["ssv"] else None
        return Need(DEVTLB, (device,), tag, *atc_span(f))
    if op == Opcode.CFGI_CD:
        return Need(CONFIG, (device,), f["ssid"], *FULL)
    if op == Opcode.CFGI_CD_ALL:
        return Need(CONFIG, (device,), None, *FULL)
    return None


def as_removal(need: Need) -> Removal:
    return Removal(
        need.cache, need.place, need.tag, need.lo, need.hi, need.leaf_only, need.level, need.granule
    )


@dataclass(slots=True)
class _Device:
    device: str
    iommu: str
    ats: bool  # the physical device can do ATS
    s1: bool = False  # its current vSTE translates through stage 1
    ats_on: bool = False  # ... with EATS=1
    s1_ever: bool = False


@dataclass(slots=True)
class SmmuGuest:
    """One vSMMU as the guest sees it."""

    name: str
    host: HostConfig
    ledger: Ledger
    devices: dict[int, _Device] = field(default_factory=dict)
    stes: dict[int, bytes] = field(default_factory=dict)
    s1_iommus: set[str] = field(default_factory=set)
    _doorbell: bytes = b""
    _since: int = 0

    def attach(self, vid: int, device: str) -> None:
        pdev = self.host.device(device)
        self.devices[vid] = _Device(device, pdev.iommu, pdev.ats)

    def detach(self, vid: int) -> None:
        self.devices.pop(vid, None)

    def write_ste(self, vsid: int, data: bytes) -> None:
        self.stes[vsid] = bytes(data)

    def begin(self, data: bytes) -> None:
        self._doorbell = bytes(data)
        self._since = self.ledger.begin()

    def end(self, refused: set[int]) -> None:
        ledger = self.ledger
        data = self._doorbell
        order = Order()
        for index in range(len(data) // COMMAND_SIZE):
            if index in refused:
                continue
            raw = data[index * COMMAND_SIZE : (index + 1) * COMMAND_SIZE]
            f = command(raw)
            op = f["opcode"]
            if op == Opcode.CMD_SYNC:
                ledger.barrier_reached(self.name)
                order.sync()
            elif op == Opcode.CFGI_STE:
                self._reread(f["sid"], f["sid"])
            elif op == Opcode.CFGI_STE_RANGE:  # 2^(Range+1) StreamIDs; Range 31: all
                span = 1 << (f["range"] + 1)
                first = f["sid"] & ~(span - 1)
                self._reread(first, first + span - 1)
            else:
                origin = f"{self.name}[{index}] 0x{op:02x}"
                for need, iommu in self._needs(f, raw, origin):
                    after = order.before(need, iommu)
                    order.raised(
                        need,
                        iommu,
                        ledger.need(need, self._since, due=False, after=after, owner=self.name),
                    )
        ledger.settle()

    def _reread(self, first: int, last: int) -> None:
        for vid, dev in self.devices.items():
            raw = self.stes.get(vid)
            if first <= vid <= last and raw is not None:
                if len(raw) != STE_SIZE:
                    dev.s1 = dev.ats_on = False  # not an STE: nothing translates with it
                    continue
                entry = ste(raw)
                dev.s1 = entry["v"] == 1 and entry["config"] == STE_CONFIG_S1
                dev.ats_on = dev.s1 and dev.ats and entry["eats"] == STE_EATS_FULL
                if dev.s1:
                    dev.s1_ever = True
                    self.s1_iommus.add(dev.iommu)

    def _needs(self, f: dict[str, int], raw: bytes, origin: str) -> list[tuple[Need, str]]:
        """The needs of one command, each with the physical SMMU whose caches hold them."""
        op = f["opcode"]
        if op in SID_OPS:
            dev = self.devices.get(f["sid"])
            if dev is None:
                return []
            if op == Opcode.ATC_INV and not dev.ats_on:
                return []  # no ATS, no ATC to clean
            if op != Opcode.ATC_INV and not dev.s1_ever:
                return []  # no stage 1, no CDs cached
            need = device_effect(f, dev.device)
            return [] if need is None else [(_named(need, origin), dev.iommu)]
        out = []
        for iommu in sorted(self.s1_iommus):
            key = (raw, (self.name, iommu))
            needs = _guest_tlbis.get(key)
            if needs is None:
                if len(_guest_tlbis) >= _CACHE_LIMIT:
                    _guest_tlbis.clear()
                needs = _guest_tlbis[key] = tlb_effect(f, key[1])
            out += [(_named(need, origin), iommu) for need in needs]
        return out


@dataclass(slots=True)
class Order:
    """What a guest CMD_SYNC ordered before the commands that follow it in one doorbell
    (§4.7 CMD_SYNC: it completes once every earlier command has). A guest cleaning up a
    change invalidates configuration, then TLBs, then ATCs, each step after a sync (§4.5:
    an ATC invalidation that overtook the TLB one could be refilled from the stale TLB; a
    TLB invalidation that overtook the CD one could be refilled through the stale CD). So:
    a TLB need depends on the configuration needs of the devices behind its physical SMMU
    that a sync ordered before it; an ATC need on the TLB needs of its physical SMMU and the
    configuration needs of its device."""

    ordered: list[tuple[Need, str, Handle]] = field(default_factory=list)
    pending: list[tuple[Need, str, Handle]] = field(default_factory=list)

    def sync(self) -> None:
        self.ordered += self.pending
        self.pending = []

    def raised(self, need: Need, iommu: str, handle: Handle) -> None:
        if need.cache != DEVTLB:  # nothing is ordered after an ATC invalidation
            self.pending.append((need, iommu, handle))

    def before(self, need: Need, iommu: str) -> tuple[Handle, ...]:
        if need.cache == IOTLB:
            return tuple(h for n, i, h in self.ordered if n.cache == CONFIG and i == iommu)
        if need.cache == DEVTLB:
            return tuple(
                h
                for n, i, h in self.ordered
                if (n.cache == IOTLB and i == iommu)
                or (n.cache == CONFIG and n.place == need.place)
            )
        return ()


def _named(need: Need, origin: str) -> Need:
    n = need  # positional: dataclasses.replace costs a tenth of a verify run
    return Need(n.cache, n.place, n.tag, n.lo, n.hi, n.leaf_only, n.level, n.granule, origin)


@dataclass(slots=True)
class SmmuHost:
    """The host objects behind the call log's ids, and what ARM invalidations removed."""

    ledger: Ledger
    owner: dict[str, str]  # device -> vSMMU name (kept by the verifier)
    devids: dict[int, str] = field(default_factory=dict)
    viommus: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (vSMMU, pSMMU)
    vdevices: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (viommu, vsid)
    vsids: dict[tuple[int, int], str] = field(default_factory=dict)  # (viommu, vsid) -> dev

    def call(self, ioctl: str, err: int, call: dict[str, Any], iommu: str | None) -> None:
        if ioctl == "IOMMU_HWPT_INVALIDATE":
            self._invalidate(err, call)
            return
        if err:
            return
        args, out = call.get("args", {}), call.get("out", {})
        if ioctl == "VFIO_DEVICE_BIND_IOMMUFD":
            self.devids[out["out_devid"]] = args["device"]
        elif ioctl == "IOMMU_VIOMMU_ALLOC":
            device = self.devids.get(args["dev_id"], "")
            self.viommus[out["out_viommu_id"]] = (self.owner.get(device, ""), iommu or "")
        elif ioctl == "IOMMU_VDEVICE_ALLOC":
            key = (args["viommu_id"], args["virt_id"])
            self.vdevices[out["out_vdevice_id"]] = key
            self.vsids[key] = self.devids.get(args["dev_id"], "")
        elif ioctl == "IOMMU_DESTROY":
            gone = args["id"]
            self.viommus.pop(gone, None)
            if gone in self.vdevices:
                self.vsids.pop(self.vdevices.pop(gone), None)

    def _invalidate(self, err: int, call: dict[str, Any]) -> None:
        target = call.get("object", {})
        if target.get("kind") != "viommu" or call.get("data_type") != "VIOMMU_ARM_SMMUV3":
            return
        viommu_id = target["id"]
        owner = self.viommus.get(viommu_id)
        if owner is None:
            return
        entries = call["entries"]
        done = len(entries) if not err else call["entry_num"] - call["entry_num"] % 63
        for raw in entries[:done]:
            key = (raw, owner)
            removals = _host_tlbis.get(key)
            if removals is None:
                f = command(bytes.fromhex(raw)[:COMMAND_SIZE].ljust(COMMAND_SIZE, b"\0"))
                if f["opcode"] in SID_OPS:
                    device = self.vsids.get((viommu_id, f["sid"]))
                    need = None if device is None else device_effect(f, device)
                    removals = () if need is None else (as_removal(need),)
                else:  # a TLBI's removals depend on the command and the object only
                    removals = tuple(as_removal(n) for n in tlb_effect(f, owner))
                    if len(_host_tlbis) >= _CACHE_LIMIT:
                        _host_tlbis.clear()
                    _host_tlbis[key] = removals
            entry = self.ledger.new_entry()
            for removal in removals:
                self.ledger.remove(removal, entry)
