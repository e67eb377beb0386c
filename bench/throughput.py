"""End-to-end throughput and sync latency through the Unix socket, against the echo ceiling.

    python bench/throughput.py [--json] [--quick] [--workload NAME ...] [--modes M,...]

Workloads (guest traces in the shapes Linux drivers produce; full mode at least 1,000,000
commands each, --quick about 20,000):

* ``smmuv3-strict``: arm-smmu-v3, ``iommu.strict=1`` with range invalidation, one unmap
  (TLBI_NH_VA + CMD_SYNC) per doorbell (bench/workloads.py);
* ``smmuv3-batched``: the same guest with CPUs racing for the queue: 16 unmaps and one
  CMD_SYNC per doorbell;
* ``vtd-strict-ats``: intel-iommu in scalable mode, strict: per unmap one doorbell of a
  page-selective P_IOTLB, a device-TLB invalidation per ATS device of the domain and a wait
  with status write (bench/workloads_vtd.py);
* ``virtio-map-unmap``: virtio-iommu under the DMA API: MAP per segment, UNMAP per buffer,
  one request (one REQUEST frame) each (bench/workloads_virtio.py);
* ``vtd-legacy-strict-ats`` (only when asked for with --workload): the VT-d guest in legacy
  mode, where every map is flushed too (caching mode); its second-level tables are never
  nested, so its devices are blocked and nothing reaches the backend (docs/vtd.md).

A command is an SMMUv3 command, a VT-d descriptor or a virtio-iommu request. The set-up
(vIOMMU, devices, their STEs / context and PASID entries / PROBE and ATTACH) is sent first
and not timed; then the same pre-encoded frames of the timed stream go to an echo server
with the same framing (bench/transport.py: the transport's ceiling) and to ``viommud
serve`` in another process, each in a fresh process, in this run, so the ratio survives a
noisy machine. Daemon modes (--modes, default all):

* ``per-doorbell``: the daemon as is;
* ``group-commit``: HELLO ``group_commit: true``: the daemon may carry the work of
  consecutive doorbells already waiting in its input into one backend call (a daemon that
  does not know the key ignores it, and the figures are those of per-doorbell);
* ``verify``: HELLO ``verify: true``, the verification oracle watching every barrier. It is
  much slower, so it replays the first part of the trace only (the table says how much).

Every stream must be clean: no ERROR frame, no guest error, no failed config record, no
virtio status other than OK, and the daemon's STATS must count every command sent (and, with
verify, no missed invalidation). Otherwise the figures are printed with the problems and the
exit status is 1.

Latency: one doorbell of 16 invalidations and a sync at a time, against the echo ping-pong of
the same bytes (p50 / p99 / p99.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads, workloads_virtio, workloads_vtd
from bench.scaling import grown
from bench.transport import Pipe, command_sizes, commands_in, frames, spawned

FULL_COMMANDS = 1_000_000
QUICK_COMMANDS = 20_000
# verify-on replays this much of each trace (the oracle costs 3-10x the daemon's own work)
VERIFY_COMMANDS = {"full": 100_000, "quick": 5_000}
MODES: dict[str, dict[str, bool]] = {
    "per-doorbell": {},
    "group-commit": {"group_commit": True},
    "verify": {"verify": True},
}


@dataclass
class Workload:
    name: str
    title: str
    host: dict[str, Any]
    setup: list[bytes]
    timed: list[bytes]
    size: int  # bytes per guest command in the timed frames; 0: requests, one command each
    note: str = ""

    @property
    def commands(self) -> int:
        return commands_in(self.timed, self.size)

    def head(self, commands: int) -> list[bytes]:
        """The shortest prefix of the timed frames with at least ``commands`` commands."""
        if not self.size:
            return self.timed[:commands]
        out, total = [], 0
        for frame in self.timed:
            if total >= commands:
                break
            out.append(frame)
            total += commands_in([frame], self.size)
        return out


def _from_records(
    name: str, title: str, records: list[dict[str, Any]], first_timed: int, note: str = ""
) -> Workload:
    host, setup, timed = frames(records, first_timed)
    sizes = set(command_sizes(records).values())
    assert len(sizes) == 1, "one kind of vIOMMU per workload"
    return Workload(name, title, host, setup, timed, sizes.pop(), note)


def _smmuv3(name: str, title: str, target: int, per_doorbell: int, sync_each: bool) -> Workload:
    """At most 50,000 commands generated (bench/workloads.py builds ~20,000 unmaps/s); a
    bigger trace is that one again with every address moved past the previous copy's, as
    bench/scaling.py grows its traces."""
    per_unmap = 2 if sync_each else 1 + 1 / per_doorbell
    unmaps = math.ceil(min(target, 50_000) / per_unmap / per_doorbell) * per_doorbell
    records = workloads.strict_ril(unmaps, per_doorbell=per_doorbell, sync_each=sync_each)
    host, setup, base = frames(records)
    copies = math.ceil(target / commands_in(base, 16))
    timed = [frame for copy in grown(base, copies) for frame in copy]
    note = f"{copies} copies of a {len(base):,}-doorbell trace" if copies > 1 else ""
    return Workload(name, title, host, setup, timed, 16, note)


def _vtd(target: int, scalable: bool) -> Workload:
    per_unmap = 3.3 if scalable else 5.2  # commands per unmap, on average, of this layout
    records, first = workloads_vtd.strict_ats(math.ceil(target / per_unmap), scalable=scalable)
    if scalable:
        name, title = "vtd-strict-ats", "VT-d strict, ATS (P_IOTLB + devTLBs + wait)"
    else:
        name, title = "vtd-legacy-strict-ats", "VT-d legacy strict, ATS (+ map flushes)"
    return _from_records(name, title, records, first)


def _virtio(target: int) -> Workload:
    records, first = workloads_virtio.map_unmap(target)
    return _from_records(
        "virtio-map-unmap", "virtio-iommu MAP/UNMAP (1 per request)", records, first
    )


BUILDERS: dict[str, Callable[[int], Workload]] = {
    "smmuv3-strict": lambda n: _smmuv3(
        "smmuv3-strict", "SMMUv3 strict (1 unmap + sync per doorbell)", n, 1, True
    ),
    "smmuv3-batched": lambda n: _smmuv3(
        "smmuv3-batched", "SMMUv3 batched (16 unmaps + sync per doorbell)", n, 16, False
    ),
    "vtd-strict-ats": lambda n: _vtd(n, True),
    "virtio-map-unmap": _virtio,
    "vtd-legacy-strict-ats": lambda n: _vtd(n, False),
}
DEFAULT_WORKLOADS = ["smmuv3-strict", "smmuv3-batched", "vtd-strict-ats", "virtio-map-unmap"]


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Run:
    seconds: float
    errors: int
    samples: list[str]
    stats: dict[str, Any] | None  # the daemon's STATS after the stream (daemon only)
    counted: int  # commands the daemon counted during the stream


async def measure(
    path: str, workload: Workload, timed: list[bytes], *, daemon: bool, **hello: bool
) -> Run:
    pipe = await Pipe.open(path, workload.host, **hello)
    for frame in workload.setup:
        pipe.writer.write(frame)
    await pipe.writer.drain()
    if await pipe.replies(len(workload.setup)):
        raise RuntimeError(f"{workload.name}: set-up refused: {pipe.error_samples}")
    before = (await pipe.stats())["commands"]["total"] if daemon else 0
    seconds = await pipe.stream(timed)
    stats = await pipe.stats() if daemon else None
    await pipe.close()
    counted = stats["commands"]["total"] - before if stats is not None else 0
    return Run(seconds, pipe.errors, pipe.error_samples, stats, counted)


def figures(run: Run, commands: int, frames_: int) -> dict[str, Any]:
    return {
        "commands": commands,
        "doorbells": frames_,
        "seconds": round(run.seconds, 3),
        "commands_per_s": round(commands / run.seconds),
        "doorbells_per_s": round(frames_ / run.seconds),
        "errors": run.errors,
    }


def run_workload(
    workload: Workload, modes: list[str], verify_commands: int, loop: str = "asyncio"
) -> tuple[dict[str, Any], list[str]]:
    """One table row and the problems found (empty: every stream was clean)."""
    problems: list[str] = []
    commands, doorbells = workload.commands, len(workload.timed)
    row: dict[str, Any] = {
        "workload": workload.name,
        "title": workload.title,
        "commands": commands,
        "doorbells": doorbells,
        "setup_frames": len(workload.setup),
        "command_bytes": workload.size,
    }
    if workload.note:
        row["note"] = workload.note
    with spawned("echo") as path:  # its runs are short (0.1 s at batched rates): median of 5
        runs = [asyncio.run(measure(path, workload, workload.timed, daemon=False)) for _ in "12345"]
    echo = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    row["echo"] = figures(echo, commands, doorbells)
    row["echo"]["runs_commands_per_s"] = sorted(round(commands / r.seconds) for r in runs)
    row["echo"]["errors"] = sum(r.errors for r in runs)  # every run must be clean
    progress(f"{workload.name}: {commands:,} commands, echo {row['echo']['commands_per_s']:,}/s")
    if row["echo"]["errors"]:
        problems.append(
            f"{workload.name} echo: {row['echo']['errors']} failed replies {echo.samples}"
        )
    row["modes"] = {}
    for mode in modes:
        timed = workload.timed
        if mode == "verify" and verify_commands < commands:
            timed = workload.head(verify_commands)
        sent = commands_in(timed, workload.size)
        with spawned("daemon", loop) as path:
            run = asyncio.run(measure(path, workload, timed, daemon=True, **MODES[mode]))
        result = figures(run, sent, len(timed))
        result["ratio"] = round(result["commands_per_s"] / row["echo"]["commands_per_s"], 3)
        result["slice"] = sent < commands
        assert run.stats is not None
        daemon_errors = run.stats["errors"]["total"] + run.stats["config_errors"]
        result["daemon_errors"] = run.stats["errors"]["by_code"]
        result["backend_calls"] = run.stats["backend"]["calls"]
        result["verify"] = run.stats["verify"]
        row["modes"][mode] = result
        progress(f"{workload.name} {mode}: {sent:,} commands, {result['commands_per_s']:,}/s")
        where = f"{workload.name} {mode}"
        if run.errors:
            problems.append(f"{where}: {run.errors} failed replies, first: {run.samples}")
        if daemon_errors:
            problems.append(f"{where}: STATS reports errors {run.stats['errors']}")
        if run.counted != sent:
            problems.append(f"{where}: the daemon counted {run.counted} commands, sent {sent}")
        if run.stats["verify"].get("missed"):
            problems.append(f"{where}: verification missed {run.stats['verify']['missed']}")
    if "per-doorbell" in row["modes"]:  # the keys of the two-workload version of this table
        row["daemon"] = row["modes"]["per-doorbell"]
        row["ratio"] = row["daemon"]["ratio"]
    return row, problems


async def latency(
    path: str,
    host: dict[str, Any],
    setup: list[bytes],
    frame: bytes,
    rounds: int,
    *,
    group_commit: bool = False,
) -> list[float]:
    pipe = await Pipe.open(path, host, group_commit=group_commit)
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


def measure_latency(quick: bool, loop: str = "asyncio") -> dict[str, Any]:
    records = workloads.strict_ril(32, per_doorbell=16, sync_each=False)
    host, setup, doorbells = frames(records)
    rounds = 300 if quick else 5000
    out: dict[str, Any] = {}
    for kind in ("echo", "daemon", "group_commit"):
        with spawned("echo" if kind == "echo" else "daemon", loop) as path:
            samples = asyncio.run(
                latency(
                    path, host, setup, doorbells[0], rounds, group_commit=kind == "group_commit"
                )
            )
        out[kind] = {
            "p50_us": round(pct(samples, 0.5), 1),
            "p99_us": round(pct(samples, 0.99), 1),
            "p999_us": round(pct(samples, 0.999), 1),
            "mean_us": round(statistics.fmean(samples) * 1e6, 1),
        }
    out["p99_ratio"] = round(out["daemon"]["p99_us"] / out["echo"]["p99_us"], 2)
    out["p99_ratio_group_commit"] = round(out["group_commit"]["p99_us"] / out["echo"]["p99_us"], 2)
    return out


def _names(values: list[str] | None, known: list[str], what: str) -> list[str]:
    names = [n for value in values or [] for n in value.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{'workload':<48} {'commands':>10} {'echo cmd/s':>11}  {'mode':<13} "
        f"{'daemon cmd/s':>12} {'ratio':>6} {'doorbells/s':>11}"
    )
    notes = []
    for row in results["throughput"]:
        left = f"{row['title']:<48} {row['commands']:>10,} {row['echo']['commands_per_s']:>11,}"
        if row.get("note"):
            notes.append(f"{row['workload']}: {row['note']}")
        for mode, r in row["modes"].items():
            label = mode + ("*" if r["slice"] else "")
            print(
                f"{left}  {label:<13} {r['commands_per_s']:>12,} {r['ratio']:>6} "
                f"{r['doorbells_per_s']:>11,}"
            )
            if r["slice"]:
                notes.append(
                    f"{row['workload']} {mode}*: the first {r['commands']:,} commands "
                    f"({r['doorbells']:,} doorbells) of the trace"
                )
            left = " " * len(left)
    if any(row["command_bytes"] == 0 for row in results["throughput"]):
        print("(virtio-iommu: doorbells/s counts requests)")
    for note in notes:
        print(note)
    lat = results.get("latency")
    if lat:
        print()
        print(
            f"{'sync latency (16 unmaps + sync)':<30} {'p50 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9}"
        )
        for kind in ("echo", "daemon", "group_commit"):
            r = lat[kind]
            label = {"daemon": "daemon per-doorbell", "group_commit": "daemon group-commit"}
            print(
                f"{label.get(kind, kind):<30} {r['p50_us']:>8} {r['p99_us']:>8} {r['p999_us']:>9}"
            )
        print(
            f"p99 daemon / echo: per-doorbell {lat['p99_ratio']}, "
            f"group-commit {lat['p99_ratio_group_commit']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument(
        "--workload",
        action="append",
        metavar="NAME",
        help=f"run only these (repeatable); one of {', '.join(BUILDERS)}",
    )
    parser.add_argument(
        "--modes",
        action="append",
        metavar="M,...",
        help=f"daemon modes, comma-separated (default all): {', '.join(MODES)}",
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the sync-latency part")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the daemon's event loop (serve --loop); the echo server always runs asyncio",
    )
    args = parser.parse_args(argv)
    names = _names(args.workload, list(BUILDERS), "workload") or DEFAULT_WORKLOADS
    modes = _names(args.modes, list(MODES), "mode") or list(MODES)
    target = QUICK_COMMANDS if args.quick else FULL_COMMANDS
    verify_commands = VERIFY_COMMANDS["quick" if args.quick else "full"]
    results: dict[str, Any] = {"throughput": [], "modes": modes}
    problems: list[str] = []
    for name in names:
        row, found = run_workload(BUILDERS[name](target), modes, verify_commands, args.loop)
        results["throughput"].append(row)
        problems += found
    if not args.no_latency:
        results["latency"] = measure_latency(args.quick, args.loop)
    results["loop"] = args.loop
    results["problems"] = problems
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
