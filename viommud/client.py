"""An asyncio client of the frame protocol: hello, pipelined requests, replies in order."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from protocols.frames import PROTOCOL_VERSION, FrameType
from viommud import __version__, wire


class ClientError(Exception):
    """The daemon refused us or the connection broke."""


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = wire.FrameDecoder()
        self._seq = 0

    @classmethod
    async def connect(cls, socket_path: str | Path) -> Client:
        try:
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
        except OSError as exc:
            raise ClientError(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
        return cls(reader, writer)

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def send(self, frame: bytes) -> None:
        self._writer.write(frame)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise ClientError(f"connection lost: {exc}") from None

    async def receive(self) -> wire.Frame:
        """The next reply frame."""
        while True:
            try:
                frame = self._decoder.next_frame()
            except wire.WireError as exc:
                raise ClientError(f"bad reply from the daemon: {exc}") from None
            if frame is not None:
                return frame
            try:
                data = await self._reader.read(256 * 1024)
            except ConnectionError as exc:
                raise ClientError(f"connection lost: {exc}") from None
            if not data:
                raise ClientError("the daemon closed the connection")
            self._decoder.receive_data(data)

    async def request(self, frame_type: int, obj: Any) -> wire.Frame:
        seq = self.next_seq()
        self.send(wire.encode_json(frame_type, seq, obj))
        await self.drain()
        return await self.receive()

    async def hello(self, **fields: Any) -> dict[str, Any]:
        reply = await self.request(
            FrameType.HELLO,
            {"protocol": PROTOCOL_VERSION, "client": f"viommud-client/{__version__}", **fields},
        )
        body = reply.json()
        if reply.type == FrameType.ERROR:
            raise ClientError(f"the daemon refused the session: {body.get('error')}")
        if reply.type != FrameType.HELLO_OK or not isinstance(body, dict):
            raise ClientError(f"unexpected reply 0x{reply.type:02x} to HELLO")
        return body

    async def stats(self) -> dict[str, Any]:
        reply = await self.request(FrameType.STATS, {})
        body = reply.json()
        if reply.type != FrameType.STATS_OK or not isinstance(body, dict):
            raise ClientError(f"unexpected reply to STATS: {body}")
        return body

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


async def health(socket_path: str | Path, wait: float = 2.0) -> str:
    """Connect and exchange HELLO (probe); returns the server's name or raises ClientError."""
    try:
        async with asyncio.timeout(wait):
            client = await Client.connect(socket_path)
            try:
                reply = await client.hello(probe=True, client="viommud-health")
            finally:
                await client.close()
    except TimeoutError:
        raise ClientError(f"no answer from {socket_path} within {wait} s") from None
    return str(reply.get("server", "?"))
