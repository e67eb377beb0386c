"""Sans-I/O codec of the daemon's frame protocol (docs/protocol.md, protocols/frames.py).

``FrameDecoder.receive_data(bytes)`` buffers; ``next_frame()`` returns a ``Frame`` or
``NEED_DATA``. The header is validated before any payload is buffered, so a peer that lies
about lengths is refused after 12 bytes. Encoding helpers build frames with ``struct``; a test
proves them equal to the construct declarations.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Final

from protocols.frames import HEADER_SIZE, MAX_PAYLOAD, PROTOCOL_VERSION, FrameType

NEED_DATA: Final = None
_HEADER = struct.Struct("<BBHII")
_CMDS_OK = struct.Struct("<II")  # protocols.frames.CmdsOk
_STATUS_WRITE = struct.Struct("<IQI")  # protocols.frames.StatusWrite
_CMDS_OK_FRAME = struct.Struct("<BBHIIII")  # header + CmdsOk in one pack (the hot reply)
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
MAX_JSON_DEPTH: Final = 32  # containers inside containers in a JSON payload from a client


def _deeper_than(payload: bytes, value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed from ``payload``) nests more than ``limit`` containers.

    Linear: when the payload holds at most ``limit`` brackets nothing can nest deeper and
    the parsed value is not walked at all; otherwise it is walked once, without recursion."""
    if not isinstance(value, (dict, list)) or payload.count(b"[") + payload.count(b"{") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


