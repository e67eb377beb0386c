"""``python -m capture.figures``: the real-guest table of the README and docs/capture.md §6.

For each capture directory: the guest's commands, the host calls viommud's replay made for
them, the calls QEMU itself would make for the same guest work (``qemu_calls``), the oracle's
``missed``, and the wall times of ``viommud import qemu-log`` and ``viommud replay`` (median
of ``--runs`` runs). The deterministic columns are checked against the README by
tests/capture/test_fixtures.py, so the table cannot go stale.

QEMU's own cost, counted from the imported trace (docs/capture.md §6 says why):

* SMMUv3: one call per invalidation command (``CMD_TLBI_*``, ``CMD_ATC_INV``, ``CMD_CFGI_CD*``),
  as QEMU's accelerated vSMMU forwards them (the replay report's ``baseline``, one physical
  SMMU);
* VT-d: QEMU shadows legacy and second-stage tables: one page-table walk, at least one VFIO
  map or unmap, per IOTLB-class descriptor (``iotlb_inv``, ``p_iotlb_inv``) per device whose
  current context (legacy) or PASID-0 (scalable) entry translates with the descriptor's
  domain ID (every translating device for a global one); device-TLB descriptors cost nothing
  (VFIO registers no device-IOTLB notifier);
* virtio-iommu: one IOAS map or unmap per MAP / UNMAP request per endpoint attached to the
  request's domain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
from pathlib import Path
from typing import Any

__all__ = ["ORDER", "Row", "host_calls", "main", "measure", "qemu_calls", "render"]

Row = dict[str, Any]
ORDER = ("smmuv3-strict", "smmuv3-lazy", "vtd-legacy", "vtd-scalable", "virtio-iommu")

_SMMU_INVALIDATIONS = ("smmuv3:CMD_TLBI_", "smmuv3:CMD_ATC_INV", "smmuv3:CMD_CFGI_CD")


def _vtd_translating_did(data: bytes, kind: str) -> int | None:
    """The domain ID a device translates with after this entry, or None (not present,
    pass-through). Legacy context entry (VT-d 9.3): P bit 0, TT [3:2] (2 = pass-through),
    DID [87:72]. Scalable PASID entry (9.6): P bit 0, PGTT [8:6] (4 = pass-through), DID
    [79:64]."""
    lo, hi = struct.unpack_from("<QQ", data)
    if kind == "context_entry":
        return (hi >> 8) & 0xFFFF if lo & 1 and (lo >> 2) & 3 != 2 else None
    return hi & 0xFFFF if lo & 1 and (lo >> 6) & 7 in (1, 2, 3) else None


def _vtd_qemu_calls(records: list[dict[str, Any]]) -> int:
    dw = 16
    dids: dict[int, int | None] = {}
    calls = 0
    for record in records:
        op = record.get("op")
        if op == "viommu_create":
            dw = 32 if record["options"].get("dw") == 256 else 16
        elif op == "context_entry" and len(record["data"]) == 32:
            dids[record["sid"]] = _vtd_translating_did(
                bytes.fromhex(record["data"]), "context_entry"
            )
        elif op == "pasid_entry" and record.get("pasid", 0) == 0:
            dids[record["sid"]] = _vtd_translating_did(bytes.fromhex(record["data"]), "pasid_entry")
        elif op == "cmds":
            data = bytes.fromhex(record["data"])
            for offset in range(0, len(data) - dw + 1, dw):
                (qw0,) = struct.unpack_from("<Q", data, offset)
                kind = (qw0 & 0xF) | ((qw0 >> 9) & 7) << 4
                if kind not in (0x2, 0x6):  # IOTLB, PASID-based IOTLB (VT-d 6.5.2)
                    continue
                translating = [d for d in dids.values() if d is not None]
                if kind == 0x2 and (qw0 >> 4) & 3 == 1:  # global
                    calls += len(translating)
                else:
                    calls += translating.count((qw0 >> 16) & 0xFFFF)
    return calls


def _virtio_qemu_calls(records: list[dict[str, Any]]) -> int:
    endpoints: dict[int, int] = {}  # endpoint -> domain
    calls = 0
    for record in records:
        if record.get("op") != "request":
            continue
        data = bytes.fromhex(record["data"])
        if len(data) < 12:
            continue
        kind, domain, endpoint = data[0], *struct.unpack_from("<II", data, 4)
        if kind == 1:  # ATTACH (virtio 1.2 5.13.6.3)
            endpoints[endpoint] = domain
        elif kind == 2:  # DETACH
            endpoints.pop(endpoint, None)
        elif kind in (3, 4):  # MAP, UNMAP
            calls += sum(1 for d in endpoints.values() if d == domain)
    return calls


def qemu_calls(model: str, trace: Path, report: dict[str, Any]) -> int:
    """The host calls QEMU itself would make for the guest work of an imported trace."""
    if model == "smmuv3":
        return sum(
            n for k, n in report["commands"]["by_kind"].items() if k.startswith(_SMMU_INVALIDATIONS)
        )
    with trace.open() as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    if model == "vtd":
        return _vtd_qemu_calls(records[1:])
    return _virtio_qemu_calls(records[1:])


def host_calls(model: str, report: dict[str, Any]) -> int:
    """viommud's calls for the guest's invalidations: ``IOMMU_HWPT_INVALIDATE`` (SMMUv3,
    VT-d), ``IOMMU_IOAS_MAP`` + ``IOMMU_IOAS_UNMAP`` (virtio-iommu, the guest-RAM map of the
    identity IOAS included)."""
    calls = report["backend"]["calls"]
    if model == "virtio-iommu":
        return int(calls.get("IOMMU_IOAS_MAP", 0) + calls.get("IOMMU_IOAS_UNMAP", 0))
    return int(calls.get("IOMMU_HWPT_INVALIDATE", 0))


def measure(capture_dir: Path, runs: int = 3) -> Row:
    """One table row: import and replay ``capture_dir`` ``runs`` times (capture.kit's
    ``import_and_replay``, no option), the figures of the last run and the median times."""
    from capture.kit import import_and_replay  # noqa: PLC0415  (kit imports this module)

    manifest = json.loads((capture_dir / "MANIFEST.json").read_text())
    results = [import_and_replay(capture_dir) for _ in range(runs)]
    last = results[-1]
    report = last["replay"]["report"]
    return {
        "capture": manifest["config"],
        "kernel": manifest["kernel"]["release"],
        "boot_s": manifest["boot_seconds"],
        "commands": report["commands"]["total"],
        "host_calls": host_calls(last["model"], report),
        "qemu_calls": last["qemu_calls"],
        "missed": report["verify"]["missed"],
        "import_s": statistics.median(r["import"]["seconds"] for r in results),
        "replay_s": statistics.median(r["replay"]["seconds"] for r in results),
    }


def render(rows: list[Row]) -> str:
    lines = [
        "| capture | kernel | boot | commands | viommud host calls | QEMU's calls | missed "
        "| import | replay |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['capture']}` | `{row['kernel']}` | {row['boot_s']:.1f} s "
            f"| {row['commands']:,} | {row['host_calls']:,} | {row['qemu_calls']:,} "
            f"| {row['missed']} | {row['import_s']:.2f} s | {row['replay_s']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capture.figures", description=__doc__)
    parser.add_argument("captures", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    dirs = args.captures or [Path("fixtures/captures") / name for name in ORDER]
    print(render([measure(d, args.runs) for d in dirs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
