"""Shared pieces of the socket benchmarks: a daemon or an echo server in another process,
and a pipelined client that times frames against either.

The echo server speaks the same framing (viommud.wire) and answers every request frame with
one reply frame of a typical response size, doing no other work: it is the transport's own
ceiling, measured in the same run as the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocols.frames import FrameType  # noqa: E402
from viommud import wire  # noqa: E402
from viommud.trace import Cmds, parse_record, record_to_json  # noqa: E402

ECHO_REPLY = json.dumps({"consumed": 2, "errors": [], "syncs": 1}).encode()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    decoder = wire.FrameDecoder()
    while data := await reader.read(256 * 1024):
        decoder.receive_data(data)
        out = []
        while (frame := decoder.next_frame()) is not None:
            if frame.type == FrameType.CMDS:  # what the daemon answers a clean doorbell with
                out.append(wire.encode_cmds_ok(frame.seq, 2, 1))
                continue
            kind = FrameType.HELLO_OK if frame.type == FrameType.HELLO else FrameType.RESPONSE
            out.append(wire.encode(kind, frame.seq, ECHO_REPLY))
        writer.write(b"".join(out))
        await writer.drain()
    writer.close()


async def serve_echo(path: str) -> None:
    server = await asyncio.start_unix_server(_echo, path=path)
    async with server:
        await server.serve_forever()


@contextmanager
def spawned(kind: str) -> Iterator[str]:
    """Run ``daemon`` (viommud serve) or ``echo`` in a child process; yields its socket."""
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


def frames(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[bytes], list[bytes]]:
    """(hello host, setup frames, doorbell frames) for a synthetic trace."""
    header, setup, doorbells = records[0], [], []
    for seq, obj in enumerate(records[1:], start=1):
        record = parse_record(seq + 1, obj)
        if isinstance(record, Cmds):
            frame = wire.encode_guest_data(FrameType.CMDS, seq, record.viommu, record.data)
            # STE installs (CFGI_STE + SYNC) are set-up; the guest's invalidations are timed
            (setup if record.data[0] == 0x03 else doorbells).append(frame)
        else:
            setup.append(wire.encode_json(FrameType.RECORD, seq, record_to_json(record)))
    return header["host"], setup, doorbells


class Pipe:
    """A client connection that sends frames pipelined and counts replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = wire.FrameDecoder()

    @classmethod
    async def open(cls, path: str, host: dict[str, Any]) -> Pipe:
        reader, writer = await asyncio.open_unix_connection(path)
        pipe = cls(reader, writer)
        hello = {"protocol": 1, "host": host, "compact": True}
        writer.write(wire.encode_json(FrameType.HELLO, 0, hello))
        await pipe.replies(1)
        return pipe

    async def replies(self, n: int) -> int:
        """Read ``n`` reply frames; returns how many were ERROR frames."""
        errors = 0
        while n:
            frame = self.decoder.next_frame()
            if frame is None:
                data = await self.reader.read(256 * 1024)
                if not data:
                    raise ConnectionError("peer closed")
                self.decoder.receive_data(data)
                continue
            errors += frame.type == FrameType.ERROR
            n -= 1
        return errors

    async def stream(self, frames: list[bytes], window: int = 256) -> float:
        """Send every frame with at most ``window`` unanswered; returns seconds taken."""
        start = time.perf_counter()
        outstanding = 0
        for frame in frames:
            self.writer.write(frame)
            outstanding += 1
            if outstanding >= window:
                await self.writer.drain()
                await self.replies(window // 2)
                outstanding -= window // 2
        await self.writer.drain()
        await self.replies(outstanding)
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
