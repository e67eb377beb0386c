"""The virtio-iommu request queue: a sans-I/O state machine (h11 style).

``receive_request(readable, writable=None)`` takes one request (the device-readable part of
one descriptor chain, and the size of its device-writable part: by default exactly what the
type needs, as a Linux driver provides). When the request passes every guest-visible check,
its effects are applied to the frontend's state and ``next_event()`` / ``events()`` return
what the host side must do (``viommud.frontends.virtio.events``), ending with a ``Barrier``.
The I/O layer carries them out and calls ``complete(failure)``: with ``None`` the request
stands; with a status (the host refused), every state change of the request is undone and
that status is the reply. A request that fails a check yields no event but the ``Barrier``;
``complete`` then answers with its status. The frontend never calls a backend and never logs.

Guest-visible rules: virtio-iommu.md §3 (the specification's MUST/SHOULD list), checked in
the order the reference suggests (§6.3): parse/length (used length 0) -> reserved and flags
(INVAL) -> object existence (NOENT) -> bypass / domain kind (INVAL) -> range, alignment,
input and domain range (RANGE) -> reserved-region overlap (INVAL) -> mapping overlap (INVAL)
-> resource caps (NOMEM). Where the reference implementations disagree the specification's
reading is the default and the other reading is a ``DevicePolicy`` switch; docs/virtio-iommu.md
lists every choice.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Final

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
    MAP_FLAGS_MASK,
    AttachFlag,
    FaultFlag,
    FaultReason,
    MapFlag,
    ProbeType,
    ResvMemSubtype,
    Status,
    build_config,
    build_fault,
    build_resv_mem,
)
from viommud.events import Barrier, Cache, Invalidation, Scope
from viommud.frontends.virtio.events import (
    DomainCreated,
    DomainDestroyed,
    DomainKind,
    EndpointAttached,
    EndpointDetached,
    Mapped,
    TableAttached,
    TableConfig,
    TableInvalidation,
    Unmapped,
    VirtioEvent,
)
from viommud.frontends.virtio.mappings import Mapping, MappingStore, SplitError
from viommud.guest.virtio import (
    ArmPgtTable,
    ArmPstTable,
    ArmSteTable,
    Attach,
    AttachTable,
    Decoded,
    Detach,
    InvalidateA,
    InvalidateB,
    InvalidateC,
    Malformed,
    Map,
    OpaqueTable,
    Probe,
    Unknown,
    Unmap,
    VtdTable,
    decode,
    kind_name,
    tail,
)

__all__ = [
    "NEED_DATA",
    "DevicePolicy",
    "Domain",
    "EndpointInfo",
    "Reply",
    "RequestPendingError",
    "ResvRegion",
    "VirtioFeatures",
    "VirtioIommuFrontend",
]

NEED_DATA: Final = None
U64_MAX: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1
ARM_SMMUV3: Final = HostIommu.ARM_SMMUV3
INTEL_VTD: Final = HostIommu.INTEL_VTD

# SMMUv3 STE words for an S1-translate nested vSTE (smmuv3.md §3, iommufd.md §3.1)
STE0_V = 1
STE0_CFG_S1_TRANS = 0b101 << 1
STE0_S1CTXPTR_MASK = ((1 << 52) - 1) & ~0x3F  # bits 51:6
STE1_LINUX_CACHEABILITY = 0xD4  # S1CIR = S1COR = WBRA (1), S1CSH = inner shareable (3)
VTD_S1_FLAGS = 0x7  # SRE | EAFE | WPE
VTD_ADDR_WIDTHS = frozenset({39, 48, 57})
PASID_MAX = (1 << 20) - 1


class RequestPendingError(RuntimeError):
    """``receive_request`` was called before the previous request was completed."""


@dataclass(frozen=True, slots=True)
class ResvRegion:
    """One reserved region of an endpoint (a PROBE RESV_MEM property), inclusive."""

    start: int
    end: int
    subtype: ResvMemSubtype = ResvMemSubtype.RESERVED


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """What the frontend knows of an endpoint (given by the I/O layer at device_attach)."""

    resv: tuple[ResvRegion, ...] = ()
    table_models: frozenset[str] = frozenset()  # host IOMMU models whose tables it can use
    host: bool = True  # False: an emulated endpoint with no physical device


@dataclass(frozen=True, slots=True)
class VirtioFeatures:
    """What this device offers (and a Linux-like driver accepts, §1.1)."""

    probe: bool = True
    mmio: bool = True
    bypass_config: bool = True
    legacy_bypass: bool = False  # F_BYPASS: superseded; not offered by default
    vsva: bool = False  # the draft F_ATTACH_TABLE: requests 6 and 7
    vsva_draft: str = "B"


class AttachSameDomain(enum.Enum):
    KEEP = "keep"  # spec reading: it already is attached; nothing changes (cloud-hypervisor)
    REATTACH = "reattach"  # QEMU: detach (a sole-endpoint domain dies) then attach again


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """Where implementations disagree: the specification's reading is the default."""

    attach_same_domain: AttachSameDomain = AttachSameDomain.KEEP
    unmap_reserved_inval: bool = False  # UNMAP reserved != 0: INVAL (MAY); default ignore
    check_domain_range: bool = True  # ATTACH to a domain outside domain_range: RANGE
    max_mappings: int = 1 << 20  # per domain; one more: NOMEM
    max_domains: int = 1 << 16  # one more: NOMEM


