"""Topology of a virtio-iommu: endpoints, domains and the iommufd objects behind them.

What each guest-visible thing is on the host (iommufd.md §1, §0.3):

* an endpoint backed by a host device is that device, bound to the session's iommufd
  (``HostEndpoint``); an *emulated* endpoint (a device the VMM emulates, like QEMU's host
  bridge at 00:00.0) has nothing on the host;
* a MAP/UNMAP domain is an IOAS of its own plus one paging HWPT on it per physical IOMMU
  its devices sit behind; MAP and UNMAP are IOAS_MAP and IOAS_UNMAP on that IOAS. Both are
  made when the domain's first host device arrives (mappings made before are replayed into
  the new IOAS, as the Linux driver replays its own at first attach);
* guest physical memory is the *identity* IOAS: the guest's RAM regions mapped at
  IOVA = GPA (``GuestMemory``). Its HWPT (one per physical IOMMU, a nesting parent) is what
  a device in bypass is attached to, and the stage 2 under every guest table;
* a table domain (ATTACH_TABLE) is a nested HWPT per physical IOMMU: on an Arm SMMU,
  allocated on the iommufd vIOMMU of that SMMU (one per SMMU, on the identity HWPT) from
  the vSTE words, with one vDEVICE (virt_id = endpoint ID) per endpoint; on VT-d, allocated
  directly on the identity HWPT from ``iommu_hwpt_vtd_s1``;
* an unattached device is attached to the identity HWPT when the device is in bypass, and
  detached (blocked: no DMA reaches memory) otherwise.

Every object is reference counted (``_Obj.users``: attached devices and dependent objects)
and destroyed, parents after children, when its last user goes; detaching the last device
of everything leaves the backend empty. Each operation either completes or undoes its own
backend calls before raising ``BackendCallError``.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from protocols import iommufd as uapi
from protocols.models import HostIommu
from protocols.virtio_iommu import MapFlag
from viommud.backend.calls import BackendCallError, BoundDevice, Iommufd
from viommud.guest_memory import RamRegion, synthetic_memfd
from viommud.host import HostConfig, PhysicalDevice
from viommud.mappings import Mapping
from viommud.topology import PiommuStatus, TopologyError, TopologyStatus, VdeviceStatus
from viommud.virtio_state import DomainKind, TableConfig

__all__ = [
    "DEFAULT_GUEST_MEMORY",
    "GuestMemory",
    "GuestRam",
    "HostEndpoint",
    "NotGuestRam",
    "VirtioTopology",
]

# MAP flags as plain ints: tested once per mapping (an IntFlag operation costs ~0.5 µs)
MAP_READ, MAP_WRITE, MAP_MMIO = int(MapFlag.READ), int(MapFlag.WRITE), int(MapFlag.MMIO)
STE1_EATS_TRANS = 1 << 28
_STE_WORDS = struct.Struct("<QQ")

Key = tuple[Any, ...]


class NotGuestRam(Exception):  # noqa: N818 - a condition the caller maps to S_FAULT
    """A MAP names guest physical addresses that are not guest RAM."""


@dataclass(frozen=True, slots=True)
class GuestRam:
    """One region of guest RAM: ``size`` bytes at guest-physical ``gpa``, at host VA ``hva``
    (mapped with IOAS_MAP), or with ``fd`` >= 0 (a number from ``import_fd``) at byte
    ``offset`` of that file (mapped with IOAS_MAP_FILE)."""

    gpa: int
    size: int
    hva: int
    fd: int = -1
    offset: int = 0


# Without a ``guest_memory`` option: 1 TiB of guest RAM from guest-physical 0. On a backend
# with sparse user memory (the emulator) its host VA is allocated there, which costs
# nothing; otherwise (/dev/iommu) it is a sparse memfd, whose pages are only allocated and
# pinned when a mapping needs them.
DEFAULT_GUEST_MEMORY = ((0, 1 << 40),)


@dataclass(frozen=True, slots=True)
class GuestMemory:
    """Where the VMM keeps guest RAM: the GPA -> host VA translation IOAS_MAP needs."""

    regions: tuple[GuestRam, ...] = ()

    def pieces(self, gpa: int, size: int) -> list[tuple[int, GuestRam, int, int]]:
        """``(offset, region, offset in region, length)`` pieces covering
        ``[gpa, gpa + size)``; NotGuestRam if a byte of it is not RAM."""
        out: list[tuple[int, GuestRam, int, int]] = []
        pos, end = gpa, gpa + size
        while pos < end:
            for region in self.regions:
                if region.gpa <= pos < region.gpa + region.size:
                    length = min(end, region.gpa + region.size) - pos
                    out.append((pos - gpa, region, pos - region.gpa, length))
                    pos += length
                    break
            else:
                raise NotGuestRam(f"guest-physical {pos:#x} is not guest RAM")
        return out


@dataclass(slots=True)
class HostEndpoint:
    vid: int
    pdev: PhysicalDevice
    model: str  # of the physical IOMMU behind it
    bound: BoundDevice
    on: Key | None = None  # the HWPT it is attached to (None: detached, i.e. blocked)
    vdevice: bool = False  # holds ("vdevice", vid)

    @property
    def iommu(self) -> str:
        return self.pdev.iommu


@dataclass(slots=True)
class _Obj:
    """One backend object: its id, the physical IOMMU it belongs to, the objects it keeps
    alive and how many users keep it alive."""

    id: int
    iommu: str | None
    parents: tuple[Key, ...]
    users: int = 0


@dataclass(slots=True)
class HostDomain:
    domain: int
    kind: DomainKind
    table: TableConfig | None = None
    endpoints: set[int] = field(default_factory=set)  # host endpoints in the domain
    forwarded: set[int] = field(default_factory=set)  # starts of mappings in the IOAS


@dataclass(slots=True)
class VirtioTopology:
    """One virtio-iommu's host side."""

    name: str
    host: HostConfig
    iommufd: Iommufd
    memory: GuestMemory = field(default_factory=GuestMemory)
    allocated: list[int] = field(default_factory=list)  # host VAs this vIOMMU allocated
    imported: list[int] = field(default_factory=list)  # backend numbers from import_fd
    memfds: list[int] = field(default_factory=list)  # synthetic RAM memfds (OS fds) it owns
    endpoints: dict[int, HostEndpoint] = field(default_factory=dict)
    domains: dict[int, HostDomain] = field(default_factory=dict)
    objects: dict[Key, _Obj] = field(default_factory=dict)

    # -- lookups ------------------------------------------------------------------------
    def model_of(self, device: str) -> str:
        pdev = self.host.device(device)
        return self.host.iommu(pdev.iommu).model

    def endpoint_of(self, device: str) -> int | None:
        for vid, ep in self.endpoints.items():
            if ep.pdev.id == device:
                return vid
        return None

    def viommu_id(self, iommu: str) -> int | None:
        obj = self.objects.get(("viommu", iommu))
        return obj.id if obj is not None else None

    def nested_hwpts(self, domain: int) -> list[tuple[Key, int, str]]:
        """``(key, hwpt id, iommu)`` of every nested HWPT of table domain ``domain``."""
        return [
            (key, obj.id, obj.iommu or "")
            for key, obj in self.objects.items()
            if key[0] == "nested" and key[1] == domain
        ]

    def host_endpoints(self, domain: int) -> list[HostEndpoint]:
        dom = self.domains.get(domain)
        if dom is None:
            return []
        return [self.endpoints[vid] for vid in sorted(dom.endpoints)]

    # -- endpoints (device_attach / device_detach) ----------------------------------------
    def add_endpoint(self, vid: int, device: str) -> HostEndpoint:
        if vid in self.endpoints:
            raise TopologyError(f"endpoint {vid} is already attached")
        try:
            pdev = self.host.device(device)
        except KeyError:
            raise TopologyError(f"host device {device!r} does not exist") from None
        if any(ep.pdev.id == device for ep in self.endpoints.values()):
            raise TopologyError(f"host device {device} is already an endpoint")
        model = self.host.iommu(pdev.iommu).model
        try:
            bound = self.iommufd.bind(device, pdev.iommu)
        except BackendCallError as exc:
            raise TopologyError(f"binding {device}: {exc}") from None
        ep = HostEndpoint(vid, pdev, model, bound)
        self.endpoints[vid] = ep
        return ep

    def remove_endpoint(self, vid: int) -> None:
        ep = self.endpoints.pop(vid)
        self._move(ep, None)
        if ep.vdevice:
            ep.vdevice = False
            self._put(("vdevice", vid))
        for dom in self.domains.values():
            dom.endpoints.discard(vid)
        self.iommufd.unbind(ep.bound)

    # -- domains ------------------------------------------------------------------------
    def domain_created(self, domain: int, kind: DomainKind, table: TableConfig | None) -> None:
        """Nothing on the host yet: objects come with the first host device."""
        self.domains[domain] = HostDomain(domain, kind, table)

    def domain_destroyed(self, domain: int) -> None:
        dom = self.domains.pop(domain, None)
        if dom is None:
            return
        for vid in sorted(dom.endpoints):  # normally empty: endpoints left first
            ep = self.endpoints.get(vid)
            if ep is not None and ep.on is not None and ep.on[1:2] == (domain,):
                self._move(ep, None)
        if ("ioas", domain) in self.objects:
            self._put(("ioas", domain))  # its mappings go with it

    def table_attached(self, domain: int, table: TableConfig) -> None:
        """A MAP domain (without mappings) becomes a table domain: move its devices."""
        dom = self.domains[domain]
        old_kind, old_table = dom.kind, dom.table
        dom.kind, dom.table = DomainKind.TABLE, table
        before = [(ep, ep.on) for ep in self.host_endpoints(domain)]
        for _, key in before:
            if key is not None:
                self._get(key)  # pinned, so that a failure can move the device back
        try:
            for ep, _ in before:
                self._attach_kind(ep, dom)
        except BackendCallError:
            dom.kind, dom.table = old_kind, old_table
            for ep, key in reversed(before):
                if ep.on != key:
                    with contextlib.suppress(BackendCallError):
                        if key is not None:
                            self._get(key)
                        self._move(ep, key)
            raise
        finally:
            for _, key in before:
                if key is not None:
                    self._put(key)
        if ("ioas", domain) in self.objects:
            self._put(("ioas", domain))
            dom.forwarded.clear()

    # -- attach / detach ------------------------------------------------------------------
    def attach(self, vid: int, domain: int, mappings: Callable[[], Iterable[Mapping]]) -> None:
        """Endpoint ``vid`` now translates through ``domain``; no-op for emulated ones."""
        ep = self.endpoints.get(vid)
        dom = self.domains[domain]
        if ep is None:
            return
        current = ep.on is not None and ep.on[0] in ("paging", "nested") and ep.on[1] == domain
        if not current:
            made_ioas = False
            if dom.kind is DomainKind.MAPPING and ("ioas", domain) not in self.objects:
                self._domain_ioas(dom, mappings())
                made_ioas = True
            try:
                self._attach_kind(ep, dom)
            except BackendCallError:
                if made_ioas:
                    self._put(("ioas", domain))
                    dom.forwarded.clear()
                raise
        for other in self.domains.values():
            other.endpoints.discard(vid)
        dom.endpoints.add(vid)

    def unattached(self, vid: int, bypass: bool) -> None:
        """Endpoint ``vid`` is attached to no domain: bypass (identity) or blocked."""
        for dom in self.domains.values():
            dom.endpoints.discard(vid)
        ep = self.endpoints.get(vid)
        if ep is None:
            return
        if not bypass:
            self._move(ep, None)
            return
        key = ("identity", ep.iommu)
        if ep.on == key:
            return
        self._identity(ep)
        try:
            self._move(ep, key)
        except BackendCallError:
            self._put(key)
            raise

    def _attach_kind(self, ep: HostEndpoint, dom: HostDomain) -> None:
        key: Key
        if dom.kind is DomainKind.BYPASS:
            key = ("identity", ep.iommu)
            self._identity(ep)
        elif dom.kind is DomainKind.MAPPING:
            key = ("paging", dom.domain, ep.iommu)
            self._paging(ep, dom)
        else:
            assert dom.table is not None
            key = self._nested(ep, dom)
        try:
            self._move(ep, key)
        except BackendCallError:
            self._put(key)
            raise

    def _move(self, ep: HostEndpoint, key: Key | None) -> None:
        """Attach (replace) ``ep`` to the HWPT ``key`` already referenced for it, or detach;
        then drop its reference on what it was on. The caller holds one reference on
        ``key``, which becomes the device's."""
        fd = self.iommufd
        if key is None:
            if ep.on is None:
                return
            fd.detach(ep.bound)
        else:
            fd.attach(ep.bound, self.objects[key].id)
        old, ep.on = ep.on, key
        if old is not None:
            self._put(old)
        if ep.vdevice and (key is None or key[0] != "nested"):
            ep.vdevice = False
            self._put(("vdevice", ep.vid))

    # -- MAP / UNMAP ------------------------------------------------------------------------
    def map(self, domain: int, mapping: Mapping) -> None:
        dom = self.domains.get(domain)
        ioas = self.objects.get(("ioas", domain))
        if dom is None or ioas is None:
            return  # no host device in the domain yet: replayed at the first one
        self._ioas_map(dom, mapping, ioas.id)

    def unmap(self, domain: int, mappings: Iterable[Mapping]) -> None:
        dom = self.domains.get(domain)
        ioas = self.objects.get(("ioas", domain))
        if dom is None or ioas is None:
            return
        forwarded = dom.forwarded
        gone = [m for m in mappings if m.start in forwarded]
        if not gone:
            return
        first, last = gone[0].start, gone[-1].end
        done = self.iommufd.ioas_unmap(None, ioas.id, first, last - first + 1)
        expected = sum(m.end - m.start + 1 for m in gone)
        if done != expected:
            raise TopologyError(
                f"IOAS_UNMAP of [{first:#x}, {last:#x}] removed {done} bytes, not {expected}"
            )
        for m in gone:
            forwarded.discard(m.start)

    @staticmethod
    def forwardable(mapping: Mapping) -> bool:
        """Mappings a physical device can use: readable or writable guest memory. MMIO
        mappings (an emulated doorbell) and flags 0 stay with the guest-visible state."""
        return bool(mapping.flags & (MAP_READ | MAP_WRITE)) and not mapping.flags & MAP_MMIO

    def _ioas_map(self, dom: HostDomain, mapping: Mapping, ioas_id: int | None = None) -> None:
        flags = mapping.flags
        if not flags & (MAP_READ | MAP_WRITE) or flags & MAP_MMIO:
            return  # not forwardable
        if ioas_id is None:
            ioas_id = self.objects[("ioas", dom.domain)].id
        start = mapping.start
        pieces = self.memory.pieces(mapping.phys, mapping.end - start + 1)
        readable = bool(flags & MAP_READ)
        writeable = bool(flags & MAP_WRITE)
        done: list[tuple[int, int]] = []
        try:
            for offset, region, within, length in pieces:
                self._map_ram(
                    ioas_id,
                    start + offset,
                    region,
                    within,
                    length,
                    readable=readable,
                    writeable=writeable,
                )
                done.append((start + offset, length))
        except BackendCallError:
            for iova, length in done:
                with contextlib.suppress(BackendCallError):
                    self.iommufd.ioas_unmap(None, ioas_id, iova, length)
            raise
        dom.forwarded.add(start)

    def _domain_ioas(self, dom: HostDomain, mappings: Iterable[Mapping]) -> None:
        key: Key = ("ioas", dom.domain)
        ioas_id = self.iommufd.ioas_alloc(None)
        self.objects[key] = _Obj(ioas_id, None, (), users=1)  # the domain's own reference
        try:
            for mapping in mappings:
                self._ioas_map(dom, mapping)
        except (BackendCallError, NotGuestRam):
            self._put(key)
            dom.forwarded.clear()
            raise

    def _map_ram(
        self,
        ioas_id: int,
        iova: int,
        region: GuestRam,
        within: int,
        length: int,
        *,
        readable: bool,
        writeable: bool,
    ) -> None:
        """Map ``length`` bytes of ``region`` from ``within`` at ``iova``: IOAS_MAP of its
        host VA, or IOAS_MAP_FILE of its file."""
        if region.fd < 0:
            self.iommufd.ioas_map(
                None,
                ioas_id,
                iova,
                length,
                user_va=region.hva + within,
                readable=readable,
                writeable=writeable,
            )
            return
        flags = (uapi.IOMMU_IOAS_MAP_READABLE if readable else 0) | (
            uapi.IOMMU_IOAS_MAP_WRITEABLE if writeable else 0
        )
        self.iommufd.ioas_map_file(
            None, ioas_id, region.fd, region.offset + within, length, iova=iova, flags=flags
        )

    def _ioas_used(self, dom: HostDomain) -> bool:
        return any(k[0] == "paging" and k[1] == dom.domain for k in self.objects)

    # -- object constructors (each returns holding one new reference) ------------------------
    def _get(self, key: Key) -> int:
        obj = self.objects[key]
        obj.users += 1
        return obj.id

    def _make(
        self, key: Key, iommu: str | None, parents: tuple[Key, ...], alloc: Callable[[], int]
    ) -> int:
        """Return ``key``'s id with one more user; allocate it (holding ``parents``, whose
        references the caller already took) when it does not exist yet."""
        obj = self.objects.get(key)
        if obj is not None:
            for parent in parents:
                self._put(parent)  # the existing object already holds its parents
            obj.users += 1
            return obj.id
        try:
            obj_id = alloc()
        except BackendCallError:
            for parent in parents:
                self._put(parent)
            raise
        self.objects[key] = _Obj(obj_id, iommu, parents, users=1)
        return obj_id

    def _identity_ioas(self) -> Key:
        key: Key = ("ioas", "identity")
        obj = self.objects.get(key)
        if obj is not None:
            obj.users += 1
            return key
        ioas_id = self.iommufd.ioas_alloc(None)
        self.objects[key] = _Obj(ioas_id, None, (), users=1)
        try:
            for region in self.memory.regions:
                self._map_ram(
                    ioas_id, region.gpa, region, 0, region.size, readable=True, writeable=True
                )
        except BackendCallError:
            self._put(key)
            raise
        return key

    def _identity(self, ep: HostEndpoint) -> int:
        """The identity (GPA) HWPT of ``ep``'s physical IOMMU: a nesting parent."""
        key: Key = ("identity", ep.iommu)
        if key in self.objects:
            return self._get(key)
        parent = self._identity_ioas()
        return self._make(
            key,
            ep.iommu,
            (parent,),
            lambda: self.iommufd.hwpt_alloc(
                ep.iommu,
                ep.bound.dev_id,
                self.objects[parent].id,
                flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT,
            ),
        )

    def _paging(self, ep: HostEndpoint, dom: HostDomain) -> int:
        key: Key = ("paging", dom.domain, ep.iommu)
        if key in self.objects:
            return self._get(key)
        parent: Key = ("ioas", dom.domain)
        self._get(parent)
        return self._make(
            key,
            ep.iommu,
            (parent,),
            lambda: self.iommufd.hwpt_alloc(ep.iommu, ep.bound.dev_id, self.objects[parent].id),
        )

    def _nested(self, ep: HostEndpoint, dom: HostDomain) -> Key:
        table = dom.table
        assert table is not None
        if ep.model == HostIommu.ARM_SMMUV3:
            ste0, ste1 = table.ste0, table.ste1
            if not table.raw_ste and ep.pdev.ats:
                ste1 |= STE1_EATS_TRANS
            key: Key = ("nested", dom.domain, ep.iommu, ste1)
            new_vdevice = not ep.vdevice
            self._vdevice(ep)
            try:
                if key in self.objects:
                    self._get(key)
                else:
                    viommu = self._viommu(ep)
                    self._make(
                        key,
                        ep.iommu,
                        (viommu,),
                        lambda: self.iommufd.hwpt_alloc(
                            ep.iommu,
                            ep.bound.dev_id,
                            self.objects[viommu].id,
                            data_type=uapi.IOMMU_HWPT_DATA_ARM_SMMUV3,
                            data=_STE_WORDS.pack(ste0, ste1),
                        ),
                    )
            except BackendCallError:
                if new_vdevice:
                    ep.vdevice = False
                    self._put(("vdevice", ep.vid))
                raise
            return key
        key = ("nested", dom.domain, ep.iommu, 0)
        if key in self.objects:
            self._get(key)
            return key
        parent: Key = ("identity", ep.iommu)
        self._identity(ep)
        data = uapi.encode(
            uapi.HwptVtdS1(
                flags=table.vtd_flags, pgtbl_addr=table.pgtbl_addr, addr_width=table.addr_width
            )
        )
        self._make(
            key,
            ep.iommu,
            (parent,),
            lambda: self.iommufd.hwpt_alloc(
                ep.iommu,
                ep.bound.dev_id,
                self.objects[parent].id,
                data_type=uapi.IOMMU_HWPT_DATA_VTD_S1,
                data=bytes(data),
            ),
        )
        return key

    def _viommu(self, ep: HostEndpoint) -> Key:
        key: Key = ("viommu", ep.iommu)
        if key in self.objects:
            self._get(key)
            return key
        parent: Key = ("identity", ep.iommu)
        self._identity(ep)
        self._make(
            key,
            ep.iommu,
            (parent,),
            lambda: self.iommufd.viommu_alloc(
                ep.iommu,
                ep.bound.dev_id,
                self.objects[parent].id,
                uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
            ),
        )
        return key

    def _vdevice(self, ep: HostEndpoint) -> None:
        """``ep``'s vDEVICE on its SMMU's vIOMMU (virt_id = the endpoint ID)."""
        if ep.vdevice:
            return
        key: Key = ("vdevice", ep.vid)
        viommu = self._viommu(ep)
        self._make(
            key,
            ep.iommu,
            (viommu,),
            lambda: self.iommufd.vdevice_alloc(
                ep.iommu, self.objects[viommu].id, ep.bound.dev_id, ep.vid
            ),
        )
        ep.vdevice = True

    def _put(self, key: Key) -> None:
        """Drop one reference; the last one destroys the object, then its parents' refs."""
        obj = self.objects[key]
        obj.users -= 1
        if obj.users > 0:
            return
        del self.objects[key]
        self.iommufd.destroy(obj.iommu, obj.id)
        for parent in obj.parents:
            self._put(parent)

    # -- guest memory ------------------------------------------------------------------------
    def place_guest_memory(self, regions: Iterable[tuple[int, int, int | None]]) -> None:
        """Set guest RAM: ``(gpa, size, hva)``; a None ``hva`` is synthetic RAM, freed at
        ``destroy``: allocated in the backend's user memory when that is sparse (the
        emulator's), else a sparse memfd mapped with IOAS_MAP_FILE (/dev/iommu: nothing is
        allocated up front, pages are pinned only where mapped)."""
        placed: list[GuestRam] = []
        memory = self.iommufd.backend.memory
        sparse = bool(getattr(memory, "sparse", False))
        for gpa, size, given in regions:
            if given is not None:
                placed.append(GuestRam(gpa, size, given))
            elif sparse:
                hva = memory.alloc(size)
                self.allocated.append(hva)
                placed.append(GuestRam(gpa, size, hva))
            else:
                os_fd = synthetic_memfd(size)
                self.memfds.append(os_fd)
                number = self.iommufd.import_fd(os_fd)
                self.imported.append(number)
                placed.append(GuestRam(gpa, size, 0, number, 0))
        self.memory = GuestMemory(tuple(placed))

    def use_passed_memory(self, regions: Iterable[RamRegion]) -> None:
        """Set guest RAM to the memfds the VMM passed (the session owns the fds; only the
        backend's numbers for them are this vIOMMU's)."""
        numbers: dict[int, int] = {}
        placed: list[GuestRam] = []
        for region in regions:
            number = numbers.get(region.fd)
            if number is None:
                number = numbers[region.fd] = self.iommufd.import_fd(region.fd)
                self.imported.append(number)
            placed.append(GuestRam(region.gpa, region.size, 0, number, region.offset))
        self.memory = GuestMemory(tuple(placed))

    # -- teardown ---------------------------------------------------------------------------
    def describe(self) -> TopologyStatus:
        """The backend objects this vIOMMU holds, for ``viommud status``: per physical IOMMU
        its vIOMMU object (vSVA) and HWPTs, per endpoint the HWPT it is attached to."""
        hwpt_kinds = ("paging", "nested", "identity")
        iommus = sorted({o.iommu for o in self.objects.values() if o.iommu is not None})
        piommus = []
        for iommu in iommus:
            viommu = self.objects.get(("viommu", iommu))
            hwpts = sorted(
                o.id for k, o in self.objects.items() if k[0] in hwpt_kinds and o.iommu == iommu
            )
            piommus.append(
                PiommuStatus(iommu, viommu.id if viommu is not None else None, None, tuple(hwpts))
            )
        vdevices = []
        for vid, ep in sorted(self.endpoints.items()):
            on = self.objects.get(ep.on) if ep.on is not None and ep.on[0] in hwpt_kinds else None
            vdev = self.objects.get(("vdevice", vid))
            vdevices.append(
                VdeviceStatus(
                    vid,
                    ep.bound.name,
                    ep.iommu,
                    vdev.id if vdev is not None else None,
                    on.id
                    if on is not None and ep.on is not None and ep.on[0] in hwpt_kinds
                    else None,
                )
            )
        return TopologyStatus(
            tuple(piommus),
            tuple(vdevices),
            sum(1 for k in self.objects if k[0] in hwpt_kinds),
        )

    def destroy(self) -> None:
        """Free everything: detach and unbind every device, then the objects left."""
        for vid in sorted(self.endpoints):
            self.remove_endpoint(vid)
        for domain in sorted(self.domains):
            self.domain_destroyed(domain)
        while self.objects:  # anything still referenced only by bookkeeping
            leaves = [
                k for k in self.objects if not any(k in o.parents for o in self.objects.values())
            ]
            for key in leaves:
                obj = self.objects.pop(key)
                with contextlib.suppress(BackendCallError):
                    self.iommufd.destroy(obj.iommu, obj.id)
        memory = self.iommufd.backend.memory
        while self.allocated:
            memory.free(self.allocated.pop())
        while self.imported:
            self.iommufd.close_imported(self.imported.pop())
        while self.memfds:
            os.close(self.memfds.pop())
