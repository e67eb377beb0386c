"""The daemon's own wire frames (docs/protocol.md), declared with construct.

Every message between a client and viommud is one frame: a 12-byte little-endian header
followed by ``length`` payload bytes. Binary payloads (guest doorbells) carry the vIOMMU
name as a length-prefixed UTF-8 string, then the guest's bytes untouched.
"""

from __future__ import annotations

import enum
from typing import Any

from construct import (
    Bytes,
    GreedyBytes,
    GreedyRange,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    Struct,
    this,
)

PROTOCOL_VERSION = 1
HEADER_SIZE = 12
MAX_PAYLOAD = 64 * 1024 * 1024


class FrameType(enum.IntEnum):
    """Frame types; replies set bit 7 of the request's type (docs/protocol.md §2)."""

    HELLO = 0x01  # JSON: {"protocol": 1, "client": str, "host": {...}?, "calls": bool}
    RECORD = 0x02  # JSON: one trace record without data-heavy fields (config records)
    CMDS = 0x03  # binary: GuestData — one doorbell of SMMUv3 CMDQ entries / VT-d descriptors
    REQUEST = 0x04  # binary: GuestData — one virtio-iommu request
    STATS = 0x05  # empty: ask for the session totals
    STATUS = 0x06  # JSON: {} or {"token": str}; the daemon's state, no session needed
    STATE_SAVE = 0x08  # empty: ask for the session's state document (docs/state-format.md)
    STATE_LOAD = 0x09  # a state document: rebuild the session from it
    MEMORY = 0x0A  # JSON {"regions": [{gpa, size, fd, offset}]}, with memfds (SCM_RIGHTS)
    DEVICES = 0x0B  # JSON {"devices": {name: fd index}}, with VFIO cdev fds (SCM_RIGHTS)
    TEST = 0x0C  # JSON: {"op": ..., ...} raise a host event (serve --testing only)
    HELLO_OK = 0x81  # JSON: {"protocol": 1, "server": str, "backend": str, "host": {...}}
    RESPONSE = 0x82  # JSON: a response (docs/trace-format.md §4), "calls" when asked for
    CMDS_OK = 0x83  # binary: CmdsOk — a doorbell answered with nothing but counts (compact)
    STATS_OK = 0x85  # JSON: session totals in the replay report's shape
    CMDS_OK_WRITES = 0x87  # binary: CmdsOkWrites — CMDS_OK plus VT-d status writes (compact)
    STATUS_OK = 0x86  # JSON: listeners, clients, live vIOMMUs/vdevices/HWPTs, totals
    STATE = 0x88  # the state document (JSON bytes, docs/state-format.md)
    STATE_LOADED = 0x89  # JSON: {"viommus": {name: model}, "records": int, "calls"?: [...]}
    EVENT = 0x8A  # JSON: a host event for the guest (vEVENTQ record); answers no request
    ERROR = 0xFF  # JSON: {"error": str, "fatal": bool} — the request was refused


FrameHeader = Struct(
    "version" / Int8ul,  # PROTOCOL_VERSION
    "type" / Int8ul,  # FrameType
    "flags" / Int16ul,  # must be 0
    "seq" / Int32ul,  # chosen by the client, echoed in the reply
    "length" / Int32ul,  # payload bytes that follow (at most MAX_PAYLOAD)
)
FrameHeader.__doc__ = "docs/protocol.md §1: the 12-byte frame header."

GuestData = Struct(
    "viommu" / PascalString(Int8ul, "utf8"),  # name of the vIOMMU, as in the trace
    "data" / GreedyBytes,  # the guest's bytes, to the end of the payload
)
GuestData.__doc__ = "docs/protocol.md §3: payload of CMDS and REQUEST frames."

CmdsOk = Struct(
    "consumed" / Int32ul,  # commands consumed
    "syncs" / Int32ul,  # barriers completed
)
CmdsOk.__doc__ = (
    "docs/protocol.md §2: the compact answer to CMDS when the response has no errors, no "
    "status writes and nothing else (only to clients that asked for it in HELLO)."
)

StatusWrite = Struct(
    "index" / Int32ul,  # the wait descriptor's position in the doorbell
    "addr" / Int64ul,  # Status Address (VT-d §6.5.2.8)
    "data" / Int32ul,  # Status Data, the 32 bits written there
)
CmdsOkWrites = Struct(
    "consumed" / Int32ul,
    "syncs" / Int32ul,
    "writes" / GreedyRange(StatusWrite),  # as many as the payload holds, in order
)
CmdsOkWrites.__doc__ = (
    "docs/protocol.md §2: the compact answer to a VT-d CMDS whose response has no errors, "
    "no completion interrupts and only status writes besides the counts (to clients whose "
    "HELLO asked for compact_writes)."
)

Frame = Struct(
    "header" / FrameHeader,
    "payload" / Bytes(this.header.length),
)
Frame.__doc__ = "docs/protocol.md §1: a whole frame."


def parse_header(raw: bytes) -> dict[str, int]:
    """Decode a frame header with the construct declaration (reference decoder)."""
    parsed: Any = FrameHeader.parse(raw)
    return {k: int(parsed[k]) for k in ("version", "type", "flags", "seq", "length")}


def build_frame(frame_type: int, seq: int, payload: bytes) -> bytes:
    """Encode a whole frame with the construct declaration (reference encoder)."""
    header = {
        "version": PROTOCOL_VERSION,
        "type": frame_type,
        "flags": 0,
        "seq": seq,
        "length": len(payload),
    }
    return bytes(Frame.build({"header": header, "payload": payload}))


def build_guest_data(viommu: str, data: bytes) -> bytes:
    """Encode a CMDS/REQUEST payload with the construct declaration."""
    return bytes(GuestData.build({"viommu": viommu, "data": data}))


def parse_guest_data(payload: bytes) -> tuple[str, bytes]:
    """Decode a CMDS/REQUEST payload with the construct declaration."""
    parsed: Any = GuestData.parse(payload)
    return str(parsed.viommu), bytes(parsed.data)


def parse_cmds_ok(payload: bytes) -> dict[str, int]:
    """Decode a CMDS_OK payload with the construct declaration."""
    parsed: Any = CmdsOk.parse(payload)
    return {"consumed": int(parsed.consumed), "syncs": int(parsed.syncs)}
