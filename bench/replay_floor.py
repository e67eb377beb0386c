"""`viommud replay` against its transport floor, per doorbell and with group commit.

    python bench/replay_floor.py [--json] [--quick] [--group-commit N ...]

The same replay client (viommud.shell.replay: it reads the trace, frames each record, keeps
up to 128 frames in flight and reads every reply) replays the same trace file twice in one
run: against an echo server with the daemon's framing and replies (bench/transport.py: the
floor, parsing + framing + echo, nothing else) and against ``viommud serve`` in another
process (no oracle, logging at error). The ratio ``floor seconds / daemon seconds`` is the
figure: 1.0 would mean the daemon costs nothing beyond the transport.

Modes:

* ``per-doorbell`` (the default of ``viommud replay``): every doorbell handled on its own,
  what a guest that waits on each sync costs (pipelining hides only the transport);
* ``group-commit N`` (``--group-commit N``): N vCPUs racing for the queue, at most N
  doorbells of a vIOMMU pending at once; doorbells that arrive together share host calls.

Workloads (bench/workloads.py): ``strict`` (one TLBI_NH_VA + CMD_SYNC per doorbell, RIL),
``noril-64`` (64 TLBI_NH_VA + CMD_SYNC per doorbell) and ``real-strict`` (the bundled real
Linux 6.1 trace). Each pair of runs is repeated (--rounds, default 3) and the best of each
side kept: the machine has slow spells.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.transport import spawned
from viommud.shell.replay import replay
from viommud.trace import render_trace

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "fixtures" / "smmuv3-linux61-strict.jsonl.xz"
FULL = {"strict": 200_000, "noril-64": 1_000_000}  # commands
QUICK = {"strict": 10_000, "noril-64": 50_000}


def _trace(name: str, quick: bool, tmp: Path) -> tuple[Path, int]:
    """(trace file, doorbells in it)."""
    if name == "real-strict":
        return REAL, 6_237
    size = (QUICK if quick else FULL)[name]
    if name == "strict":
        objs = workloads.strict_ril(size // 2)
    else:
        objs = workloads.strict_noril(max(1, size // (16 * 65)))
    path = tmp / f"{name}.jsonl"
    path.write_text(render_trace(objs[0], objs[1:]))
    doorbells = sum(1 for o in objs[1:] if o.get("op") == "cmds")
    return path, doorbells


async def _once(trace: Path, socket: str, group_commit: int) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = await replay(trace, socket, verify=False, group_commit=group_commit)
    elapsed = time.perf_counter() - started
    if result.report is None:
        raise RuntimeError(f"replay of {trace} failed: {result.error}")
    return elapsed, result.report


def measure(name: str, group_commits: list[int], *, quick: bool, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="viommud-floor-") as tmp:
        trace, doorbells = _trace(name, quick, Path(tmp))
        row: dict[str, Any] = {"workload": name, "doorbells": doorbells, "modes": {}}
        with spawned("echo") as echo, spawned("daemon") as daemon:
            for n in [0, *group_commits]:
                floor = best = float("inf")
                report: dict[str, Any] = {}
                for _ in range(rounds):
                    floor = min(floor, asyncio.run(_once(trace, echo, n))[0])
                    elapsed, report = asyncio.run(_once(trace, daemon, n))
                    best = min(best, elapsed)
                commands = report["commands"]["total"]
                mode = "per-doorbell" if n == 0 else f"group-commit {n}"
                row["modes"][mode] = {
                    "group_commit": report.get("group_commit", n),
                    "floor_s": round(floor, 4),
                    "daemon_s": round(best, 4),
                    "ratio": round(floor / best, 3),
                    "commands_per_s": round(commands / best),
                    "doorbells_per_s": round(doorbells / best),
                    "invalidate_calls": report["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0),
                    "baseline_calls": report["baseline"]["invalidate_calls"],
                }
        row["commands"] = commands
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workload", nargs="+", default=["strict", "noril-64", "real-strict"])
    parser.add_argument(
        "--group-commit",
        type=int,
        nargs="*",
        default=[8, 128],
        metavar="N",
        help="group-commit modes to run besides per-doorbell (racing vCPUs)",
    )
    args = parser.parse_args(argv)
    rows = [
        measure(w, args.group_commit, quick=args.quick, rounds=args.rounds) for w in args.workload
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        for mode, m in row["modes"].items():
            print(
                f"{row['workload']:>12} {mode:>17}: ratio {m['ratio']:.3f}"
                f" (floor {m['floor_s']} s, daemon {m['daemon_s']} s),"
                f" {m['commands_per_s']:,} cmd/s, {m['doorbells_per_s']:,} doorbells/s,"
                f" calls {m['invalidate_calls']:,} (baseline {m['baseline_calls']:,})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
