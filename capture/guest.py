"""Boots one configuration under QEMU and collects its console, trace log and queue dump.

The serial console is QEMU's stdio; the human monitor (HMP) listens on a unix socket. QEMU
runs with ``-no-shutdown``: when the guest powers off, the machine stops but its memory and
device registers stay. The kit then reads the queue's registers with ``xp``, saves the queue
memory with ``pmemsave`` (so the dump holds every command the guest ever queued, the ones of
its shutdown path included, as long as the queue never wrapped) and quits QEMU. Every wait
has a deadline; a guest that hangs is killed and the run reports why.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from capture.assets import CaptureError
from capture.configs import Config, QueueDump
from capture.initramfs import MARK
from capture.tables import smmuv3_tables, vtd_tables

__all__ = ["GuestRun", "Monitor", "qemu_argv", "run_guest"]

PROMPT = b"(qemu) "
STOP_WAIT = 60.0  # seconds from the poweroff marker to the machine's stop
QUIT_WAIT = 30.0
# Without VIRTIO_F_ACCESS_PLATFORM (iommu_platform) the guest's virtio drivers bypass the DMA
# API and QEMU the vIOMMU: no mappings, no invalidations. It needs a modern-only device.
VIRTIO_DMA = "disable-legacy=on,iommu_platform=on"
_XP = re.compile(r"^([0-9a-fA-F]+):\s+0x([0-9a-fA-F]+)\s*$", re.MULTILINE)
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Monitor:
    """A QEMU human-monitor session over a unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    self._sock.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise CaptureError(f"no QEMU monitor on {path}") from None
                    time.sleep(0.1)
            self._read_prompt()
        except BaseException:
            self._sock.close()
            raise

    def _read_prompt(self) -> str:
        data = b""
        while not data.endswith(PROMPT):
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise CaptureError(f"QEMU monitor: no prompt after {data[-200:]!r}") from None
            if not chunk:
                raise CaptureError("QEMU monitor closed the connection")
            data += chunk
        return _ESCAPES.sub("", data[: -len(PROMPT)].decode(errors="replace"))

    def command(self, text: str) -> str:
        """Runs one HMP command; its output without the echo and the prompt."""
        self._sock.sendall(text.encode() + b"\n")
        out = self._read_prompt()
        lines = out.replace("\r", "").split("\n")
        return "\n".join(line for line in lines[1:] if line)

    def command_nowait(self, text: str) -> None:
        """Sends a command that ends the session (``quit``) and waits for QEMU to hang up."""
        self._sock.sendall(text.encode() + b"\n")
        try:
            while self._sock.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass

    def read(self, address: int, size: int = 8) -> int:
        """One 32- or 64-bit word of guest physical memory or MMIO (``xp /1wx``, ``/1gx``)."""
        unit = {4: "w", 8: "g"}[size]
        out = self.command(f"xp /1{unit}x 0x{address:x}")
        found = _XP.search(out)
        if found is None or int(found[1], 16) != address:
            raise CaptureError(f"QEMU monitor: unexpected xp output {out!r}")
        return int(found[2], 16)

    def memory(self, address: int, size: int, scratch: Path) -> bytes:
        """``size`` bytes of guest physical memory, through ``pmemsave`` into ``scratch``."""
        out = self.command(f'pmemsave 0x{address:x} 0x{size:x} "{scratch}"')
        if out.strip():
            raise CaptureError(f"pmemsave 0x{address:x} 0x{size:x}: {out.strip()}")
        data = scratch.read_bytes()
        scratch.unlink()
        if len(data) != size:
            raise CaptureError(f"pmemsave 0x{address:x}: {len(data)} bytes, not {size}")
        return data

    def close(self) -> None:
        self._sock.close()


@dataclass(slots=True)
class GuestRun:
    """What one boot produced."""

    config: str
    console: Path
    trace: Path
    dump: Path | None = None
    dump_info: dict[str, Any] = field(default_factory=dict)
    tables: Path | None = None
    tables_info: list[dict[str, Any]] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exit_code: int | None = None
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def workload_done(self) -> bool:
        return any(line.startswith("workload-done") for line in self.markers)


def qemu_argv(
    config: Config,
    binary: Path,
    kernel: Path,
    initrd: Path,
    workdir: Path,
    *,
    memory_mib: int = 512,
    smp: int = 1,
) -> list[str]:
    """The QEMU command line for ``config`` (serial on stdio, monitor on workdir/monitor);
    writes the trace event list it names to workdir/events."""
    events = workdir / "events"
    events.write_text("".join(f"{pattern}\n" for pattern in config.events))
    append = f"console={config.console} quiet panic=-1 {config.cmdline}"
    argv = [
        str(binary),
        *config.machine,
        "-accel",
        "tcg",
        "-m",
        str(memory_mib),
        "-smp",
        str(smp),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-no-shutdown",
        "-serial",
        "stdio",
        "-monitor",
        f"unix:{workdir / 'monitor'},server=on,wait=off",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
        "-msg",
        "timestamp=on",
        "-trace",
        f"events={events}",
        "-D",
        str(workdir / "trace.log"),
        "-drive",
        f"file={workdir / 'disk.img'},if=none,format=raw,id=disk0",
        "-netdev",
        f"user,id=net0,tftp={workdir / 'tftp'}",
    ]
    extra = ",ats=on" if config.ats else ""
    devices = [
        f"virtio-blk-pci,drive=disk0,{VIRTIO_DMA}{extra}",
        f"virtio-net-pci,netdev=net0,romfile=,{VIRTIO_DMA}{extra}",
    ]
    for port, device in enumerate(devices, start=1):
        bus = ""
        if config.root_ports:
            argv += ["-device", f"pcie-root-port,id=rp{port},chassis={port},slot={port}"]
            bus = f",bus=rp{port}"
        argv += ["-device", device + bus]
    return argv


