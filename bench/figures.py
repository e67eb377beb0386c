"""Regenerate the figures of the README, section by section, in one run.

    python bench/figures.py [--quick] [--only NAME ...] [--out FILE]

Each section runs the command that produces one README table (a ``viommud replay`` or a
bench script, in a child process of this interpreter) and prints the table as the README
shows it, or the script's own table when its layout is the README's. Sections:

* ``real-trace``: "Measured on the bundled real trace" (`viommud replay` of the real SMMUv3
  trace, per doorbell and with ``--group-commit 128``);
* ``coalescing``: "Dispatch, coalescing and verification" (bench/coalescing.py);
* ``per-doorbell``: Throughput, per doorbell: `viommud replay` against its transport floor
  (bench/replay_floor.py, default settings: each doorbell on its own);
* ``group-commit``: Throughput, group commit: the same with ``--group-commit N`` for the N
  listed (N vCPUs racing, at most N doorbells of a vIOMMU pending);
* ``doorbell-us``: daemon CPU per doorbell in process, by layer (bench/doorbell.py);
* ``virtio-scale``: virtio-iommu MAP/UNMAP at 10^3 / 10^5 / 10^6 live mappings
  (bench/virtio_scale.py);
* ``clients``: 1 and 2 concurrent clients, a session process each, against their echo floor
  (bench/replay_clients.py);
* ``log-latency``: INFO logging's cost and the sync p50 / p99 against the echo's, default
  settings (bench/log_latency.py);
* ``socket``: the socket benchmark against the echo server, all modes, and sync latency
  (bench/throughput.py);
* ``scaling``, ``memory``, ``decode``: bench/scaling.py, bench/memory.py, bench/decode.py.

``--quick`` passes ``--quick`` to every script (small sizes: a smoke run, not README
figures). The README's "Real guests" table comes from ``python -m capture.kit`` (it boots
QEMU), not from here. The full run takes about 35 minutes on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
REAL = ROOT / "fixtures" / "smmuv3-linux61-strict.jsonl.xz"
GROUP_COMMIT = [8, 128]


def _run(argv: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode not in (0, 1):  # 1: a bench that reports a missed target
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def _json(argv: list[str]) -> Any:
    return json.loads(_run(argv))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def real_trace(quick: bool) -> str:
    del quick  # the real trace is small
    rows = []
    for label, extra in (("per doorbell", []), ("--group-commit 128", ["--group-commit", "128"])):
        report = _json(["-m", "viommud", "replay", str(REAL), "--json", *extra])
        calls = report["backend"]["calls"]
        rows.append(
            [
                label,
                report["commands"]["total"],
                report["barriers"],
                calls.get("IOMMU_HWPT_INVALIDATE", 0),
                report["backend"]["invalidation_entries"],
                report["baseline"]["invalidate_calls"],
                f"{report['verify']['missed']} / {report['verify']['over']}",
                round(report["commands_per_s"]),
            ]
        )
    head = ["mode", "commands", "barriers", "HWPT_INVALIDATE calls", "entries", "baseline"]
    return _table([*head, "missed / over", "commands/s"], rows)


_FLOOR: dict[bool, list[dict[str, Any]]] = {}  # one replay_floor run serves both sections


def _floor(quick: bool) -> list[dict[str, Any]]:
    if quick not in _FLOOR:
        argv = [str(BENCH / "replay_floor.py"), "--json", "--group-commit"]
        _FLOOR[quick] = _json(argv + [*map(str, GROUP_COMMIT)] + (["--quick"] if quick else []))
    return _FLOOR[quick]


def per_doorbell(quick: bool) -> str:
    rows = []
    for row in _floor(quick):
        m = row["modes"]["per-doorbell"]
        rows.append(
            [
                row["workload"],
                f"{m['ratio']:.2f}",
                m["doorbells_per_s"],
                m["commands_per_s"],
                m["invalidate_calls"],
                m["baseline_calls"],
            ]
        )
    head = ["workload", "ratio to floor", "doorbells/s", "commands/s", "calls", "baseline"]
    return _table(head, rows)


def group_commit(quick: bool) -> str:
    rows = []
    for row in _floor(quick):
        for mode, m in row["modes"].items():
            if mode == "per-doorbell":
                continue
            rows.append(
                [
                    row["workload"],
                    m["group_commit"],
                    f"{m['ratio']:.2f}",
                    m["doorbells_per_s"],
                    m["commands_per_s"],
                    m["invalidate_calls"],
                    m["baseline_calls"],
                ]
            )
    head = ["workload", "N (vCPUs racing)", "ratio to floor", "doorbells/s", "commands/s"]
    return _table([*head, "calls", "baseline"], rows)


def doorbell_us(quick: bool) -> str:
    rows = []
    for row in _json([str(BENCH / "doorbell.py"), "--json", *(["--quick"] if quick else [])]):
        layers = row["layers_us"]
        rows.append(
            [
                row["workload"],
                row["us_per_doorbell_mean"],
                layers["frontend"],
                layers["dispatcher"],
                layers["emulator"],
                layers["rest"],
                row["commands_per_s"],
            ]
        )
    head = ["workload", "µs / doorbell", "frontend", "dispatcher", "emulator", "rest"]
    return _table([*head, "commands/s"], rows)


def virtio_scale(quick: bool) -> str:
    sizes = ["1000", "10000"] if quick else ["1000", "100000", "1000000"]
    rows = [
        [r["mappings"], r["map_us"], r["unmap_us"], f"{r['map_ratio']} / {r['unmap_ratio']}"]
        for r in _json([str(BENCH / "virtio_scale.py"), "--json", "--sizes", *sizes])
    ]
    return _table(["live mappings", "MAP µs", "UNMAP µs", "ratio to 10^3 (MAP / UNMAP)"], rows)


def _script(name: str) -> Callable[[bool], str]:
    def run(quick: bool) -> str:
        out = _run([str(BENCH / name), *(["--quick"] if quick else [])])
        return "```\n" + out.rstrip() + "\n```"

    return run


SECTIONS: dict[str, Callable[[bool], str]] = {
    "real-trace": real_trace,
    "coalescing": _script("coalescing.py"),
    "per-doorbell": per_doorbell,
    "group-commit": group_commit,
    "doorbell-us": doorbell_us,
    "virtio-scale": virtio_scale,
    "clients": _script("replay_clients.py"),
    "log-latency": _script("log_latency.py"),
    "socket": _script("throughput.py"),
    "scaling": _script("scaling.py"),
    "memory": _script("memory.py"),
    "decode": _script("decode.py"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, not README figures")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="these sections")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    parts = []
    for name in args.only or list(SECTIONS):
        started = time.perf_counter()
        body = SECTIONS[name](args.quick)
        took = time.perf_counter() - started
        part = f"### {name} ({took:.0f} s)\n\n{body}\n"
        print(part, flush=True)
        parts.append(part)
    if args.out is not None:
        args.out.write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
