"""``viommud import qemu-log``: a QEMU trace log -> a v1 trace.

The log is what QEMU's ``log`` trace backend writes with ``-trace EVENT... -D FILE``
(``.xz``/``.gz`` read directly); qemu_events.py has the lines read and their formats, taken
from QEMU 7.2-10.x's ``hw/*/trace-events``. The model is detected from the events: Intel
VT-d (qemu_vtd.py), Arm SMMUv3 with the command queue's memory (qemu_smmuv3.py), or
virtio-iommu (qemu_virtio.py).

Without a host file or ``--attach``, the host is made up from the log: one physical IOMMU of
the model (``dmar0`` / ``smmu0``; ``dmar0`` under a virtio-iommu), and one device per guest
ID the log names, ``0000:BB:DD.F`` with the same ID on the host, with ATS when the log
invalidates its device TLB. The configuration the guest wrote to memory (context and PASID
entries, STEs) is synthesized unless ``synthesize`` is off (``--no-synthesize``).

What the log cannot show (descriptors QEMU does not trace, the upper half of 256-bit
descriptors, commands missing from the queue dump, …) is listed in the header's ``notes``
(and printed by the CLI), never filled in silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from protocols.models import HostIommu, ViommuModel
from viommud.host import HostConfig, PhysicalDevice, PhysicalIommu
from viommud.importers import qemu_smmuv3, qemu_virtio, qemu_vtd
from viommud.importers.options import HostSpec, ImportLogError, ImportOptions
from viommud.importers.qemu_events import Event, device_id, events, spliced_note
from viommud.importers.qemu_smmuv3 import parse_smmuv3
from viommud.importers.qemu_vtd import Doorbell, parse_vtd

__all__ = ["Doorbell", "convert", "detect_model", "parse_smmuv3", "parse_vtd"]

# Events that decide the model, each by itself.
_DECISIVE = {
    ViommuModel.VTD: ("vtd_inv_desc", "vtd_inv_qi_tail", "vtd_inv_qi_head"),
    ViommuModel.SMMUV3: ("smmuv3_write_mmio", "smmuv3_cmdq_consume", "smmuv3_cmdq_opcode"),
    ViommuModel.VIRTIO_IOMMU: (
        "virtio_iommu_attach",
        "virtio_iommu_map",
        "virtio_iommu_get_config",
        "virtio_iommu_fill_resv_property",
    ),
}


def detect_model(stream: list[Event]) -> str:
    names = {ev.name for ev in stream}
    found = [model for model, decisive in _DECISIVE.items() if names & set(decisive)]
    if not found:
        wanted = ", ".join(e for decisive in _DECISIVE.values() for e in decisive[:2])
        raise ImportLogError(
            f"no virtual-IOMMU event in the log (looked for {wanted}, …): was QEMU run with "
            "-trace 'vtd_*' / 'smmuv3_*' / 'virtio_iommu_*' and -D FILE?"
        )
    if len(found) > 1:
        raise ImportLogError(f"the log has events of {', '.join(found)}: say which with --model")
    return found[0]


def convert(
    lines: Iterable[str],
    options: ImportOptions,
    dump: bytes | Path | None = None,
    dump_name: str = "dump",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and records of the trace a QEMU log describes (``dump``: the SMMUv3
    command queue's raw memory, or a file holding it, read only for an SMMUv3 log). The
    header's ``notes`` say what the log could not show."""
    stream = list(events(lines, dumps=True))
    model = options.model or detect_model([e for e in stream if e.name != "dump"])
    notes: list[str] = spliced_note(stream)
    _check_units(options, model)
    if model == ViommuModel.VTD:
        vlog = parse_vtd(stream)
        if not vlog.doorbells:
            raise ImportLogError("no vtd_inv_desc event in the log")
        spec = _host_spec(options, model, _vtd_devices(vlog))
        records = qemu_vtd.vtd_records(vlog, options, spec)
        notes += qemu_vtd.notes(vlog, options)
    elif model == ViommuModel.SMMUV3:
        if isinstance(dump, Path):
            dump_name = str(dump)
            dump = qemu_smmuv3.read_dump(dump)
            notes.append(f"command queue memory read from {dump_name}")
        slog = qemu_smmuv3.read_smmuv3(stream, dump, dump_name)
        if not slog.doorbells:
            raise ImportLogError("no CMDQ_PROD write with queue entries in the log")
        sids, ats = qemu_smmuv3.log_sids(slog)
        spec = _host_spec(options, model, {sid: sid in ats for sid in sids})
        records = qemu_smmuv3.smmuv3_records(slog, options, spec)
        notes += qemu_smmuv3.notes(slog)
    elif model == ViommuModel.VIRTIO_IOMMU:
        ilog = qemu_virtio.read_virtio(stream)
        if not ilog.requests:
            raise ImportLogError("no virtio-iommu request event in the log")
        spec = _host_spec(options, model, dict.fromkeys(ilog.endpoints, False))
        records = qemu_virtio.virtio_records(ilog, options, spec)
        notes += qemu_virtio.notes(ilog)
    else:
        raise ImportLogError(f"unknown model {model!r}")
    if options.spec is None and not options.extra_attach:
        notes.append(
            "host made up from the log: one device per guest ID, same ID on the host, ATS "
            "where the guest invalidates its device TLB"
        )
    if not options.synthesize and model != ViommuModel.VIRTIO_IOMMU:
        notes.append(
            "no configuration synthesized (--no-synthesize): devices stay unconfigured "
            "unless the host attaches them otherwise"
        )
    header: dict[str, Any] = {
        "format": "viommud-trace",
        "version": 1,
        "name": options.name,
        "host": spec.host.to_json(),
    }
    if notes:
        header["notes"] = notes
    return header, records


