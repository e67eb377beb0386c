"""K clients say HELLO at the same moment to a fresh ``viommud serve`` (issue 17).

    python bench/hello_burst.py [--json] [--clients 2 8 64] [--rounds 3] [--settle 3]
                                [-- SERVE-OPTIONS...]

Each round starts a new ``viommud serve`` (default settings, ``--log-level error``, plus
whatever follows ``--``) in another process, waits until its socket exists and then
``--settle`` seconds more (its spare session processes start and import viommud, as they
have long before the first VM of a real host connects), then opens K connections at once
from this process, each saying HELLO (a session each: bench/transport.py ``Pipe.open``).
The figure is the time from the burst's start until the LAST client has its HELLO_OK (and
the first's), best of ``--rounds`` rounds. The development machines are shared and noisy:
the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import workloads  # noqa: E402
from bench.transport import Pipe, frames  # noqa: E402


@contextlib.contextmanager
def fresh_daemon(extra: list[str], settle: float) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="viommud-burst-") as tmp:
        path = os.path.join(tmp, "s.sock")
        argv = [sys.executable, "-m", "viommud", "--log-level", "error", "serve"]
        argv += ["--socket", path, "--handshake-timeout", "300", *extra]
        child = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(path):
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start")
                time.sleep(0.02)
            time.sleep(settle)
            yield path
        finally:
            child.terminate()
            child.wait(timeout=60)


async def burst(path: str, clients: int) -> dict[str, float]:
    host, _, _ = frames(workloads.strict_ril(3))
    started = time.perf_counter()
    done: list[float] = []

    async def one() -> Pipe:
        pipe = await Pipe.open(path, host)
        done.append(time.perf_counter() - started)
        return pipe

    pipes = await asyncio.gather(*(one() for _ in range(clients)))
    for pipe in pipes:
        await pipe.close()
    return {"first_s": min(done), "last_s": max(done)}


def measure(clients: int, rounds: int, settle: float, extra: list[str]) -> dict[str, Any]:
    runs = []
    for _ in range(rounds):
        with fresh_daemon(extra, settle) as path:
            runs.append(asyncio.run(burst(path, clients)))
    best = min(runs, key=lambda r: r["last_s"])
    return {
        "clients": clients,
        "first_s": round(best["first_s"], 3),
        "last_s": round(best["last_s"], 3),
        "last_s_all": [round(r["last_s"], 3) for r in runs],
        "load": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, metavar="SECONDS")
    parser.add_argument("serve", nargs="*", help="more `viommud serve` options (after --)")
    args = parser.parse_args(argv)
    rows = [measure(k, args.rounds, args.settle, args.serve) for k in args.clients]
    out = {"cpus": len(os.sched_getaffinity(0)), "serve": args.serve, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for row in rows:
        print(
            f"{row['clients']:>3} clients: all HELLO_OK after {row['last_s']:.3f} s "
            f"(first {row['first_s']:.3f} s; rounds {row['last_s_all']}; load {row['load']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
