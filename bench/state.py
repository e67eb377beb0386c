"""Migration and restart figures (issue 16): state size, save and load times, restart time.

    .venv/bin/python bench/state.py                 # real SMMUv3 trace, virtio 10^3 and 10^4
    .venv/bin/python bench/state.py --mappings 1000 100000 --json

Everything goes through a real ``viommud serve --state-dir DIR`` in another process, as an
operator would run it (default settings: a process per session). For each workload:

* the records are sent (pipelined, every reply read), then STATE_SAVE: **state bytes** and
  the **save** time seen by the client (request to reply);
* the daemon is killed with SIGKILL, and a new one started on the same state directory:
  **start** is the time from spawning the new daemon to its socket answering a STATUS;
* a client resumes the session (HELLO ``resume``): **resume** is HELLO to HELLO_OK, i.e. the
  rebuild of every vIOMMU from the stored state on a fresh backend; the restored totals are
  checked against the first daemon's;
* **first hello**, for comparison: HELLO to HELLO_OK of the first session on the first daemon
  (no state: what any new session costs, mostly starting its process);
* **restart to serving** is start + resume;
* **load**: a second, fresh session on the new daemon takes the saved document with
  STATE_LOAD (request to STATE_LOADED).

The daemons run with ``--max-frame 64 MiB``: a STATE_LOAD carries the whole document, and
with 10^5 live mappings (~11 MB) it exceeds the default frame limit (8 MiB + 256).

Workloads: the bundled real SMMUv3 trace (``smmuv3-linux61-strict``, whole; its journal stays
small, the figure is the per-vIOMMU cost) and one virtio-iommu domain with a host device and N
live one-page mappings (the journal holds one MAP per mapping). The machine is shared and
noisy: times are best of ``--repeat`` runs; sizes are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures.generate_virtio import HOST as VIRTIO_HOST
from fixtures.generate_virtio import LINUX_OPTIONS
from protocols.frames import FrameType
from protocols.virtio_iommu import RequestType, build_request
from viommud import wire
from viommud.shell.client import Client, ClientError
from viommud.trace import TraceReader, record_to_json

ROOT = Path(__file__).resolve().parent.parent
SMMUV3_TRACE = ROOT / "fixtures" / "smmuv3-linux61-strict.jsonl.xz"
PAGE = 4096
IOVA_BASE = 1 << 32
DEVICE = "0000:01:00.0"
ENDPOINT = 0x100
WINDOW = 128  # frames in flight, as the replay client
LONG = 600.0  # seconds a HELLO (a resume rebuilding 10^5 mappings) or a STATE_LOAD may take


def _smmuv3() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with TraceReader(SMMUV3_TRACE) as reader:
        records = [record_to_json(r) for r in reader]
        host = reader.header.host.to_json()
    return host, records


def _virtio(mappings: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    def request(data: bytes) -> dict[str, Any]:
        return {"op": "request", "viommu": "v", "data": data.hex()}

    records: list[dict[str, Any]] = [
        {"op": "viommu_create", "viommu": "v", "model": "virtio-iommu", "iommus": ["dmar0"],
         "options": dict(LINUX_OPTIONS)},
        {"op": "device_attach", "viommu": "v", "vid": ENDPOINT, "device": DEVICE},
        request(build_request(RequestType.ATTACH, domain=1, endpoint=ENDPOINT)),
    ]  # fmt: skip
    for page in range(mappings):
        start = IOVA_BASE + 2 * page * PAGE
        records.append(
            request(
                build_request(
                    RequestType.MAP,
                    domain=1,
                    virt_start=start,
                    virt_end=start + PAGE - 1,
                    phys_start=(256 + page % 0x70000) * PAGE,
                    flags=3,
                )
            )
        )
    return VIRTIO_HOST, records


def _frame(seq: int, obj: dict[str, Any]) -> bytes:
    if obj["op"] == "cmds":
        data = bytes.fromhex(obj["data"])
        return wire.encode_guest_data(FrameType.CMDS, seq, obj["viommu"], data)
    if obj["op"] == "request":
        data = bytes.fromhex(obj["data"])
        return wire.encode_guest_data(FrameType.REQUEST, seq, obj["viommu"], data)
    return wire.encode_json(FrameType.RECORD, seq, obj)


class Daemon:
    def __init__(self, socket: Path, state_dir: Path) -> None:
        argv = [sys.executable, "-m", "viommud", "serve", "--socket", str(socket)]
        argv += ["--backend", "emulated", "--state-dir", str(state_dir), "--log-level", "error"]
        # a STATE_LOAD frame carries the whole document: 10^5 mappings exceed the default
        # --max-frame (8 MiB + 256), so the bench raises it to the codec's 64 MiB
        argv += ["--max-frame", str(64 << 20)]
        self.socket = socket
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )

    async def serving(self) -> float:
        """Seconds from spawn until a STATUS is answered."""
        deadline = self.started + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("the daemon exited")
            try:
                client = await Client.connect(self.socket, wait=1.0)
                await client.status()
                await client.close()
                return time.perf_counter() - self.started
            except ClientError:
                if time.perf_counter() > deadline:
                    raise RuntimeError("the daemon did not start") from None
                await asyncio.sleep(0.002)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


async def _send_all(client: Client, records: list[dict[str, Any]]) -> None:
    pending = 0
    for obj in records:
        client.send(_frame(client.next_seq(), obj))
        pending += 1
        if pending >= WINDOW:
            await client.drain()
            reply = await client.receive()
            _check(reply)
            pending -= 1
    await client.drain()
    for _ in range(pending):
        _check(await client.receive())


def _check(reply: wire.Frame) -> None:
    body = reply.response()
    if reply.type == FrameType.ERROR or (isinstance(body, dict) and body.get("ok") is False):
        raise RuntimeError(f"refused: {body}")
    if isinstance(body, dict) and body.get("status", "OK") != "OK":
        raise RuntimeError(f"request failed: {body}")


async def run_once(host: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="viommud-state-bench-") as tmp:
        socket, state_dir = Path(tmp) / "s.sock", Path(tmp) / "state"
        first = Daemon(socket, state_dir)
        try:
            await first.serving()
            client = await Client.connect(socket, wait=LONG)
            t0 = time.perf_counter()
            hello = await client.hello(host=host)
            first_hello = time.perf_counter() - t0
            token = hello["session_token"]
            await _send_all(client, records)
            t0 = time.perf_counter()
            document = await client.state_save()
            save = time.perf_counter() - t0
            totals = await client.stats()
        finally:
            first.kill()  # the session's process dies with its daemon's process group
        await asyncio.sleep(0.2)
        second = Daemon(socket, state_dir)
        try:
            start = await second.serving()
            client = await Client.connect(socket, wait=LONG)
            t0 = time.perf_counter()
            body = await client.hello(host=host, resume=token)
            resume = time.perf_counter() - t0
            restored = await client.stats()
            await client.close()
            if restored["commands"] != totals["commands"]:
                raise RuntimeError("the resumed session's totals differ")
            other = await Client.connect(socket, wait=LONG)
            await other.hello(host=host, state=True)
            t0 = time.perf_counter()
            await other.state_load(document)
            load = time.perf_counter() - t0
            await other.close()
        finally:
            second.kill()
    return {
        "records": len(records),
        "viommus": len(body["resumed"]["viommus"]),
        "state_bytes": len(document),
        "save_ms": save * 1e3,
        "start_ms": start * 1e3,
        "first_hello_ms": first_hello * 1e3,
        "resume_ms": resume * 1e3,
        "restart_to_serving_ms": (start + resume) * 1e3,
        "load_ms": load * 1e3,
    }


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for key in (
        "save_ms",
        "start_ms",
        "first_hello_ms",
        "resume_ms",
        "restart_to_serving_ms",
        "load_ms",
    ):
        out[key] = round(min(r[key] for r in runs), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mappings", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workloads = [("smmuv3-linux61-strict", _smmuv3())]
    workloads += [(f"virtio, {n} mappings", _virtio(n)) for n in args.mappings]
    rows = []
    for name, (host, records) in workloads:
        runs = [asyncio.run(run_once(host, records)) for _ in range(args.repeat)]
        rows.append({"workload": name, **best(runs)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["workload", "records", "state_bytes", "save_ms", "start_ms", "first_hello_ms",
            "resume_ms", "restart_to_serving_ms", "load_ms"]  # fmt: skip
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
