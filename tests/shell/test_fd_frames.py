"""MEMORY and DEVICES frames and the fds that come with them, at the Connection (sans-I/O):
which frame takes which fds, every refusal and that no fd is ever left open
(docs/protocol.md §12)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.conftest import Memfds, replies
from viommud import wire
from viommud.backend.select import emulated_backend
from viommud.shell.connection import Connection
from viommud.shell.passed import MAX_QUEUED_FDS, split
from viommud.trace import TraceReader

with TraceReader(FIXTURES / "smmuv3-every-opcode.jsonl") as _reader:
    HOST = _reader.header.host.to_json()
DEVICE = HOST["devices"][0]["id"]
MIB = 1 << 20
VIOMMU = {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]}
ATTACH = {"op": "device_attach", "viommu": "v", "vid": 1, "device": DEVICE}


def connection(**options: Any) -> Connection:
    return Connection(1, emulated_backend, None, structlog.get_logger("viommud"), **options)


def hello(conn: Connection) -> None:
    (frame,) = replies(
        conn.receive(wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST}))
    )
    assert frame.type == FrameType.HELLO_OK, frame.json()


def send(conn: Connection, kind: int, body: Any, fds: list[int], seq: int = 7) -> Any:
    payload = body if isinstance(body, bytes) else None
    data = (
        wire.encode(kind, seq, payload)
        if payload is not None
        else wire.encode_json(kind, seq, body)
    )
    (frame,) = replies(conn.receive(data, fds))
    assert frame.seq == seq
    return frame.json()


def memory(*regions: tuple[int, int, int]) -> dict[str, Any]:
    return {"regions": [{"gpa": g, "size": s, "fd": k} for g, s, k in regions]}


def record(conn: Connection, rec: dict[str, Any]) -> None:
    (frame,) = replies(conn.receive(wire.encode_json(FrameType.RECORD, 3, rec)))
    assert frame.json() == {"ok": True}


def test_memory_is_given_to_the_session(memfds: Memfds) -> None:
    conn = connection()
    hello(conn)
    low, high = memfds(), memfds(4 * MIB)
    body = {
        "regions": [
            {"gpa": 0, "size": 2 * MIB, "fd": 1},
            {"gpa": 1 << 32, "size": 2 * MIB, "fd": 0, "offset": 2 * MIB},
        ]
    }
    assert send(conn, FrameType.MEMORY, body, [high, low]) == {
        "ok": True,
        "regions": 2,
        "bytes": 4 * MIB,
    }
    session = conn.session
    assert session is not None
    assert [(r.gpa, r.size, r.fd, r.offset) for r in session.resources.regions] == [
        (0, 2 * MIB, low, 0),
        (1 << 32, 2 * MIB, high, 2 * MIB),
    ]
    conn.close()
    assert memfds.open_names() == set()  # the session closed them


def test_devices_are_given_to_the_session(memfds: Memfds) -> None:
    conn = connection()
    hello(conn)
    a, b = memfds(), memfds()  # any fd: the backend judges the kind when it binds
    second = HOST["devices"][1]["id"]
    reply = send(conn, FrameType.DEVICES, {"devices": {DEVICE: 1, second: 0}}, [a, b])
    assert reply == {"ok": True, "devices": [DEVICE, second]}
    assert conn.session is not None
    assert conn.session.resources.devices == {DEVICE: b, second: a}
    conn.close()
    assert memfds.open_names() == set()


def _refusal_cases() -> list[Any]:
    def aligned(m: Memfds) -> tuple[dict[str, Any], list[int]]:
        return memory((0, 2 * MIB, 0)), [m()]

    return [
        pytest.param(
            "before-viommu",
            lambda m: (memory((0, 2 * MIB, 0)), [m()]),
            FrameType.MEMORY,
            "EBUSY: MEMORY must come before the session's first vIOMMU",
            id="memory-after-viommu",
        ),
        pytest.param(
            None,
            lambda m: (memory((0, 2 * MIB, 2)), [m(), m()]),
            FrameType.MEMORY,
            "EBADF: MEMORY region 0: fd index 2 out of range (the frame came with 2 fds)",
            id="index-out-of-range",
        ),
        pytest.param(
            None,
            lambda m: (memory((0, 2 * MIB, 0), (4 * MIB, 2 * MIB, 0)), [m()]),
            FrameType.MEMORY,
            "EINVAL: MEMORY region 1: fd index 0 is used twice",
            id="index-used-twice",
        ),
        pytest.param(
            None,
            lambda m: (memory((0, 2 * MIB, 1)), [m(), m(), m()]),
            FrameType.MEMORY,
            "EINVAL: MEMORY: the frame came with fds it does not use (indexes [0, 2])",
            id="fds-not-used",
        ),
        pytest.param(
            None,
            lambda m: ({"regions": {"gpa": 0}}, [m()]),
            FrameType.MEMORY,
            'EINVAL: MEMORY: payload must be {"regions": [...]}',
            id="regions-not-a-list",
        ),
        pytest.param(
            None,
            lambda m: ({"regions": []}, [m()]),
            FrameType.MEMORY,
            "EINVAL: MEMORY: no region",
            id="no-region",
        ),
        pytest.param(
            None,
            lambda m: ({"regions": [{"gpa": -4096, "size": 2 * MIB, "fd": 0}]}, [m()]),
            FrameType.MEMORY,
            "EINVAL: MEMORY region 0: 'gpa' must be a non-negative integer",
            id="negative-gpa",
        ),
        pytest.param(
            None,
            lambda m: ({"regions": [{"gpa": 0, "size": True, "fd": 0}]}, [m()]),
            FrameType.MEMORY,
            "EINVAL: MEMORY region 0: 'size' must be a non-negative integer",
            id="bool-size",
        ),
        pytest.param(
            None,
            lambda m: ({"regions": [{"gpa": 0, "size": 2 * MIB, "fd": "0"}]}, [m()]),
            FrameType.MEMORY,
            "EINVAL: MEMORY region 0: 'fd' must be an integer index",
            id="fd-not-an-index",
        ),
        pytest.param(
            None,
            lambda m: (b"{not json", [m()]),
            FrameType.MEMORY,
            "EINVAL: MEMORY: frame payload is not valid JSON",
            id="not-json",
        ),
        pytest.param(
            None,
            lambda m: (memory((100, 2 * MIB, 0)), [m()]),
            FrameType.MEMORY,
            "EINVAL: region 0 (gpa 0x64, size 0x200000): not 4096-byte aligned",
            id="not-aligned",
        ),
        pytest.param(
            None,
            lambda m: (memory((0, 4 * MIB, 0)), [m(2 * MIB)]),
            FrameType.MEMORY,
            "EINVAL: region 0 (gpa 0x0, size 0x400000): needs bytes up to 0x400000 of its file",
            id="file-too-short",
        ),
        pytest.param(
            "memory",
            aligned,
            FrameType.MEMORY,
            "EEXIST: guest memory was already given",
            id="memory-twice",
        ),
        pytest.param(
            None,
            lambda m: ({"devices": {"0000:99:00.0": 0}}, [m()]),
            FrameType.DEVICES,
            "ENODEV: DEVICES: the host has no device '0000:99:00.0'",
            id="unknown-device",
        ),
        pytest.param(
            "attached",
            lambda m: ({"devices": {DEVICE: 0}}, [m()]),
            FrameType.DEVICES,
            f"EBUSY: DEVICES: '{DEVICE}' is already attached: pass its fd before",
            id="device-attached",
        ),
        pytest.param(
            "device",
            lambda m: ({"devices": {DEVICE: 0}}, [m()]),
            FrameType.DEVICES,
            f"EEXIST: DEVICES: '{DEVICE}' was already given an fd",
            id="device-twice",
        ),
        pytest.param(
            None,
            lambda m: ({"devices": {DEVICE: 0, HOST["devices"][1]["id"]: 0}}, [m()]),
            FrameType.DEVICES,
            f"EINVAL: DEVICES '{HOST['devices'][1]['id']}': fd index 0 is used twice",
            id="device-index-twice",
        ),
        pytest.param(
            None,
            lambda m: ({"devices": [DEVICE]}, [m()]),
            FrameType.DEVICES,
            'EINVAL: DEVICES: payload must be {"devices": {...}}',
            id="devices-not-an-object",
        ),
        pytest.param(
            None,
            lambda m: ({"devices": {DEVICE: 0}}, [m(), m()]),
            FrameType.DEVICES,
            "EINVAL: DEVICES: the frame came with fds it does not use (indexes [1])",
            id="device-fds-not-used",
        ),
    ]


@pytest.mark.parametrize(("before", "make", "kind", "error"), _refusal_cases())
def test_refused_frames_close_every_fd(
    memfds: Memfds, before: str | None, make: Any, kind: int, error: str
) -> None:
    conn = connection()
    hello(conn)
    if before == "before-viommu":
        record(conn, VIOMMU)
    elif before == "attached":
        record(conn, VIOMMU)
        record(conn, ATTACH)
    elif before == "memory":
        assert send(conn, FrameType.MEMORY, memory((0, 2 * MIB, 0)), [memfds()])["ok"]
    elif before == "device":
        assert send(conn, FrameType.DEVICES, {"devices": {DEVICE: 0}}, [memfds()])["ok"]
    kept = memfds.open_names()
    body, fds = make(memfds)
    reply = send(conn, kind, body, fds)
    assert reply["fatal"] is False
    assert reply["error"].startswith(error)
    assert memfds.open_names() == kept  # every fd of the refused frame was closed
    assert not conn.closing
    stats = replies(conn.receive(wire.encode(FrameType.STATS, 9)))
    assert stats[0].type == FrameType.STATS_OK  # the session goes on
    conn.close()
    assert memfds.open_names() == set()


def test_memory_before_hello_is_fatal_and_its_fds_closed(memfds: Memfds) -> None:
    conn = connection()
    reply = send(conn, FrameType.MEMORY, memory((0, 2 * MIB, 0)), [memfds()])
    assert reply == {"error": "the first frame must be HELLO", "fatal": True}
    assert memfds.open_names() == set()


def test_memory_over_tcp_is_refused(memfds: Memfds) -> None:
    conn = connection(transport="tcp")
    hello(conn)
    reply = send(conn, FrameType.MEMORY, memory((0, 2 * MIB, 0)), [])
    assert reply == {
        "error": "EOPNOTSUPP: MEMORY needs the Unix socket (fds cannot cross TCP)",
        "fatal": False,
    }
    reply = send(conn, FrameType.DEVICES, {"devices": {DEVICE: 0}}, [])
    assert reply["error"].startswith("EOPNOTSUPP: DEVICES needs the Unix socket")


@pytest.mark.parametrize("kind", [FrameType.STATS, FrameType.RECORD, FrameType.CMDS])
def test_fds_with_a_frame_that_takes_none_are_closed(memfds: Memfds, kind: int) -> None:
    conn = connection()
    hello(conn)
    record(conn, VIOMMU)
    if kind == FrameType.STATS:
        data = wire.encode(kind, 5)
    elif kind == FrameType.RECORD:
        data = wire.encode_json(kind, 5, {**VIOMMU, "op": "viommu_destroy"})
    else:
        data = wire.encode_guest_data(kind, 5, "v", bytes.fromhex("46" + "00" * 15))
    (frame,) = replies(conn.receive(data, [memfds(), memfds()]))
    assert frame.type != FrameType.ERROR, frame.json()  # answered as without them
    assert memfds.open_names() == set()
    # a later MEMORY frame does not inherit them: it gets exactly its own
    if kind == FrameType.RECORD:
        reply = send(conn, FrameType.MEMORY, memory((0, 2 * MIB, 0)), [memfds()])
        assert reply["ok"] is True


def test_fds_with_group_commit_doorbells_are_closed(memfds: Memfds) -> None:
    conn = connection()
    hello_frame = {"protocol": 1, "host": HOST, "group_commit": True}
    conn.receive(wire.encode_json(FrameType.HELLO, 1, hello_frame))
    record(conn, VIOMMU)
    sync = bytes.fromhex("46" + "00" * 15)
    run = b"".join(wire.encode_guest_data(FrameType.CMDS, s, "v", sync) for s in (5, 6))
    out = replies(conn.receive(run, [memfds()]))
    assert [f.seq for f in out] == [5, 6]
    assert memfds.open_names() == set()


def test_a_frame_takes_the_fds_that_came_with_any_of_its_bytes(memfds: Memfds) -> None:
    """A frame cut across reads: its fds may come with its first bytes (the kernel attaches
    them to a message's first part)."""
    conn = connection()
    hello(conn)
    fd = memfds()
    data = wire.encode_json(FrameType.MEMORY, 4, memory((0, 2 * MIB, 0)))
    assert conn.receive(data[:5], [fd]) == b""
    (frame,) = replies(conn.receive(data[5:]))
    assert frame.json()["ok"] is True
    assert conn.session is not None
    assert conn.session.resources.regions[0].fd == fd
    conn.close()
    assert memfds.open_names() == set()


def test_too_many_waiting_fds_end_the_connection(memfds: Memfds) -> None:
    conn = connection()
    hello(conn)
    shared = memfds()
    partial = wire.encode_json(FrameType.MEMORY, 4, memory((0, 2 * MIB, 0)))[:3]
    fds = [os.dup(shared) for _ in range(MAX_QUEUED_FDS + 1)]
    os.close(shared)
    (frame,) = replies(conn.receive(partial, fds))
    assert frame.seq == 0
    assert frame.json() == {
        "error": f"more than {MAX_QUEUED_FDS} file descriptors wait for their frames",
        "fatal": True,
    }
    assert conn.closing
    assert memfds.open_names() == set()


def test_lost_fds_end_the_connection(memfds: Memfds) -> None:
    conn = connection()
    hello(conn)
    data = wire.encode_json(FrameType.MEMORY, 4, memory((0, 2 * MIB, 0)))
    (frame,) = replies(conn.receive(data, [memfds()], truncated=True))
    assert frame.seq == 0
    assert frame.json()["fatal"] is True
    assert "file descriptors lost" in frame.json()["error"]
    assert memfds.open_names() == set()


def test_close_closes_waiting_fds(memfds: Memfds) -> None:
    conn = connection()
    hello(conn)
    data = wire.encode_json(FrameType.MEMORY, 4, memory((0, 2 * MIB, 0)))
    assert conn.receive(data[:20], [memfds()]) == b""
    assert memfds.open_names() != set()
    conn.close()
    assert memfds.open_names() == set()


def test_fds_after_hello_go_along_with_a_handoff(memfds: Memfds) -> None:
    """The listener reads HELLO and a pipelined MEMORY with its fds in one chunk; the session
    process's Connection gets them back at their place in the handed-over bytes."""
    listener = connection(handoff=True)
    fd = memfds()
    stream = wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST})
    stream += wire.encode_json(FrameType.MEMORY, 2, memory((0, 2 * MIB, 0)))
    assert listener.receive(stream, [fd]) == b""
    assert listener.handed_off == stream
    batches, listener.handed_fds = listener.handed_fds, []
    assert batches == [(len(stream) - 1, [fd])]
    listener.close()
    assert memfds.open_names() != set()  # handed over, not closed
    session = connection()
    out = b"".join(session.receive(data, fds) for data, fds in split(stream, batches))
    out += session.receive(wire.encode(FrameType.STATS, 3))
    kinds = [(f.type, f.seq) for f in replies(out)]
    assert kinds == [(FrameType.HELLO_OK, 1), (FrameType.RESPONSE, 2), (FrameType.STATS_OK, 3)]
    assert session.session is not None
    assert session.session.resources.regions[0].fd == fd
    session.close()
    assert memfds.open_names() == set()


def test_fds_with_hello_are_closed_by_the_listener(memfds: Memfds) -> None:
    listener = connection(handoff=True)
    stream = wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST})
    assert listener.receive(stream, [memfds()]) == b""
    assert listener.handed_fds == []
    assert memfds.open_names() == set()


@pytest.mark.parametrize(
    ("batches", "pieces"),
    [
        ([], [(b"abcdef", [])]),
        ([(2, [7])], [(b"abc", [7]), (b"def", [])]),
        ([(5, [7])], [(b"abcdef", [7])]),
        ([(1, [7]), (1, [8]), (4, [9])], [(b"ab", [7, 8]), (b"cde", [9]), (b"f", [])]),
        ([(-1, [7]), (0, [8])], [(b"a", [7, 8]), (b"bcdef", [])]),
        ([(9, [7])], [(b"abcdef", [7])]),
    ],
)
def test_split_places_each_batch_after_its_byte(
    batches: list[tuple[int, list[int]]], pieces: list[tuple[bytes, list[int]]]
) -> None:
    assert split(b"abcdef", batches) == pieces
