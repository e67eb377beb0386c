"""Shared pieces of the socket benchmarks: a daemon or an echo server in another process,
and a pipelined client that times frames against either.

The echo server speaks the same framing (viommud.wire) and answers every request frame with
one reply frame of the size and kind the daemon answers a clean one with (CMDS_OK for an
SMMUv3 doorbell, a RESPONSE with the wait's status write for a VT-d one, a RESPONSE with
status and tail for a virtio-iommu request; it learns each vIOMMU's model from the
``viommu_create`` record), doing no other work: it is the transport's own ceiling, measured
in the same run as the daemon.

``frames()`` turns a synthetic trace into pre-encoded frames: the set-up (everything before
``timed_from``) and the timed stream (everything from it on); ``commands_in()`` counts the
guest commands in frames (SMMUv3 commands, VT-d descriptors, virtio requests).
``Pipe`` counts refused frames (ERROR) and failed responses (guest errors, a failed config
record, a virtio status other than OK) so that a benchmark can insist on a clean stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocols.frames import HEADER_SIZE, FrameType  # noqa: E402
from viommud import wire  # noqa: E402
from viommud.trace import Cmds, Request, parse_record, record_to_json  # noqa: E402

ECHO_RECORD = json.dumps({"ok": True}, separators=(",", ":")).encode()
# what the daemon answers a clean MAP/UNMAP with: the 4-byte tail
ECHO_REQUEST = json.dumps(
    {"status": "OK", "reply": "00000000", "used": 4}, separators=(",", ":")
).encode()


# STATS_OK in the replay report's shape, all zero (so `viommud replay` runs against the echo)
ECHO_STATS = json.dumps(
    {
        "commands": {"total": 0, "by_kind": {}},
        "errors": {"total": 0, "by_code": {}},
        "barriers": 0,
        "backend": {"calls": {}, "invalidation_entries": 0, "errnos": {}},
        "baseline": {"invalidate_calls": 0},
    },
    separators=(",", ":"),
).encode()


def _vtd_reply(seq: int, data: bytes, width: int, compact: bool) -> bytes:
    """The daemon's answer to a clean VT-d doorbell ending in a wait with a status write."""
    n = len(data) // width
    last = data[(n - 1) * width :]
    qw0 = int.from_bytes(last[:8], "little")
    addr = int.from_bytes(last[8:16], "little") & ~3
    if compact:
        return wire.encode_cmds_ok_writes(seq, n, 1, [(n - 1, addr, qw0 >> 32)])
    write = {"index": n - 1, "addr": f"0x{addr:x}", "data": f"0x{qw0 >> 32:x}"}
    body = {"consumed": n, "errors": [], "syncs": 1, "status_writes": [write]}
    return wire.encode_json(FrameType.RESPONSE, seq, body)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    decoder = wire.FrameDecoder()
    vtd: dict[str, int] = {}  # VT-d vIOMMU name -> descriptor width
    compact_writes = False
    while data := await reader.read(256 * 1024):
        decoder.receive_data(data)
        out = []
        while (frame := decoder.next_frame()) is not None:
            kind = frame.type
            if kind == FrameType.CMDS:
                viommu, guest = frame.guest_data()
                width = vtd.get(viommu)
                if width is None:  # SMMUv3: what the daemon answers a clean doorbell with
                    out.append(wire.encode_cmds_ok(frame.seq, len(guest) // 16, 1))
                else:
                    out.append(_vtd_reply(frame.seq, guest, width, compact_writes))
            elif kind == FrameType.REQUEST:
                out.append(wire.encode(FrameType.RESPONSE, frame.seq, ECHO_REQUEST))
            elif kind == FrameType.RECORD:
                record = frame.json()
                if record.get("op") == "viommu_create" and record.get("model") == "vtd":
                    vtd[record["viommu"]] = record.get("options", {}).get("dw", 128) // 8
                out.append(wire.encode(FrameType.RESPONSE, frame.seq, ECHO_RECORD))
            elif kind == FrameType.STATS:  # a replay client's end: totals of nothing
                out.append(wire.encode(FrameType.STATS_OK, frame.seq, ECHO_STATS))
            elif kind == FrameType.HELLO:
                hello = frame.json()
                compact_writes = bool(hello.get("compact")) and bool(hello.get("compact_writes"))
                out.append(wire.encode(FrameType.HELLO_OK, frame.seq, ECHO_RECORD))
            else:
                out.append(wire.encode(FrameType.RESPONSE, frame.seq, ECHO_RECORD))
        writer.write(b"".join(out))
        await writer.drain()
    writer.close()


async def serve_echo(path: str) -> None:
    server = await asyncio.start_unix_server(_echo, path=path)
    async with server:
        await server.serve_forever()


@contextmanager
def spawned(kind: str, loop: str = "asyncio") -> Iterator[str]:
    """Run ``daemon`` (viommud serve, on event loop ``loop``) or ``echo`` in a child process;
    yields its socket."""
    with tempfile.TemporaryDirectory(prefix="viommud-bench-") as tmp:
        path = os.path.join(tmp, "s.sock")
        if kind == "daemon":
            argv = [
                sys.executable,
                "-m",
                "viommud",
                "--log-level",
                "error",
                "serve",
                "--socket",
                path,
                "--loop",
                loop,
            ]
        else:
            argv = [sys.executable, __file__, "--echo", path]
        child = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not start")
                time.sleep(0.02)
            yield path
        finally:
            child.terminate()
            child.wait(timeout=30)


def frames(
    records: list[dict[str, Any]], timed_from: int | None = None
) -> tuple[dict[str, Any], list[bytes], list[bytes]]:
    """(hello host, set-up frames, timed frames) for a synthetic trace, header first.

    ``records[timed_from:]`` are timed, the records before them set-up. Without
    ``timed_from`` (the SMMUv3 workloads of bench/workloads.py): every doorbell but the STE
    installs (CFGI_STE + SYNC) is timed. ``cmds`` become CMDS frames, ``request`` REQUEST
    frames, other records RECORD frames; the seq of a frame is its record's index."""
    setup: list[bytes] = []
    timed: list[bytes] = []
    for seq, obj in enumerate(records[1:], start=1):
        record = parse_record(seq + 1, obj)
        if isinstance(record, Cmds):
            frame = wire.encode_guest_data(FrameType.CMDS, seq, record.viommu, record.data)
            is_timed = record.data[0] != 0x03 if timed_from is None else seq >= timed_from
        elif isinstance(record, Request):
            frame = wire.encode_guest_data(FrameType.REQUEST, seq, record.viommu, record.data)
            is_timed = timed_from is not None and seq >= timed_from
        else:
            frame = wire.encode_json(FrameType.RECORD, seq, record_to_json(record))
            is_timed = timed_from is not None and seq >= timed_from
        (timed if is_timed else setup).append(frame)
    host: dict[str, Any] = records[0]["host"]
    return host, setup, timed


def command_sizes(records: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes per guest command of each vIOMMU the trace creates (virtio-iommu: 0, one
    command per request)."""
    sizes = {}
    for obj in records[1:]:
        if obj.get("op") == "viommu_create":
            model = obj["model"]
            if model == "smmuv3":
                sizes[obj["viommu"]] = 16
            elif model == "vtd":
                sizes[obj["viommu"]] = int(obj.get("options", {}).get("dw", 128)) // 8
            else:
                sizes[obj["viommu"]] = 0
    return sizes


def commands_in(frames: list[bytes], size: int) -> int:
    """Guest commands in CMDS frames of ``size``-byte commands, or (``size`` 0) in REQUEST
    frames, one each."""
    if not size:
        return len(frames)
    return sum((len(f) - HEADER_SIZE - 1 - f[HEADER_SIZE]) // size for f in frames)


# A RESPONSE holding one of these is clean (wire.encode_json writes no spaces, and a quote
# inside a JSON string is escaped, so they cannot come from a reason text).
_CLEAN = (b'"errors":[]', b'"status":"OK"', b'"ok":true')


def failed(frame: wire.Frame) -> bool:
    """Whether a reply frame says the request was refused or did not succeed: an ERROR
    frame, a doorbell with guest errors, a failed config record, a virtio status other
    than OK."""
    if frame.type == FrameType.ERROR:
        return True
    if frame.type != FrameType.RESPONSE:
        return False
    payload = frame.payload
    if _CLEAN[0] in payload or _CLEAN[1] in payload or _CLEAN[2] in payload:
        return False
    body = frame.json()
    if not isinstance(body, dict):
        return True
    return bool(body.get("errors")) or body.get("status", "OK") != "OK" or not body.get("ok", 1)


class Pipe:
    """A client connection that sends frames pipelined and counts replies.

    ``errors`` counts every reply so far that ``failed()``; ``error_samples`` keeps the
    first few of them (frame type and payload) for the message of whoever checks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = wire.FrameDecoder()
        self.errors = 0
        self.error_samples: list[str] = []

    @classmethod
    async def open(
        cls,
        path: str,
        host: dict[str, Any],
        *,
        group_commit: bool = False,
        verify: bool = False,
    ) -> Pipe:
        """Connect and say HELLO (compact replies). ``group_commit``: the daemon may carry
        the work of consecutive doorbells waiting in its input into one backend call;
        ``verify``: the session runs the verification oracle. Both are sent only when set
        (a daemon ignores HELLO keys it does not know)."""
        reader, writer = await asyncio.open_unix_connection(path)
        pipe = cls(reader, writer)
        hello: dict[str, Any] = {
            "protocol": 1,
            "host": host,
            "compact": True,
            "compact_writes": True,
        }
        if group_commit:
            hello["group_commit"] = True
        if verify:
            hello["verify"] = True
        writer.write(wire.encode_json(FrameType.HELLO, 0, hello))
        reply = await pipe.reply()
        if reply.type != FrameType.HELLO_OK:
            raise ConnectionError(f"HELLO refused: {reply.payload[:300]!r}")
        return pipe

    async def reply(self) -> wire.Frame:
        """The next reply frame (not counted)."""
        while (frame := self.decoder.next_frame()) is None:
            data = await self.reader.read(256 * 1024)
            if not data:
                raise ConnectionError("peer closed")
            self.decoder.receive_data(data)
        return frame

    async def replies(self, n: int) -> int:
        """Read ``n`` reply frames; returns how many of them ``failed()``."""
        errors = 0
        while n:
            frame = self.decoder.next_frame()
            if frame is None:
                data = await self.reader.read(256 * 1024)
                if not data:
                    raise ConnectionError("peer closed")
                self.decoder.receive_data(data)
                continue
            if failed(frame):
                errors += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(
                        f"seq {frame.seq} type 0x{frame.type:02x}: {frame.payload[:300]!r}"
                    )
            n -= 1
        self.errors += errors
        return errors

    async def stats(self) -> dict[str, Any]:
        """The session's totals (STATS → STATS_OK), once every sent frame is answered."""
        self.writer.write(wire.encode(FrameType.STATS, 0))
        frame = await self.reply()
        if frame.type != FrameType.STATS_OK:
            raise ConnectionError(f"STATS answered with frame type 0x{frame.type:02x}")
        report: dict[str, Any] = frame.json()
        return report

    async def stream(self, frames: list[bytes], window: int = 256) -> float:
        """Send every frame with at most ``window`` unanswered; returns seconds taken.

        Frames go out in batches of ``window // 2``, one write each, as a VMM that queues
        its doorbells would send them: a write per frame would make the benchmark measure
        this client's system calls rather than the server behind the socket."""
        start = time.perf_counter()
        half = max(1, window // 2)
        in_flight: deque[int] = deque()
        for at in range(0, len(frames), half):
            batch = frames[at : at + half]
            if len(in_flight) >= 2:
                await self.replies(in_flight.popleft())
            self.writer.write(b"".join(batch))
            await self.writer.drain()
            in_flight.append(len(batch))
        while in_flight:
            await self.replies(in_flight.popleft())
        return time.perf_counter() - start

    async def ping(self, frame: bytes, rounds: int) -> list[float]:
        """One frame at a time: the round trip of each, in seconds."""
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            self.writer.write(frame)
            await self.replies(1)
            out.append(time.perf_counter() - start)
        return out

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


if __name__ == "__main__" and sys.argv[1:2] == ["--echo"]:
    asyncio.run(serve_echo(sys.argv[2]))
