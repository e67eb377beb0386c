"""``python -m capture.kit``: boot real Debian guests behind QEMU's vIOMMUs, capture their
invalidation traffic, import it with ``viommud import qemu-log`` and replay it with the oracle.

Each configuration (capture/configs.py) leaves a directory ``OUT/NAME/`` with

* ``MANIFEST.json``: QEMU and kernel versions, the QEMU command line, the workload, the
  guest's progress markers, the queue registers, the import and replay results;
* ``trace.log.xz``: QEMU's ``log`` trace backend output (``-msg timestamp=on``);
* ``queue.bin.xz``: the guest's command queue (SMMUv3) or invalidation queue (VT-d) memory,
  saved with the monitor's ``pmemsave`` after the guest's power-off;
* ``tables.bin.xz``: the stream / context tables the vIOMMU's registers name at that point
  (capture/tables.py; the manifest's ``tables`` says what each region is);
* ``console.log``: the serial console.

docs/capture.md describes the kit and how to read a capture.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from capture import initramfs
from capture.assets import (
    CaptureError,
    default_cache,
    ensure_qemu,
    fetch_busybox,
    fetch_kernel,
    module_closure,
    qemu_version,
)
from capture.configs import CONFIGS, Config
from capture.figures import qemu_calls
from capture.guest import GuestRun, qemu_argv, run_guest

__all__ = ["capture", "import_and_replay", "main"]

DEFAULT_CONFIGS = ("smmuv3-strict", "vtd-legacy", "vtd-scalable", "smmuv3-lazy", "virtio-iommu")
DISK_MIB = 8
TFTP_BYTES = 128 * 1024
_EVENT = re.compile(r"^(?:\d+@\d+\.\d+:)?([a-z][a-z0-9_]*)\b")


def _xz(path: Path) -> Path:
    out = path.with_name(path.name + ".xz")
    with path.open("rb") as src, lzma.open(out, "wb", preset=9) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    path.unlink()
    return out


def event_counts(trace: Path) -> dict[str, int]:
    """How many lines of each trace event the log holds."""
    counts: Counter[str] = Counter()
    with trace.open(errors="replace") as lines:
        for line in lines:
            found = _EVENT.match(line)
            if found is not None:
                counts[found[1]] += 1
    return dict(sorted(counts.items()))


def _viommud(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "viommud", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "VIOMMUD_LOG_FORMAT": "json"},
    )


def import_and_replay(capture_dir: Path, *, timeout: float = 600.0) -> dict[str, Any]:
    """Imports a capture directory's trace the way a user would, with no option (the
    importer detects the model, reads the ``.xz`` log and finds ``queue.bin.xz`` beside it),
    and replays it (verify on); the outcome as JSON.

    Works on a kit's output and on the committed fixtures alike: only MANIFEST.json,
    trace.log.xz and queue.bin.xz are read.
    """
    manifest = json.loads((capture_dir / "MANIFEST.json").read_text())
    result: dict[str, Any] = {"model": manifest["model"], "import": None, "replay": None}
    with tempfile.TemporaryDirectory(prefix="viommud-capture-") as tmp:
        work = Path(tmp)
        for name in ("trace.log.xz", "queue.bin.xz"):
            if (capture_dir / name).exists():
                shutil.copyfile(capture_dir / name, work / name)
        out = work / f"{manifest['config']}.jsonl"
        args = ["import", "qemu-log", str(work / "trace.log.xz"), "-o", str(out)]
        started = time.monotonic()
        done = _viommud(args, timeout)
        import_seconds = round(time.monotonic() - started, 2)
        result["import"] = {
            "ok": done.returncode == 0,
            "exit": done.returncode,
            "argv": ["viommud", *(a.replace(str(work) + "/", "") for a in args)],
            "seconds": import_seconds,
            "stderr": done.stderr.strip()[-2000:],
        }
        if done.returncode != 0:
            return result
        with out.open() as lines:
            result["import"]["records"] = sum(1 for _ in lines) - 1
        started = time.monotonic()
        replay = _viommud(["replay", "--json", "--no-progress", str(out)], timeout)
        report: dict[str, Any] | None = None
        try:
            report = json.loads(replay.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            report = None
        calls = sum(report["backend"]["calls"].values()) if report else None
        result["replay"] = {
            "exit": replay.returncode,
            "seconds": round(time.monotonic() - started, 2),
            "backend_calls": calls,
            "missed": report["verify"]["missed"] if report else None,
            "report": report,
            "stderr": replay.stderr.strip()[-2000:],
        }
        if report is not None:
            result["qemu_calls"] = qemu_calls(result["model"], out, report)
    return result


def capture(
    config: Config,
    out_root: Path,
    cache: Path,
    workload: initramfs.Workload,
    *,
    timeout: float,
    install: bool,
    memory_mib: int,
    replay: bool,
    log: Any = sys.stderr,
    smp: int = 1,
) -> dict[str, Any]:
    """Boots ``config`` once and leaves its capture directory; returns its manifest."""
    started = time.monotonic()
    if not config.domain_switch:
        workload = replace(workload, rebind=False)
    log.write(f"{config.name}: preparing ({config.description})\n")
    log.flush()
    binary = ensure_qemu(config.arch, install=install)
    kernel = fetch_kernel(cache, config.arch, config.suite)
    busybox = fetch_busybox(cache, config.arch)
    modules = module_closure(kernel, list(config.modules))
    workdir = out_root / config.name
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "tftp").mkdir(parents=True)
    (workdir / "tftp" / workload.tftp_file).write_bytes(os.urandom(TFTP_BYTES))
    with (workdir / "disk.img").open("wb") as disk:
        disk.truncate(DISK_MIB << 20)
    initrd = workdir / "initramfs.cpio"
    initrd.write_bytes(initramfs.build(busybox.binary.read_bytes(), modules, workload))
    argv = qemu_argv(
        config, binary, kernel.vmlinuz, initrd, workdir, memory_mib=memory_mib, smp=smp
    )
    log.write(f"{config.name}: booting {kernel.release} under {binary.name} (TCG)\n")
    log.flush()
    run: GuestRun = run_guest(config, argv, workdir, timeout=timeout, log=log)
    events = event_counts(run.trace) if run.trace.exists() else {}
    manifest: dict[str, Any] = {
        "config": config.name,
        "model": config.model,
        "description": config.description,
        "qemu": {"binary": binary.name, "version": qemu_version(binary)},
        "kernel": {
            "package": kernel.package,
            "deb": kernel.deb,
            "release": kernel.release,
            "suite": kernel.suite,
        },
        "busybox": busybox.deb,
        "modules": [module.name for module in modules],
        "machine": list(config.machine),
        "qemu_argv": [
            arg.replace(str(workdir), ".").replace(str(kernel.root), kernel.package)
            for arg in [binary.name, *argv[1:]]
        ],
        "cmdline": argv[argv.index("-append") + 1],
        "trace_events": list(config.events),
        "root_ports": config.root_ports,
        "ats": config.ats,
        "workload": asdict(workload),
        "memory_mib": memory_mib,
        "smp": smp,
        "boot_seconds": run.seconds,
        "exit_code": run.exit_code,
        "timed_out": run.timed_out,
        "markers": run.markers,
        "queue": run.dump_info,
        "tables": run.tables_info,
        "trace_lines": sum(events.values()),
        "events": events,
        "problems": run.problems,
    }
    for scratch in ("disk.img", "initramfs.cpio", "events", "monitor"):
        (workdir / scratch).unlink(missing_ok=True)
    shutil.rmtree(workdir / "tftp", ignore_errors=True)
    if run.trace.exists():
        _xz(run.trace)
    for dumped in (run.dump, run.tables):
        if dumped is not None and dumped.exists():
            _xz(dumped)
    _write_manifest(workdir, manifest)
    if replay:
        log.write(f"{config.name}: import + replay\n")
        log.flush()
        manifest["result"] = import_and_replay(workdir)
        _write_manifest(workdir, manifest)
    manifest["total_seconds"] = round(time.monotonic() - started, 1)
    _write_manifest(workdir, manifest)
    return manifest


def _write_manifest(workdir: Path, manifest: dict[str, Any]) -> None:
    (workdir / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


def summary(manifest: dict[str, Any]) -> str:
    """One line per configuration: booted, trace size, import and replay outcome."""
    parts = [
        f"{manifest['config']}:",
        f"boot {manifest['boot_seconds']} s",
        "workload done" if "workload-done" in " ".join(manifest["markers"]) else "NO WORKLOAD",
        f"{manifest['trace_lines']} trace lines",
    ]
    result = manifest.get("result") or {}
    imported = result.get("import")
    if imported is not None:
        parts.append("import ok" if imported.get("ok") else "import FAILED")
    replayed = result.get("replay")
    if replayed is not None:
        parts.append(
            f"replay exit {replayed['exit']}, {replayed['backend_calls']} backend calls, "
            f"missed {replayed['missed']}"
        )
    if manifest["problems"]:
        parts.append("problems: " + "; ".join(manifest["problems"]))
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capture.kit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "configs",
        nargs="*",
        metavar="CONFIG",
        help=f"configurations to boot (default: all): {', '.join(CONFIGS)}",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("captures"), help="output directory")
    parser.add_argument("--cache", type=Path, default=None, help="default ~/.cache/viommud-capture")
    parser.add_argument("--timeout", type=float, default=600.0, help="per boot, seconds")
    parser.add_argument("--memory", type=int, default=512, help="guest RAM, MiB")
    parser.add_argument("--smp", type=int, default=1, help="guest vCPUs (QEMU threads, MTTCG)")
    parser.add_argument("--disk-kib", type=int, default=1024, help="disk workload (multiple of 64)")
    parser.add_argument("--no-net", action="store_true", help="skip the network workload")
    parser.add_argument("--no-rebind", action="store_true", help="skip the domain switches")
    parser.add_argument("--no-replay", action="store_true", help="capture only")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get install")
    parser.add_argument("--list", action="store_true", help="list the configurations")
    parser.add_argument(
        "--export",
        type=Path,
        metavar="DIR",
        help="boot nothing: copy the captures in --out to DIR (fixtures/captures) without "
        "their import results and scratch files",
    )
    args = parser.parse_args(argv)
    if args.list:
        for config in CONFIGS.values():
            print(f"{config.name:16} {config.description}")
        return 0
    names = args.configs or list(DEFAULT_CONFIGS)
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {', '.join(unknown)} (see --list)")
    if args.smp < 1:
        parser.error("--smp must be at least 1")
    if args.disk_kib < 0 or args.disk_kib % 64:
        parser.error("--disk-kib must be a non-negative multiple of 64")
    workload = initramfs.Workload(
        disk_kib=args.disk_kib, net=not args.no_net, rebind=not (args.no_rebind or args.no_net)
    )
    if args.export is not None:
        export(args.out, args.export, names)
        return 0
    cache = args.cache or default_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in names:
        try:
            manifest = capture(
                CONFIGS[name],
                args.out,
                cache,
                workload,
                timeout=args.timeout,
                install=not args.no_install,
                memory_mib=args.memory,
                replay=not args.no_replay,
                smp=args.smp,
            )
        except CaptureError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(summary(manifest), flush=True)
        if manifest["problems"]:
            status = 1
    write_index(args.out)
    return status


EXPORTED = ("trace.log.xz", "queue.bin.xz", "tables.bin.xz", "console.log")


def export(out: Path, dest: Path, names: list[str]) -> None:
    """Copies captures to ``dest`` as the repository keeps them: the manifest without the
    import and replay results (they belong to the importer of the day), the compressed trace
    and queue dump, the console."""
    for name in names:
        src = out / name
        manifest = json.loads((src / "MANIFEST.json").read_text())
        if manifest["problems"]:
            raise CaptureError(f"{src}: not exported, the capture had problems")
        manifest.pop("result", None)
        manifest.pop("total_seconds", None)
        target = dest / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for file in EXPORTED:
            if (src / file).exists():
                shutil.copyfile(src / file, target / file)
        _write_manifest(target, manifest)
    write_index(dest)


def write_index(out: Path) -> None:
    """OUT/MANIFEST.txt: one line per capture directory in OUT, with versions and options."""
    lines = []
    for path in sorted(out.glob("*/MANIFEST.json")):
        manifest = json.loads(path.read_text())
        lines.append(summary(manifest))
        lines.append(
            f"    QEMU {manifest['qemu']['version']} ({manifest['qemu']['binary']}), "
            f"kernel {manifest['kernel']['package']} ({manifest['kernel']['deb']})"
        )
        argv = manifest["qemu_argv"]
        devices = [
            f"-device {argv[i + 1]}"
            for i, arg in enumerate(argv[:-1])
            if arg == "-device" and argv[i + 1] not in manifest["machine"]
        ]
        lines.append(f"    machine: {' '.join(manifest['machine'])}")
        lines.append(f"    devices: {' '.join(devices)}")
        lines.append(f"    cmdline: {manifest['cmdline']}")
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
