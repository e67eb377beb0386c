"""A session process's memory over a long strict SMMUv3 stream (issue 14: bounded memory).

    python bench/session_rss.py [--json] [--commands N] [--marks N,N,...]

Runs ``viommud serve`` (one process per session) in a child process, opens one session
(three devices with translate vSTEs, bench/workloads.py ``strict_ril``: TLBI_NH_VA range
invalidations each followed by a CMD_SYNC, four unmaps per doorbell), finds the session
process's pid with STATUS (``clients[].pid``) and streams the doorbells, pipelined,
cycling through them until ``--commands`` guest commands (default 10^6) were answered. The
session process's ``VmRSS`` (``/proc/PID/status``) is read at each mark (default 10^5 and
10^6 commands) and the STATS reply is checked: every command counted, no guest error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.transport import Pipe, commands_in, frames, spawned
from viommud.shell.client import status

DEFAULT_MARKS = (100_000, 1_000_000)
WINDOW = 256  # frames in flight


def rss_kib(pid: int) -> int:
    """``VmRSS`` of process ``pid`` (as bench/memory.py reads it)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as proc:
        for line in proc:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def measure(path: str, marks: tuple[int, ...], *, unmaps: int = 20_000) -> dict[str, Any]:
    records = workloads.strict_ril(unmaps, per_doorbell=4)
    host, setup, doorbells = frames(records)
    per_cycle = commands_in(doorbells, 16)
    pipe = await Pipe.open(path, host)
    pipe.writer.write(b"".join(setup))
    await pipe.writer.drain()
    if await pipe.replies(len(setup)):
        raise RuntimeError(f"set-up refused: {pipe.error_samples}")
    daemon = await status(path)
    pids = [c["pid"] for c in daemon["clients"] if c.get("pid")]
    if len(pids) != 1:
        raise RuntimeError(f"expected one session process, STATUS shows {daemon['clients']}")
    pid = pids[0]
    rss = {"session_start": rss_kib(pid)}
    sent = 0
    started = time.perf_counter()
    for mark in marks:
        while sent < mark:  # whole cycles: a mark is passed by less than one
            await pipe.stream(doorbells, WINDOW)
            sent += per_cycle
        rss[str(mark)] = rss_kib(pid)
    seconds = time.perf_counter() - started
    report = await pipe.stats()
    if report["errors"]["total"] or report["config_errors"]:
        raise RuntimeError(f"the daemon reported errors: {report['errors']}")
    await pipe.close()
    if pipe.errors:
        raise RuntimeError(f"refused doorbells: {pipe.error_samples}")
    marks_kib = [rss[str(m)] for m in marks]
    return {
        "session_pid": pid,
        "commands": sent,
        "commands_counted": report["commands"]["total"],
        "commands_per_cycle": per_cycle,
        "rss_kib": rss,
        "growth_kib": marks_kib[-1] - marks_kib[0],
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--marks", default=",".join(map(str, DEFAULT_MARKS)))
    args = parser.parse_args(argv)
    marks = tuple(int(m) for m in args.marks.split(","))
    with spawned("daemon") as path:
        result = asyncio.run(measure(path, marks))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:20} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