def _pump(stream: IO[bytes], sink: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        sink.write(raw)
        sink.flush()
        lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(None)


def _dump_queue(monitor: Monitor, dump: QueueDump, path: Path) -> dict[str, Any]:
    # QEMU's SMMUv3 answers 64-bit reads only for its 64-bit registers: PROD/CONS as words.
    base_value = monitor.read(dump.mmio + dump.base_reg)
    prod = monitor.read(dump.mmio + dump.prod_reg, 4)
    cons = monitor.read(dump.mmio + dump.cons_reg, 4)
    address, size = dump.span(base_value)
    if address == 0:
        raise CaptureError(f"{dump.kind}: the guest never set the queue base ({base_value:#x})")
    out = monitor.command(f'pmemsave 0x{address:x} 0x{size:x} "{path}"')
    if out.strip():
        raise CaptureError(f"pmemsave: {out.strip()}")
    return {
        "kind": dump.kind,
        "base_register": f"0x{base_value:016x}",
        "address": f"0x{address:x}",
        "size": size,
        "prod": f"0x{prod:x}",
        "cons": f"0x{cons:x}",
    }


def _dump_tables(monitor: Monitor, config: Config, run: GuestRun, workdir: Path) -> None:
    """The translation tables the vIOMMU's registers name, into workdir/tables.bin."""
    assert config.queue is not None
    scratch = workdir / "region.bin"

    def read(address: int, size: int) -> bytes:
        return monitor.memory(address, size, scratch)

    mmio = config.queue.mmio
    if config.model == "smmuv3":
        # SMMUv3 6.3.23 STRTAB_BASE (64-bit), 6.3.24 STRTAB_BASE_CFG (32-bit).
        regions = smmuv3_tables(read, monitor.read(mmio + 0x80), monitor.read(mmio + 0x88, 4))
    else:
        regions = vtd_tables(read, monitor.read(mmio + 0x20))  # VT-d 11.4.5 RTADDR_REG
    if not regions:
        return
    run.tables = workdir / "tables.bin"
    offset = 0
    with run.tables.open("wb") as out:
        for region in regions:
            out.write(region.data)
            run.tables_info.append(
                {
                    "what": region.what,
                    "address": f"0x{region.address:x}",
                    "size": len(region.data),
                    "offset": offset,
                }
            )
            offset += len(region.data)


def _stopped(monitor: Monitor, deadline: float) -> bool:
    """Waits until the machine has stopped (the guest powered off); False at the deadline."""
    while time.monotonic() < deadline:
        if "shutdown" in monitor.command("info status"):
            return True
        time.sleep(0.2)
    return False


def _finish(config: Config, run: GuestRun, workdir: Path, stop_wait: float) -> None:
    """After the power-off (or a timeout): dump the queue if there is one, then quit QEMU."""
    monitor = Monitor(workdir / "monitor")
    try:
        if not _stopped(monitor, time.monotonic() + stop_wait):
            run.problems.append("the machine did not stop; the dump is of a running guest")
            monitor.command("stop")
        if config.queue is not None:
            run.dump = workdir / "queue.bin"
            try:
                run.dump_info = _dump_queue(monitor, config.queue, run.dump)
            except CaptureError as exc:
                run.problems.append(f"queue dump: {exc}")
                run.dump = None
            try:
                _dump_tables(monitor, config, run, workdir)
            except (CaptureError, ValueError) as exc:
                run.problems.append(f"table dump: {exc}")
        monitor.command_nowait("quit")
    finally:
        monitor.close()


def run_guest(
    config: Config,
    argv: list[str],
    workdir: Path,
    *,
    timeout: float,
    log: IO[str] | None = None,
    stop_wait: float = STOP_WAIT,
) -> GuestRun:
    """Boots the guest, waits for it to power off (or for ``timeout`` seconds), dumps.

    ``stop_wait``: how long the machine may take to stop after the power-off marker.
    """
    run = GuestRun(config.name, workdir / "console.log", workdir / "trace.log")
    (workdir / "argv.json").write_text(json.dumps(argv, indent=1) + "\n")
    started = time.monotonic()
    deadline = started + timeout
    lines: queue.Queue[str | None] = queue.Queue()
    with (
        run.console.open("wb") as console,
        (workdir / "qemu-stderr.log").open("wb") as stderr,
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=workdir
        ) as proc,
    ):
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, console, lines), daemon=True)
        pump.start()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    run.timed_out = True
                    run.problems.append(f"no power-off within {timeout:.0f} s")
                    break
                try:
                    line = lines.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if line is None:
                    run.problems.append("QEMU closed the console before the guest powered off")
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=QUIT_WAIT)
                    break
                if MARK not in line:
                    continue
                marker = line.split(MARK, 1)[1].strip()
                run.markers.append(marker)
                if log is not None:
                    log.write(f"  [{time.monotonic() - started:6.1f}s] {marker}\n")
                    log.flush()
                if marker == "poweroff":
                    break
            if proc.poll() is None:
                try:
                    _finish(config, run, workdir, stop_wait)
                except (CaptureError, OSError) as exc:
                    run.problems.append(f"monitor: {exc}")
                try:
                    proc.wait(timeout=QUIT_WAIT)
                except subprocess.TimeoutExpired:
                    run.problems.append("QEMU did not quit")
        finally:
            if proc.poll() is None:
                proc.kill()
            run.exit_code = proc.wait(timeout=30)
            pump.join(timeout=10)
    run.seconds = round(time.monotonic() - started, 1)
    if not run.workload_done:
        run.problems.append("the guest did not finish the workload")
    return run
