"""The daemon under load (issue 14): figures for docs/operations.md §10.

    python bench/daemon_load.py [--json] [--quick]

* **health while flooded**: ``viommud health`` (connect + probe HELLO) round trips, one
  after another, while another client floods its session with heavy doorbells (20,000
  TLBI_NH_VA commands each, 4 in flight); p50 / p99 / max, with one process per session
  (the default) and with ``--in-process``;
* **HELLO burst**: N clients connect at once and say HELLO (a session each) to a daemon
  that has served one session before; the time until the first and the last HELLO_OK (one
  spare session process waits ready, each further one costs an interpreter start);
* **log level**: doorbells/s of the strict SMMUv3 stream (bench/workloads.py
  ``strict_ril``, one unmap per doorbell) at ``--log-level info`` and ``error``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import workloads  # noqa: E402
from bench.hello_burst import burst  # noqa: E402
from bench.transport import Pipe, frames  # noqa: E402
from protocols.frames import FrameType  # noqa: E402
from viommud import wire  # noqa: E402
from viommud.shell.client import health  # noqa: E402

TLBI_PAIR = bytes.fromhex("12000000000001000107ffff0000000012000000000001000100004000000000")


@contextmanager
def daemon(*args: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="viommud-load-") as tmp:
        path = os.path.join(tmp, "s.sock")
        child = subprocess.Popen(
            [sys.executable, "-m", "viommud", "serve", "--socket", path, *args],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(path):
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start")
                time.sleep(0.02)
            yield path
        finally:
            child.terminate()
            child.wait(timeout=60)


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2),
    }


async def health_while_flooded(path: str, probes: int) -> dict[str, float]:
    records = workloads.strict_ril(3)
    host, setup, _ = frames(records)
    flood = await Pipe.open(path, host)
    flood.writer.write(b"".join(setup))
    await flood.replies(len(setup))
    heavy = wire.encode_guest_data(FrameType.CMDS, 9, "v", TLBI_PAIR * 10_000)
    stop = asyncio.Event()

    async def flooding() -> int:
        rung = 0
        while not stop.is_set():
            flood.writer.write(heavy * 4)
            await flood.writer.drain()
            await flood.replies(4)
            rung += 4
        return rung

    task = asyncio.create_task(flooding())
    await asyncio.sleep(0.5)
    samples = []
    for _ in range(probes):
        started = time.perf_counter()
        await health(path, wait=60)
        samples.append(time.perf_counter() - started)
    stop.set()
    rung = await task
    await flood.close()
    return {**_ms(samples), "flood_doorbells": rung}


async def hello_burst(path: str, clients: int) -> dict[str, Any]:
    host, _, _ = frames(workloads.strict_ril(3))
    warm = await Pipe.open(path, host)  # the daemon's first spare is ready: steady state
    await warm.close()
    await asyncio.sleep(2.0)  # and so is the next one
    timed = await burst(path, clients)
    return {"clients": clients, **{key: round(value, 2) for key, value in timed.items()}}


async def throughput(path: str, unmaps: int) -> float:
    host, setup, doorbells = frames(workloads.strict_ril(unmaps))
    pipe = await Pipe.open(path, host)
    pipe.writer.write(b"".join(setup))
    await pipe.replies(len(setup))
    seconds = await pipe.stream(doorbells, 256)
    await pipe.close()
    return len(doorbells) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    probes, clients, unmaps = (20, 8, 5_000) if args.quick else (200, 64, 40_000)
    out: dict[str, Any] = {"health_while_flooded": {}}
    for mode, extra in (("processes", ()), ("in-process", ("--in-process",))):
        with daemon("--log-level", "error", *extra) as path:
            out["health_while_flooded"][mode] = asyncio.run(health_while_flooded(path, probes))
    with daemon("--log-level", "error", "--handshake-timeout", "300") as path:
        out["hello_burst"] = asyncio.run(hello_burst(path, clients))
    rates = {}
    for level in ("info", "error"):
        with daemon("--log-level", level) as path:
            rates[level] = round(asyncio.run(throughput(path, unmaps)))
    out["doorbells_per_s"] = {**rates, "info_vs_error": round(rates["info"] / rates["error"], 3)}
    print(json.dumps(out, indent=2) if args.json else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
