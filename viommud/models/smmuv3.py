"""The SMMUv3 vIOMMU model: CMDQ frontend + stream topology + per-doorbell dispatcher."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from viommud.dispatcher.smmuv3 import SmmuDispatcher
from viommud.frontends.smmuv3.decode import COMMAND, kind_name
from viommud.frontends.smmuv3.frontend import FrameError, SmmuFeatures, SmmuV3Frontend
from viommud.models import (
    ModelContext,
    ModelError,
    RecordRefused,
    check_host_iommus,
    viommu_log,
)
from viommud.topology.smmuv3 import SmmuTopology
from viommud.trace import DeviceAttach, DeviceDetach, Record, Ste, ViommuCreate


@dataclass(slots=True)
class SmmuV3Viommu:
    name: str
    frontend: SmmuV3Frontend
    topology: SmmuTopology
    dispatcher: SmmuDispatcher
    log: Any
    debug: bool
    model: str = "smmuv3"

    @classmethod
    def create(cls, record: ViommuCreate, ctx: ModelContext) -> SmmuV3Viommu:
        check_host_iommus(record, ctx, "arm-smmuv3")
        try:
            features = SmmuFeatures.from_options(record.options)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        frontend = SmmuV3Frontend(features)
        topology = SmmuTopology(record.viommu, record.iommus, ctx.host, ctx.iommufd)
        dispatcher = SmmuDispatcher(frontend, topology, ctx.iommufd, ctx.stats)
        if "smmuv3" in ctx.policies:
            dispatcher.policy = ctx.policies["smmuv3"]
        log, debug = viommu_log(ctx, record.viommu)
        return cls(record.viommu, frontend, topology, dispatcher, log, debug)

    def config(self, record: Record) -> dict[str, Any]:
        if isinstance(record, DeviceAttach):
            self.topology.attach(record.vid, record.device)
        elif isinstance(record, DeviceDetach):
            self.topology.detach(record.vid)
        elif isinstance(record, Ste):
            self.frontend.write_ste(record.vsid, record.data)
        else:
            raise ValueError(f"{type(record).__name__} records do not apply to an smmuv3 vIOMMU")
        return {"ok": True}

    def doorbell(self, data: bytes) -> dict[str, Any]:
        frontend = self.frontend
        calls = self.dispatcher.iommufd.log
        calls_before = calls.seq
        started = time.perf_counter()
        try:
            frontend.receive_data(data)
        except FrameError as exc:
            raise RecordRefused(f"vIOMMU {self.name!r}: {exc}") from None
        errors = self.dispatcher.run(frontend.events())
        summary = frontend.last
        log = self.log
        if log is not None:
            if self.debug:
                for index, (w0, w1) in enumerate(COMMAND.iter_unpack(data)):
                    log.debug(
                        "command_decoded",
                        index=index,
                        kind=kind_name(w0 & 0xFF),
                        raw_hex=COMMAND.pack(w0, w1).hex(),
                    )
            log.info(
                "batch_forwarded",
                commands=summary.consumed,
                syncs=summary.syncs,
                errors=len(errors),
                backend_calls=calls.seq - calls_before,
                duration_ms=round((time.perf_counter() - started) * 1e3, 3),
            )
            for error in errors:
                log.warning(
                    "guest_error",
                    index=error.index,
                    code=error.code,
                    reason=error.reason,
                    raw_hex=error.raw.hex(),
                )
        return {
            "consumed": summary.consumed,
            "errors": [{"index": e.index, "code": e.code, "reason": e.reason} for e in errors],
            "syncs": summary.syncs,
        }

    def request(self, data: bytes) -> dict[str, Any]:
        raise RecordRefused(f"vIOMMU {self.name!r} is an smmuv3: it takes no virtio requests")

    def kind_counts(self) -> dict[str, int]:
        return self.frontend.kind_counts()

    def error_counts(self) -> dict[str, int]:
        return dict(self.frontend.error_counts)

    def destroy(self) -> None:
        self.topology.destroy()
