"""The virtio-iommu request queue: a sans-I/O state machine (h11 style).

``receive_request(readable, writable=None)`` takes one request (the device-readable part of
one descriptor chain, and the size of its device-writable part: by default exactly what the
type needs, as a Linux driver provides). When the request passes every guest-visible check,
its effects are applied to the frontend's state and ``next_event()`` / ``events()`` return
what the host side must do (``viommud.virtio_state``), ending with a ``Barrier``. The I/O
layer carries them out and calls ``complete(failure)``: with ``None`` the request stands;
with a status (the host refused), every state change of the request is undone and that
status is the reply. A request that fails a check yields no event but the ``Barrier``;
``complete`` then answers with its status. The frontend never calls a backend and never logs.

Guest-visible rules: virtio-iommu.md §3 (the specification's MUST/SHOULD list), checked in
the order the reference suggests (§6.3): parse/length (used length 0) -> reserved and flags
(INVAL) -> object existence (NOENT) -> bypass / domain kind (INVAL) -> range, alignment,
input and domain range (RANGE) -> reserved-region overlap (INVAL) -> mapping overlap (INVAL)
-> resource caps (NOMEM). Where the reference implementations disagree the specification's
reading is the default and the other reading is a ``DevicePolicy`` switch; docs/virtio-iommu.md
lists every choice.

The requests are handled by one module each: ``domains`` (ATTACH, DETACH and the endpoint
and domain state), ``maps`` (MAP, UNMAP), ``tables`` (ATTACH_TABLE descriptors),
``invalidate`` (INVALIDATE), ``probe`` (PROBE); ``faults`` builds fault records (§4).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Final

from protocols.virtio_iommu import (
    CONFIG_BYPASS_OFFSET,
    TAIL_SIZE,
    FaultReason,
    RequestType,
    Status,
    build_config,
)
from viommud.events import Barrier
from viommud.frontends.compat import QEMU
from viommud.frontends.virtio.domains import Domain, DomainState
from viommud.frontends.virtio.faults import access, fault_record
from viommud.frontends.virtio.invalidate import table_invalidations
from viommud.frontends.virtio.maps import MapRules, map_fields, unmap_fields
from viommud.frontends.virtio.options import DevicePolicy, EndpointInfo, VirtioFeatures
from viommud.frontends.virtio.probe import probe_properties
from viommud.frontends.virtio.request import Pending, Refused, Reply, RequestPendingError
from viommud.frontends.virtio.tables import table_config
from viommud.guest.virtio import (
    MAP_SIZE,
    UNMAP_SIZE,
    Attach,
    AttachTable,
    Decoded,
    Detach,
    Malformed,
    Map,
    Probe,
    Unknown,
    Unmap,
    decode,
    kind_name,
    request_type_of,
    tail,
    unpack_map,
    unpack_unmap,
)
from viommud.virtio_state import DomainKind, GuestView, VirtioEvent

__all__ = ["NEED_DATA", "VirtioIommuFrontend"]

NEED_DATA: Final = None
U64_MAX: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1
_BARRIER: Final = Barrier(0)  # every request is one completion (§2.1)
_MAP: Final = int(RequestType.MAP)
_UNMAP: Final = int(RequestType.UNMAP)
_MAP_SIZES: Final = frozenset((MAP_SIZE, UNMAP_SIZE))


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
    kind_counts_: dict[int, int] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    state: DomainState = field(init=False)  # endpoints, domains, attachments
    _rules: MapRules = field(init=False)
    _events: deque[VirtioEvent] = field(default_factory=deque)
    _pending: Pending | None = None

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
        self.state = DomainState(self.policy, self.domain_range, self._events)
        self._rules = MapRules.of(self.page_size_mask, self.input_range, self.features, self.policy)

    # -- guest-visible state (read only: the I/O layer changes it through requests) ---------
    @property
    def endpoints(self) -> dict[int, EndpointInfo]:
        return self.state.endpoints

    @property
    def domains(self) -> dict[int, Domain]:
        return self.state.domains

    @property
    def attached(self) -> dict[int, int]:
        """endpoint -> the domain it is attached to."""
        return self.state.attached

    def has_endpoint(self, endpoint: int) -> bool:
        return endpoint in self.state.endpoints

    def guest_view(self) -> GuestView:
        """What the host side must match (after the host refused a request)."""
        return self.state.view(self.bypass_active)

    # -- configuration space (§1.2) -------------------------------------------------------
    @property
    def granule(self) -> int:
        return self._rules.granule

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
        if offset != CONFIG_BYPASS_OFFSET or len(data) != 1:
            raise ValueError(f"config offset {offset} (+{len(data)}) is read-only")
        if data[0] not in (0, 1):
            raise ValueError(f"bypass must be 0 or 1, not {data[0]}")
        before = self.bypass_active
        self.bypass = data[0]
        return self._unattached_moved(before)

    def reset(self) -> list[VirtioEvent]:
        """Device reset: no endpoint is attached to any domain; ``bypass`` is kept (§1.2)."""
        return self.state.reset(self.bypass_active)

    def system_reset(self) -> list[VirtioEvent]:
        """System reset: as device reset, and ``bypass`` returns to its boot value."""
        out = self.reset()
        before = self.bypass_active
        self.bypass = self.boot_bypass
        return out + self._unattached_moved(before)

    def _unattached_moved(self, before: bool) -> list[VirtioEvent]:
        now = self.bypass_active
        return [] if now == before else self.state.unattached_moved(now)

    # -- endpoints (device_attach / device_detach records) ----------------------------------
    def add_endpoint(self, endpoint: int, info: EndpointInfo) -> list[VirtioEvent]:
        """An endpoint appears behind this device, unattached (bypass or blocked)."""
        return self.state.add_endpoint(endpoint, info, self.bypass_active)

    def remove_endpoint(self, endpoint: int) -> list[VirtioEvent]:
        """An endpoint leaves (hot-unplug): it is detached first, as DETACH would."""
        return self.state.remove_endpoint(endpoint)

    # -- sans-I/O verbs ---------------------------------------------------------------------
    def receive_request(self, readable: bytes, writable: int | None = None) -> None:
        """Take one request; its events become available from next_event()."""
        if self._pending is not None:
            raise RequestPendingError("complete() the previous request first")
        size = len(readable)
        if size in _MAP_SIZES and (writable is None or writable >= TAIL_SIZE):
            request_type = readable[0]
            if (request_type == _MAP and size == MAP_SIZE) or (
                request_type == _UNMAP and size == UNMAP_SIZE
            ):
                self._receive_map(request_type, readable, writable)
                return
        self._receive(readable, writable)

    def _receive_map(self, request_type: int, readable: bytes, writable: int | None) -> None:
        """``_receive`` of a well-formed MAP or UNMAP with room for the tail, without the
        decoded value and the type dispatch (the same checks, state and events: held to
        ``_receive`` by tests/frontends/test_virtio_fast_path.py)."""
        self.requests += 1
        counts = self.kind_counts_
        counts[request_type] = counts.get(request_type, 0) + 1
        pending = Pending(request_type, Status.OK, TAIL_SIZE if writable is None else writable)
        self._pending = pending
        try:
            if request_type == _MAP:
                map_fields(self.state, self._rules, pending, unpack_map(readable))
            else:
                unmap_fields(self.state, self._rules, pending, unpack_unmap(readable))
        except Refused as exc:
            pending.refuse(exc)
            self._events.clear()
        self._events.append(_BARRIER)

    def _receive(self, readable: bytes, writable: int | None) -> None:
        """Any request (the general path)."""
        features = self.features
        decoded = decode(readable, features.vsva_draft, vsva=features.vsva)
        qemu = self.policy.compat == QEMU
        if qemu and isinstance(decoded, Malformed) and decoded.length > decoded.expected:
            # QEMU copies the type's bytes (virtio_iommu_iov_to_req) and ignores the rest
            decoded = decode(readable[: decoded.expected], features.vsva_draft, vsva=features.vsva)
        request_type = request_type_of(readable)
        self.requests += 1
        self.kind_counts_[request_type] = self.kind_counts_.get(request_type, 0) + 1
        need = self.probe_size + TAIL_SIZE if isinstance(decoded, Probe) else TAIL_SIZE
        pending = Pending(request_type, Status.OK, writable if writable is not None else need)
        self._pending = pending
        if qemu and isinstance(decoded, Unknown | Malformed) and len(readable) >= TAIL_SIZE:
            # QEMU writes a status: UNSUPP for an unknown type, INVAL for a short request
            self._qemu_unparsable(decoded, pending)
        elif isinstance(decoded, Unknown | Malformed) or (
            isinstance(decoded, Probe) and not features.probe and not qemu
        ):
            pending.status = None  # §3.1: nothing written, used length 0
            pending.reason = _unparsable(decoded)
        elif pending.writable < TAIL_SIZE:
            pending.status = None
            pending.reason = (
                f"device-writable part of {pending.writable} bytes has no room for a tail"
            )
        else:
            try:
                self._handle(decoded, pending, readable)
            except Refused as exc:
                pending.refuse(exc)
                self._events.clear()
        self._events.append(_BARRIER)

    def _qemu_unparsable(self, decoded: Unknown | Malformed, pending: Pending) -> None:
        if pending.writable < TAIL_SIZE:
            pending.status = None
            pending.reason = "device-writable part has no room for a tail"
        elif isinstance(decoded, Unknown):
            pending.status = Status.UNSUPP
            pending.reason = f"unknown request type {decoded.type} (QEMU: UNSUPP)"
        else:
            pending.status = Status.INVAL
            pending.reason = (
                f"request type {decoded.type}: {decoded.length} readable bytes, "
                f"{decoded.expected} expected (QEMU: INVAL)"
            )

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
            pending.rollback()
            pending.status = failure
            pending.reason = reason
            pending.properties = b""
        status = pending.status
        if status is None:
            reply = Reply(pending.request_type, None, b"", pending.reason)
        elif pending.writable == TAIL_SIZE and not pending.properties:
            reply = Reply(pending.request_type, status, tail(status), pending.reason)
        else:
            body = bytearray(pending.writable - TAIL_SIZE)
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
    def _handle(self, decoded: Decoded, pending: Pending, raw: bytes) -> None:
        if isinstance(decoded, Map):
            phys, flags = decoded.phys_start, decoded.flags
            fields = (_MAP, decoded.domain, decoded.virt_start, decoded.virt_end, phys, flags)
            map_fields(self.state, self._rules, pending, fields)
        elif isinstance(decoded, Unmap):
            start, end, reserved = decoded.virt_start, decoded.virt_end, decoded.reserved
            unmap_fields(
                self.state, self._rules, pending, (_UNMAP, decoded.domain, start, end, reserved)
            )
        elif isinstance(decoded, Attach):
            self.state.attach(decoded, pending, bypass_config=self.features.bypass_config)
        elif isinstance(decoded, Detach):
            self.state.detach(decoded, pending, bypass=self.bypass_active)
        elif isinstance(decoded, Probe):
            self._probe(decoded, pending)
        elif isinstance(decoded, AttachTable):
            table = table_config(decoded.format, decoded.table)
            self.state.join(decoded.domain, decoded.endpoint, DomainKind.TABLE, table, pending)
        else:
            assert not isinstance(decoded, Unknown | Malformed)
            self._events.extend(table_invalidations(decoded, bytes(raw), self.state.domains))

    def _probe(self, req: Probe, pending: Pending) -> None:
        """PROBE (§2.6): the endpoint's properties, within ``probe_size``."""
        info = self.state.endpoints.get(req.endpoint)
        if info is None:
            raise Refused(Status.NOENT, f"endpoint {req.endpoint} does not exist")
        if pending.writable < self.probe_size + TAIL_SIZE:
            raise Refused(Status.INVAL, "the properties area is smaller than probe_size")
        area = probe_properties(info, self.features)
        if len(area) > self.probe_size:
            status = Status.INVAL if self.policy.compat == QEMU else Status.DEVERR
            raise Refused(status, "the endpoint's properties do not fit in probe_size")
        pending.properties = area

    # -- faults (§4) ---------------------------------------------------------------------
    def access(self, endpoint: int, addr: int, *, write: bool) -> int | tuple[FaultReason, int]:
        """What a DMA access of ``endpoint`` at ``addr`` does: the output address, or
        ``(reason, flags)`` of the fault it raises (QEMU's emitter rules, §4)."""
        return access(self.state, self.bypass_active, endpoint, addr, write=write)

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
        """The 24-byte ``virtio_iommu_fault`` for a fault the host reported (§4); the PASID
        is reported only with vSVA."""
        return fault_record(
            self.state,
            self.bypass_active,
            endpoint,
            address,
            read=read,
            write=write,
            pasid=pasid if self.features.vsva else None,
            translation=translation,
        )


def _unparsable(decoded: Decoded) -> str:
    if isinstance(decoded, Unknown):
        return f"unknown request type {decoded.type}: nothing written"
    if isinstance(decoded, Malformed):
        return (
            f"request type {decoded.type}: {decoded.length} readable bytes, "
            f"{decoded.expected} expected: nothing written"
        )
    return "PROBE without F_PROBE: nothing written"
