"""Replies to frames: one encoder per frame type, at the wire boundary.

A session answers with frozen values (``viommud.replies``); this module is the only place
they become JSON or the compact binary forms (docs/protocol.md §2, docs/trace-format.md
"Responses").
"""

from __future__ import annotations

from typing import Any

from protocols.frames import FrameType
from viommud import wire
from viommud.replies import ConfigReply, DoorbellReply, Reply, RequestReply


def doorbell_json(reply: DoorbellReply) -> dict[str, Any]:
    out: dict[str, Any] = {
        "consumed": reply.consumed,
        "errors": [{"index": e.index, "code": e.code, "reason": e.reason} for e in reply.errors],
        "syncs": reply.syncs,
    }
    if reply.status_writes is not None:
        out["status_writes"] = [
            {"index": w.index, "addr": f"0x{w.addr:x}", "data": f"0x{w.data:x}"}
            for w in reply.status_writes
        ]
    if reply.interrupts:
        out["interrupts"] = list(reply.interrupts)
    return out


def request_json(reply: RequestReply) -> dict[str, Any]:
    out: dict[str, Any] = {"status": reply.status, "reply": reply.reply.hex(), "used": reply.used}
    if reply.reason is not None:
        out["reason"] = reply.reason
    if reply.faults:
        out["faults"] = [f.hex() for f in reply.faults]
    return out


def config_json(reply: ConfigReply) -> dict[str, Any]:
    return {"ok": True} if reply.ok else {"ok": False, "error": reply.error}


def reply_json(reply: Reply) -> dict[str, Any]:
    """The JSON body of any reply (a RESPONSE frame, a line of the responses file)."""
    if isinstance(reply, DoorbellReply):
        return doorbell_json(reply)
    if isinstance(reply, RequestReply):
        return request_json(reply)
    return config_json(reply)


def encode_response(seq: int, reply: Reply, calls: list[dict[str, Any]] | None = None) -> bytes:
    """RESPONSE: the reply's JSON, with the call log entries it caused when asked for."""
    body = reply_json(reply)
    if calls is not None:
        body["calls"] = calls
    return wire.encode_json(FrameType.RESPONSE, seq, body)


def encode_doorbell(
    seq: int,
    reply: DoorbellReply,
    *,
    compact: bool,
    writes: bool,
    calls: list[dict[str, Any]] | None = None,
) -> bytes:
    """The answer to CMDS: CMDS_OK / CMDS_OK_WRITES for a clean doorbell when the client
    asked for compact replies (and, for status writes, for ``compact_writes``), else
    RESPONSE (with ``calls`` when the client streams the call log). A doorbell that raised
    completion interrupts is always a RESPONSE: the compact forms have no room for them."""
    if compact and not reply.errors and not reply.interrupts:
        status_writes = reply.status_writes
        if status_writes is None:
            return wire.encode_cmds_ok(seq, reply.consumed, reply.syncs)
        if writes:
            return wire.encode_cmds_ok_writes(
                seq,
                reply.consumed,
                reply.syncs,
                [(w.index, w.addr, w.data) for w in status_writes],
            )
    return encode_response(seq, reply, calls)


def encode_error(seq: int, message: str, *, fatal: bool) -> bytes:
    """ERROR: a refused request (``fatal`` false) or the end of the connection."""
    return wire.encode_json(FrameType.ERROR, seq, {"error": message, "fatal": fatal})
