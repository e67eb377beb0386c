"""The oracle's virtio-iommu model: what a completed request asked for, and what the host
calls of MAP/UNMAP domains removed.

Requests are read with the construct declarations of ``protocols.virtio_iommu`` (the
virtio-iommu specification's requests, §2.2-§2.5; the vSVA drafts' ATTACH_TABLE and
INVALIDATE, §5.1-§5.3 of the reference); nothing of the daemon's decoder, frontend or
topology is used. Every request is its own barrier: its completion (the used buffer) is what
the guest waits for. Only a request the device answered OK asks for anything: for the others
the guest was told nothing changed.

Guest side (``VirtioGuest``, one per virtio-iommu):

* Endpoints (``device_attach`` records: endpoint ID -> host device) and domains: ATTACH and
  ATTACH_TABLE move an endpoint into a domain (leaving its previous one), DETACH takes it
  out; a domain dies with its last endpoint, and its mappings with it (§2.2, §2.3).
* Mappings of MAP domains: MAP adds ``[virt_start, virt_end]``; UNMAP removes every mapping
  inside its range (§2.5: an OK UNMAP split none). A removed mapping a physical device could
  use (READ or WRITE, not MMIO: the host keeps MMIO and flag-less mappings to itself) must be
  gone from the IOTLB of every host device of the domain when the UNMAP completes.
* INVALIDATE of a table domain (scope DOMAIN / PASID / VA, caches configuration / TLB /
  device TLB, PASID and ASID tags, per draft): on an Arm table (SMMUv3 PASID table) the
  configuration cache of each endpoint (the CD of the PASID, or all of them), the TLB of each
  physical SMMU of the domain (tagged with the ASID when the guest gives one: a VA range
  names that ASID's entries and the global ones, SMMUv3 §4.4 TLBI_NH_VA; without an ASID a
  VA range names every ASID's and a PASID scope the whole VMID, since the TLB is tagged with
  ASIDs the host cannot derive from PASIDs), and the ATC of each ATS endpoint (the PASID's
  requests, or all); on a VT-d table the IOTLB and, for the device-TLB type, the device TLB
  of each endpoint (a VT-d table has no configuration cache of the guest's).
  Configuration, TLB and ATC steps are ordered (SMMUv3 §4.5): each only counts host calls
  after the ones that completed the step before, as in the SMMUv3 model.

Host side (``VirtioHost``): IOAS ids, HWPTs allocated on them and the devices attached to
either; an ``IOMMU_IOAS_UNMAP`` issued while a request runs removes the range it reports
unmapped from the IOTLB of every device translating through that IOAS (the kernel flushes
IOTLBs and ATCs of the IOAS's domains before it returns). ``IOMMU_HWPT_INVALIDATE`` calls of
table domains are read by the SMMUv3 and VT-d host models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from protocols.virtio_iommu import (
    INV_A_F_CONFIG,
    INV_A_F_LEAF,
    INV_A_SCOPE_DOMAIN,
    INV_A_SCOPE_PASID,
    INV_B_F_ARCHID,
    INV_B_F_LEAF,
    INV_B_F_PASID,
    INV_B_GRAN_DOMAIN,
    INV_B_GRAN_PASID,
    INV_B_TYPE_DEV_IOTLB,
    INV_B_TYPE_IOTLB,
    INV_B_TYPE_PASID,
    INV_C_CACHE_PASID,
    INV_C_CACHE_TLB,
    INV_C_F_GLOBAL,
    INV_C_F_ID,
    INV_C_F_LEAF,
    INV_C_F_PASID,
    INV_C_SCOPE_DOMAIN,
    INV_C_SCOPE_PASID,
    MapFlag,
    RequestType,
    parse_request,
)
from viommud.host import HostConfig
from viommud.oracle import CONFIG, DEVTLB, FULL, GLOBAL, IOTLB, Ledger, Need, Removal
from viommud.oracle.smmuv3 import Order

ARM_MODEL = "arm-smmuv3"
# The translation granule (log2 bytes; SMMUv3 TG 1..3) of a table whose pages or blocks are
# 2^g bytes: 4 KiB tables map 4 KiB pages and 2 MiB / 1 GiB / 512 GiB blocks, 16 KiB ones
# 16 KiB pages and 32 MiB / 64 GiB blocks, 64 KiB ones 64 KiB pages and 512 MiB / 4 TiB
# blocks (Arm VMSAv8-64 translation granules; the sizes do not overlap). Other sizes name no
# granule: only a TLBI without TG, or a wider one, is sure to cover them (SMMUv3 §4.4.1.1).
ARM_GRANULE_OF = {12: 12, 21: 12, 30: 12, 39: 12, 14: 14, 25: 14, 36: 14, 16: 16, 29: 16, 42: 16}


@dataclass(frozen=True, slots=True)
class TableInvalidate:
    """One INVALIDATE, whatever its draft: ``scope`` "domain" / "pasid" / "va"; which caches;
    the PASID and ASID tags (None: not given); the VA range, its page size and LEAF."""

    domain: int
    scope: str
    config: bool
    tlb: bool
    devtlb: bool
    pasid: int | None
    asid: int | None
    lo: int = 0
    hi: int = 0
    granule: int = 0
    leaf: bool = False


def _scope(value: int, domain: int, pasid: int) -> str:
    return "domain" if value == domain else "pasid" if value == pasid else "va"


def read_invalidate(f: dict[str, Any], draft: str) -> TableInvalidate:
    """The fields of an INVALIDATE the device answered OK (so well-formed), per draft."""
    if draft == "A":
        scope = _scope(f["scope"], INV_A_SCOPE_DOMAIN, INV_A_SCOPE_PASID)
        config = bool(f["flags"] & INV_A_F_CONFIG)  # CONFIG: configuration only
        tagged = scope != "domain"
        pasid = f["pasid"] if tagged else None
        asid = f["id"] if tagged else None
        start, pages, log2 = f["virt_start"], f["nr_pages"], f["granule"]
        leaf = bool(f["flags"] & INV_A_F_LEAF)
        tlb = devtlb = not config
    elif draft == "B":
        scope = _scope(f["inv_gran"], INV_B_GRAN_DOMAIN, INV_B_GRAN_PASID)
        config = bool(f["inv_type"] & INV_B_TYPE_PASID)
        tlb = bool(f["inv_type"] & INV_B_TYPE_IOTLB)
        devtlb = bool(f["inv_type"] & INV_B_TYPE_DEV_IOTLB)
        pasid = f["pasid"] if f["flags"] & INV_B_F_PASID else None
        asid = f["archid"] if f["flags"] & INV_B_F_ARCHID else None
        start, pages, log2 = f["virt_start"], f["nr_pages"], f["granule"]
        leaf = bool(f["flags"] & INV_B_F_LEAF)
    else:  # draft C: TLB implies the device TLB; GLOBAL: no ASID
        scope = _scope(f["scope"], INV_C_SCOPE_DOMAIN, INV_C_SCOPE_PASID)
        config = bool(f["caches"] & INV_C_CACHE_PASID)
        tlb = devtlb = bool(f["caches"] & INV_C_CACHE_TLB)
        pasid = f["pasid"] if f["flags"] & INV_C_F_PASID else None
        named = f["flags"] & INV_C_F_ID and not f["flags"] & INV_C_F_GLOBAL
        asid = f["id"] & 0xFFFF if named else None
        start, pages, log2 = f["address"], f["nr_pages"], f["page_size"]
        leaf = bool(f["flags"] & INV_C_F_LEAF)
    if scope == "domain":
        pasid = asid = None
    lo, hi = (start, start + (pages << log2)) if scope == "va" else FULL
    return TableInvalidate(f["domain"], scope, config, tlb, devtlb, pasid, asid, lo, hi, log2, leaf)


@dataclass(slots=True)
class _Domain:
    table: bool = False
    endpoints: set[int] = field(default_factory=set)
    mappings: dict[int, tuple[int, bool]] = field(default_factory=dict)  # start -> (end, host)


@dataclass(slots=True)
class VirtioGuest:
    """One virtio-iommu as the guest sees it."""

    name: str
    host: HostConfig
    ledger: Ledger
    options: dict[str, Any]
    endpoints: dict[int, str] = field(default_factory=dict)  # endpoint -> host device
    domains: dict[int, _Domain] = field(default_factory=dict)
    where: dict[int, int] = field(default_factory=dict)  # endpoint -> domain
    _request: dict[str, Any] | None = None
    _since: int = 0

    @property
    def draft(self) -> str:
        return str(self.options.get("vsva_draft", "B"))

    def attach(self, endpoint: int, device: str) -> None:
        self.endpoints[endpoint] = device

    def detach(self, endpoint: int) -> None:
        self._leave(endpoint)
        self.endpoints.pop(endpoint, None)

    def begin(self, data: bytes) -> None:
        self._since = self.ledger.begin()
        try:
            self._request = parse_request(bytes(data), self.draft)
        except Exception:  # a request the declarations cannot read: the device wrote nothing
            self._request = None

    def end(self, ok: bool) -> None:
        """The request completed; ``ok``: the device answered OK."""
        f, self._request = self._request, None
        if ok and f is not None:
            kind = f["type"]
            if kind in (RequestType.ATTACH, RequestType.ATTACH_TABLE):
                self._join(f["endpoint"], f["domain"], kind == RequestType.ATTACH_TABLE)
            elif kind == RequestType.DETACH:
                self._leave(f["endpoint"])
            elif kind == RequestType.MAP:
                self._map(f)
            elif kind == RequestType.UNMAP:
                self._unmap(f)
            elif kind == RequestType.INVALIDATE:
                self._invalidate(read_invalidate(f, self.draft))
        self.ledger.settle()

    # -- domains and mappings -----------------------------------------------------------
    def _join(self, endpoint: int, domain: int, table: bool) -> None:
        same = self.where.get(endpoint) == domain
        if same and self.options.get("attach_same_domain", "keep") == "keep":
            return  # nothing changes, the mappings stay
        self._leave(endpoint)
        dom = self.domains.setdefault(domain, _Domain())
        dom.table = dom.table or table
        dom.endpoints.add(endpoint)
        self.where[endpoint] = domain

    def _leave(self, endpoint: int) -> None:
        domain = self.where.pop(endpoint, None)
        dom = None if domain is None else self.domains.get(domain)
        if domain is None or dom is None:
            return
        dom.endpoints.discard(endpoint)
        if not dom.endpoints:
            del self.domains[domain]  # the domain dies with its last endpoint

    def _map(self, f: dict[str, Any]) -> None:
        dom = self.domains.get(f["domain"])
        if dom is None:
            return
        flags = f["flags"]
        host = bool(flags & (MapFlag.READ | MapFlag.WRITE)) and not flags & MapFlag.MMIO
        dom.mappings[f["virt_start"]] = (f["virt_end"] + 1, host)

    def _unmap(self, f: dict[str, Any]) -> None:
        dom = self.domains.get(f["domain"])
        if dom is None:
            return
        first, last = f["virt_start"], f["virt_end"]
        gone = sorted(
            (start, end) for start, (end, host) in dom.mappings.items() if first <= start <= last
        )
        spans: list[list[int]] = []
        for start, end in gone:
            host = dom.mappings.pop(start)[1]
            if not host:
                continue
            if spans and spans[-1][1] == start:
                spans[-1][1] = end
            else:
                spans.append([start, end])
        origin = f"{self.name} UNMAP"
        for endpoint in sorted(dom.endpoints):
            device = self.endpoints.get(endpoint)
            if device is None:
                continue  # an emulated endpoint: nothing on the host
            for lo, hi in spans:
                need = Need(IOTLB, (device,), None, lo, hi, origin=origin)
                self.ledger.need(need, self._since, due=True)

    # -- INVALIDATE ---------------------------------------------------------------------
    def _invalidate(self, inv: TableInvalidate) -> None:
        dom = self.domains.get(inv.domain)
        if dom is None:
            return
        origin = f"{self.name} INVALIDATE"
        devices = [
            (self.host.device(d), d)
            for d in (self.endpoints.get(e) for e in sorted(dom.endpoints))
            if d is not None
        ]
        order = Order()
        steps: list[list[tuple[Need, str]]] = [[], [], []]  # config, TLB, ATC
        for pdev, device in devices:
            model = self.host.iommu(pdev.iommu).model
            if model != ARM_MODEL:  # a VT-d first-stage table: IOTLB and device TLB
                if inv.tlb or inv.devtlb:
                    steps[1].append((Need(IOTLB, (device,), None, inv.lo, inv.hi, inv.leaf), ""))
                if inv.devtlb and pdev.ats:
                    steps[2].append((Need(DEVTLB, (device,), None, inv.lo, inv.hi), ""))
                continue
            if inv.config:
                steps[0].append((Need(CONFIG, (device,), inv.pasid, *FULL), pdev.iommu))
            if inv.devtlb and pdev.ats:
                lo, hi = (inv.lo, inv.hi) if inv.scope == "va" else FULL
                steps[2].append((Need(DEVTLB, (device,), inv.pasid, lo, hi), pdev.iommu))
        if inv.tlb:
            smmus = sorted(
                {p.iommu for p, _ in devices if self.host.iommu(p.iommu).model == ARM_MODEL}
            )
            for iommu in smmus:
                steps[1] += [(n, iommu) for n in self._arm_tlb(inv, (self.name, iommu))]
        for step in steps:
            for unnamed, iommu in step:
                need = replace(unnamed, origin=origin)
                after = order.before(need, iommu) if iommu else ()
                handle = self.ledger.need(need, self._since, due=True, after=after)
                order.raised(need, iommu, handle)
            order.sync()

    @staticmethod
    def _arm_tlb(inv: TableInvalidate, place: tuple[Any, ...]) -> list[Need]:
        """The SMMU TLB entries an INVALIDATE names (SMMUv3 §4.4; see the module doc)."""
        if inv.scope == "domain" or (inv.asid is None and inv.scope == "pasid"):
            return [Need(IOTLB, place, None, *FULL)]
        if inv.scope == "pasid":
            return [Need(IOTLB, place, inv.asid, *FULL)]
        granule = ARM_GRANULE_OF.get(inv.granule, 0)
        tags = (inv.asid, GLOBAL) if inv.asid is not None else (None,)
        return [Need(IOTLB, place, t, inv.lo, inv.hi, inv.leaf, 0, granule) for t in tags]


@dataclass(slots=True)
class VirtioHost:
    """IOAS ids, HWPTs on them, devices attached, and what IOAS_UNMAP calls removed."""

    ledger: Ledger
    active: bool = False  # a virtio-iommu request is running
    devids: dict[int, str] = field(default_factory=dict)
    ioas: dict[int, int] = field(default_factory=dict)  # IOAS id or HWPT id -> IOAS id
    attached: dict[str, int] = field(default_factory=dict)  # device -> pt_id

    def call(self, ioctl: str, err: int, call: dict[str, Any]) -> None:
        args, out = call.get("args", {}), call.get("out", {})
        if ioctl == "IOMMU_IOAS_UNMAP":
            if self.active and not err:
                self._unmap(args, out)
            return
        if err:
            return
        if ioctl == "VFIO_DEVICE_BIND_IOMMUFD":
            self.devids[out["out_devid"]] = args["device"]
        elif ioctl == "IOMMU_IOAS_ALLOC":
            self.ioas[out["out_ioas_id"]] = out["out_ioas_id"]
        elif ioctl == "IOMMU_HWPT_ALLOC" and args.get("pt_id") in self.ioas:
            self.ioas[out["out_hwpt_id"]] = self.ioas[args["pt_id"]]
        elif ioctl == "VFIO_DEVICE_ATTACH_IOMMUFD_PT":
            device = self.devids.get(args["dev_id"])
            if device is not None:
                self.attached[device] = args["pt_id"]
        elif ioctl == "VFIO_DEVICE_DETACH_IOMMUFD_PT":
            device = self.devids.get(args["dev_id"])
            if device is not None:
                self.attached.pop(device, None)
        elif ioctl == "IOMMU_DESTROY":
            self.ioas.pop(args["id"], None)

    def _unmap(self, args: dict[str, Any], out: dict[str, Any]) -> None:
        ioas = args.get("ioas_id")
        length = out.get("length", 0)  # what the kernel reports unmapped
        if not length:
            return
        lo = args["iova"]
        entry = self.ledger.new_entry()
        for device, pt in sorted(self.attached.items()):
            if self.ioas.get(pt) == ioas:
                self.ledger.remove(Removal(IOTLB, (device,), None, lo, lo + length), entry)
