"""The Intel VT-d vIOMMU model: queued-invalidation frontend + context/PASID topology +
per-wait dispatcher."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from viommud.dispatcher.vtd import VtdDispatcher
from viommud.frontends.vtd.decode import kind_name
from viommud.frontends.vtd.frontend import FrameError, VtdFeatures, VtdFrontend
from viommud.models import (
    ModelContext,
    ModelError,
    RecordRefused,
    check_host_iommus,
    viommu_log,
)
from viommud.topology.vtd import VtdTopology
from viommud.trace import ContextEntry, DeviceAttach, DeviceDetach, PasidEntry, Record, ViommuCreate


@dataclass(slots=True)
class VtdViommu:
    name: str
    frontend: VtdFrontend
    topology: VtdTopology
    dispatcher: VtdDispatcher
    log: Any
    debug: bool
    model: str = "vtd"

    @classmethod
    def create(cls, record: ViommuCreate, ctx: ModelContext) -> VtdViommu:
        check_host_iommus(record, ctx, "intel-vtd")
        try:
            features = VtdFeatures.from_options(record.options)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        frontend = VtdFrontend(features)
        topology = VtdTopology(record.viommu, record.iommus, ctx.host, ctx.iommufd)
        dispatcher = VtdDispatcher(frontend, topology, ctx.iommufd, ctx.stats)
        log, debug = viommu_log(ctx, record.viommu)
        return cls(record.viommu, frontend, topology, dispatcher, log, debug)

    def config(self, record: Record) -> dict[str, Any]:
        if isinstance(record, DeviceAttach):
            self.topology.attach(record.vid, record.device)
        elif isinstance(record, DeviceDetach):
            self.topology.detach(record.vid)
        elif isinstance(record, ContextEntry):
            self.frontend.write_context_entry(record.sid, record.data)
        elif isinstance(record, PasidEntry):
            self.frontend.write_pasid_entry(record.sid, record.pasid, record.data)
        else:
            raise ValueError(f"{type(record).__name__} records do not apply to a vtd vIOMMU")
        return {"ok": True}

    def doorbell(self, data: bytes) -> dict[str, Any]:
        frontend = self.frontend
        dispatcher = self.dispatcher
        calls = dispatcher.iommufd.log
        calls_before = calls.seq
        elided_before = dispatcher.elided
        try:
            frontend.receive_data(data)
        except FrameError as exc:
            raise RecordRefused(f"vIOMMU {self.name!r}: {exc}") from None
        result = dispatcher.run(frontend.events())
        summary = frontend.last
        log = self.log
        if log is not None:
            if self.debug:
                size = frontend.features.desc_size
                for index in range(len(data) // size):
                    raw = data[index * size : (index + 1) * size]
                    (qw0,) = struct.unpack_from("<Q", raw)
                    log.debug(
                        "descriptor_decoded",
                        index=index,
                        kind=kind_name((qw0 & 0xF) | ((qw0 >> 5) & 0x70)),
                        raw_hex=raw.hex(),
                    )
            log.info(
                "batch_forwarded",
                commands=summary.consumed,
                syncs=summary.syncs,
                errors=len(result.errors),
                backend_calls=calls.seq - calls_before,
                device_tlb_elided=dispatcher.elided - elided_before,
            )
            for error in result.errors:
                log.warning(
                    "guest_error",
                    index=error.index,
                    code=error.code,
                    reason=error.reason,
                    raw_hex=error.raw.hex(),
                )
        return {
            "consumed": summary.consumed,
            "errors": [
                {"index": e.index, "code": e.code, "reason": e.reason} for e in result.errors
            ],
            "syncs": summary.syncs,
            "status_writes": [
                {"index": w.index, "addr": f"0x{w.addr:x}", "data": f"0x{w.data:x}"}
                for w in result.status_writes
            ],
        }

    def request(self, data: bytes) -> dict[str, Any]:
        raise RecordRefused(f"vIOMMU {self.name!r} is a vtd: it takes no virtio requests")

    def kind_counts(self) -> dict[str, int]:
        return self.frontend.kind_counts()

    def error_counts(self) -> dict[str, int]:
        return dict(self.frontend.error_counts)

    def destroy(self) -> None:
        self.topology.destroy()
