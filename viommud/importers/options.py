"""What an importer is told (options, a host file) and how it writes the trace."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viommud.host import HostConfig, HostConfigError
from viommud.trace import TraceError, TraceReader, render_trace, store_trace


class ImportLogError(ValueError):
    """The log cannot be turned into a trace; the message says why (and where)."""


@dataclass(frozen=True, slots=True)
class HostSpec:
    """The host a trace will be replayed on, and the guest IDs of its devices."""

    host: HostConfig
    attach: tuple[tuple[int, str], ...] = ()  # (guest vid, host device id), in order


@dataclass(slots=True)
class ImportOptions:
    """What the command line says about the trace to write."""

    model: str | None = None  # "vtd" | "smmuv3" | "virtio-iommu"; None: from the log's events
    name: str = "imported"
    viommu: str | None = None  # default: vvtd0 / vsmmu0 / viommu0
    dw: int | None = None  # VT-d queue width; None: from the log
    synthesize: bool = True  # add the guest-memory records a replay needs (see the importer)
    spec: HostSpec | None = None
    extra_attach: list[tuple[int, str]] = field(default_factory=list)
    ats: bool = False  # devices made up from --attach have ATS


def parse_attach(text: str) -> tuple[int, str]:
    """``VID=DEVICE``: VID decimal, 0x-hex, or a guest PCI address ``BB:DD.F``."""
    vid_text, sep, device = text.partition("=")
    if not sep or not device:
        raise ImportLogError(f"--attach {text!r}: expected VID=DEVICE")
    try:
        if ":" in vid_text:
            bus, _, devfn = vid_text.partition(":")
            dev, _, fn = devfn.partition(".")
            vid = int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn or "0", 16)
        else:
            vid = int(vid_text, 0)
    except ValueError:
        raise ImportLogError(f"--attach {text!r}: bad guest ID {vid_text!r}") from None
    return vid, device


def load_host_spec(path: Path) -> HostSpec:
    """A host file: a trace whose header to use, or a JSON host object (``iommus``,
    ``devices``) with an optional ``attach`` list of ``{"vid": n, "device": "id"}``."""
    if path.suffix in (".jsonl", ".gz", ".xz"):
        try:
            reader = TraceReader(path)
        except TraceError as exc:
            raise ImportLogError(f"host file {path}: {exc}") from None
        reader.close()
        return HostSpec(reader.header.host)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImportLogError(f"host file {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise ImportLogError(f"host file {path}: a JSON object is expected")
    if "host" in obj and isinstance(obj["host"], dict):
        obj = {**obj["host"], "attach": obj.get("attach", obj["host"].get("attach", []))}
    attach_raw = obj.get("attach", [])
    try:
        host = HostConfig.from_json({k: v for k, v in obj.items() if k != "attach"})
    except HostConfigError as exc:
        raise ImportLogError(f"host file {path}: {exc}") from None
    attach: list[tuple[int, str]] = []
    if not isinstance(attach_raw, list):
        raise ImportLogError(f"host file {path}: 'attach' must be a list")
    for item in attach_raw:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("vid"), int)
            or not isinstance(item.get("device"), str)
        ):
            raise ImportLogError(f"host file {path}: attach entries are {{'vid': n, 'device': id}}")
        attach.append((item["vid"], item["device"]))
    return HostSpec(host, tuple(attach))


def write_trace(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Write a v1 trace: the header line, then one record per line."""
    store_trace(path, render_trace(header, records))
