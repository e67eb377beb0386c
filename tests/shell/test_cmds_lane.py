"""``Connection``'s CMDS lane (runs of well-formed CMDS frames taken without Frame objects,
``Connection._doorbells``) against the general path (``next_frame`` / ``_dispatch`` for
every frame, ``cmds_lane = False``): the same byte stream, cut the same way, must give the
same reply bytes, session totals, counters and log lines."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from protocols.frames import FrameType
from tests.shell.test_connection_fuzz import SETUP
from viommud import wire
from viommud.backend.select import emulated_backend
from viommud.shell.connection import Connection

HEADER = struct.Struct("<BBHII")
TIMING = {"duration_ms", "elapsed_s", "commands_per_s", "p50_ms", "p99_ms", "timestamp"}


def command(op: int, w0_rest: int = 0, w1: int = 0) -> bytes:
    return struct.pack("<QQ", op | w0_rest << 8, w1)


TLBI_VA = command(0x12, 5 << 40, 0x1000)  # ASID 5 (W0[63:48]), one page
TLBI_ASID = command(0x11, 7 << 40)
SYNC = command(0x46)
CFGI_STE = command(0x03, 8 << 24)  # vSID 8: a doorbell that is not plain
BAD = command(0xEE)  # an opcode the frontend refuses

PAYLOAD = b"\x01s" + TLBI_VA + SYNC  # a CMDS payload: vIOMMU "s", a plain doorbell

doorbell_data = st.lists(
    st.sampled_from([TLBI_VA, TLBI_ASID, SYNC, SYNC, CFGI_STE, BAD]), min_size=0, max_size=20
).map(b"".join) | st.binary(max_size=40)

cmds_frame = st.builds(
    lambda seq, name, data: wire.encode_guest_data(FrameType.CMDS, seq, name, data),
    st.integers(0, 1000),
    st.sampled_from(["s", "s", "s", "d", "v", "nope"]),
    doorbell_data,
)
odd_frame = st.one_of(
    # a CMDS frame whose name is not UTF-8, or longer than its payload
    st.just(wire.encode(FrameType.CMDS, 7, b"\x01\xff" + SYNC)),
    st.just(wire.encode(FrameType.CMDS, 7, b"\x09s")),
    st.just(wire.encode(FrameType.CMDS, 7, b"")),
    # a bad header: version, flags, unknown type, a length over the limit
    st.just(HEADER.pack(2, FrameType.CMDS, 0, 1, len(PAYLOAD)) + PAYLOAD),
    st.just(HEADER.pack(1, FrameType.CMDS, 1, 1, len(PAYLOAD)) + PAYLOAD),
    st.just(HEADER.pack(1, FrameType.CMDS, 0x100, 1, len(PAYLOAD)) + PAYLOAD),
    st.just(HEADER.pack(1, 0x7F, 0, 1, 0)),
    st.just(HEADER.pack(1, FrameType.CMDS, 0, 1, 1 << 30)),
    st.just(wire.encode(FrameType.STATS, 11)),
    st.just(wire.encode_guest_data(FrameType.REQUEST, 12, "v", b"\x00" * 8)),
    st.just(
        wire.encode_json(
            FrameType.RECORD,
            13,
            {"op": "device_detach", "viommu": "s", "vid": 8},
        )
    ),
    st.binary(min_size=1, max_size=24),
)


def run(
    hello: bytes, stream: bytes, cuts: list[int], *, lane: bool, eof: bool
) -> tuple[list[bytes], dict[str, Any]]:
    connection = Connection(1, emulated_backend, None, structlog.get_logger())
    connection.cmds_lane = lane
    outs = [connection.receive(hello + b"".join(SETUP[1:]))]
    at = 0
    with capture_logs() as logs:
        for cut in [*sorted(cuts), len(stream)]:
            if connection.closing:
                break
            outs.append(connection.receive(stream[at:cut]))
            at = max(at, cut)
        if eof and not connection.closing:
            outs.append(connection.receive(b""))
    progress = connection.progress
    seen = {
        "frames": connection.frames,
        "closing": connection.closing,
        "viommu": connection.viommu,
        "progress": (
            progress.doorbells,
            progress.requests,
            progress.commands,
            progress.errors,
            progress.host_calls,
            {k: sum(h.counts) for k, h in progress.latency.items()},
        ),
        "report": _untimed(connection.session.report() if connection.session else {}),
        "logs": [_untimed(line) for line in logs],
    }
    connection.close()
    return outs, seen


def _untimed(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    compact=st.booleans(),
    frames=st.lists(st.one_of(cmds_frame, cmds_frame, cmds_frame, odd_frame), max_size=14),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    eof=st.booleans(),
)
def test_cmds_lane_matches_the_general_path(
    compact: bool, frames: list[bytes], cuts: list[int], eof: bool
) -> None:
    hello = wire.encode_json(
        FrameType.HELLO, 1, {"protocol": 1, "host": _host(), "compact": compact}
    )
    stream = b"".join(frames)
    cuts = [c % (len(stream) + 1) for c in cuts]
    lane = run(hello, stream, cuts, lane=True, eof=eof)
    general = run(hello, stream, cuts, lane=False, eof=eof)
    assert b"".join(lane[0]) == b"".join(general[0])
    assert lane == general


def _host() -> Any:
    from tests.shell.test_connection_fuzz import HOST

    return HOST


def test_the_lane_takes_runs_of_doorbells(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of whole CMDS frames never builds a Frame."""
    connection = Connection(1, emulated_backend, None, structlog.get_logger())
    hello = wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": _host(), "compact": True})
    connection.receive(hello + b"".join(SETUP[1:]))
    before = connection.frames

    def fail(self: wire.FrameDecoder) -> None:
        raise AssertionError("next_frame was called for a whole CMDS frame")

    bells = b"".join(
        wire.encode_guest_data(FrameType.CMDS, seq, "s", TLBI_VA + SYNC) for seq in range(40)
    )
    monkeypatch.setattr(wire.FrameDecoder, "next_frame", fail)
    with capture_logs(), pytest.raises(AssertionError, match="next_frame"):
        connection.receive(bells)  # the loop asks next_frame only once the lane is done
    assert connection.frames == before + 40
    assert connection.progress.doorbells == 40
