"""Importers: foreign captures of what a guest did -> v1 trace files (docs/trace-format.md §2).

``viommud import FORMAT LOG -o TRACE.jsonl`` picks the importer by format name; the only one
today is ``qemu-log`` (viommud/importers/qemu_log.py: QEMU trace logs of the intel-iommu and
arm-smmuv3 devices). What a log cannot tell — the host, and which host device the guest sees
under which ID — comes from options or a small host file (``load_host_spec``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viommud.host import HostConfig, HostConfigError
from viommud.trace import TraceError, TraceReader, render_trace, store_trace

__all__ = [
    "HostSpec",
    "ImportLogError",
    "ImportOptions",
    "cli",
    "load_host_spec",
    "parse_attach",
    "write_trace",
]


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

    model: str | None = None  # "vtd" | "smmuv3"; None: guessed from the log's events
    name: str = "imported"
    viommu: str | None = None  # default: vvtd0 / vsmmu0
    dw: int | None = None  # VT-d queue width; None: from the log
    synthesize: bool = False  # add the guest-memory records a replay needs (see the importer)
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


def cli(args: argparse.Namespace) -> int:
    """``viommud import`` (the parser block is in viommud/cli.py)."""
    from viommud.importers import qemu_log  # noqa: PLC0415 - one importer per format

    name = args.name or args.output.name.split(".")[0]
    try:
        options = ImportOptions(
            model=args.model,
            name=name,
            viommu=args.viommu,
            dw=args.dw,
            synthesize=args.synthesize,
            spec=load_host_spec(args.host) if args.host is not None else None,
            extra_attach=[parse_attach(a) for a in args.attach],
            ats=args.ats,
        )
        with args.log.open("r", encoding="utf-8", errors="replace") as log:
            header, records = qemu_log.convert(log, options)
        write_trace(args.output, header, records)
    except (ImportLogError, OSError) as exc:
        print(f"viommud: import: {exc}", file=sys.stderr)
        return 2
    cmds = sum(1 for r in records if r["op"] == "cmds")
    print(f"{args.output}: {len(records)} records, {cmds} doorbells", file=sys.stderr)
    return 0
