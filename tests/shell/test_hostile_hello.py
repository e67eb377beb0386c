"""Hostile or careless clients against one ``Connection`` (in process, no socket).

Deep or malformed JSON, oversized HELLOs and hosts, odd tokens and huge names must end in a
clear protocol answer (docs/protocol.md §8), never an ``internal error``; client-chosen
names are cut short on log lines (docs/operations.md §5), and ``backend_error`` lines say
which VM and vIOMMU they are about.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from protocols.frames import FrameType
from protocols.smmuv3 import Opcode, build_command
from tests.shell.conftest import replies
from viommud import wire
from viommud.backend.base import Backend
from viommud.backend.emulator import EmulatedIommufd, testing
from viommud.host import HostConfig
from viommud.shell import connection as connection_module
from viommud.shell.connection import MAX_HELLO_PAYLOAD, Connection
from viommud.shell.endpoints import token_matches
from viommud.shell.limits import Limits
from viommud.trace import DeviceAttach, Record, Ste, ViommuCreate, record_to_json

HOST = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
    "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": 256}],
}
TOKEN = "s" * 24


def connection(**options: Any) -> tuple[Connection, list[EmulatedIommufd]]:
    made: list[EmulatedIommufd] = []

    def factory(host: HostConfig) -> Backend:
        made.append(EmulatedIommufd(host))
        return made[-1]

    log = structlog.get_logger("viommud").bind(client=1)
    return Connection(1, factory, None, log, **options), made


def hello(**fields: Any) -> bytes:
    return wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST, **fields})


def assert_fatal(
    conn: Connection, out: bytes, message: str, logs: list[MutableMapping[str, Any]]
) -> None:
    (frame,) = replies(out)
    body = frame.json()
    assert frame.type == FrameType.ERROR, body
    assert body["fatal"] is True, body
    assert message in body["error"], body
    assert conn.closing
    assert conn.session is None
    assert "internal_error" not in [e["event"] for e in logs]


def test_a_hello_nested_5000_deep_is_a_fatal_protocol_error() -> None:
    conn, _ = connection()
    payload = b'{"protocol":1,"host":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with capture_logs() as logs:
        out = conn.receive(wire.encode(FrameType.HELLO, 7, payload))
    assert_fatal(conn, out, "bad HELLO: frame payload is not valid JSON: nested too deeply", logs)
    assert replies(out)[0].seq == 7
    assert [e["event"] for e in logs] == ["protocol_error"]


def test_a_hello_deeper_than_the_limit_is_refused_even_when_python_could_parse_it() -> None:
    conn, _ = connection()
    deep: Any = 0
    for _ in range(wire.MAX_JSON_DEPTH):
        deep = [deep]
    with capture_logs() as logs:
        out = conn.receive(hello(client=deep))
    assert_fatal(conn, out, "nested too deeply (at most 32 levels)", logs)


def test_a_deep_record_inside_a_session_is_refused_but_not_fatal() -> None:
    conn, _ = connection()
    assert replies(conn.receive(hello()))[0].type == FrameType.HELLO_OK
    payload = b"[" * 5000 + b"]" * 5000
    with capture_logs() as logs:
        (frame,) = replies(conn.receive(wire.encode(FrameType.RECORD, 2, payload)))
    assert frame.type == FrameType.ERROR
    assert frame.json() == {
        "error": "frame payload is not valid JSON: nested too deeply (at most 32 levels)",
        "fatal": False,
    }
    assert not conn.closing
    assert not logs


def test_a_hello_longer_than_its_limit_is_refused_from_its_header() -> None:
    conn, _ = connection()
    big = wire.encode(FrameType.HELLO, 1, b" " * (MAX_HELLO_PAYLOAD + 1))
    with capture_logs() as logs:
        out = conn.receive(big[:12])  # the payload is never read
    assert_fatal(conn, out, f"exceeds the limit of {MAX_HELLO_PAYLOAD}", logs)


def test_after_hello_the_frame_limit_is_the_sessions_one() -> None:
    """serve --max-frame: by default the largest SMMUv3 command queue (2^19 commands) plus
    the frame's vIOMMU name, below the codec's own 64 MiB."""
    conn, _ = connection()
    conn.receive(hello())
    assert conn.decoder.max_payload == Limits().max_frame == (1 << 19) * 16 + 256


def test_a_big_host_is_accepted_and_one_over_the_limit_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    devices = [{"id": f"d{i}", "iommu": "smmu0", "sid": i} for i in range(20000)]
    frame = hello(host={"iommus": HOST["iommus"], "devices": devices})
    assert len(frame) < MAX_HELLO_PAYLOAD
    conn, _ = connection()
    conn.receive(frame)  # checked with sets: linear in the host's size
    assert conn.session is not None
    monkeypatch.setattr(connection_module, "MAX_HOST_DEVICES", 1000)
    conn, _ = connection()
    with capture_logs() as logs:
        out = conn.receive(frame)
    assert_fatal(conn, out, "bad host in HELLO: more than 1000 host.devices", logs)


def test_hello_names_must_be_strings() -> None:
    conn, _ = connection()
    with capture_logs() as logs:
        out = conn.receive(hello(vm=["a", "b"]))
    assert_fatal(conn, out, "bad HELLO: 'vm' must be a string", logs)


def test_a_lone_surrogate_token_is_a_bad_token_in_hello() -> None:
    conn, _ = connection(transport="tcp", peer="10.0.0.2:4000", token=TOKEN)
    frame = hello(token="\ud800")
    assert b'"\\ud800"' in frame  # what a client sends: legal JSON, not encodable as UTF-8
    with capture_logs() as logs:
        out = conn.receive(frame)
    assert_fatal(conn, out, "this listener needs the daemon's token", logs)
    assert [e["event"] for e in logs] == ["auth_failed", "protocol_error"]


def test_a_lone_surrogate_token_is_a_bad_token_in_status() -> None:
    conn, _ = connection(transport="tcp", peer="10.0.0.2:4000", token=TOKEN, status=lambda _: {})
    with capture_logs() as logs:
        out = conn.receive(wire.encode_json(FrameType.STATUS, 3, {"token": TOKEN[:-1] + "\udfff"}))
    assert_fatal(conn, out, "this listener needs the daemon's token", logs)
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(TOKEN, "\ud800" * 24)


def test_client_names_are_cut_short_on_log_lines() -> None:
    conn, _ = connection()
    names = {"vm": "v" * 65536, "trace": "t" * 65536, "client": "c" * 65536}
    with capture_logs() as logs:
        assert replies(conn.receive(hello(**names)))[0].type == FrameType.HELLO_OK
    (started,) = (e for e in logs if e["event"] == "session_started")
    for key, name in (("vm", "vm"), ("trace", "trace"), ("client_name", "client")):
        value = started[key]
        assert len(value) <= 128, key
        assert value.endswith(f"(+{65536 - value.index('…')})"), value[-20:]
        assert value.startswith(name[0] * 100)
    assert len(json.dumps(started)) < 1024
    assert conn.describe()["session"]["vm"] == names["vm"]  # STATUS reports it whole


def test_backend_errors_name_the_vm_and_the_viommu() -> None:
    conn, made = connection()
    conn.receive(hello(vm="guest-9"))
    ste = struct.pack("<8Q", 0xB | 0x40000000, 0xD6, 0, 0, 0, 0, 0, 0)
    records: list[Record] = [
        ViommuCreate(0, "v", "smmuv3", ("smmu0",)),
        DeviceAttach(0, "v", 8, "0000:01:00.0"),
        Ste(0, "v", 8, ste),
    ]
    for seq, record in enumerate(records, 2):
        (ok,) = replies(
            conn.receive(wire.encode_json(FrameType.RECORD, seq, record_to_json(record)))
        )
        assert ok.json() == {"ok": True}
    sync = build_command(Opcode.CMD_SYNC)
    cfgi = build_command(Opcode.CFGI_STE, sid=8, leaf=1) + sync  # the guest installs the STE
    assert replies(conn.receive(wire.encode_guest_data(FrameType.CMDS, 8, "v", cfgi)))
    testing.inject_cmdq_error(made[0], "smmu0", errno.EIO)
    doorbell = build_command(Opcode.TLBI_NH_ASID, asid=1) + sync
    with capture_logs() as logs:
        conn.receive(wire.encode_guest_data(FrameType.CMDS, 9, "v", doorbell))
    (error,) = (e for e in logs if e["event"] == "backend_error")
    assert error["vm"] == "guest-9"
    assert error["viommu"] == "v"
    assert (error["errno"], error["piommu"]) == ("EIO", "smmu0")
