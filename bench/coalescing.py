"""Invalidate calls and entries per trace: baseline, batching only, full coalescing.

    python bench/coalescing.py [--json] [--quick]

Every trace is replayed in process (Session over the emulated backend) with the oracle on,
once per dispatch policy, and the table shows, per trace: (a) the report's baseline
(docs/trace-format.md §3.3: one call per forwarded command and physical SMMU, as QEMU does), (b)
batching only (one array call per
vIOMMU object per doorbell), (c) full coalescing, and the oracle's missed/over for each. The
lower bound is one call per backend object touched per doorbell. A second table compares one
vSMMU spanning two physical SMMUs with one vSMMU per physical SMMU on the same workload, and
a third sweeps the flood threshold on the non-RIL workload.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.replies import as_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import workloads  # noqa: E402
from viommud.backend.emulator.kernel import EmulatedIommufd  # noqa: E402
from viommud.dispatcher.smmuv3 import DispatchPolicy  # noqa: E402
from viommud.host import HostConfig  # noqa: E402
from viommud.session import Session  # noqa: E402
from viommud.trace import Cmds, TraceReader, parse_header, parse_record  # noqa: E402

POLICIES = {
    "batching": DispatchPolicy(coalesce=False),
    "coalesced": DispatchPolicy(),
}


def run(
    header: dict[str, Any] | None,
    records: Iterable[Any],
    policy: DispatchPolicy,
    host: HostConfig | None = None,
) -> dict[str, Any]:
    if host is None:
        assert header is not None
        host = parse_header(header).host
    session = Session(EmulatedIommufd(host), verify=True, policies={"smmuv3": policy})
    for record in records:
        if isinstance(record, Cmds):
            as_json(session.doorbell(record.viommu, record.data))
        else:
            as_json(session.handle(record))
    report = session.report()
    session.close()
    return {
        "calls": report["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0),
        "entries": report["backend"]["invalidation_entries"],
        "baseline": report["baseline"]["invalidate_calls"],
        "missed": report["verify"]["missed"],
        "over": report["verify"]["over"],
        "commands": report["commands"]["total"],
    }


def synthetic(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    return records[0], [parse_record(i + 2, r) for i, r in enumerate(records[1:])]


def bundled() -> Iterable[tuple[str, dict[str, Any] | None, list[Any], HostConfig]]:
    paths = sorted((ROOT / "fixtures").glob("smmuv3-*.json*"))
    paths += sorted((ROOT / "fixtures").glob("vtd-*.json*"))
    paths += sorted((ROOT / "fixtures").glob("virtio-*.json*"))
    for path in paths:
        with TraceReader(path) as reader:
            yield reader.header.name, None, list(reader), reader.header.host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small synthetic traces (CI)")
    args = parser.parse_args(argv)
    n = 200 if args.quick else 5000
    cases: list[tuple[str, dict[str, Any] | None, list[Any], HostConfig | None]] = [
        (name, None, records, host) for name, _, records, host in bundled()
    ]
    for name, recs in (
        ("synthetic strict-ril", workloads.strict_ril(n)),
        ("synthetic strict-ril, 8 CPUs racing", workloads.strict_ril(n, per_doorbell=8)),
        ("synthetic strict-noril", workloads.strict_noril(n // 10)),
        ("synthetic strict-noril, 8 CPUs racing", workloads.strict_noril(n // 10, gather=8)),
        ("synthetic lazy + ATS", workloads.lazy(n)),
    ):
        header, records = synthetic(recs)
        cases.append((name, header, records, None))
    rows = []
    for name, header, records, host in cases:
        row: dict[str, Any] = {"trace": name}
        for label, policy in POLICIES.items():
            row[label] = run(header, records, policy, host)
        row["baseline"] = row["coalesced"]["baseline"]
        rows.append(row)
    topo = []
    for label, layout in (
        ("1 vSMMU over 2 pSMMUs", {"v": ["smmu0", "smmu1"]}),
        ("1 vSMMU per pSMMU", {"v0": ["smmu0"], "v1": ["smmu1"]}),
    ):
        header, records = synthetic(workloads.strict_ril(n, layout=layout, iommus=2))
        topo.append({"topology": label, **run(header, records, DispatchPolicy())})
    sweep = []
    header, records = synthetic(workloads.strict_noril(n // 10, gather=8))
    for threshold in (64, 256, 512, 2048, 1 << 30):
        sweep.append(
            {
                "flood_pages": threshold,
                **run(header, records, DispatchPolicy(flood_pages=threshold)),
            }
        )
    if args.json:
        print(json.dumps({"traces": rows, "topologies": topo, "threshold": sweep}, indent=1))
        return 0
    print(
        f"{'trace':<38} {'baseline':>9} {'batching calls/entries':>23} "
        f"{'coalesced calls/entries':>24} {'missed':>7} {'over':>5}"
    )
    for row in rows:
        b, c = row["batching"], row["coalesced"]
        print(
            f"{row['trace']:<38} {row['baseline']:>9} {b['calls']:>12}/{b['entries']:<10} "
            f"{c['calls']:>12}/{c['entries']:<11} {b['missed'] + c['missed']:>7} "
            f"{c['over']:>5}"
        )
    print()
    print(
        f"{'topology (same strict-ril workload)':<38} {'baseline':>9} {'calls':>7} "
        f"{'entries':>8} {'missed':>7} {'over':>5}"
    )
    for t in topo:
        print(
            f"{t['topology']:<38} {t['baseline']:>9} {t['calls']:>7} {t['entries']:>8} "
            f"{t['missed']:>7} {t['over']:>5}"
        )
    print()
    print(
        f"{'flood threshold (strict-noril, racing)':<38} {'calls':>7} {'entries':>8} {'missed':>7}"
    )
    for s in sweep:
        label = "off" if s["flood_pages"] >= 1 << 30 else str(s["flood_pages"])
        print(f"{label:<38} {s['calls']:>7} {s['entries']:>8} {s['missed']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