class WireError(ValueError):
    """The byte stream is not a valid frame stream; the connection cannot continue."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    seq: int
    payload: bytes

    def json(self, *, max_depth: int | None = None) -> Any:
        """The payload as JSON; raises WireError when it is not.

        Nesting deeper than the interpreter can parse is refused the same way, and so is
        nesting deeper than ``max_depth`` containers when given (the daemon passes
        ``MAX_JSON_DEPTH`` for what clients send; docs/protocol.md §8)."""
        payload = self.payload
        try:
            value = json.loads(payload)
        except RecursionError:
            value, deep = None, True
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
            raise WireError(f"frame payload is not valid JSON: {exc}", payload[:64]) from None
        else:
            deep = max_depth is not None and _deeper_than(payload, value, max_depth)
        if deep:
            limit = f" (at most {max_depth} levels)" if max_depth is not None else ""
            raise WireError(
                f"frame payload is not valid JSON: nested too deeply{limit}", payload[:64]
            )
        return value

    def response(self) -> Any:
        """A reply's body as JSON: CMDS_OK / CMDS_OK_WRITES expand to the response they
        stand for."""
        if self.type == FrameType.CMDS_OK:
            if len(self.payload) != _CMDS_OK.size:
                raise WireError("CMDS_OK payload must be 8 bytes", self.payload[:64])
            consumed, syncs = _CMDS_OK.unpack(self.payload)
            return {"consumed": consumed, "errors": [], "syncs": syncs}
        if self.type == FrameType.CMDS_OK_WRITES:
            payload = self.payload
            if len(payload) < _CMDS_OK.size or (len(payload) - _CMDS_OK.size) % _STATUS_WRITE.size:
                raise WireError("CMDS_OK_WRITES payload is 8 + 16 * N bytes", payload[:64])
            consumed, syncs = _CMDS_OK.unpack_from(payload)
            writes = [
                {"index": index, "addr": f"0x{addr:x}", "data": f"0x{data:x}"}
                for index, addr, data in _STATUS_WRITE.iter_unpack(payload[_CMDS_OK.size :])
            ]
            return {"consumed": consumed, "errors": [], "syncs": syncs, "status_writes": writes}
        return self.json()

    def guest_data(self) -> tuple[str, bytes]:
        """Split a CMDS/REQUEST payload into (vIOMMU name, guest bytes)."""
        payload = self.payload
        if not payload or len(payload) < 1 + payload[0]:
            raise WireError("guest-data payload shorter than its vIOMMU name", payload[:64])
        name_len = payload[0]
        try:
            name = payload[1 : 1 + name_len].decode()
        except UnicodeDecodeError:
            raise WireError("vIOMMU name is not UTF-8", payload[: 1 + name_len]) from None
        return name, payload[1 + name_len :]


class FrameDecoder:
    """Buffers bytes from a peer and cuts them into frames."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        # The largest payload a header may announce; the daemon keeps it small until the
        # HELLO is accepted (docs/protocol.md §1) and may change it between frames.
        self.max_payload = max_payload
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or NEED_DATA. Raises WireError on a bad header or on EOF
        inside a frame."""
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            if self._eof and buffer:
                raise WireError("connection closed inside a frame header", bytes(buffer))
            return NEED_DATA
        version, frame_type, flags, seq, length = _HEADER.unpack_from(buffer)
        if version != PROTOCOL_VERSION:
            raise WireError(
                f"unsupported protocol version {version} (this daemon speaks {PROTOCOL_VERSION})",
                bytes(buffer[:HEADER_SIZE]),
            )
        if frame_type not in _KNOWN_TYPES:
            raise WireError(f"unknown frame type 0x{frame_type:02x}", bytes(buffer[:HEADER_SIZE]))
        if flags:
            raise WireError(f"reserved frame flags 0x{flags:04x}", bytes(buffer[:HEADER_SIZE]))
        if length > self.max_payload:
            raise WireError(
                f"frame payload of {length} bytes exceeds the limit of {self.max_payload}",
                bytes(buffer[:HEADER_SIZE]),
            )
        end = HEADER_SIZE + length
        if len(buffer) < end:
            if self._eof:
                raise WireError("connection closed inside a frame", bytes(buffer[:HEADER_SIZE]))
            return NEED_DATA
        payload = bytes(buffer[HEADER_SIZE:end])
        del buffer[:end]
        return Frame(frame_type, seq, payload)

    def take_guest_data(self, frame_type: int) -> list[tuple[int, str, bytes]]:
        """The whole, well-formed ``frame_type`` frames (CMDS / REQUEST) at the head of the
        buffer, as (seq, vIOMMU name, guest bytes), taken in one pass without Frame objects.

        Stops before anything else — another type, a header or name ``next_frame`` /
        ``Frame.guest_data`` would refuse, a frame not yet complete — so those keep their
        usual path and errors. Used for group commit, where runs of doorbells arrive."""
        buffer = self._buffer
        view = memoryview(buffer)
        out: list[tuple[int, str, bytes]] = []
        names: dict[bytes, str] = {}
        at, size = 0, len(buffer)
        unpack, limit = _HEADER.unpack_from, self.max_payload
        while size - at >= HEADER_SIZE:
            version, kind, flags, seq, length = unpack(buffer, at)
            if version != PROTOCOL_VERSION or kind != frame_type or flags or length > limit:
                break
            start, end = at + HEADER_SIZE, at + HEADER_SIZE + length
            if end > size or length < 1 or length < 1 + buffer[start]:
                break
            raw_name = bytes(view[start + 1 : start + 1 + buffer[start]])
            name = names.get(raw_name)
            if name is None:
                try:
                    name = names[raw_name] = raw_name.decode()
                except UnicodeDecodeError:
                    break
            out.append((seq, name, bytes(view[start + 1 + len(raw_name) : end])))
            at = end
        view.release()
        if at:
            del buffer[:at]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def pending(self) -> bytes:
        """The bytes received and not yet cut into frames (they stay buffered)."""
        return bytes(self._buffer)


def encode(frame_type: int, seq: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(PROTOCOL_VERSION, frame_type, 0, seq, len(payload)) + payload


def encode_json(frame_type: int, seq: int, obj: Any) -> bytes:
    return encode(frame_type, seq, json.dumps(obj, separators=(",", ":")).encode())


def encode_guest_data(frame_type: int, seq: int, viommu: str, data: bytes) -> bytes:
    name = viommu.encode()
    if len(name) > 255:
        raise ValueError("a vIOMMU name is at most 255 bytes of UTF-8")
    return encode(frame_type, seq, bytes((len(name),)) + name + data)


def encode_cmds_ok(seq: int, consumed: int, syncs: int) -> bytes:
    return _CMDS_OK_FRAME.pack(
        PROTOCOL_VERSION, FrameType.CMDS_OK, 0, seq, _CMDS_OK.size, consumed, syncs
    )


def encode_cmds_ok_writes(
    seq: int, consumed: int, syncs: int, writes: list[tuple[int, int, int]]
) -> bytes:
    """CMDS_OK_WRITES: counts and (index, address, data) of each status write, in order."""
    body = [_CMDS_OK.pack(consumed, syncs)]
    body += [_STATUS_WRITE.pack(*write) for write in writes]
    return encode(FrameType.CMDS_OK_WRITES, seq, b"".join(body))
