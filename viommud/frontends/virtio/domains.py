"""Endpoints and domains as the guest sees them, and the requests that move endpoints
between domains: ATTACH (virtio-iommu.md §2.2), DETACH (§2.3) and ATTACH_TABLE (§5).

``DomainState`` holds the endpoints behind the device, the domains and which domain each
endpoint is attached to. Every change a request makes records its undo in the request's
``Pending`` and appends the host's work to ``events``; a failed check raises ``Refused``
before anything changed (the §3.2 order: existence, kind, range, caps).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocols.virtio_iommu import AttachFlag, Status
from viommud.frontends.compat import QEMU
from viommud.frontends.virtio.options import AttachSameDomain, DevicePolicy, EndpointInfo
from viommud.frontends.virtio.request import Pending, Refused
from viommud.guest.virtio import Attach, Detach
from viommud.mappings import MappingStore
from viommud.virtio_state import (
    DomainCreated,
    DomainDestroyed,
    DomainKind,
    DomainView,
    EndpointAttached,
    EndpointDetached,
    GuestView,
    TableAttached,
    TableConfig,
    VirtioEvent,
)

__all__ = ["Domain", "DomainState"]

U32_MAX = (1 << 32) - 1
_ATTACH_F_BYPASS = int(AttachFlag.BYPASS)


@dataclass(slots=True)
class Domain:
    id: int
    kind: DomainKind
    endpoints: set[int] = field(default_factory=set)
    mappings: MappingStore = field(default_factory=MappingStore)
    table: TableConfig | None = None


@dataclass(slots=True)
class DomainState:
    """The device's endpoints and domains; ``events`` is the frontend's event queue."""

    policy: DevicePolicy
    domain_range: tuple[int, int]
    events: deque[VirtioEvent]
    endpoints: dict[int, EndpointInfo] = field(default_factory=dict)
    domains: dict[int, Domain] = field(default_factory=dict)
    attached: dict[int, int] = field(default_factory=dict)  # endpoint -> domain

    def view(self, bypass: bool) -> GuestView:
        """A snapshot for the host side's re-sync (the stores themselves, not copies)."""
        return GuestView(
            {d.id: DomainView(d.kind, d.table, d.mappings) for d in self.domains.values()},
            dict(self.attached),
            bypass,
        )

    # -- endpoints (device_attach / device_detach records) and resets (§1.2) -----------------
    def add_endpoint(self, endpoint: int, info: EndpointInfo, bypass: bool) -> list[VirtioEvent]:
        """An endpoint appears behind this device, unattached (bypass or blocked)."""
        if endpoint in self.endpoints:
            raise ValueError(f"endpoint {endpoint} already exists")
        if not 0 <= endpoint <= U32_MAX:
            raise ValueError(f"endpoint {endpoint} does not fit in 32 bits")
        self.endpoints[endpoint] = info
        return [EndpointDetached(endpoint, None, bypass)]

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

    def reset(self, bypass: bool) -> list[VirtioEvent]:
        """Device reset: no endpoint is attached to any domain."""
        out: list[VirtioEvent] = []
        for endpoint in sorted(self.attached):
            domain = self.attached.pop(endpoint)
            self.domains[domain].endpoints.discard(endpoint)
            out.append(EndpointDetached(endpoint, domain, bypass))
        for domain in sorted(self.domains):
            out.append(DomainDestroyed(domain))
        self.domains.clear()
        return out

    def unattached_moved(self, bypass: bool) -> list[VirtioEvent]:
        """Unattached endpoints changed between bypass and blocked (§1.3)."""
        return [
            EndpointDetached(ep, None, bypass)
            for ep in sorted(self.endpoints)
            if ep not in self.attached
        ]

    # -- ATTACH / ATTACH_TABLE (§2.2, §3.2, §5) ------------------------------------------------
    def attach(self, req: Attach, pending: Pending, *, bypass_config: bool) -> None:
        """ATTACH: reserved and flags (INVAL; ATTACH_F_BYPASS only with F_BYPASS_CONFIG)."""
        qemu = self.policy.compat == QEMU  # QEMU: reserved unread, BYPASS always known
        if req.reserved and not qemu:
            raise Refused(Status.INVAL, "ATTACH reserved bytes are not zero")
        allowed = _ATTACH_F_BYPASS if bypass_config or qemu else 0
        if req.flags & ~allowed:
            raise Refused(Status.INVAL, f"ATTACH flags 0x{req.flags:x}: unknown bits")
        kind = DomainKind.BYPASS if req.flags & _ATTACH_F_BYPASS else DomainKind.MAPPING
        self.join(req.domain, req.endpoint, kind, None, pending)

    def join(
        self,
        domain_id: int,
        endpoint: int,
        kind: DomainKind,
        table: TableConfig | None,
        pending: Pending,
    ) -> None:
        """ATTACH / ATTACH_TABLE after their own field checks: existence, kind, range."""
        info = self.endpoints.get(endpoint)
        if info is None:
            raise Refused(Status.NOENT, f"endpoint {endpoint} does not exist")
        domain = self.domains.get(domain_id)
        current = self.attached.get(endpoint)
        policy = self.policy
        if current == domain_id and policy.attach_same_domain is AttachSameDomain.REATTACH:
            # QEMU: detach first (a sole-endpoint domain dies with its mappings), then attach
            self.leave(endpoint, pending, bypass=False)
            domain = self.domains.get(domain_id)
            current = None
        if domain is not None:
            self._check_kind(domain, kind, table)
        else:
            if policy.check_domain_range and not (
                self.domain_range[0] <= domain_id <= self.domain_range[1]
            ):
                raise Refused(Status.RANGE, f"domain {domain_id} is outside domain_range")
            if len(self.domains) >= policy.max_domains:
                raise Refused(Status.NOMEM, "too many domains")
        walked = table if table is not None else domain.table if domain is not None else None
        if walked is not None:
            members = {endpoint} | (domain.endpoints if domain is not None else set())
            for member in sorted(members):
                member_info = self.endpoints[member]
                if member_info.host and walked.model not in member_info.table_models:
                    raise Refused(
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
            self.events.append(DomainCreated(domain_id, kind, table))
        self._move(endpoint, domain, current, pending)

    def _check_kind(self, domain: Domain, kind: DomainKind, table: TableConfig | None) -> None:
        if (domain.kind is DomainKind.BYPASS) != (kind is DomainKind.BYPASS):
            raise Refused(Status.INVAL, "ATTACH_F_BYPASS disagrees with the existing domain")
        if kind is DomainKind.TABLE:
            if domain.kind is DomainKind.MAPPING and domain.mappings:
                raise Refused(Status.INVAL, "the domain has mappings: it cannot take a table")
            if domain.kind is DomainKind.TABLE and domain.table != table:
                raise Refused(Status.INVAL, "the domain already has a different table")

    def _convert_to_table(self, domain: Domain, table: TableConfig, pending: Pending) -> None:
        def undo() -> None:
            domain.kind, domain.table = DomainKind.MAPPING, None

        domain.kind, domain.table = DomainKind.TABLE, table
        pending.undo.append(undo)
        self.events.append(TableAttached(domain.id, table))

    def _check_compatible(self, domain: Domain, info: EndpointInfo, endpoint: int) -> None:
        """§3.2 ATTACH rule 7: the endpoint's reserved regions must not hold mappings."""
        for region in info.resv:
            if domain.mappings.overlaps(region.start, region.end):
                raise Refused(
                    Status.UNSUPP,
                    f"domain {domain.id} maps inside a reserved region of endpoint {endpoint}",
                )

    def _move(self, endpoint: int, domain: Domain, current: int | None, pending: Pending) -> None:
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
        self.events.append(EndpointAttached(endpoint, domain.id, current, domain.mappings))
        if destroyed is not None:
            self.events.append(DomainDestroyed(destroyed.id))

    def _forget(self, domain_id: int) -> None:
        self.domains.pop(domain_id, None)

    # -- DETACH (§2.3) -------------------------------------------------------------------------
    def detach(self, req: Detach, pending: Pending, *, bypass: bool) -> None:
        """DETACH; ``bypass``: whether the endpoint, now unattached, is in bypass (§1.3)."""
        # reserved bytes MUST be ignored: the decoder does not even read them
        if req.endpoint not in self.endpoints:
            raise Refused(Status.NOENT, f"endpoint {req.endpoint} does not exist")
        if self.attached.get(req.endpoint) != req.domain:
            raise Refused(
                Status.INVAL, f"endpoint {req.endpoint} is not attached to domain {req.domain}"
            )
        self.leave(req.endpoint, pending, bypass=bypass)

    def leave(self, endpoint: int, pending: Pending, *, bypass: bool) -> None:
        """``endpoint`` leaves its domain, which dies with its last endpoint."""
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
        self.events.append(EndpointDetached(endpoint, domain_id, bypass))
        if gone:
            self.events.append(DomainDestroyed(domain_id))

    # -- lookups ----------------------------------------------------------------------------
    def mapping_domain(self, domain_id: int) -> Domain:
        """The MAP/UNMAP domain ``domain_id`` (NOENT, or INVAL for another kind)."""
        domain = self.domains.get(domain_id)
        if domain is None:
            raise Refused(Status.NOENT, f"domain {domain_id} does not exist")
        if domain.kind is DomainKind.BYPASS:
            raise Refused(Status.INVAL, f"domain {domain_id} is a bypass domain")
        if domain.kind is DomainKind.TABLE:
            raise Refused(Status.INVAL, f"domain {domain_id} translates with a guest table")
        return domain