@dataclass(slots=True)
class Domain:
    id: int
    kind: DomainKind
    endpoints: set[int] = field(default_factory=set)
    mappings: MappingStore = field(default_factory=MappingStore)
    table: TableConfig | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """What the device wrote for one request.

    ``data`` is the whole device-writable part as written, tail included; empty when the
    device wrote nothing (used length 0, which a driver takes as IOERR).
    """

    request_type: int
    status: Status | None
    data: bytes
    reason: str = ""

    @property
    def used(self) -> int:
        return len(self.data)

    @property
    def code(self) -> str:
        """The status name a report counts: ``IOERR`` for a used length of 0."""
        return "IOERR" if self.status is None else self.status.name


class _Refused(Exception):  # noqa: N818 - control flow: the request fails with ``status``
    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class _Pending:
    request_type: int
    status: Status | None  # None: nothing to write (used length 0)
    writable: int
    reason: str = ""
    properties: bytes = b""  # PROBE: the properties area
    undo: list[Callable[[], None]] = field(default_factory=list)


def _refuse(status: Status, reason: str) -> _Refused:
    return _Refused(status, reason)


def _config_default_mask() -> int:
    return U64_MAX & ~0xFFF


@dataclass(slots=True)
class VirtioIommuFrontend:
    """One virtio-iommu device's request queue, as the guest sees it."""

    page_size_mask: int = field(default_factory=_config_default_mask)
    input_range: tuple[int, int] = (0, U64_MAX)
    domain_range: tuple[int, int] = (0, U32_MAX)
    probe_size: int = 512
    boot_bypass: int = 1  # the value ``bypass`` takes at system reset
    features: VirtioFeatures = field(default_factory=VirtioFeatures)
    policy: DevicePolicy = field(default_factory=DevicePolicy)
    bypass: int = -1  # the config field; -1: take boot_bypass
    endpoints: dict[int, EndpointInfo] = field(default_factory=dict)
    domains: dict[int, Domain] = field(default_factory=dict)
    attached: dict[int, int] = field(default_factory=dict)  # endpoint -> domain
    kind_counts_: dict[int, int] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    _events: deque[VirtioEvent] = field(default_factory=deque)
    _pending: _Pending | None = None

    model: ClassVar[str] = "virtio-iommu"

    def __post_init__(self) -> None:
        if not self.page_size_mask:
            raise ValueError("page_size_mask must have at least one bit set")
        if self.input_range[0] > self.input_range[1]:
            raise ValueError("input_range is empty")
        if self.domain_range[0] > self.domain_range[1]:
            raise ValueError("domain_range is empty")
        if self.boot_bypass not in (0, 1):
            raise ValueError("bypass must be 0 or 1")
        if self.features.vsva_draft not in ("A", "B", "C"):
            raise ValueError("vsva_draft must be 'A', 'B' or 'C'")
        if self.bypass < 0:
            self.bypass = self.boot_bypass

    # -- configuration space (§1.2) -------------------------------------------------------
    @property
    def granule(self) -> int:
        return self.page_size_mask & -self.page_size_mask

    @property
    def bypass_active(self) -> bool:
        """Unattached endpoints are in bypass (§1.3)."""
        return (self.features.bypass_config and self.bypass == 1) or self.features.legacy_bypass

    def config_space(self) -> bytes:
        """The 40-byte configuration space as the guest reads it."""
        return build_config(
            page_size_mask=self.page_size_mask,
            input_range_start=self.input_range[0],
            input_range_end=self.input_range[1],
            domain_range_start=self.domain_range[0],
            domain_range_end=self.domain_range[1],
            probe_size=self.probe_size if self.features.probe else 0,
            bypass=self.bypass if self.features.bypass_config else 0,
        )

    def write_config(self, offset: int, data: bytes) -> list[VirtioEvent]:
        """A driver write to the config space: only ``bypass`` (offset 36, one byte) is
        writable, only with F_BYPASS_CONFIG, only 0 or 1; anything else raises ValueError
        (QEMU marks the device broken). Returns the host work (unattached endpoints change
        between bypass and blocked)."""
        if not self.features.bypass_config:
            raise ValueError("bypass is not writable without F_BYPASS_CONFIG")
        if offset != 36 or len(data) != 1:
            raise ValueError(f"config offset {offset} (+{len(data)}) is read-only")
        if data[0] not in (0, 1):
            raise ValueError(f"bypass must be 0 or 1, not {data[0]}")
        before = self.bypass_active
        self.bypass = data[0]
        return self._unattached_moved(before)

    def reset(self) -> list[VirtioEvent]:
        """Device reset: no endpoint is attached to any domain; ``bypass`` is kept (§1.2)."""
        out: list[VirtioEvent] = []
        for endpoint in sorted(self.attached):
            domain = self.attached.pop(endpoint)
            self.domains[domain].endpoints.discard(endpoint)
            out.append(EndpointDetached(endpoint, domain, self.bypass_active))
        for domain in sorted(self.domains):
            out.append(DomainDestroyed(domain))
        self.domains.clear()
        return out

    def system_reset(self) -> list[VirtioEvent]:
        """System reset: as device reset, and ``bypass`` returns to its boot value."""
        out = self.reset()
        before = self.bypass_active
        self.bypass = self.boot_bypass
        return out + self._unattached_moved(before)

    def _unattached_moved(self, before: bool) -> list[VirtioEvent]:
        now = self.bypass_active
        if now == before:
            return []
        return [
            EndpointDetached(ep, None, now)
            for ep in sorted(self.endpoints)
            if ep not in self.attached
        ]

    # -- endpoints (device_attach / device_detach records) ----------------------------------
    def add_endpoint(self, endpoint: int, info: EndpointInfo) -> list[VirtioEvent]:
        """An endpoint appears behind this device, unattached (bypass or blocked)."""
        if endpoint in self.endpoints:
            raise ValueError(f"endpoint {endpoint} already exists")
        if not 0 <= endpoint <= U32_MAX:
            raise ValueError(f"endpoint {endpoint} does not fit in 32 bits")
        self.endpoints[endpoint] = info
        return [EndpointDetached(endpoint, None, self.bypass_active)]

    def remove_endpoint(self, endpoint: int) -> list[VirtioEvent]:
        """An endpoint leaves (hot-unplug): it is detached first, as DETACH would."""
        if endpoint not in self.endpoints:
            raise ValueError(f"endpoint {endpoint} does not exist")
        out: list[VirtioEvent] = []
        domain = self.attached.pop(endpoint, None)
        if domain is not None:
            dom = self.domains[domain]
            dom.endpoints.discard(endpoint)
            out.append(EndpointDetached(endpoint, domain, bypass=False))
            if not dom.endpoints:
                del self.domains[domain]
                out.append(DomainDestroyed(domain))
        del self.endpoints[endpoint]
        return out

    # -- sans-I/O verbs ---------------------------------------------------------------------
    def receive_request(self, readable: bytes, writable: int | None = None) -> None:
        """Take one request; its events become available from next_event()."""
        if self._pending is not None:
            raise RequestPendingError("complete() the previous request first")
        features = self.features
        decoded = decode(readable, features.vsva_draft, vsva=features.vsva)
        request_type = readable[0] if readable else 0
        self.requests += 1
        self.kind_counts_[request_type] = self.kind_counts_.get(request_type, 0) + 1
        need = self._writable_size(decoded)
        pending = _Pending(request_type, Status.OK, writable if writable is not None else need)
        self._pending = pending
        if isinstance(decoded, Unknown | Malformed) or (
            isinstance(decoded, Probe) and not features.probe
        ):
            pending.status = None  # §3.1: nothing written, used length 0
            pending.reason = _unparsable(decoded)
        elif pending.writable < 4:
            pending.status = None
            pending.reason = (
                f"device-writable part of {pending.writable} bytes has no room for a tail"
            )
        else:
            try:
                self._handle(decoded, pending, bytes(readable))
            except _Refused as exc:
                self._undo(pending)
                pending.status = exc.status
                pending.reason = exc.reason
                self._events.clear()
        self._events.append(Barrier(0))

    def next_event(self) -> VirtioEvent | None:
        """The next event of the current request, or NEED_DATA."""
        events = self._events
        return events.popleft() if events else NEED_DATA

    def events(self) -> list[VirtioEvent]:
        """Drain every pending event at once."""
        out = list(self._events)
        self._events.clear()
        return out

    def complete(self, failure: Status | None = None, reason: str = "") -> Reply:
        """Finish the current request; ``failure`` is the status when the host refused it
        (its state changes are then undone). Returns what the device writes back."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("no request to complete")
        self._pending = None
        self._events.clear()
        if failure is not None and pending.status is Status.OK:
            self._undo(pending)
            pending.status = failure
            pending.reason = reason
            pending.properties = b""
        status = pending.status
        if status is None:
            reply = Reply(pending.request_type, None, b"", pending.reason)
        else:
            body = bytearray(pending.writable - 4)
            body[: len(pending.properties)] = pending.properties
            reply = Reply(pending.request_type, status, bytes(body) + tail(status), pending.reason)
        if reply.status is not Status.OK:
            code = reply.code
            self.error_counts[code] = self.error_counts.get(code, 0) + 1
        return reply

    def kind_counts(self) -> dict[str, int]:
        """Requests seen, keyed ``virtio:NAME`` as the replay report wants."""
        return {f"virtio:{kind_name(t)}": n for t, n in sorted(self.kind_counts_.items())}

    # -- per-request rules -------------------------------------------------------------------
    def _writable_size(self, decoded: Decoded) -> int:
        if isinstance(decoded, Probe):
            return self.probe_size + 4
        return 4

    def _handle(self, decoded: Decoded, pending: _Pending, raw: bytes) -> None:
        if isinstance(decoded, Map):
            self._map(decoded, pending)
        elif isinstance(decoded, Unmap):
            self._unmap(decoded, pending)
        elif isinstance(decoded, Attach):
            self._attach(decoded, pending)
        elif isinstance(decoded, Detach):
            self._detach(decoded, pending)
        elif isinstance(decoded, Probe):
            self._probe(decoded, pending)
        elif isinstance(decoded, AttachTable):
            self._attach_table(decoded, pending)
        else:
            assert isinstance(decoded, InvalidateA | InvalidateB | InvalidateC)
            self._invalidate(decoded, raw)

    # ATTACH (§2.2, §3.2) -------------------------------------------------------------------
    def _attach(self, req: Attach, pending: _Pending) -> None:
        if req.reserved:
            raise _refuse(Status.INVAL, "ATTACH reserved bytes are not zero")
        allowed = int(AttachFlag.BYPASS) if self.features.bypass_config else 0
        if req.flags & ~allowed:
            raise _refuse(Status.INVAL, f"ATTACH flags 0x{req.flags:x}: unknown bits")
        bypass = bool(req.flags & AttachFlag.BYPASS)
        kind = DomainKind.BYPASS if bypass else DomainKind.MAPPING
        self._join(req.domain, req.endpoint, kind, None, pending)

    def _join(
        self,
        domain_id: int,
        endpoint: int,
        kind: DomainKind,
        table: TableConfig | None,
        pending: _Pending,
    ) -> None:
        """ATTACH / ATTACH_TABLE after their own field checks: existence, kind, range."""
        info = self.endpoints.get(endpoint)
        if info is None:
            raise _refuse(Status.NOENT, f"endpoint {endpoint} does not exist")
        domain = self.domains.get(domain_id)
        current = self.attached.get(endpoint)
        policy = self.policy
        if current == domain_id and policy.attach_same_domain is AttachSameDomain.REATTACH:
            # QEMU: detach first (a sole-endpoint domain dies with its mappings), then attach
            self._leave(endpoint, pending, bypass=False, emit=True)
            domain = self.domains.get(domain_id)
            current = None
        if domain is not None:
            self._check_kind(domain, kind, table)
        else:
            if policy.check_domain_range and not (
                self.domain_range[0] <= domain_id <= self.domain_range[1]
            ):
                raise _refuse(Status.RANGE, f"domain {domain_id} is outside domain_range")
            if len(self.domains) >= policy.max_domains:
                raise _refuse(Status.NOMEM, "too many domains")
        walked = table if table is not None else domain.table if domain is not None else None
        if walked is not None:
            members = {endpoint} | (domain.endpoints if domain is not None else set())
            for member in sorted(members):
                member_info = self.endpoints[member]
                if member_info.host and walked.model not in member_info.table_models:
                    raise _refuse(
                        Status.UNSUPP, f"endpoint {member} cannot walk this {walked.model} table"
                    )
        if domain is not None and current != domain_id:
            self._check_compatible(domain, info, endpoint)
        if domain is not None and table is not None and domain.kind is DomainKind.MAPPING:
            self._convert_to_table(domain, table, pending)
        if current == domain_id:
            return  # already attached to it: nothing changes (spec reading)
        if domain is None:
            domain = Domain(domain_id, kind, table=table)
            self.domains[domain_id] = domain
            pending.undo.append(lambda: self._forget(domain_id))
            self._events.append(DomainCreated(domain_id, kind, table))
        self._move(endpoint, domain, current, pending)

    def _check_kind(self, domain: Domain, kind: DomainKind, table: TableConfig | None) -> None:
        if (domain.kind is DomainKind.BYPASS) != (kind is DomainKind.BYPASS):
            raise _refuse(Status.INVAL, "ATTACH_F_BYPASS disagrees with the existing domain")
        if kind is DomainKind.TABLE:
            if domain.kind is DomainKind.MAPPING and domain.mappings:
                raise _refuse(Status.INVAL, "the domain has mappings: it cannot take a table")
            if domain.kind is DomainKind.TABLE and domain.table != table:
                raise _refuse(Status.INVAL, "the domain already has a different table")

    def _convert_to_table(self, domain: Domain, table: TableConfig, pending: _Pending) -> None:
        def undo() -> None:
            domain.kind, domain.table = DomainKind.MAPPING, None

        domain.kind, domain.table = DomainKind.TABLE, table
        pending.undo.append(undo)
        self._events.append(TableAttached(domain.id, table))

    def _check_compatible(self, domain: Domain, info: EndpointInfo, endpoint: int) -> None:
        """§3.2 ATTACH rule 7: the endpoint's reserved regions must not hold mappings."""
        for region in info.resv:
            if domain.mappings.overlaps(region.start, region.end):
                raise _refuse(
                    Status.UNSUPP,
                    f"domain {domain.id} maps inside a reserved region of endpoint {endpoint}",
                )

    def _move(self, endpoint: int, domain: Domain, current: int | None, pending: _Pending) -> None:
        domain.endpoints.add(endpoint)
        self.attached[endpoint] = domain.id
        destroyed: Domain | None = None
        if current is not None:
            old = self.domains[current]
            old.endpoints.discard(endpoint)
            if not old.endpoints:
                destroyed = self.domains.pop(current)

        def undo() -> None:
            domain.endpoints.discard(endpoint)
            if current is None:
                self.attached.pop(endpoint, None)
                return
            self.attached[endpoint] = current
            if destroyed is not None:
                self.domains[current] = destroyed
            self.domains[current].endpoints.add(endpoint)

        pending.undo.append(undo)
        self._events.append(EndpointAttached(endpoint, domain.id, current))
        if destroyed is not None:
            self._events.append(DomainDestroyed(destroyed.id))

    def _leave(self, endpoint: int, pending: _Pending, *, bypass: bool, emit: bool) -> None:
        domain_id = self.attached.pop(endpoint)
        domain = self.domains[domain_id]
        domain.endpoints.discard(endpoint)
        gone = not domain.endpoints
        if gone:
            del self.domains[domain_id]

        def undo() -> None:
            self.attached[endpoint] = domain_id
            self.domains[domain_id] = domain
            domain.endpoints.add(endpoint)

        pending.undo.append(undo)
        if emit:
            self._events.append(EndpointDetached(endpoint, domain_id, bypass))
        if gone:
            self._events.append(DomainDestroyed(domain_id))

    # DETACH (§2.3) -----------------------------------------------------------------------
    def _detach(self, req: Detach, pending: _Pending) -> None:
        # reserved bytes MUST be ignored: the decoder does not even read them
        if req.endpoint not in self.endpoints:
            raise _refuse(Status.NOENT, f"endpoint {req.endpoint} does not exist")
        if self.attached.get(req.endpoint) != req.domain:
            raise _refuse(
                Status.INVAL, f"endpoint {req.endpoint} is not attached to domain {req.domain}"
            )
        self._leave(req.endpoint, pending, bypass=self.bypass_active, emit=True)

    # MAP (§2.4) --------------------------------------------------------------------------
    def _map(self, req: Map, pending: _Pending) -> None:
        allowed = MAP_FLAGS_MASK if self.features.mmio else int(MapFlag.READ | MapFlag.WRITE)
        if req.flags & ~allowed:
            raise _refuse(Status.INVAL, f"MAP flags 0x{req.flags:x}: unknown bits")
        domain = self._mapping_domain(req.domain)
        start, end, phys = req.virt_start, req.virt_end, req.phys_start
        if end < start:
            raise _refuse(Status.RANGE, "MAP virt_end is below virt_start")
        granule = self.granule
        if start % granule or phys % granule or (end + 1) % granule:
            raise _refuse(Status.RANGE, f"MAP is not aligned to the {granule:#x}-byte granule")
        if start < self.input_range[0] or end > self.input_range[1]:
            raise _refuse(Status.RANGE, "MAP is outside input_range")
        if phys + (end - start) > U64_MAX:
            raise _refuse(Status.RANGE, "MAP phys_start + size overflows")
        for endpoint in sorted(domain.endpoints):
            for region in self.endpoints[endpoint].resv:
                if region.start <= end and start <= region.end:
                    raise _refuse(
                        Status.INVAL,
                        f"MAP overlaps a reserved region of endpoint {endpoint} "
                        f"[{region.start:#x}, {region.end:#x}]",
                    )
        mapping = Mapping(start, end, phys, req.flags)
        if len(domain.mappings) >= self.policy.max_mappings:
            if domain.mappings.overlaps(start, end):
                raise _refuse(Status.INVAL, "MAP overlaps an existing mapping")
            raise _refuse(Status.NOMEM, "too many mappings in the domain")
        if not domain.mappings.add(mapping):
            raise _refuse(Status.INVAL, "MAP overlaps an existing mapping")
        pending.undo.append(lambda: domain.mappings.discard(mapping))
        self._events.append(Mapped(domain.id, mapping))

    def _mapping_domain(self, domain_id: int) -> Domain:
        domain = self.domains.get(domain_id)
        if domain is None:
            raise _refuse(Status.NOENT, f"domain {domain_id} does not exist")
        if domain.kind is DomainKind.BYPASS:
            raise _refuse(Status.INVAL, f"domain {domain_id} is a bypass domain")
        if domain.kind is DomainKind.TABLE:
            raise _refuse(Status.INVAL, f"domain {domain_id} translates with a guest table")
        return domain

    # UNMAP (§2.5) ------------------------------------------------------------------------
    def _unmap(self, req: Unmap, pending: _Pending) -> None:
        if req.reserved and self.policy.unmap_reserved_inval:
            raise _refuse(Status.INVAL, "UNMAP reserved bytes are not zero")
        domain = self._mapping_domain(req.domain)
        if req.virt_end < req.virt_start:
            raise _refuse(Status.RANGE, "UNMAP virt_end is below virt_start")
        try:
            removed = domain.mappings.remove_range(req.virt_start, req.virt_end)
        except SplitError as exc:
            raise _refuse(Status.RANGE, f"UNMAP: mapping {exc}") from None
        if not removed:
            return

        def undo() -> None:
            for mapping in removed:
                domain.mappings.add(mapping)

        pending.undo.append(undo)
        self._events.append(Unmapped(domain.id, tuple(removed)))

    # PROBE (§2.6) ------------------------------------------------------------------------
    def _probe(self, req: Probe, pending: _Pending) -> None:
        info = self.endpoints.get(req.endpoint)
        if info is None:
            raise _refuse(Status.NOENT, f"endpoint {req.endpoint} does not exist")
        if pending.writable < self.probe_size + 4:
            raise _refuse(Status.INVAL, "the properties area is smaller than probe_size")
        area = self.probe_properties(info)
        if len(area) > self.probe_size:
            raise _refuse(Status.DEVERR, "the endpoint's properties do not fit in probe_size")
        pending.properties = area

    def probe_properties(self, info: EndpointInfo) -> bytes:
        """The properties an endpoint's PROBE returns, without the zero padding."""
        out = [
            build_resv_mem(region.subtype, region.start, region.end)
            for region in sorted(info.resv, key=lambda r: (r.start, r.end))
        ]
        features = self.features
        if features.vsva and features.vsva_draft in ("A", "B") and info.host:
            # drafts A/B advertise the table formats an endpoint accepts (§5.2)
            for model in sorted(info.table_models):
                ptype, fmt = _FORMAT_PROPERTY[model]
                out.append(
                    ptype.to_bytes(2, "little")
                    + (4).to_bytes(2, "little")
                    + fmt.to_bytes(2, "little")
                    + bytes(2)
                )
        return b"".join(out)

    # ATTACH_TABLE (§5) -------------------------------------------------------------------
    def _attach_table(self, req: AttachTable, pending: _Pending) -> None:
        table = self._table_config(req)
        self._join(req.domain, req.endpoint, DomainKind.TABLE, table, pending)

    def _table_config(self, req: AttachTable) -> TableConfig:
        """Field checks of an ATTACH_TABLE descriptor (§5.5): INVAL, or UNSUPP for a format
        no host IOMMU model of this daemon can walk."""
        t = req.table
        if isinstance(t, OpaqueTable):
            raise _refuse(Status.INVAL, f"unknown table format {req.format}")
        if isinstance(t, ArmPgtTable):
            if any(t.reserved):
                raise _refuse(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
            raise _refuse(Status.UNSUPP, "single Arm LPAE page tables cannot be nested by iommufd")
        if isinstance(t, ArmPstTable):
            if any(t.reserved):
                raise _refuse(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
            if t.s1fmt > 2 or t.s1dss > 2 or t.s1cdmax > 20:
                raise _refuse(Status.INVAL, "invalid PASID-table format fields")
            if t.s1contextptr & ~STE0_S1CTXPTR_MASK:
                raise _refuse(Status.INVAL, "s1contextptr is not a 64-byte aligned 52-bit address")
            ste0 = STE0_V | STE0_CFG_S1_TRANS | t.s1fmt << 4 | t.s1contextptr | t.s1cdmax << 59
            return TableConfig(ARM_SMMUV3, ste0, STE1_LINUX_CACHEABILITY | t.s1dss)
        if isinstance(t, ArmSteTable):
            if any(t.reserved0) or any(t.reserved):
                raise _refuse(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
            if not t.ste0 & STE0_V or (t.ste0 >> 1) & 0x7 != 0b101:
                raise _refuse(Status.INVAL, "the STE is not a valid stage-1 translate STE")
            return TableConfig(ARM_SMMUV3, t.ste0, t.ste1, raw_ste=True)
        assert isinstance(t, VtdTable)
        if t.reserved0 not in (0, bytes(3)) or any(t.reserved):
            raise _refuse(Status.INVAL, "ATTACH_TABLE reserved bytes are not zero")
        if (
            t.vtd_flags & ~VTD_S1_FLAGS
            or t.addr_width not in VTD_ADDR_WIDTHS
            or t.pgtbl_addr & 0xFFF
        ):
            raise _refuse(Status.INVAL, "invalid VT-d table fields")
        return TableConfig(
            INTEL_VTD, vtd_flags=t.vtd_flags, pgtbl_addr=t.pgtbl_addr, addr_width=t.addr_width
        )

    # INVALIDATE (§5) ---------------------------------------------------------------------
    def _invalidate(self, req: InvalidateA | InvalidateB | InvalidateC, raw: bytes) -> None:
        spec = replace(_normalise(req), raw=raw)
        domain = self.domains.get(spec.domain)
        if domain is None:
            raise _refuse(Status.NOENT, f"domain {spec.domain} does not exist")
        if domain.kind is not DomainKind.TABLE:
            raise _refuse(Status.INVAL, f"domain {spec.domain} has no guest table to invalidate")
        if spec.scope is Scope.RANGE and spec.addr + spec.size - 1 > U64_MAX:
            raise _refuse(Status.RANGE, "the invalidation range overflows")
        assert domain.table is not None
        for inv in _split_by_tag(spec, domain.table):
            self._events.append(TableInvalidation(domain.id, inv))

    # -- faults (§4) ---------------------------------------------------------------------
    def access(self, endpoint: int, addr: int, *, write: bool) -> int | tuple[FaultReason, int]:
        """What a DMA access of ``endpoint`` at ``addr`` does: the output address, or
        ``(reason, flags)`` of the fault it raises (QEMU's emitter rules, §4)."""
        info = self.endpoints.get(endpoint)
        if info is None:
            if self.bypass_active:
                return addr
            return FaultReason.UNKNOWN, int(FaultFlag.ADDRESS)
        for region in info.resv:
            if region.start <= addr <= region.end:
                if region.subtype == ResvMemSubtype.MSI:
                    return addr  # the doorbell: reaches the interrupt controller
                return FaultReason.MAPPING, int(FaultFlag.ADDRESS | _access_flag(write))
        domain_id = self.attached.get(endpoint)
        if domain_id is None:
            if self.bypass_active:
                return addr
            return FaultReason.DOMAIN, int(FaultFlag.ADDRESS)
        domain = self.domains[domain_id]
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
        self,
        endpoint: int,
        address: int | None,
        *,
        read: bool = False,
        write: bool = False,
        pasid: int | None = None,
        translation: bool = True,
    ) -> bytes:
        """The 24-byte ``virtio_iommu_fault`` for a fault the host reported (§4)."""
        flags = 0
        reason = FaultReason.UNKNOWN
        if translation and address is not None:
            result = self.access(endpoint, address, write=write and not read)
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
        if pasid is not None and self.features.vsva:
            flags |= FaultFlag.PASID
            pasid_field = pasid
        return build_fault(reason, flags, endpoint, address or 0, pasid_field)

    # -- helpers ---------------------------------------------------------------------------
    def _forget(self, domain_id: int) -> None:
        self.domains.pop(domain_id, None)

    def _undo(self, pending: _Pending) -> None:
        while pending.undo:
            pending.undo.pop()()


_FORMAT_PROPERTY: dict[str, tuple[int, int]] = {
    ARM_SMMUV3: (ProbeType.PASID_TABLE_FMT, 2),  # PSTF_ARM_SV3
    INTEL_VTD: (ProbeType.PAGE_TABLE_FMT, 4),  # the Intel fork's VT-d format
}


def _access_flag(write: bool) -> FaultFlag:
    return FaultFlag.WRITE if write else FaultFlag.READ


def _unparsable(decoded: Decoded) -> str:
    if isinstance(decoded, Unknown):
        return f"unknown request type {decoded.type}: nothing written"
    if isinstance(decoded, Malformed):
        return (
            f"request type {decoded.type}: {decoded.length} readable bytes, "
            f"{decoded.expected} expected: nothing written"
        )
    return "PROBE without F_PROBE: nothing written"


# -- INVALIDATE normalisation (the three drafts into one shape) ------------------------------


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
    raise _refuse(Status.INVAL, f"invalid invalidation scope 0x{value:x}")


def _range(scope: Scope, start: int, nr_pages: int, log2: int) -> tuple[int, int, int]:
    if scope is not Scope.RANGE:
        return 0, 0, 0
    if not nr_pages or log2 > 63 or log2 < 12:
        raise _refuse(Status.INVAL, "invalid invalidation range (nr_pages / granule)")
    granule = 1 << log2
    if start % granule:
        raise _refuse(Status.INVAL, "invalidation address not aligned to its granule")
    size = nr_pages * granule
    if start + size - 1 > U64_MAX:
        raise _refuse(Status.RANGE, "the invalidation range overflows")
    return start, size, granule


def _normalise(req: InvalidateA | InvalidateB | InvalidateC) -> _InvSpec:
    """One draft's INVALIDATE fields -> scope, caches, tags and range (INVAL on bad bits)."""
    if isinstance(req, InvalidateA):
        if any(req.reserved) or req.flags & ~(INV_A_F_CONFIG | INV_A_F_LEAF):
            raise _refuse(Status.INVAL, "INVALIDATE reserved bits set")
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
            raise _refuse(Status.INVAL, "INVALIDATE reserved or unknown bits set")
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
            raise _refuse(Status.INVAL, "a PASID invalidation names neither PASID nor ARCHID")
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
        raise _refuse(Status.INVAL, "INVALIDATE reserved or unknown bits set")
    scopes = {
        INV_C_SCOPE_DOMAIN: Scope.ALL,
        INV_C_SCOPE_PASID: Scope.ASID,
        INV_C_SCOPE_ADDRESS: Scope.RANGE,
    }
    scope_c = scopes.get(req.scope)
    if scope_c is None:
        raise _refuse(Status.INVAL, f"invalid invalidation scope {req.scope}")
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
        raise _refuse(Status.RANGE, f"PASID {pasid} exceeds 20 bits")

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
    if table.model == INTEL_VTD:
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
