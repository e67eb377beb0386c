"""Aggregate replay throughput with 1 and 2 concurrent clients, against its transport floor.

    python bench/replay_clients.py [--json] [--quick] [--clients 1 2] [--rounds 3]

The same trace file (bench/replay_floor.py's workloads) is replayed by N clients at once,
each a process of its own running the replay client (viommud.shell.replay, what
``viommud replay --socket`` runs), against

* one ``viommud serve`` in another process with default settings: every client's session
  runs in a session process of its own (docs/operations.md), so N sessions can use N cores;
* the floor: N echo servers (bench/transport.py), one per client — the daemon's process per
  session, with the transport's work only.

Every client process starts, reads its trace's first bytes and connects nothing until all
are ready; they are then released together, and each reports when it started and ended its
replay. The aggregate rate of a round is ``N * doorbells / (last end - first start)``; each
point is the best of ``--rounds`` rounds (this machine is shared and has slow spells). The
figure is the scaling ratio: aggregate doorbells/s with N clients / with 1 client, for the
daemon and for the floor, measured in the same run. Issue 17's target: ≥ 1.7x with 2
clients on 2 cores. The clients themselves take CPU (parsing, framing: what the floor
measures), so on a 2-core machine N clients and N sessions share the same 2 cores.

Each client reports the CPU it used, so every point also states its ceiling: an estimate of
the ratio N clients and N sessions sharing the machine's cores could reach, from the client's
CPU per doorbell and the 1-client daemon time per doorbell (``ceiling()``). The pipe client
sends its timed frames several times over (``REPEAT``) so that a round lasts about a second
of daemon time. Run it on a quiet machine: two sessions need both cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.replay_floor import _trace  # noqa: E402
from bench.transport import Pipe, frames, spawned  # noqa: E402
from viommud.shell.replay import replay  # noqa: E402


def _go() -> bool:
    print("ready", flush=True)
    return sys.stdin.readline().strip() == "go"


def replay_client(trace: str, socket: str) -> int:
    """One ``replay`` client process: wait for ``go`` on stdin, replay, print its times."""
    if not _go():
        return 1
    started, cpu = time.time(), time.process_time()
    result = asyncio.run(replay(trace, socket, verify=False))
    ended, cpu = time.time(), time.process_time() - cpu
    if result.report is None:
        print(json.dumps({"error": result.error}), flush=True)
        return 1
    out = {
        "start": started,
        "end": ended,
        "cpu": cpu,
        "guest_errors": result.report["errors"]["total"],
    }
    print(json.dumps(out), flush=True)
    return 0


def pipe_client(trace: str, socket: str, repeat: str = "1") -> int:
    """One ``pipe`` client process: HELLO and the set-up first, then wait for ``go`` and
    stream the doorbells (pre-encoded frames, bench/transport.py) ``repeat`` times over,
    print its times and the CPU it used meanwhile."""
    host, setup, timed = frames(_records(Path(trace)))
    timed *= int(repeat)  # TLB invalidations are idempotent; seq is the client's to choose

    async def run() -> dict[str, Any]:
        pipe = await Pipe.open(socket, host)
        pipe.writer.write(b"".join(setup))
        await pipe.writer.drain()
        if await pipe.replies(len(setup)):
            raise RuntimeError(f"set-up refused: {pipe.error_samples}")
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, _go):
            raise RuntimeError("not released")
        started, cpu = time.time(), time.process_time()
        await pipe.stream(timed)
        ended, cpu = time.time(), time.process_time() - cpu
        await pipe.close()
        return {"start": started, "end": ended, "cpu": cpu, "guest_errors": pipe.errors}

    print(json.dumps(asyncio.run(run())), flush=True)
    return 0


CLIENTS = {"pipe": pipe_client, "replay": replay_client}


def _round(trace: Path, sockets: list[str], kind: str, repeat: int = 1) -> list[dict[str, Any]]:
    """One client process per socket, released together; their reports."""
    extra = [str(repeat)] if kind == "pipe" else []
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", kind, str(trace), path, *extra],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for path in sockets
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("client did not start")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = []
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if child.wait(timeout=600) != 0 or not line:
                raise RuntimeError(f"client failed: {line.strip()}")
            reports.append(json.loads(line))
        return reports
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _records(trace: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


@contextlib.contextmanager
def _echoes(n: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(spawned("echo")) for _ in range(n)]


# The pipe client's timed frames are sent this many times over, so that a round lasts long
# enough (about a second of daemon time) for a session process's start-up to be noise.
REPEAT = {"strict": 1, "noril-64": 10}


def ceiling(clients: int, cpus: int, daemon_s: float, client_s: float) -> float:
    """An estimate of the best scaling ratio when every client and every session shares
    ``cpus`` cores: one client's rate is taken as bound by its session (``daemon_s``
    seconds per doorbell, the 1-client round's wall time, which counts the session's waits
    as CPU, so the estimate errs low), N clients' by N sessions and N clients sharing the
    cores (``daemon_s + client_s`` per doorbell)."""
    return min(clients, cpus * daemon_s / (daemon_s + client_s))


def measure(name: str, counts: list[int], *, kind: str, quick: bool, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="viommud-clients-") as tmp:
        trace, doorbells = _trace(name, quick, Path(tmp))
        repeat = 1
        if kind == "pipe":  # the set-up's doorbells (STE installs) are not timed
            repeat = 1 if quick else REPEAT.get(name, 1)
            doorbells = len(frames(_records(trace))[2]) * repeat
        points: dict[str, list[dict[str, Any]]] = {"daemon": [], "floor": []}
        client_cpu: list[float] = []  # seconds per doorbell, daemon rounds
        with spawned("daemon") as daemon, _echoes(max(counts)) as echoes:
            _round(trace, [daemon], kind, repeat)  # warm-up: the spare session process exists
            for n in counts:
                best: dict[str, float] = {"daemon": 0.0, "floor": 0.0}
                for _ in range(rounds):
                    for side, sockets in (("floor", echoes[:n]), ("daemon", [daemon] * n)):
                        reports = _round(trace, sockets, kind, repeat)
                        if side == "daemon" and any(r["guest_errors"] for r in reports):
                            raise RuntimeError(f"guest errors: {reports}")
                        if side == "daemon":
                            client_cpu += [r["cpu"] / doorbells for r in reports]
                        wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
                        best[side] = max(best[side], n * doorbells / wall)
                for side, series in points.items():
                    series.append({"clients": n, "doorbells_per_s": round(best[side])})
        cpus = len(os.sched_getaffinity(0))
        client_s = statistics.median(client_cpu)
        daemon_s = 1 / points["daemon"][0]["doorbells_per_s"]
        for series in points.values():
            for p in series:
                p["ratio_to_1"] = round(p["doorbells_per_s"] / series[0]["doorbells_per_s"], 3)
        for p in points["daemon"]:
            p["ceiling"] = round(ceiling(p["clients"], cpus, daemon_s, client_s), 3)
        return {
            "workload": name,
            "client": kind,
            "doorbells_per_client": doorbells,
            "cpus": cpus,
            "client_cpu_us_per_doorbell": round(client_s * 1e6, 2),
            "daemon_us_per_doorbell_1_client": round(daemon_s * 1e6, 2),
            **points,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workload", nargs="+", default=["strict", "noril-64"])
    parser.add_argument(
        "--client",
        nargs="+",
        choices=sorted(CLIENTS),
        default=["pipe", "replay"],
        help="pipe: pre-encoded frames after HELLO and set-up (the daemon's own scaling); "
        "replay: the replay client from its start (trace parsing and HELLO included)",
    )
    args = parser.parse_args(argv)
    if args.clients[0] != 1:
        parser.error("--clients must start with 1 (the ratio's base)")
    rows = [
        measure(w, args.clients, kind=kind, quick=args.quick, rounds=args.rounds)
        for kind in args.client
        for w in args.workload
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        for d, f in zip(row["daemon"], row["floor"], strict=True):
            print(
                f"{row['client']:>6} {row['workload']:>9} {d['clients']} client(s): daemon"
                f" {d['doorbells_per_s']:,} doorbells/s ({d['ratio_to_1']:.2f}x of 1),"
                f" floor {f['doorbells_per_s']:,} ({f['ratio_to_1']:.2f}x of 1);"
                f" ceiling {d['ceiling']:.2f}x"
            )
        print(
            f"{'':>16} client CPU {row['client_cpu_us_per_doorbell']} us/doorbell, daemon"
            f" {row['daemon_us_per_doorbell_1_client']} us/doorbell with 1 client,"
            f" {row['cpus']} cores"
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(CLIENTS[sys.argv[2]](*sys.argv[3:]))
    raise SystemExit(main())
