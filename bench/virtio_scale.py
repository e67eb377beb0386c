"""virtio-iommu MAP / UNMAP cost as the number of live mappings grows (in process).

One domain with a host device behind it (every MAP is an IOMMU_IOAS_MAP and every UNMAP an
IOMMU_IOAS_UNMAP of the emulated kernel). The domain is filled with N one-page mappings, then
``--ops`` MAPs of fresh pages and their UNMAPs are timed, pair by pair, at random addresses
among the live ones (so an UNMAP does not always hit the end of a sorted list). The figure of
interest is flatness: the µs per MAP / UNMAP at each N, and its ratio to the smallest N, all in
one process (these machines are noisy; absolute µs move with load, the ratio much less).

    .venv/bin/python bench/virtio_scale.py                # 10^3, 10^5, 10^6
    .venv/bin/python bench/virtio_scale.py --sizes 1000 100000 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures.generate_virtio import HOST as VIRTIO_HOST
from fixtures.generate_virtio import LINUX_OPTIONS
from protocols.virtio_iommu import RequestType, build_request
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.replies import RequestReply
from viommud.session import Session
from viommud.trace import DeviceAttach, Request, ViommuCreate

PAGE = 4096
IOVA_BASE = 1 << 32  # above the MSI window and the host's reserved regions
RAM_PAGES = 0x80000000 // PAGE  # LINUX_OPTIONS' guest RAM
DEVICE = "0000:01:00.0"
ENDPOINT = 0x100
DOMAIN = 1


def _map(page: int) -> bytes:
    start = IOVA_BASE + page * PAGE
    phys = (256 + page % (RAM_PAGES - 256)) * PAGE
    return build_request(
        RequestType.MAP,
        domain=DOMAIN,
        virt_start=start,
        virt_end=start + PAGE - 1,
        phys_start=phys,
        flags=3,
    )


def _unmap(page: int) -> bytes:
    start = IOVA_BASE + page * PAGE
    return build_request(
        RequestType.UNMAP, domain=DOMAIN, virt_start=start, virt_end=start + PAGE - 1
    )


def _ok(reply: object, what: str) -> None:
    if not isinstance(reply, RequestReply) or reply.status != "OK":
        raise RuntimeError(f"{what}: {reply!r}")


def _session() -> Session:
    session = Session(EmulatedIommufd(HostConfig.from_json(VIRTIO_HOST)))
    session.handle(ViommuCreate(1, "v", "virtio-iommu", (), dict(LINUX_OPTIONS)))
    session.handle(DeviceAttach(2, "v", ENDPOINT, DEVICE))
    attach = build_request(RequestType.ATTACH, domain=DOMAIN, endpoint=ENDPOINT)
    _ok(session.handle(Request(3, "v", attach)), "ATTACH")
    return session


def point(size: int, ops: int, seed: int = 1) -> dict[str, Any]:
    """Fill ``size`` mappings (every other page, so holes remain), then time ``ops`` MAP +
    UNMAP pairs of hole pages chosen at random."""
    session = _session()
    handle = session.handle
    for i in range(size):
        handle(Request(0, "v", _map(2 * i)))
    rng = random.Random(seed)
    holes = [2 * rng.randrange(size) + 1 for _ in range(ops)]
    maps = [Request(0, "v", _map(p)) for p in holes]
    unmaps = [Request(0, "v", _unmap(p)) for p in holes]
    gc.collect()
    gc.disable()
    try:
        map_s: list[float] = []
        unmap_s: list[float] = []
        clock = time.perf_counter
        for m, u in zip(maps, unmaps, strict=True):
            t0 = clock()
            a = handle(m)
            t1 = clock()
            b = handle(u)
            t2 = clock()
            map_s.append(t1 - t0)
            unmap_s.append(t2 - t1)
        _ok(a, "MAP")
        _ok(b, "UNMAP")
    finally:
        gc.enable()
    session.close()
    return {
        "mappings": size,
        "map_us": round(statistics.median(map_s) * 1e6, 2),
        "unmap_us": round(statistics.median(unmap_s) * 1e6, 2),
        "map_us_p90": round(statistics.quantiles(map_s, n=10)[-1] * 1e6, 2),
        "unmap_us_p90": round(statistics.quantiles(unmap_s, n=10)[-1] * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--ops", type=int, default=2_000, help="timed MAP+UNMAP pairs per size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [point(size, args.ops) for size in args.sizes]
    base = rows[0]
    for row in rows:
        row["map_ratio"] = round(row["map_us"] / base["map_us"], 2)
        row["unmap_ratio"] = round(row["unmap_us"] / base["unmap_us"], 2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'mappings':>10} {'MAP µs':>8} {'p90':>7} {'UNMAP µs':>9} {'p90':>7} {'ratio M/U':>12}")
    for r in rows:
        print(
            f"{r['mappings']:>10,} {r['map_us']:>8} {r['map_us_p90']:>7} {r['unmap_us']:>9}"
            f" {r['unmap_us_p90']:>7} {r['map_ratio']:>5}/{r['unmap_ratio']:<5}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
