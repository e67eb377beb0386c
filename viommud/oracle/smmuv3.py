"""The oracle's SMMUv3 models: what the guest asked for, and what a host call removed.

Guest side (``SmmuGuest``, one per vSMMU): the guest's devices, the STEs it wrote and, from
its CFGI_STE commands, which devices translate through stage 1; then per command:

* TLBI_NH_VA / NH_VAA / NH_ASID / NH_ALL / NSNH_ALL: the IOTLB of every physical SMMU where a
  device of this vSMMU has translated through stage 1 must lose the matching entries;
* ATC_INV: the device's ATC (if the device has ATS and its vSTE enabled it, EATS=1);
* CFGI_CD / CFGI_CD_ALL: the configuration cache entries of that device's CDs (once the
  device has had a stage-1 vSTE).

Commands the vSMMU refused (their index is in the response's errors) ask for nothing.

Host side (``SmmuHost``): the objects behind the ids in the call log (bound devices,
vIOMMU objects and their physical SMMU, vDEVICEs), and per ``IOMMU_HWPT_INVALIDATE`` on an
ARM vIOMMU the entries the kernel really issued: all of them on success; on failure at entry
k only the groups of 63 before k's group (iommufd.md §3.4).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from protocols.smmuv3 import Opcode
from viommud.guest.smmuv3 import decode_ste
from viommud.host import HostConfig
from viommud.oracle import CONFIG, DEVTLB, FULL, IOTLB, Ledger, Need, Removal

_CMD = struct.Struct("<QQ")
_ADDR = 0xFFFFFFFFFFFFF000


def tlb_span(w0: int, w1: int) -> tuple[int, int, bool, int]:
    """(lo, hi, leaf_only, level) of a TLBI_NH_VA / NH_VAA (SMMUv3 §4.4.1)."""
    tg = (w1 >> 10) & 3
    addr = w1 & _ADDR
    leaf = bool(w1 & 1)
    level = (w1 >> 8) & 3
    if tg == 0:
        return addr, addr + 1, leaf, 0  # every entry that contains this address
    granule = 1 << (tg * 2 + 10)
    pages = (((w0 >> 12) & 0x1F) + 1) << ((w0 >> 20) & 0x1F)
    return addr, addr + pages * granule, leaf, level


def tlb_effect(w0: int, w1: int, place: tuple[Any, ...]) -> Need | None:
    """The IOTLB entries a TLBI command covers, at ``place`` (None for other opcodes)."""
    op = w0 & 0xFF
    if op in (Opcode.TLBI_NH_ALL, Opcode.TLBI_NSNH_ALL):
        return Need(IOTLB, place, None, *FULL)
    if op == Opcode.TLBI_NH_ASID:
        return Need(IOTLB, place, w0 >> 48, *FULL)
    if op in (Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA):
        lo, hi, leaf, level = tlb_span(w0, w1)
        tag = (w0 >> 48) if op == Opcode.TLBI_NH_VA else None
        return Need(IOTLB, place, tag, lo, hi, leaf, level)
    return None


def atc_span(w1: int) -> tuple[int, int]:
    size = w1 & 0x3F
    if size >= 52:
        return FULL
    span = 1 << (12 + size)
    lo = (w1 & _ADDR) & ~(span - 1)
    return lo, lo + span


def device_effect(w0: int, w1: int, device: str) -> Need | None:
    """The ATC or config entries an ATC_INV / CFGI_CD(_ALL) covers for ``device``."""
    op = w0 & 0xFF
    if op == Opcode.ATC_INV:
        tag = (w0 >> 12) & 0xFFFFF if w0 & (1 << 11) else None
        return Need(DEVTLB, (device,), tag, *atc_span(w1))
    if op == Opcode.CFGI_CD:
        return Need(CONFIG, (device,), (w0 >> 12) & 0xFFFFF, *FULL)
    if op == Opcode.CFGI_CD_ALL:
        return Need(CONFIG, (device,), None, *FULL)
    return None


def as_removal(need: Need) -> Removal:
    return Removal(need.cache, need.place, need.tag, need.lo, need.hi, need.leaf_only, need.level)


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
        self.stes[vsid] = data

    def begin(self, data: bytes) -> None:
        self._doorbell = data
        self._since = self.ledger.begin()

    def end(self, refused: set[int]) -> None:
        ledger = self.ledger
        for index, (w0, w1) in enumerate(_CMD.iter_unpack(self._doorbell)):
            if index in refused:
                continue
            op = w0 & 0xFF
            if op == Opcode.CMD_SYNC:
                ledger.barrier_reached()
            elif op == Opcode.CFGI_STE:
                self._reread(w0 >> 32, w0 >> 32)
            elif op == Opcode.CFGI_STE_RANGE:
                span = 1 << ((w1 & 0x1F) + 1)
                first = (w0 >> 32) & ~(span - 1)
                self._reread(first, first + span - 1)
            else:
                for need in self._needs(w0, w1, f"{self.name}[{index}] 0x{op:02x}"):
                    ledger.need(need, self._since, due=False)
        ledger.settle()

    def _reread(self, first: int, last: int) -> None:
        for vid, dev in self.devices.items():
            if first <= vid <= last and vid in self.stes:
                ste = decode_ste(self.stes[vid])
                dev.s1 = ste.v and ste.config == 0b101
                dev.ats_on = dev.s1 and dev.ats and ste.eats == 1
                if dev.s1:
                    dev.s1_ever = True
                    self.s1_iommus.add(dev.iommu)

    def _needs(self, w0: int, w1: int, origin: str) -> list[Need]:
        op = w0 & 0xFF
        if op in (Opcode.ATC_INV, Opcode.CFGI_CD, Opcode.CFGI_CD_ALL):
            dev = self.devices.get(w0 >> 32)
            if dev is None:
                return []
            if op == Opcode.ATC_INV and not dev.ats_on:
                return []  # no ATS, no ATC to clean
            if op != Opcode.ATC_INV and not dev.s1_ever:
                return []  # no stage 1, no CDs cached
            need = device_effect(w0, w1, dev.device)
            return [] if need is None else [_named(need, origin)]
        needs = []
        for iommu in sorted(self.s1_iommus):
            need = tlb_effect(w0, w1, (self.name, iommu))
            if need is not None:
                needs.append(_named(need, origin))
        return needs


def _named(need: Need, origin: str) -> Need:
    return Need(
        need.cache, need.place, need.tag, need.lo, need.hi, need.leaf_only, need.level, origin
    )


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
            w0, w1 = _CMD.unpack(bytes.fromhex(raw)[:16].ljust(16, b"\0"))
            op = w0 & 0xFF
            if op in (Opcode.ATC_INV, Opcode.CFGI_CD, Opcode.CFGI_CD_ALL):
                device = self.vsids.get((viommu_id, w0 >> 32))
                need = None if device is None else device_effect(w0, w1, device)
            else:
                need = tlb_effect(w0, w1, owner)
            if need is not None:
                self.ledger.remove(as_removal(need))
