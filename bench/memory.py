"""Daemon memory: RSS growth per vdevice (64 VMs x 16) and per virtio-iommu mapping (1M).

    python bench/memory.py [--json] [--quick]

Each part runs ``viommud serve --in-process`` in a child process (every session in the
daemon's own process; bench/session_rss.py measures a session process) and reads the
daemon's ``VmRSS`` from ``/proc/<pid>/status`` (the pid comes from the socket's peer
credentials) at each step:

* **baseline**: the idle daemon holding one trivial session (an SMMUv3 vIOMMU with two
  vdevices and a virtio-iommu vIOMMU with one endpoint, one domain and one map/unmap), so
  that every module the later steps need is already imported and the differences measure
  data, not code;
* **vdevices**: ``--vms`` client connections (64; quick 8), each its own VM: HELLO with a
  host of its own ``--vdevices`` SMMUv3 devices (16; quick 4), then one vIOMMU (RSS read),
  then every device attached with a translate vSTE installed (STE record + CFGI_STE + SYNC),
  as bench/workloads.py sets up a Linux guest. Per vdevice = growth of the last step / all
  vdevices; per VM = growth of HELLO + vIOMMU / VMs; "all-in" charges everything since the
  baseline to the vdevices;
* **mappings**: one connection, one virtio-iommu vIOMMU over a host device (the Linux
  session's options of fixtures/generate_virtio.py: 2 GiB of guest RAM), one domain, then
  ``--mappings`` (1,000,000; quick 20,000) MAP requests of one 4 KiB page each, pipelined
  through the socket. Per mapping = growth / mappings, also between 10% and 100% (marginal,
  without the fixed costs).

Targets (issue 7): at most 2 KiB per vdevice and 100 bytes per mapping. The STATS reply of
every session is checked: no guest errors, every command and request counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.daemon_load import daemon
from bench.transport import Pipe, frames
from fixtures.generate_virtio import HOST as VIRTIO_HOST
from fixtures.generate_virtio import LINUX_OPTIONS
from protocols.frames import FrameType
from protocols.virtio_iommu import RequestType, build_request
from viommud import wire

# Every session in the daemon's own process (``serve --in-process``): what is measured is
# the data a vdevice or a mapping costs, read from one process (with one process per
# session each would be its own process, and the listener's RSS would not move).
IN_PROCESS = ("--log-level", "error", "--in-process")
TARGET_PER_VDEVICE = 2048
TARGET_PER_MAPPING = 100
PAGE = 4096
IOVA_BASE = 1 << 32  # above the MSI window and the host's reserved regions
FORWARDED_MAPPINGS = 10_000  # each one an emulated IOMMU_IOAS_MAP (see bench/virtio_scale.py)
RAM_PAGES = 0x80000000 // PAGE  # LINUX_OPTIONS' guest RAM
VIRTIO_DEVICE = "0000:01:00.0"  # behind dmar0 in VIRTIO_HOST
ENDPOINT = 0x100
DOMAIN = 1
# virtio_iommu_req_map (virtio-iommu.md §2.5): checked against build_request below.
MAP = struct.Struct("<B3xIQQQI")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def daemon_pid(path: str) -> int:
    """The pid of the process listening on the Unix socket ``path`` (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid: int = _PEERCRED.unpack(cred)[0]
    return pid


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def reply(pipe: Pipe) -> wire.Frame:
    """The next reply frame on ``pipe``."""
    while (frame := pipe.decoder.next_frame()) is None:
        data = await pipe.reader.read(256 * 1024)
        if not data:
            raise ConnectionError("daemon closed the connection")
        pipe.decoder.receive_data(data)
    return frame


async def send_all(pipe: Pipe, batch: list[bytes]) -> None:
    """Send a few set-up frames at once; none may be refused (ERROR)."""
    pipe.writer.write(b"".join(batch))
    await pipe.writer.drain()
    errors = await pipe.replies(len(batch))
    if errors:
        raise RuntimeError(f"{errors} set-up frames refused")


async def stats(pipe: Pipe) -> dict[str, Any]:
    pipe.writer.write(wire.encode(FrameType.STATS, 0))
    frame = await reply(pipe)
    if frame.type != FrameType.STATS_OK:
        raise RuntimeError(f"STATS answered with frame type {frame.type:#x}")
    report: dict[str, Any] = frame.json()
    return report


def clean(report: dict[str, Any], what: str) -> None:
    if report["errors"]["total"] or report["config_errors"]:
        raise RuntimeError(f"{what}: the daemon reported errors: {report['errors']}")


def request_frame(seq: int, viommu: str, data: bytes) -> bytes:
    return wire.encode_guest_data(FrameType.REQUEST, seq, viommu, data)


def trivial_session() -> tuple[dict[str, Any], list[bytes]]:
    """HELLO host and frames of the baseline session: both models used once."""
    records, _ = workloads.setup("baseline", VIRTIO_HOST, {"s": ["smmu0"]}, {})
    records += [
        {
            "op": "viommu_create",
            "viommu": "p",
            "model": "virtio-iommu",
            "iommus": [],
            "options": LINUX_OPTIONS,
        },
        {"op": "device_attach", "viommu": "p", "vid": ENDPOINT, "device": VIRTIO_DEVICE},
    ]
    # devices of a PCI domain no measured session uses (a device has one session at a time)
    renamed = json.loads(json.dumps(records).replace('"0000:', '"ffff:'))
    host, setup, doorbells = frames(renamed)
    assert not doorbells
    n = len(setup) + 1
    setup += [
        request_frame(n, "p", build_request(RequestType.ATTACH, domain=DOMAIN, endpoint=ENDPOINT)),
        request_frame(n + 1, "p", map_request(0)),
        request_frame(
            n + 2,
            "p",
            build_request(
                RequestType.UNMAP, domain=DOMAIN, virt_start=IOVA_BASE, virt_end=IOVA_BASE + 4095
            ),
        ),
    ]
    return host, setup


async def open_baseline(path: str) -> Pipe:
    host, setup = trivial_session()
    pipe = await Pipe.open(path, host)
    await send_all(pipe, setup)
    clean(await stats(pipe), "baseline session")
    return pipe


def map_request(i: int) -> bytes:
    start = IOVA_BASE + i * PAGE
    phys = (256 + i % (RAM_PAGES - 256)) * PAGE
    return MAP.pack(RequestType.MAP, DOMAIN, start, start + PAGE - 1, phys, 3)


# ---------------------------------------------------------------------------------------------


def vm_frames(vm: int, per_vm: int) -> tuple[dict[str, Any], list[bytes]]:
    """HELLO host and set-up frames of VM ``vm``: its devices in a PCI domain of its own
    (``0000:00:01.0`` becomes ``0003:00:01.0`` for VM 3), as a physical device belongs to
    one live session at a time (docs/operations.md §10)."""
    records, devs = workloads.setup(
        "vm", workloads.host(1, per_vm, ats=False), {"v": ["smmu0"]}, {}
    )
    assert len(devs["v"]) == per_vm
    renamed = json.loads(json.dumps(records).replace('"0000:', f'"{vm:04x}:'))
    host, setup, doorbells = frames(renamed)
    assert not doorbells
    return host, setup


async def vdevices(path: str, vms: int, per_vm: int) -> dict[str, Any]:
    pid = daemon_pid(path)
    baseline_pipe = await open_baseline(path)
    rss: dict[str, int] = {"baseline": rss_kib(pid)}
    per = [vm_frames(vm + 1, per_vm) for vm in range(vms)]
    # viommu_create, then per device: attach, STE, CFGI
    pipes = [await Pipe.open(path, host) for host, _ in per]
    rss["sessions"] = rss_kib(pid)
    for pipe, (_, setup) in zip(pipes, per, strict=True):
        await send_all(pipe, setup[:1])
    rss["viommus"] = rss_kib(pid)
    started = time.perf_counter()
    for pipe, (_, setup) in zip(pipes, per, strict=True):
        await send_all(pipe, setup[1:])
    seconds = time.perf_counter() - started
    rss["vdevices"] = rss_kib(pid)
    for pipe in pipes:
        report = await stats(pipe)
        clean(report, "vdevice session")
        if report["commands"]["by_kind"].get("smmuv3:CMD_CFGI_STE") != per_vm:
            raise RuntimeError(f"expected {per_vm} CFGI_STE, got {report['commands']}")
    for pipe in [*pipes, baseline_pipe]:
        await pipe.close()
    total = vms * per_vm
    return {
        "vms": vms,
        "vdevices_per_vm": per_vm,
        "vdevices": total,
        "rss_kib": rss,
        "setup_seconds": round(seconds, 3),
        "bytes_per_vm": round((rss["viommus"] - rss["baseline"]) * 1024 / vms),
        "bytes_per_vdevice": round((rss["vdevices"] - rss["viommus"]) * 1024 / total),
        "bytes_per_vdevice_all_in": round((rss["vdevices"] - rss["baseline"]) * 1024 / total),
        "target_bytes_per_vdevice": TARGET_PER_VDEVICE,
    }


async def mappings(path: str, count: int, *, forwarded: bool) -> dict[str, Any]:
    """``count`` one-page MAPs into one domain; ``forwarded``: its endpoint is a host device
    (every MAP becomes an IOMMU_IOAS_MAP of the emulated kernel), else an emulated endpoint
    (the daemon's own bookkeeping only, as with a real kernel holding the IOAS)."""
    if build_request(
        RequestType.MAP,
        domain=DOMAIN,
        virt_start=IOVA_BASE + PAGE,
        virt_end=IOVA_BASE + 2 * PAGE - 1,
        phys_start=257 * PAGE,
        flags=3,
    ) != map_request(1):
        raise AssertionError("MAP layout disagrees with protocols.virtio_iommu")
    pid = daemon_pid(path)
    baseline_pipe = await open_baseline(path)
    rss: dict[str, int] = {"baseline": rss_kib(pid)}
    endpoint = ENDPOINT if forwarded else 0
    options = LINUX_OPTIONS if forwarded else {**LINUX_OPTIONS, "emulated_endpoints": [0]}
    records: list[dict[str, Any]] = [
        {"format": "viommud-trace", "version": 1, "name": "maps", "host": VIRTIO_HOST},
        {
            "op": "viommu_create",
            "viommu": "v",
            "model": "virtio-iommu",
            "iommus": [],
            "options": options,
        },
    ]
    if forwarded:
        records.append(
            {"op": "device_attach", "viommu": "v", "vid": endpoint, "device": VIRTIO_DEVICE}
        )
    host, setup, _ = frames(records)
    attach = build_request(RequestType.ATTACH, domain=DOMAIN, endpoint=endpoint)
    setup.append(request_frame(len(setup) + 1, "v", attach))
    pipe = await Pipe.open(path, host)
    await send_all(pipe, setup)
    rss["domain"] = rss_kib(pid)
    tenth = count // 10
    requests = [request_frame(i & 0xFFFFFFFF, "v", map_request(i)) for i in range(count)]
    started = time.perf_counter()
    await pipe.stream(requests[:tenth])
    rss["tenth"] = rss_kib(pid)
    tenth_seconds = time.perf_counter() - started
    await pipe.stream(requests[tenth:])
    seconds = time.perf_counter() - started
    rss["all"] = rss_kib(pid)
    del requests
    report = await stats(pipe)
    clean(report, "mapping session")
    made = report["commands"]["by_kind"].get("virtio:MAP", 0)
    if made != count:
        raise RuntimeError(f"expected {count} MAP requests, the daemon counted {made}")
    ioas_maps = report["backend"]["calls"].get("IOMMU_IOAS_MAP", 0)
    if ioas_maps != (count if forwarded else 0):
        raise RuntimeError(f"{ioas_maps} IOMMU_IOAS_MAP calls for {count} MAPs")
    for p in (pipe, baseline_pipe):
        await p.close()
    return {
        "endpoint": "host device" if forwarded else "emulated",
        "mappings": count,
        "ioas_map_calls": ioas_maps,
        "rss_kib": rss,
        "map_requests_per_s": round(count / seconds),
        "map_requests_per_s_first_tenth": round(tenth / tenth_seconds),
        "map_requests_per_s_rest": round((count - tenth) / (seconds - tenth_seconds)),
        "bytes_per_mapping": round((rss["all"] - rss["domain"]) * 1024 / count),
        "bytes_per_mapping_marginal": round((rss["all"] - rss["tenth"]) * 1024 / (count - tenth)),
        "target_bytes_per_mapping": TARGET_PER_MAPPING,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    args = parser.parse_args(argv)
    vms, per_vm = (8, 4) if args.quick else (64, 16)
    count, forwarded = (20_000, 2_000) if args.quick else (1_000_000, FORWARDED_MAPPINGS)
    with daemon(*IN_PROCESS) as path:
        dev = asyncio.run(vdevices(path, vms, per_vm))
    with daemon(*IN_PROCESS) as path:
        maps = asyncio.run(mappings(path, count, forwarded=False))
    with daemon(*IN_PROCESS) as path:
        fwd = asyncio.run(mappings(path, forwarded, forwarded=True))
    results = {"vdevices": dev, "mappings": maps, "mappings_forwarded": fwd}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    r = dev["rss_kib"]
    print(
        f"{dev['vms']} VMs x {dev['vdevices_per_vm']} vdevices (SMMUv3, translate vSTEs): "
        f"VmRSS {r['baseline']:,} KiB idle, {r['sessions']:,} after HELLO, "
        f"{r['viommus']:,} with vIOMMUs, {r['vdevices']:,} KiB with vdevices"
    )
    for m in (maps, fwd):
        k = m["rss_kib"]
        print(
            f"1 virtio-iommu domain, {m['mappings']:,} one-page MAPs, {m['endpoint']} "
            f"endpoint ({m['map_requests_per_s_first_tenth']:,} MAPs/s in the first 10%, "
            f"{m['map_requests_per_s_rest']:,}/s after): VmRSS {k['baseline']:,} KiB idle, "
            f"{k['domain']:,} with the domain, {k['all']:,} KiB with the mappings"
        )
    print()
    print(f"{'figure':<56} {'bytes':>8} {'target':>7} {'x target':>9}")
    rows = [
        ("per vdevice", dev["bytes_per_vdevice"], TARGET_PER_VDEVICE),
        (
            "per vdevice, all-in (with its share of HELLO + vIOMMU)",
            dev["bytes_per_vdevice_all_in"],
            None,
        ),
        ("per VM (session + vIOMMU, no vdevice)", dev["bytes_per_vm"], None),
        ("per mapping (emulated endpoint)", maps["bytes_per_mapping"], TARGET_PER_MAPPING),
        ("per mapping (emulated endpoint), 10%-100%", maps["bytes_per_mapping_marginal"], None),
        ("per mapping (host device, emulated kernel's IOAS too)", fwd["bytes_per_mapping"], None),
    ]
    for label, value, target in rows:
        over = f"{value / target:.2f}" if target else ""
        print(f"{label:<56} {value:>8,} {target or '':>7} {over:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