def _vtd_devices(log: qemu_vtd.VtdLog) -> dict[int, bool]:
    ats = qemu_vtd.device_tlb_sids(log)
    return {sid: sid in ats for sid in qemu_vtd.log_sids(log)}


def _host_spec(options: ImportOptions, model: str, seen: dict[int, bool]) -> HostSpec:
    """The host file's host (plus --attach), a host made up from --attach alone, or, with
    neither, one made up from the guest IDs the log names (``seen``: ID -> has ATS)."""
    unit_model, unit = (
        (HostIommu.ARM_SMMUV3, "smmu0")
        if model == ViommuModel.SMMUV3
        else (HostIommu.INTEL_VTD, "dmar0")
    )
    spec = options.spec
    extra = options.extra_attach
    if spec is None:
        if extra:
            devices = tuple(PhysicalDevice(device, unit, vid, options.ats) for vid, device in extra)
            return HostSpec(HostConfig((PhysicalIommu(unit, unit_model),), devices), tuple(extra))
        if not seen:
            raise ImportLogError(
                "the log names no device: give the host (--host FILE or --attach VID=DEVICE)"
            )
        made = tuple(
            PhysicalDevice(device_id(vid), unit, vid, ats or options.ats)
            for vid, ats in sorted(seen.items())
        )
        return HostSpec(
            HostConfig((PhysicalIommu(unit, unit_model),), made),
            tuple((d.sid, d.id) for d in made),
        )
    attach = (*spec.attach, *extra)
    for _vid, device in attach:
        try:
            spec.host.device(device)
        except KeyError:
            raise ImportLogError(f"device {device!r} is not in the host") from None
    return HostSpec(spec.host, attach)


def _check_units(options: ImportOptions, model: str) -> None:
    """A host file for smmuv3 / vtd must have a unit of that model."""
    if options.spec is None or model == ViommuModel.VIRTIO_IOMMU:
        return
    unit_model = HostIommu.ARM_SMMUV3 if model == ViommuModel.SMMUV3 else HostIommu.INTEL_VTD
    if not any(u.model == unit_model for u in options.spec.host.iommus):
        raise ImportLogError(f"the host has no {unit_model} unit")
