"""CPU cost of the daemon's Unix-socket read path: asyncio streams vs ``UnixChannel``.

    python bench/unix_read.py [--messages N] [--window W] [--rounds R]

The daemon reads Unix sockets with recvmsg (viommud.shell.channel.UnixChannel, so that fds
passed with SCM_RIGHTS arrive); before, it read them with asyncio's streams (recv). An echo
server of each kind runs in a child process; a blocking client sends N 32-byte messages,
at most W unanswered (W = 1: ping-pong, a wakeup per message, the worst case for a read
path). The figure is the server's CPU time (user + sys, getrusage) minus that of a run with
no message (its start-up), per message: CPU time, unlike wall time, hardly depends on what
else the machine runs. Best of R rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZE = 32


def _serve(kind: str, path: str, messages: int) -> None:
    from viommud.shell.channel import UnixChannel, grab  # noqa: PLC0415 - child only

    async def main() -> None:
        done = asyncio.Event()

        async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen = 0
            while seen < messages and (data := await reader.read(256 * 1024)):
                seen += len(data) // SIZE
                writer.write(data)
                await writer.drain()
            done.set()

        async def channel(ch: UnixChannel) -> None:
            seen = 0
            while seen < messages:
                data, _fds, _lost = await ch.read()
                if not data:
                    break
                seen += len(data) // SIZE
                ch.write(data)
                await ch.drain()
            ch.close()
            done.set()

        loop = asyncio.get_running_loop()
        if kind == "streams":
            server = await asyncio.start_unix_server(streams, path=path)
        else:
            server = await loop.create_unix_server(lambda: grab(channel), path=path)
        print("ready", flush=True)
        if messages:
            await done.wait()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(f"{usage.ru_utime + usage.ru_stime:.6f}", flush=True)
        server.close()

    asyncio.run(main())


def _client(path: str, messages: int, window: int) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        message = b"x" * SIZE
        sent = received = 0
        while received < messages * SIZE:
            while sent < messages and sent - received // SIZE < window:
                sock.sendall(message)
                sent += 1
            received += len(sock.recv(65536))


def _cpu(kind: str, messages: int, window: int, tmp: str) -> float:
    path = os.path.join(tmp, f"{kind}.sock")
    with subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, path, str(messages)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{kind} server did not start")
        if messages:
            _client(path, messages, window)
        cpu = float(child.stdout.readline())
    os.unlink(path)
    return cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return 0
    with tempfile.TemporaryDirectory(prefix="viommud-bench-") as tmp:
        for kind in ("streams", "channel"):
            idle = min(_cpu(kind, 0, args.window, tmp) for _ in range(args.rounds))
            busy = min(_cpu(kind, args.messages, args.window, tmp) for _ in range(args.rounds))
            per = (busy - idle) / args.messages * 1e6
            print(f"{kind:>8}: {per:.1f} us CPU per message (window {args.window})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
