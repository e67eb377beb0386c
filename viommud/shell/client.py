"""An asyncio client of the frame protocol: hello, pipelined requests, replies in order.

A target is a Unix socket path or ``tcp://ADDR:PORT`` (viommud.shell.endpoints); TCP listeners
need the daemon's token, which the client presents in HELLO and STATUS.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from protocols.frames import PROTOCOL_VERSION, FrameType
from viommud import __version__, wire
from viommud.shell.endpoints import EndpointError, is_tcp, parse_tcp


class ClientError(Exception):
    """The daemon refused us or the connection broke."""


class Client:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str | None = None
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = wire.FrameDecoder()
        self._seq = 0
        self.token = token

    @classmethod
    async def connect(cls, socket_path: str | Path, *, token: str | None = None) -> Client:
        """Connect to a Unix socket path or a ``tcp://ADDR:PORT`` target."""
        try:
            if is_tcp(socket_path):
                address = parse_tcp(str(socket_path))
                reader, writer = await asyncio.open_connection(address.host, address.port)
            else:
                reader, writer = await asyncio.open_unix_connection(str(socket_path))
        except EndpointError as exc:
            raise ClientError(str(exc)) from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
        return cls(reader, writer, token)

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
        if self.token is not None:
            fields.setdefault("token", self.token)
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

    async def status(self) -> dict[str, Any]:
        """The daemon's STATUS reply (no session needed)."""
        reply = await self.request(
            FrameType.STATUS, {"token": self.token} if self.token is not None else {}
        )
        body = reply.json()
        if reply.type == FrameType.ERROR and isinstance(body, dict):
            raise ClientError(f"the daemon refused STATUS: {body.get('error')}")
        if reply.type != FrameType.STATUS_OK or not isinstance(body, dict):
            raise ClientError(f"unexpected reply 0x{reply.type:02x} to STATUS")
        return body

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


async def health(socket_path: str | Path, wait: float = 2.0, *, token: str | None = None) -> str:
    """Connect and exchange HELLO (probe); returns the server's name or raises ClientError."""
    try:
        async with asyncio.timeout(wait):
            client = await Client.connect(socket_path, token=token)
            try:
                reply = await client.hello(probe=True, client="viommud-health")
            finally:
                await client.close()
    except TimeoutError:
        raise ClientError(f"no answer from {socket_path} within {wait} s") from None
    return str(reply.get("server", "?"))


async def status(
    socket_path: str | Path, wait: float = 5.0, *, token: str | None = None
) -> dict[str, Any]:
    """The STATUS of the daemon at ``socket_path``; raises ClientError."""
    try:
        async with asyncio.timeout(wait):
            client = await Client.connect(socket_path, token=token)
            try:
                return await client.status()
            finally:
                await client.close()
    except TimeoutError:
        raise ClientError(f"no answer from {socket_path} within {wait} s") from None
