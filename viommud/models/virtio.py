"""The virtio-iommu model: request frontend + domain topology + per-request dispatcher.

``viommu_create`` options (all optional; numbers are JSON integers or "0x..." strings):

=====================  ==================================  =====================================
key                    default                             meaning
=====================  ==================================  =====================================
page_size_mask         0xfffffffffffff000                  config ``page_size_mask`` (granule)
input_range            [0, 2^64-1]                         config ``input_range`` (inclusive)
domain_range           [0, 2^32-1]                         config ``domain_range`` (inclusive)
probe_size             512                                 config ``probe_size``
bypass                 1                                   initial config ``bypass`` (boot-bypass)
probe / mmio           true                                offer F_PROBE / F_MMIO
bypass_config          true                                offer F_BYPASS_CONFIG
legacy_bypass          false                               offer (legacy) F_BYPASS
vsva                   false                               offer the draft F_ATTACH_TABLE
vsva_draft             "B"                                 "A", "B" or "C" (protocols.virtio_iommu)
attach_same_domain     "keep"                              or "reattach" (QEMU)
unmap_reserved         "ignore"                            or "inval"
check_domain_range     true                                ATTACH outside domain_range: RANGE
max_mappings           1048576                             per domain; more: NOMEM
max_domains            65536                               more: NOMEM
msi_window             [0xfee00000, 0xfeefffff]            RESV_MEM MSI of every endpoint (or null)
resv_mem               []                                  [{"start", "end", "endpoints"?}] RESERVED
emulated_endpoints     []                                  endpoint IDs without a host device
guest_memory           [{"gpa": 0, "size": 2^40}]          guest RAM regions {gpa, size, hva?}
eventq_depth           64                                  fault records kept for the client
=====================  ==================================  =====================================

Every host endpoint also gets the reserved regions its physical IOMMU imposes on the host
(an SMMUv3 host keeps its software MSI window [0x8000000, 0x80fffff]; a VT-d host its MSI
range [0xfee00000, 0xfeefffff]), minus the guest's MSI window, as RESERVED.

Responses to ``request`` records: ``{"status", "reply", "used"}`` plus ``"reason"`` when the
status is not OK and ``"faults"`` (hex ``virtio_iommu_fault`` records, oldest first) when the
host reported faults for this vIOMMU's devices since the previous response. A request the
device writes nothing for has ``status`` "IOERR" (what a driver concludes from used length
0), ``reply`` "" and ``used`` 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocols.models import HostIommu, ViommuModel
from protocols.virtio_iommu import ResvMemSubtype, Status
from viommud.dispatcher.virtio import VirtioDispatcher
from viommud.events import DeviceFault
from viommud.frontends.compat import QEMU, compat_option
from viommud.frontends.virtio.frontend import VirtioIommuFrontend
from viommud.frontends.virtio.options import (
    AttachSameDomain,
    DevicePolicy,
    EndpointInfo,
    ResvRegion,
    VirtioFeatures,
)
from viommud.frontends.virtio.request import Reply
from viommud.guest.virtio import kind_name, request_type_of
from viommud.models.base import (
    ModelContext,
    ModelError,
    RecordRefused,
    batch_lines,
    check_host_iommus,
    viommu_log,
)
from viommud.models.eventq import GuestEventQueue
from viommud.replies import CONFIG_OK, ConfigReply, DoorbellReply, GuestEvent, RequestReply
from viommud.topology import TopologyError, TopologyStatus
from viommud.topology.virtio import DEFAULT_GUEST_MEMORY, VirtioTopology
from viommud.trace import DeviceAttach, DeviceDetach, Record, ViommuCreate
from viommud.virtio_state import VirtioEvent

__all__ = ["HOST_RESERVED", "VirtioOptions", "VirtioViommu"]

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
X86_MSI = (0xFEE00000, 0xFEEFFFFF)
ARM_SW_MSI = (0x8000000, 0x80FFFFF)

# What a host's physical IOMMU keeps for itself, per model (the kernel's reserved regions).
HOST_RESERVED: dict[str, tuple[tuple[int, int], ...]] = {
    HostIommu.ARM_SMMUV3: (ARM_SW_MSI,),
    HostIommu.INTEL_VTD: (X86_MSI,),
}

_KEYS = frozenset(
    {
        "page_size_mask",
        "compat",
        "input_range",
        "domain_range",
        "probe_size",
        "bypass",
        "probe",
        "mmio",
        "bypass_config",
        "legacy_bypass",
        "vsva",
        "vsva_draft",
        "attach_same_domain",
        "unmap_reserved",
        "check_domain_range",
        "max_mappings",
        "max_domains",
        "msi_window",
        "resv_mem",
        "emulated_endpoints",
        "guest_memory",
        "eventq_depth",
    }
)


def _number(value: Any, what: str, bits: int = 64) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ModelError(f"virtio-iommu option {what}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ModelError(f"virtio-iommu option {what} must be an integer in [0, 2^{bits})")
    return value


def _pair(value: Any, what: str, bits: int = 64) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ModelError(f"virtio-iommu option {what} must be [start, end]")
    start, end = _number(value[0], what, bits), _number(value[1], what, bits)
    if start > end:
        raise ModelError(f"virtio-iommu option {what}: start is above end")
    return start, end


def _flag(options: dict[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise ModelError(f"virtio-iommu option {key} must be a boolean")
    return value


@dataclass(frozen=True, slots=True)
class _ResvOption:
    start: int
    end: int
    endpoints: frozenset[int] | None  # None: every endpoint


@dataclass(frozen=True, slots=True)
class VirtioOptions:
    """The validated ``viommu_create`` options of a virtio-iommu."""

    page_size_mask: int = U64_MAX & ~0xFFF
    input_range: tuple[int, int] = (0, U64_MAX)
    domain_range: tuple[int, int] = (0, U32_MAX)
    probe_size: int = 512
    bypass: int = 1
    features: VirtioFeatures = field(default_factory=VirtioFeatures)
    policy: DevicePolicy = field(default_factory=DevicePolicy)
    msi_window: tuple[int, int] | None = X86_MSI
    resv_mem: tuple[_ResvOption, ...] = ()
    emulated_endpoints: frozenset[int] = frozenset()
    guest_memory: tuple[tuple[int, int, int | None], ...] = tuple(
        (gpa, size, None) for gpa, size in DEFAULT_GUEST_MEMORY
    )
    eventq_depth: int = 64

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> VirtioOptions:
        unknown = set(options) - _KEYS
        if unknown:
            raise ModelError(f"unknown virtio-iommu options: {', '.join(sorted(unknown))}")
        kw: dict[str, Any] = {}
        if "page_size_mask" in options:
            kw["page_size_mask"] = _number(options["page_size_mask"], "page_size_mask")
            if not kw["page_size_mask"]:
                raise ModelError("virtio-iommu option page_size_mask must not be 0")
        if "input_range" in options:
            kw["input_range"] = _pair(options["input_range"], "input_range")
        if "domain_range" in options:
            kw["domain_range"] = _pair(options["domain_range"], "domain_range", 32)
        if "probe_size" in options:
            kw["probe_size"] = _number(options["probe_size"], "probe_size", 16)
        if "bypass" in options:
            kw["bypass"] = _number(options["bypass"], "bypass", 1)
        draft = options.get("vsva_draft", "B")
        if draft not in ("A", "B", "C"):
            raise ModelError("virtio-iommu option vsva_draft must be 'A', 'B' or 'C'")
        kw["features"] = VirtioFeatures(
            probe=_flag(options, "probe", True),
            mmio=_flag(options, "mmio", True),
            bypass_config=_flag(options, "bypass_config", True),
            legacy_bypass=_flag(options, "legacy_bypass", False),
            vsva=_flag(options, "vsva", False),
            vsva_draft=draft,
        )
        try:
            compat = compat_option(options, "virtio-iommu")
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        qemu = compat == QEMU  # QEMU's readings become the defaults of the two switches
        same = options.get("attach_same_domain", "reattach" if qemu else "keep")
        unmap_reserved = options.get("unmap_reserved", "ignore")
        if same not in ("keep", "reattach"):
            raise ModelError("virtio-iommu option attach_same_domain must be keep or reattach")
        if unmap_reserved not in ("ignore", "inval"):
            raise ModelError("virtio-iommu option unmap_reserved must be ignore or inval")
        kw["policy"] = DevicePolicy(
            attach_same_domain=AttachSameDomain(same),
            unmap_reserved_inval=unmap_reserved == "inval",
            check_domain_range=_flag(options, "check_domain_range", not qemu),
            max_mappings=_number(options.get("max_mappings", 1 << 20), "max_mappings", 32),
            max_domains=_number(options.get("max_domains", 1 << 16), "max_domains", 32),
            compat=compat,
        )
        if "msi_window" in options:
            raw = options["msi_window"]
            kw["msi_window"] = None if raw is None else _pair(raw, "msi_window")
        if "resv_mem" in options:
            kw["resv_mem"] = tuple(_resv_option(item) for item in _list(options, "resv_mem"))
        if "emulated_endpoints" in options:
            kw["emulated_endpoints"] = frozenset(
                _number(x, "emulated_endpoints", 32) for x in _list(options, "emulated_endpoints")
            )
        if "guest_memory" in options:
            kw["guest_memory"] = tuple(_guest_ram(item) for item in _list(options, "guest_memory"))
        if "eventq_depth" in options:
            kw["eventq_depth"] = _number(options["eventq_depth"], "eventq_depth", 16)
        return cls(**kw)

    def frontend(self) -> VirtioIommuFrontend:
        try:
            return VirtioIommuFrontend(
                page_size_mask=self.page_size_mask,
                input_range=self.input_range,
                domain_range=self.domain_range,
                probe_size=self.probe_size,
                boot_bypass=self.bypass,
                features=self.features,
                policy=self.policy,
            )
        except ValueError as exc:
            raise ModelError(str(exc)) from None

    def endpoint_info(self, endpoint: int, host_model: str | None) -> EndpointInfo:
        """The reserved regions and table formats of one endpoint (None: emulated)."""
        msi = self.msi_window
        reserved: list[tuple[int, int]] = []
        if host_model is not None:
            reserved.extend(HOST_RESERVED.get(host_model, ()))
        for item in self.resv_mem:
            if item.endpoints is None or endpoint in item.endpoints:
                reserved.append((item.start, item.end))
        regions = [ResvRegion(*r) for r in _subtract(_merge(reserved), msi)]
        if msi is not None:
            regions.append(ResvRegion(msi[0], msi[1], ResvMemSubtype.MSI))
        regions.sort(key=lambda r: r.start)
        models = frozenset({host_model}) if host_model is not None else frozenset()
        return EndpointInfo(tuple(regions), models, host=host_model is not None)


def _list(options: dict[str, Any], key: str) -> list[Any]:
    value = options[key]
    if not isinstance(value, list):
        raise ModelError(f"virtio-iommu option {key} must be a list")
    return value


def _resv_option(item: Any) -> _ResvOption:
    if not isinstance(item, dict) or set(item) - {"start", "end", "endpoints"}:
        raise ModelError("resv_mem entries are {start, end, endpoints?}")
    start, end = _pair([item.get("start"), item.get("end")], "resv_mem")
    endpoints = item.get("endpoints")
    if endpoints is None:
        return _ResvOption(start, end, None)
    if not isinstance(endpoints, list):
        raise ModelError("resv_mem endpoints must be a list")
    return _ResvOption(start, end, frozenset(_number(x, "resv_mem", 32) for x in endpoints))


def _guest_ram(item: Any) -> tuple[int, int, int | None]:
    if not isinstance(item, dict) or not {"gpa", "size"} <= set(item) <= {"gpa", "size", "hva"}:
        raise ModelError("guest_memory entries are {gpa, size, hva?}")
    gpa = _number(item["gpa"], "guest_memory.gpa")
    size = _number(item["size"], "guest_memory.size")
    hva = _number(item["hva"], "guest_memory.hva") if "hva" in item else None
    if not size or gpa + size > 1 << 64 or (hva is not None and hva + size > 1 << 64):
        raise ModelError("guest_memory region is empty or wraps")
    return gpa, size, hva


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(ranges: list[tuple[int, int]], hole: tuple[int, int] | None) -> list[tuple[int, int]]:
    if hole is None:
        return ranges
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if end < hole[0] or start > hole[1]:
            out.append((start, end))
            continue
        if start < hole[0]:
            out.append((start, hole[0] - 1))
        if end > hole[1]:
            out.append((hole[1] + 1, end))
    return out


FaultSource = Callable[[frozenset[str]], list[DeviceFault]]


@dataclass(slots=True)
class VirtioViommu:
    name: str
    options: VirtioOptions
    frontend: VirtioIommuFrontend
    topology: VirtioTopology
    dispatcher: VirtioDispatcher
    log: Any
    debug: bool
    fault_source: FaultSource | None = None
    eventq: deque[bytes] = field(default_factory=deque)
    faults_lost: int = 0
    # HELLO ``events``: faults go out as EVENT frames (this queue), not in responses
    events_queue: GuestEventQueue | None = None
    _devices: frozenset[str] | None = None  # host devices of the endpoints (cache)
    host_problems: int = 0
    iommus: frozenset[str] = frozenset()  # host IOMMUs it may span (empty: any)
    model: str = ViommuModel.VIRTIO_IOMMU
    batch: bool = True  # per-request log lines wanted (models.base.batch_lines)
    group_commit: ClassVar[bool] = False  # one request at a time: nothing to share

    @classmethod
    def create(cls, record: ViommuCreate, ctx: ModelContext) -> VirtioViommu:
        check_host_iommus(record, ctx, None, at_least_one=False)
        raw = dict(record.options)
        if ctx.compat is not None:
            raw.setdefault("compat", ctx.compat)
        options = VirtioOptions.from_options(raw)
        frontend = options.frontend()
        topology = VirtioTopology(record.viommu, ctx.host, ctx.iommufd)
        if ctx.ram:
            if "guest_memory" in record.options:
                raise ModelError(
                    "the guest_memory option and guest RAM passed by the VMM exclude each other"
                )
            topology.use_passed_memory(ctx.ram)
        else:
            topology.place_guest_memory(options.guest_memory)
        dispatcher = VirtioDispatcher(topology, ctx.iommufd, ctx.stats)
        log, debug = viommu_log(ctx, record.viommu)
        source = getattr(ctx.iommufd.backend, "drain_device_faults", None)
        instance = cls(
            record.viommu,
            options,
            frontend,
            topology,
            dispatcher,
            log,
            debug,
            source,
            iommus=frozenset(record.iommus),
            batch=batch_lines(log),
        )
        if ctx.event_depth:
            instance.events_queue = GuestEventQueue(options.eventq_depth)
        for endpoint in sorted(options.emulated_endpoints):
            frontend.add_endpoint(endpoint, options.endpoint_info(endpoint, None))
        return instance

    # -- config records -------------------------------------------------------------------
    def config(self, record: Record) -> ConfigReply:
        if isinstance(record, DeviceAttach):
            self._device_attach(record.vid, record.device)
        elif isinstance(record, DeviceDetach):
            self._device_detach(record.vid)
        else:
            raise ValueError(
                f"{type(record).__name__} records do not apply to a virtio-iommu vIOMMU"
            )
        return CONFIG_OK

    def _device_attach(self, vid: int, device: str) -> None:
        frontend, topology = self.frontend, self.topology
        if frontend.has_endpoint(vid):
            raise TopologyError(f"endpoint {vid} already exists")
        try:
            pdev = topology.host.device(device)
        except KeyError:
            raise TopologyError(f"host device {device!r} does not exist") from None
        if self.iommus and pdev.iommu not in self.iommus:
            raise TopologyError(
                f"host device {device} sits behind {pdev.iommu}, "
                f"which vIOMMU {self.name} does not span"
            )
        topology.add_endpoint(vid, device)
        self._devices = None
        model = topology.host.iommu(pdev.iommu).model
        events = frontend.add_endpoint(vid, self.options.endpoint_info(vid, model))
        try:
            self._apply(events)
        except Exception:
            frontend.remove_endpoint(vid)
            topology.remove_endpoint(vid)
            raise

    def _device_detach(self, vid: int) -> None:
        frontend = self.frontend
        if not frontend.has_endpoint(vid) or vid in self.options.emulated_endpoints:
            raise TopologyError(f"endpoint {vid} is not attached")
        events = frontend.remove_endpoint(vid)
        try:
            self._apply(events)
        finally:
            if vid in self.topology.endpoints:
                self.topology.remove_endpoint(vid)
            self._devices = None

    def _apply(self, events: list[VirtioEvent]) -> None:
        """Host side of a change that is not a request (no status to report: raise)."""
        outcome = self.dispatcher.run(0, events)
        if outcome.errors:
            raise TopologyError(outcome.errors[0].reason)

    # -- requests -------------------------------------------------------------------------
    def doorbell(self, data: bytes) -> DoorbellReply:
        raise RecordRefused(
            f"vIOMMU {self.name!r} is a virtio-iommu: it takes requests, not commands"
        )

    def request(self, data: bytes) -> RequestReply:
        reply = self.handle_request(data)
        return RequestReply(
            reply.code,
            reply.data,
            reply.used,
            None if reply.status is Status.OK else reply.reason,
            tuple(self.take_faults()),
        )

    def handle_request(self, data: bytes, writable: int | None = None) -> Reply:
        """One request through frontend, dispatcher and back: the device's reply."""
        frontend, dispatcher = self.frontend, self.dispatcher
        calls = dispatcher.iommufd.log
        calls.barrier = dispatcher.stats.barriers + 1
        calls_before = calls.seq
        frontend.receive_request(data, writable)
        request_type = request_type_of(data)
        try:
            outcome = dispatcher.run(request_type, frontend.events())
        except Exception:
            # a bug, not a guest or host condition: answer DEVERR, keep the device usable
            frontend.complete(Status.DEVERR, "internal error")
            dispatcher.resync(frontend.guest_view())
            raise
        if not outcome.host_errors:
            reply = frontend.complete()
        else:
            # the host refused: the frontend undoes the request and answers its status
            error = outcome.host_errors[0]
            reply = frontend.complete(Status[error.code], error.reason)
            problems = dispatcher.resync(frontend.guest_view())
            if problems:
                self.host_problems += len(problems)
                if self.log is not None:
                    self.log.error("host_resync_failed", problems=problems)
        log = self.log
        if log is not None:
            if self.debug:
                log.debug(
                    "request_decoded",
                    kind=kind_name(request_type),
                    raw_hex=bytes(data).hex(),
                )
            if self.batch:
                log.info(
                    "request_completed",
                    kind=kind_name(request_type),
                    status=reply.code,
                    backend_calls=calls.seq - calls_before,
                )
            if reply.status is not Status.OK:
                log.warning(
                    "guest_error",
                    kind=kind_name(request_type),
                    code=reply.code,
                    reason=reply.reason,
                    raw_hex=bytes(data).hex(),
                )
        return reply

    # -- faults (§4) ------------------------------------------------------------------------
    def report_fault(self, fault: DeviceFault) -> bool:
        """A host fault for one of this vIOMMU's devices becomes a guest fault record in the
        event queue; False when the device is not one of ours."""
        endpoint = self.topology.endpoint_of(fault.device)
        if endpoint is None:
            return False
        record = self.frontend.fault_record(
            endpoint,
            fault.address,
            read=fault.read,
            write=fault.write,
            pasid=fault.pasid,
            translation=fault.translation,
        )
        queue = self.events_queue
        if queue is not None:  # an EVENT frame (docs/protocol.md §10)
            if not queue.report(self.topology.host.device(fault.device).iommu, record):
                self.faults_lost += 1
            return True
        if len(self.eventq) >= self.options.eventq_depth:
            self.faults_lost += 1  # no buffer posted: the device drops it (§4)
            return True
        self.eventq.append(record)
        return True

    def _poll_faults(self) -> None:
        source = self.fault_source
        if source is None:
            return
        devices = self._devices
        if devices is None:
            devices = self._devices = frozenset(
                ep.pdev.id for ep in self.topology.endpoints.values()
            )
        if devices:
            for fault in source(devices):
                self.report_fault(fault)

    def events(self) -> list[GuestEvent]:
        """With HELLO ``events``: the fault records queued since the last call, as EVENT
        frames (docs/virtio-iommu.md §8); without, none (they go in responses)."""
        queue = self.events_queue
        if queue is None:
            return []
        self._poll_faults()
        return [
            GuestEvent(self.name, self.model, iommu, sequence, lost, record)
            for iommu, sequence, lost, record in queue.drain()
        ]

    def take_faults(self) -> list[bytes]:
        """Poll the backend for this vIOMMU's devices' faults; drain the event queue (with
        HELLO ``events`` they are EVENT frames instead: nothing here)."""
        if self.events_queue is not None:
            return []
        self._poll_faults()
        out = list(self.eventq)
        self.eventq.clear()
        return out

    # -- reporting and teardown -------------------------------------------------------------
    def kind_counts(self) -> dict[str, int]:
        return self.frontend.kind_counts()

    def error_counts(self) -> dict[str, int]:
        return dict(self.frontend.error_counts)

    def config_space(self) -> bytes:
        return self.frontend.config_space()

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space (only ``bypass``); unattached devices move
        between bypass and blocked on the host. ValueError for a write the device refuses."""
        self._apply(self.frontend.write_config(offset, data))

    def reset(self, *, system: bool = False) -> None:
        """Device reset (``system``: system reset, which also restores ``bypass``)."""
        frontend = self.frontend
        self._apply(frontend.system_reset() if system else frontend.reset())

    def status(self) -> TopologyStatus:
        return self.topology.describe()

    def destroy(self) -> None:
        self.topology.destroy()
