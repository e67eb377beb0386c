"""virtio-iommu: a QEMU virtio-iommu trace log -> the records of a virtio-iommu trace.

QEMU traces each request when its handler starts (hw/virtio/virtio-iommu.c), with every
field of the request but the flags of ATTACH:

* ``virtio_iommu_attach domain=D endpoint=E`` -> ATTACH; the BYPASS flag is set when the
  last ``virtio_iommu_switch_address_space`` QEMU logs for the endpoint before the next
  request says ``iommu enabled=0`` (the endpoint went into a bypass domain; a move from
  another domain first detaches it, which logs a switch of its own);
* ``virtio_iommu_detach`` -> DETACH; ``virtio_iommu_map`` -> MAP (``virt_end`` inclusive,
  flags READ 1, WRITE 2, MMIO 4); ``virtio_iommu_unmap`` -> UNMAP;
* a run of ``virtio_iommu_fill_resv_property dev= E, type=T start= end=`` (lines of other
  threads may come between, not another request) -> one PROBE of
  endpoint E; its regions become the vIOMMU's ``msi_window`` (type 1, MSI) and ``resv_mem``
  (type 0, RESERVED). A PROBE of an endpoint without reserved regions leaves no trace.
* ``virtio_iommu_get_config``: ``page_size_mask``, ``input_range``, ``domain_range``,
  ``probe_size`` and the ``bypass`` the driver first read -> the ``viommu_create`` options.

``virtio_iommu_set_config`` (the driver writing ``bypass``) has no trace record: the header's
notes count them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from protocols.models import ViommuModel
from protocols.virtio_iommu import AttachFlag, RequestType, build_request
from viommud.importers.options import HostSpec, ImportLogError, ImportOptions
from viommud.importers.qemu_events import Event, events, rid, u32

MSI = 1
_REQUESTS = (
    "virtio_iommu_attach",
    "virtio_iommu_detach",
    "virtio_iommu_map",
    "virtio_iommu_unmap",
    "virtio_iommu_fill_resv_property",
)


# What ends a run of fill_resv_property lines: QEMU handling another request, under the
# BQL as the PROBE is. Other lines (DMA translations of threads that do not take the BQL,
# endpoint and domain allocations) may come between the lines of one PROBE.
_ENDS_PROBE = frozenset(
    {*_REQUESTS, "virtio_iommu_get_config", "virtio_iommu_set_config"}
    - {"virtio_iommu_fill_resv_property"}
)


@dataclass(slots=True)
class Request:
    t: float | None
    line: int
    data: bytes


@dataclass(slots=True)
class VirtioLog:
    requests: list[Request] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    endpoints: set[int] = field(default_factory=set)
    regions: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    config_writes: int = 0


def read_virtio(lines: Iterable[str] | Iterable[Event]) -> VirtioLog:
    items = list(lines)
    stream: list[Event] = (
        [e for e in items if isinstance(e, Event)]
        if items and isinstance(items[0], Event)
        else list(events([str(x) for x in items]))
    )
    log = VirtioLog()
    probe: tuple[int, Request] | None = None  # the PROBE whose regions are being listed
    for index, ev in enumerate(stream):
        f = ev.fields
        name = ev.name
        if name in _ENDS_PROBE:
            probe = None
        if name == "virtio_iommu_get_config" and not log.options:
            log.options = {
                "page_size_mask": int(f["mask"], 16),
                "input_range": [int(f["istart"], 16), int(f["iend"], 16)],
                "domain_range": [u32(f["dstart"]), u32(f["dend"])],
                "probe_size": int(f["probe"], 16),
                "bypass": int(f["bypass"], 16),
            }
        elif name == "virtio_iommu_set_config":
            log.config_writes += 1
        elif name == "virtio_iommu_switch_address_space":
            log.endpoints.add(rid(ev))
        elif name == "virtio_iommu_attach":
            ep = u32(f["ep"])
            log.endpoints.add(ep)
            flags = AttachFlag.BYPASS if _bypassed(stream, index, ep) else 0
            log.requests.append(
                _request(ev, RequestType.ATTACH, domain=u32(f["domain"]), endpoint=ep,
                         flags=int(flags))
            )  # fmt: skip
        elif name == "virtio_iommu_detach":
            log.requests.append(
                _request(ev, RequestType.DETACH, domain=u32(f["domain"]), endpoint=u32(f["ep"]))
            )
        elif name == "virtio_iommu_map":
            log.requests.append(
                _request(
                    ev,
                    RequestType.MAP,
                    domain=u32(f["domain"]),
                    virt_start=int(f["start"], 16),
                    virt_end=int(f["end"], 16),
                    phys_start=int(f["phys"], 16),
                    flags=int(f["flags"]),
                )
            )
        elif name == "virtio_iommu_unmap":
            log.requests.append(
                _request(
                    ev,
                    RequestType.UNMAP,
                    domain=u32(f["domain"]),
                    virt_start=int(f["start"], 16),
                    virt_end=int(f["end"], 16),
                )
            )
        elif name == "virtio_iommu_fill_resv_property":
            ep = u32(f["ep"])
            log.endpoints.add(ep)
            region = (int(f["subtype"]), int(f["start"], 16), int(f["end"], 16))
            if probe is None or probe[0] != ep or region in log.regions.get(ep, []):
                probe = (ep, _request(ev, RequestType.PROBE, endpoint=ep))
                log.requests.append(probe[1])
            if region not in log.regions.setdefault(ep, []):
                log.regions[ep].append(region)
    return log


def _bypassed(stream: list[Event], index: int, ep: int) -> bool:
    """Whether QEMU left ``ep`` out of translation after its ATTACH at ``index``: the last
    switch of ``ep`` before the next request (an endpoint moving from another domain is
    first detached, which switches it to the config's bypass, then attached)."""
    on: bool | None = None
    for ev in stream[index + 1 :]:
        if ev.name == "virtio_iommu_switch_address_space" and rid(ev) == ep:
            on = ev.fields["on"] == "1"
        elif ev.name in _REQUESTS:
            break
    return on is False


def _request(ev: Event, kind: int, **fields: int) -> Request:
    try:
        return Request(ev.t, ev.line, build_request(kind, "B", **fields))
    except ValueError as exc:  # a field wider than the request's
        raise ImportLogError(f"line {ev.line}: {ev.name}: {exc}") from None


def notes(log: VirtioLog) -> list[str]:
    out = [
        "ATTACH flags are taken from the address-space switch QEMU logs after each ATTACH; "
        "PROBE requests of endpoints without reserved regions leave no trace and are not in "
        "the trace"
    ]
    if log.config_writes:
        out.append(
            f"{log.config_writes} writes of the config 'bypass' field are not replayable "
            "(the trace format has no config write)"
        )
    if not log.options:
        out.append("no virtio_iommu_get_config event: the device's config is viommud's default")
    return out


def viommu_options(log: VirtioLog) -> dict[str, Any]:
    options = dict(log.options)
    msi = sorted({(s, e) for regions in log.regions.values() for t, s, e in regions if t == MSI})
    if msi:
        options["msi_window"] = [msi[0][0], msi[0][1]]
    reserved: dict[tuple[int, int], list[int]] = {}
    for ep, regions in sorted(log.regions.items()):
        for subtype, start, end in regions:
            if subtype != MSI:
                reserved.setdefault((start, end), []).append(ep)
    if reserved:
        options["resv_mem"] = [
            {"start": s, "end": e, "endpoints": eps} for (s, e), eps in sorted(reserved.items())
        ]
    return options


def virtio_records(log: VirtioLog, options: ImportOptions, spec: HostSpec) -> list[dict[str, Any]]:
    viommu = options.viommu or "viommu0"
    records: list[dict[str, Any]] = [
        {
            "op": "viommu_create",
            "viommu": viommu,
            "model": ViommuModel.VIRTIO_IOMMU,
            "iommus": [],
            "options": viommu_options(log),
        }
    ]
    attach = list(spec.attach) or [(d.sid, d.id) for d in spec.host.devices]
    records += [
        {"op": "device_attach", "viommu": viommu, "vid": vid, "device": device}
        for vid, device in attach
    ]
    t0 = next((r.t for r in log.requests if r.t is not None), None)
    for request in log.requests:
        record: dict[str, Any] = {"op": "request", "viommu": viommu, "data": request.data.hex()}
        if request.t is not None and t0 is not None:
            record["t"] = round(request.t - t0, 6)
        records.append(record)
    return records
