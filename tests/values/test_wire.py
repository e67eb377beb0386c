"""The frame protocol: struct fast path equals the construct declaration; framing is robust."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import frames
from viommud import wire


@given(
    frame_type=st.sampled_from(list(frames.FrameType)),
    seq=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
)
def test_fast_encoder_matches_construct(frame_type: int, seq: int, payload: bytes) -> None:
    fast = wire.encode(frame_type, seq, payload)
    assert fast == frames.build_frame(frame_type, seq, payload)
    assert frames.parse_header(fast[: frames.HEADER_SIZE]) == {
        "version": 1,
        "type": frame_type,
        "flags": 0,
        "seq": seq,
        "length": len(payload),
    }


@given(name=st.text(min_size=1, max_size=40), data=st.binary(max_size=200))
def test_guest_data_matches_construct(name: str, data: bytes) -> None:
    if len(name.encode()) > 255:
        return
    frame = wire.encode_guest_data(frames.FrameType.CMDS, 1, name, data)
    payload = frame[frames.HEADER_SIZE :]
    assert payload == frames.build_guest_data(name, data)
    assert frames.parse_guest_data(payload) == (name, data)
    assert wire.Frame(frames.FrameType.CMDS, 1, payload).guest_data() == (name, data)


@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_decoder_reassembles_any_split(chunks: list[int]) -> None:
    stream = b"".join(
        wire.encode(frames.FrameType.CMDS, i, bytes([i]) * (i * 7 % 50)) for i in range(10)
    )
    decoder = wire.FrameDecoder()
    got = []
    pos = 0
    sizes = iter(chunks * (len(stream) // sum(chunks) + 1))
    while pos < len(stream):
        n = next(sizes)
        decoder.receive_data(stream[pos : pos + n])
        pos += n
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
    assert [f.seq for f in got] == list(range(10))
    assert [f.payload for f in got] == [bytes([i]) * (i * 7 % 50) for i in range(10)]
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes([2, 1, 0, 0]) + bytes(8), "unsupported protocol version 2"),
        (bytes([1, 0x42, 0, 0]) + bytes(8), "unknown frame type 0x42"),
        (bytes([1, 1, 1, 0]) + bytes(8), "reserved frame flags"),
        (bytes([1, 1, 0, 0, 0, 0, 0, 0]) + (2**31).to_bytes(4, "little"), "exceeds the limit"),
    ],
)
def test_bad_headers_are_refused_before_the_payload(raw: bytes, message: str) -> None:
    decoder = wire.FrameDecoder()
    decoder.receive_data(raw)
    with pytest.raises(wire.WireError, match=message) as info:
        decoder.next_frame()
    assert info.value.raw == raw[:12]


def test_eof_inside_a_frame_is_an_error() -> None:
    decoder = wire.FrameDecoder()
    decoder.receive_data(wire.encode(frames.FrameType.CMDS, 1, b"abcdef")[:-2])
    assert decoder.next_frame() is None
    decoder.receive_data(b"")
    with pytest.raises(wire.WireError, match="closed inside a frame"):
        decoder.next_frame()


def test_guest_data_shorter_than_its_name() -> None:
    with pytest.raises(wire.WireError, match="shorter than its vIOMMU name"):
        wire.Frame(frames.FrameType.CMDS, 1, bytes([9]) + b"abc").guest_data()


@given(consumed=st.integers(0, 2**32 - 1), syncs=st.integers(0, 2**32 - 1))
def test_cmds_ok_matches_construct(consumed: int, syncs: int) -> None:
    frame = wire.encode_cmds_ok(7, consumed, syncs)
    payload = frame[frames.HEADER_SIZE :]
    assert frames.parse_cmds_ok(payload) == {"consumed": consumed, "syncs": syncs}
    assert wire.Frame(frames.FrameType.CMDS_OK, 7, payload).response() == {
        "consumed": consumed,
        "errors": [],
        "syncs": syncs,
    }


def test_cmds_ok_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(wire.WireError, match="8 bytes"):
        wire.Frame(frames.FrameType.CMDS_OK, 1, b"abc").response()


_writes = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    max_size=5,
)


@given(consumed=st.integers(0, 2**32 - 1), syncs=st.integers(0, 2**32 - 1), writes=_writes)
def test_cmds_ok_writes_matches_construct(
    consumed: int, syncs: int, writes: list[tuple[int, int, int]]
) -> None:
    frame = wire.encode_cmds_ok_writes(9, consumed, syncs, writes)
    payload = frame[frames.HEADER_SIZE :]
    parsed = frames.CmdsOkWrites.parse(payload)
    assert (parsed.consumed, parsed.syncs) == (consumed, syncs)
    assert [(w.index, w.addr, w.data) for w in parsed.writes] == writes
    assert wire.Frame(frames.FrameType.CMDS_OK_WRITES, 9, payload).response() == {
        "consumed": consumed,
        "errors": [],
        "syncs": syncs,
        "status_writes": [
            {"index": i, "addr": f"0x{a:x}", "data": f"0x{d:x}"} for i, a, d in writes
        ],
    }


@pytest.mark.parametrize("size", [0, 7, 9, 8 + 15])
def test_cmds_ok_writes_of_a_bad_size_is_refused(size: int) -> None:
    with pytest.raises(wire.WireError, match=r"8 \+ 16 \* N"):
        wire.Frame(frames.FrameType.CMDS_OK_WRITES, 1, bytes(size)).response()


def test_take_guest_data_takes_whole_runs_and_leaves_the_rest_to_next_frame() -> None:
    good = [wire.encode_guest_data(frames.FrameType.CMDS, seq, "v", bytes(16)) for seq in (1, 2)]
    bad_name = wire.encode(frames.FrameType.CMDS, 3, bytes([2]) + b"\xff\xfe" + bytes(16))
    record = wire.encode_json(frames.FrameType.RECORD, 4, {"op": "x"})
    last = wire.encode_guest_data(frames.FrameType.CMDS, 5, "w", bytes(32))
    decoder = wire.FrameDecoder()
    stream = b"".join([*good, bad_name, record, last])
    decoder.receive_data(stream[:-3])  # the last frame is not complete yet
    assert decoder.take_guest_data(frames.FrameType.CMDS) == [
        (1, "v", bytes(16)),
        (2, "v", bytes(16)),
    ]
    assert decoder.take_guest_data(frames.FrameType.CMDS) == []  # a bad name stops the run
    frame = decoder.next_frame()
    assert frame is not None
    with pytest.raises(wire.WireError, match="UTF-8"):
        frame.guest_data()
    assert decoder.take_guest_data(frames.FrameType.CMDS) == []  # another type stops it
    assert decoder.next_frame() == wire.Frame(frames.FrameType.RECORD, 4, record[12:])
    assert decoder.take_guest_data(frames.FrameType.CMDS) == []  # incomplete: wait
    decoder.receive_data(stream[-3:])
    assert decoder.take_guest_data(frames.FrameType.CMDS) == [(5, "w", bytes(32))]
    assert decoder.buffered == 0


def test_take_guest_data_leaves_a_bad_header_to_next_frame() -> None:
    decoder = wire.FrameDecoder()
    decoder.receive_data(bytes([9, frames.FrameType.CMDS, 0, 0]) + bytes(8))
    assert decoder.take_guest_data(frames.FrameType.CMDS) == []
    with pytest.raises(wire.WireError, match="unsupported protocol version 9"):
        decoder.next_frame()
