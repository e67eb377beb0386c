"""Issue 17's two remaining daemon figures, default settings, each against its own baseline
measured in the same run:

    python bench/log_latency.py [--json] [--quick] [--rounds 3]

* **INFO logging cost**: doorbells/s of the strict SMMUv3 stream (bench/workloads.py
  ``strict_ril``: one TLBI + CMD_SYNC per doorbell, pipelined, bench/daemon_load.py's
  ``throughput``) from ``viommud serve --log-level info`` (the default) and ``--log-level
  error``, the two daemons alternating, best of ``--rounds`` each. Target: info ≥ 0.95 of
  error (logging costs at most 5 %).
* **sync latency**: one doorbell at a time, each waiting for its reply (a guest spinning on
  its CMD_SYNC): p50 / p99 round trip of ``viommud serve`` (one process per session,
  per-doorbell) and of the echo server with the same framing (bench/transport.py), for a
  strict doorbell (1 TLBI + CMD_SYNC) and a batched one (16 TLBIs + CMD_SYNC); rounds
  alternate between the two servers, and the p99 of each is taken over all its samples.
  Target: daemon p99 ≤ 2x echo p99.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.daemon_load import daemon, throughput
from bench.throughput import latency, pct
from bench.transport import frames, spawned
from protocols.frames import FrameType
from viommud import wire
from viommud.backend.select import emulated_backend
from viommud.shell import logs
from viommud.shell.connection import Connection


def log_cost(unmaps: int, rounds: int) -> dict[str, Any]:
    best = {"info": 0.0, "error": 0.0}
    for _ in range(rounds):
        for level in ("info", "error"):
            with daemon("--log-level", level) as path:
                best[level] = max(best[level], asyncio.run(throughput(path, unmaps)))
    return {
        "info_doorbells_per_s": round(best["info"]),
        "error_doorbells_per_s": round(best["error"]),
        "info_vs_error": round(best["info"] / best["error"], 3),
    }


def log_cpu(unmaps: int, rounds: int) -> dict[str, Any]:
    host, setup, timed = frames(workloads.strict_ril(unmaps))
    chunks = [b"".join(timed[at : at + 64]) for at in range(0, len(timed), 64)]
    hello = wire.encode_json(
        FrameType.HELLO, 0, {"protocol": 1, "host": host, "compact": True, "compact_writes": True}
    )

    def once(level: str) -> float:
        logs.configure(level, "json", io.StringIO())
        try:
            connection = Connection(1, emulated_backend, None, logs.get_logger(client=1))
            connection.receive(hello + b"".join(setup))
            started = time.process_time()
            for chunk in chunks:
                connection.receive(chunk)
            return (time.process_time() - started) / len(timed)
        finally:
            structlog.reset_defaults()

    best = {"info": float("inf"), "error": float("inf")}
    for _ in range(rounds):
        for level in ("info", "error"):
            best[level] = min(best[level], once(level))
    return {
        "info_us_per_doorbell": round(best["info"] * 1e6, 2),
        "error_us_per_doorbell": round(best["error"] * 1e6, 2),
        "info_vs_error_cpu": round(best["info"] / best["error"], 3),
    }


def sync_latency(per_doorbell: int, pings: int, rounds: int) -> dict[str, Any]:
    records = workloads.strict_ril(32, per_doorbell=per_doorbell, sync_each=per_doorbell == 1)
    host, setup, doorbells = frames(records)
    samples: dict[str, list[float]] = {"echo": [], "daemon": []}
    for _ in range(rounds):
        for kind in samples:
            with spawned(kind) as path:
                samples[kind] += asyncio.run(latency(path, host, setup, doorbells[0], pings))
    out: dict[str, Any] = {"commands_per_doorbell": per_doorbell + 1}
    for kind, values in samples.items():
        out[kind] = {
            "p50_us": round(pct(values, 0.5), 1),
            "p99_us": round(pct(values, 0.99), 1),
            "samples": len(values),
        }
    out["p99_ratio"] = round(out["daemon"]["p99_us"] / out["echo"]["p99_us"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    unmaps, pings = (5_000, 300) if args.quick else (40_000, 2_000)
    out = {
        "log": log_cost(unmaps, args.rounds),
        "log_cpu": log_cpu(min(unmaps, 20_000), args.rounds + 2),
        "latency": [sync_latency(n, pings, args.rounds) for n in (1, 16)],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    log = out["log"]
    print(
        f"INFO vs error: {log['info_doorbells_per_s']:,} vs {log['error_doorbells_per_s']:,}"
        f" doorbells/s, ratio {log['info_vs_error']}"
    )
    cpu = out["log_cpu"]
    print(
        f"INFO vs error, CPU per doorbell through Connection.receive:"
        f" {cpu['info_us_per_doorbell']} vs {cpu['error_us_per_doorbell']} µs,"
        f" ratio {cpu['info_vs_error_cpu']}"
    )
    for lat in out["latency"]:
        print(
            f"sync latency, {lat['commands_per_doorbell']} commands: echo p50/p99"
            f" {lat['echo']['p50_us']}/{lat['echo']['p99_us']} µs, daemon"
            f" {lat['daemon']['p50_us']}/{lat['daemon']['p99_us']} µs,"
            f" p99 ratio {lat['p99_ratio']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
