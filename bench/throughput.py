"""End-to-end throughput and sync latency through the Unix socket, against the echo ceiling.

    python bench/throughput.py [--json] [--quick]

For each workload (bench/workloads.py: strict mode with one unmap per doorbell, and doorbells
of 16 unmaps + one sync) the same pre-encoded frames go to ``viommud serve`` in another
process and to an echo server with the same framing (bench/transport.py); both are timed in
this run, so the ratio survives a noisy machine. Latency: one doorbell of 16 invalidations and
a sync at a time, against the echo ping-pong of the same bytes (p50 / p99 / p99.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.transport import Pipe, frames, spawned


def workload_sets(quick: bool) -> dict[str, list[dict[str, Any]]]:
    n = 20_000 if quick else 400_000
    return {
        "strict (1 unmap + sync per doorbell)": workloads.strict_ril(n // 2),
        "batched (16 unmaps + one sync per doorbell)": workloads.strict_ril(
            n, per_doorbell=16, sync_each=False
        ),
    }


async def measure(
    path: str, host: dict[str, Any], setup: list[bytes], doorbells: list[bytes]
) -> float:
    pipe = await Pipe.open(path, host)
    for frame in setup:
        pipe.writer.write(frame)
    await pipe.replies(len(setup))
    seconds = await pipe.stream(doorbells)
    await pipe.close()
    return seconds


async def latency(
    path: str, host: dict[str, Any], setup: list[bytes], frame: bytes, rounds: int
) -> list[float]:
    pipe = await Pipe.open(path, host)
    for f in setup:
        pipe.writer.write(f)
    await pipe.replies(len(setup))
    await pipe.ping(frame, rounds // 10)  # warm up
    out = await pipe.ping(frame, rounds)
    await pipe.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"throughput": [], "latency": {}}
    for name, records in workload_sets(args.quick).items():
        host, setup, doorbells = frames(records)
        commands = (
            sum(
                len(r["data"]) // 32
                for r in records[1:]
                if r["op"] == "cmds" and len(r["data"]) > 64
            )
            or 1
        )
        commands = sum((len(f) - 14) // 16 for f in doorbells)
        row: dict[str, Any] = {"workload": name, "doorbells": len(doorbells), "commands": commands}
        for kind in ("echo", "daemon"):
            with spawned(kind) as path:
                seconds = asyncio.run(measure(path, host, setup, doorbells))
            row[kind] = {
                "seconds": round(seconds, 3),
                "commands_per_s": round(commands / seconds),
                "doorbells_per_s": round(len(doorbells) / seconds),
            }
        row["ratio"] = round(row["daemon"]["commands_per_s"] / row["echo"]["commands_per_s"], 3)
        results["throughput"].append(row)
    records = workloads.strict_ril(32, per_doorbell=16, sync_each=False)
    host, setup, doorbells = frames(records)
    rounds = 300 if args.quick else 5000
    for kind in ("echo", "daemon"):
        with spawned(kind) as path:
            samples = asyncio.run(latency(path, host, setup, doorbells[0], rounds))
        results["latency"][kind] = {
            "p50_us": round(pct(samples, 0.5), 1),
            "p99_us": round(pct(samples, 0.99), 1),
            "p999_us": round(pct(samples, 0.999), 1),
            "mean_us": round(statistics.fmean(samples) * 1e6, 1),
        }
    lat = results["latency"]
    results["latency"]["p99_ratio"] = round(lat["daemon"]["p99_us"] / lat["echo"]["p99_us"], 2)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(
        f"{'workload':<48} {'echo cmd/s':>12} {'daemon cmd/s':>13} {'doorbells/s':>12} {'ratio':>6}"
    )
    for row in results["throughput"]:
        print(
            f"{row['workload']:<48} {row['echo']['commands_per_s']:>12,} "
            f"{row['daemon']['commands_per_s']:>13,} {row['daemon']['doorbells_per_s']:>12,} "
            f"{row['ratio']:>6}"
        )
    print()
    print(f"{'sync latency (16 unmaps + sync)':<30} {'p50 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9}")
    for kind in ("echo", "daemon"):
        r = lat[kind]
        print(f"{kind:<30} {r['p50_us']:>8} {r['p99_us']:>8} {r['p999_us']:>9}")
    print(f"p99 daemon / echo: {lat['p99_ratio']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
