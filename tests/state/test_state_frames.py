"""STATE_SAVE / STATE_LOAD through the protocol (docs/protocol.md §9): a state moves to a new
connection and the session goes on there; every bad document is refused with a non-fatal
ERROR that says why, the session stays as it was and nothing of the half-built one is left
on the backend."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from protocols.smmuv3 import Opcode, build_command
from tests.shell.conftest import replies
from viommud import state, wire
from viommud.backend.base import Backend
from viommud.backend.emulator import EmulatedIommufd
from viommud.host import HostConfig
from viommud.shell.claims import Registry
from viommud.shell.connection import Connection
from viommud.shell.statedir import StateDir
from viommud.shell.status import backend_objects

HOST: dict[str, Any] = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
    "devices": [
        {"id": "0000:01:00.0", "iommu": "smmu0", "sid": 8},
        {"id": "0000:02:00.0", "iommu": "smmu0", "sid": 16},
    ],
}
STE = struct.pack("<8Q", 0xB | (0x40000 + 8) << 6, 0xD6, 0, 0, 0, 0, 0, 0)
SYNC = build_command(Opcode.CMD_SYNC, cs=2)
SETUP: list[dict[str, Any]] = [
    {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]},
    {"op": "device_attach", "viommu": "v", "vid": 8, "device": "0000:01:00.0"},
    {"op": "ste", "viommu": "v", "vsid": 8, "data": STE.hex()},
]
CFGI = build_command(Opcode.CFGI_STE, sid=8, leaf=1) + SYNC
TLBI = build_command(Opcode.TLBI_NH_ASID, asid=1) + SYNC


class Factory:
    """Emulated backends, remembered so a test can look at what they still hold."""

    def __init__(self) -> None:
        self.made: list[EmulatedIommufd] = []

    def __call__(self, host: HostConfig) -> Backend:
        backend = EmulatedIommufd(host)
        self.made.append(backend)
        return backend


def connect(factory: Factory, host: dict[str, Any] = HOST, **hello: Any) -> Connection:
    conn = Connection(1, factory, None, structlog.get_logger("viommud").bind(client=1))
    frame = wire.encode_json(
        FrameType.HELLO, 1, {"protocol": 1, "host": host, "state": True, **hello}
    )
    assert replies(conn.receive(frame))[0].type == FrameType.HELLO_OK
    return conn


def test_state_save_needs_hello_state() -> None:
    """Without HELLO ``state`` the session keeps no journal (it would hold every live
    mapping): STATE_SAVE is refused, non-fatally, saying how to ask for it."""
    conn = connect(Factory(), state=False)
    (reply,) = send(conn, wire.encode(FrameType.STATE_SAVE, 2, b""))
    assert reply.type == FrameType.ERROR
    body = reply.json()
    assert body["fatal"] is False
    assert body["error"].startswith("state refused: this session keeps no state")


def send(conn: Connection, *frames: bytes) -> list[wire.Frame]:
    return replies(conn.receive(b"".join(frames)))


def saved_session(factory: Factory, **hello: Any) -> tuple[Connection, bytes]:
    conn = connect(factory, **hello)
    frames = [wire.encode_json(FrameType.RECORD, 2 + i, r) for i, r in enumerate(SETUP)]
    frames.append(wire.encode_guest_data(FrameType.CMDS, 9, "v", CFGI))
    assert all(f.type != FrameType.ERROR for f in send(conn, *frames))
    (reply,) = send(conn, wire.encode(FrameType.STATE_SAVE, 10))
    assert reply.type == FrameType.STATE
    assert reply.seq == 10
    return conn, reply.payload


def stats(conn: Connection) -> dict[str, Any]:
    (reply,) = send(conn, wire.encode(FrameType.STATS, 99))
    body: dict[str, Any] = reply.json()
    return body


def test_the_state_moves_to_a_new_session_and_goes_on_there() -> None:
    factory = Factory()
    source, document = saved_session(factory, calls=True, verify=True)
    before = stats(source)
    target = connect(factory, calls=True, verify=True)
    (loaded,) = send(target, wire.encode(FrameType.STATE_LOAD, 5, document))
    assert loaded.type == FrameType.STATE_LOADED
    assert loaded.seq == 5
    body: dict[str, Any] = loaded.json()
    assert body["viommus"] == {"v": "smmuv3"}
    assert body["records"] == 4  # create, attach, ste, the CFGI_STE doorbell
    ioctls = [c["ioctl"] for c in body["calls"]]
    assert "IOMMU_VIOMMU_ALLOC" in ioctls
    assert "IOMMU_HWPT_ALLOC" in ioctls  # rebuilt anew
    assert body["calls"][0]["seq"] == sum(before["backend"]["calls"].values()) + 1
    after = stats(target)
    for key in ("commands", "errors", "barriers", "baseline", "verify", "config_errors"):
        assert after[key] == before[key], key
    (answer,) = send(target, wire.encode_guest_data(FrameType.CMDS, 6, "v", TLBI))
    assert answer.json()["errors"] == []
    assert answer.json()["syncs"] == 1
    assert answer.json()["calls"][0]["ioctl"] == "IOMMU_HWPT_INVALIDATE"  # still translating
    assert stats(target)["barriers"] == before["barriers"] + 1


def _reencoded(document: bytes, **changes: Any) -> bytes:
    doc = json.loads(document)
    doc.update(changes)
    return state.encode(doc)


def _bad_documents(document: bytes) -> list[tuple[str, bytes, str]]:
    doc = json.loads(document)
    flipped = bytearray(document)
    at = document.index(b"0000:01:00.0")
    flipped[at + 3] ^= 0x01  # one bit of a device name
    no_dev = json.loads(document)
    no_dev["journal"][1]["device"] = "0000:09:00.0"
    no_dev["host"]["devices"].append({"id": "0000:09:00.0", "iommu": "smmu0", "sid": 72})
    broken = json.loads(document)
    broken["journal"].insert(2, {"op": "device_detach", "viommu": "v", "vid": 99})
    return [
        ("version", _reencoded(document, version=2), "state format version 2 is not supported"),
        ("format", _reencoded(document, format="x"), "'format' must be 'viommud-state'"),
        ("checksum", bytes(flipped), "state checksum mismatch"),
        ("truncated", document[: len(document) // 2], "not valid JSON"),
        ("empty", b"", "not valid JSON"),
        ("record", _reencoded(document, journal=[{"op": "nope"}]), "unknown op 'nope'"),
        ("totals", _reencoded(document, totals={"barriers": -1}), "bad state: totals"),
        ("host", state.encode(no_dev), "host lacks what the state needs"),
        ("rebuild", state.encode(broken), "does not rebuild: journal record 3"),
        ("viommus", _reencoded(document, viommus={"w": "vtd"}), "does not rebuild: it names"),
        ("compat", _reencoded(document, compat=3), "'compat' must be a string"),
        ("not-an-object", state.encode(doc)[:1] + b"]", "not valid JSON"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_a_bad_document_is_refused_and_the_session_is_unchanged(case: int) -> None:
    factory = Factory()
    _source, document = saved_session(factory)
    what, bad, message = _bad_documents(document)[case]
    target = connect(factory)
    before_session = target.session
    before = stats(target)
    (reply,) = send(target, wire.encode(FrameType.STATE_LOAD, 7, bad))
    assert reply.type == FrameType.ERROR, what
    body = reply.json()
    assert body["fatal"] is False
    assert reply.seq == 7
    assert body["error"].startswith("state refused: ")
    assert message in body["error"], body
    assert target.session is before_session
    assert stats(target) == before
    assert not target.closing
    for backend in factory.made[2:]:  # whatever the refused load built is gone
        assert backend_objects(backend) == []
    # and the same connection can still load the good document
    (good,) = send(target, wire.encode(FrameType.STATE_LOAD, 8, document))
    assert good.type == FrameType.STATE_LOADED, good.json()


def test_a_session_with_viommus_refuses_a_load() -> None:
    factory = Factory()
    source, document = saved_session(factory)
    before = stats(source)
    (reply,) = send(source, wire.encode(FrameType.STATE_LOAD, 7, document))
    assert reply.type == FrameType.ERROR
    assert "needs a session without vIOMMUs (this one has 1)" in reply.json()["error"]
    assert stats(source) == before


def test_a_host_without_the_device_refuses_the_state() -> None:
    """The loading daemon's host lacks a device the state uses (docs/state-format.md §4)."""
    factory = Factory()
    _source, document = saved_session(factory)
    small = {"iommus": HOST["iommus"], "devices": [HOST["devices"][1]]}
    target = connect(factory, host=small)
    (reply,) = send(target, wire.encode(FrameType.STATE_LOAD, 7, document))
    assert reply.type == FrameType.ERROR
    assert "host lacks what the state needs" in reply.json()["error"]
    assert "0000:01:00.0" in reply.json()["error"]


def test_state_frames_need_a_session() -> None:
    conn = Connection(1, Factory(), None, structlog.get_logger("viommud").bind(client=1))
    (reply,) = send(conn, wire.encode(FrameType.STATE_SAVE, 3))
    assert reply.type == FrameType.ERROR
    assert reply.json()["fatal"] is True
    assert reply.json()["error"] == "the first frame must be HELLO"


def test_a_loaded_state_is_kept_in_the_state_dir(tmp_path: Path) -> None:
    """With serve --state-dir, the session a STATE_LOAD made is what the file holds as soon
    as the STATE_LOADED reply leaves (docs/state-format.md §6)."""
    factory = Factory()
    _source, document = saved_session(factory)
    conn = Connection(
        1,
        factory,
        None,
        structlog.get_logger("viommud").bind(client=1),
        state_dir=StateDir(tmp_path),
    )
    hello = wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST})
    token = replies(conn.receive(hello))[0].json()["session_token"]
    assert json.loads((tmp_path / f"{token}.state").read_bytes())["viommus"] == {}
    (loaded,) = send(conn, wire.encode(FrameType.STATE_LOAD, 2, document))
    assert loaded.type == FrameType.STATE_LOADED
    saved = json.loads((tmp_path / f"{token}.state").read_bytes())
    assert saved["viommus"] == {"v": "smmuv3"}
    assert saved["frames"] == 0


def _owned(registry: Registry, client: int, factory: Factory) -> Connection:
    """A connection to a daemon that owns its host (serve --host): devices are claimed."""
    conn = Connection(
        client,
        factory,
        HostConfig.from_json(HOST),
        structlog.get_logger("viommud").bind(client=client),
        claims=registry.owner(client, f"client {client}"),
    )
    hello = {"protocol": 1, "host": HOST, "state": True}
    assert replies(conn.receive(wire.encode_json(FrameType.HELLO, 1, hello)))[0].type == (
        FrameType.HELLO_OK
    )
    return conn


def test_a_loaded_session_claims_its_devices() -> None:
    """A session rebuilt by STATE_LOAD holds its devices as its attaches would have: while
    another session holds one, the load is refused and nothing is kept; once loaded, a third
    session's attach of it gets EBUSY."""
    registry, factory = Registry(), Factory()
    source = _owned(registry, 1, factory)
    frames = [wire.encode_json(FrameType.RECORD, 2 + i, r) for i, r in enumerate(SETUP)]
    assert all(f.type != FrameType.ERROR for f in send(source, *frames))
    (saved,) = send(source, wire.encode(FrameType.STATE_SAVE, 10))
    source.close()
    holder = _owned(registry, 2, factory)
    (ok,) = send(holder, wire.encode_json(FrameType.RECORD, 2, SETUP[0]))
    (ok,) = send(holder, wire.encode_json(FrameType.RECORD, 3, SETUP[1]))
    assert ok.json() == {"ok": True}
    target = _owned(registry, 3, factory)
    (refused,) = send(target, wire.encode(FrameType.STATE_LOAD, 2, saved.payload))
    assert refused.type == FrameType.ERROR
    assert "EBUSY: device '0000:01:00.0'" in refused.json()["error"]
    assert registry.held() == {"0000:01:00.0": 2}
    holder.close()
    (loaded,) = send(target, wire.encode(FrameType.STATE_LOAD, 3, saved.payload))
    assert loaded.type == FrameType.STATE_LOADED
    assert registry.held() == {"0000:01:00.0": 3}
    other = _owned(registry, 4, factory)
    send(other, wire.encode_json(FrameType.RECORD, 2, SETUP[0]))
    (busy,) = send(other, wire.encode_json(FrameType.RECORD, 3, SETUP[1]))
    assert busy.json()["error"].startswith("EBUSY: device '0000:01:00.0'")
    target.close()
    other.close()
    assert registry.held() == {}


def test_a_load_refused_for_a_busy_device_keeps_the_vmms_ram() -> None:
    """The rebuild took the guest RAM the VMM passed; refused afterwards (a device another
    session holds), the RAM goes back to the session, its memfd still open."""
    import os

    from viommud.guest_memory import RamRegion

    def ram() -> int:
        fd = os.memfd_create("guest-ram")
        os.ftruncate(fd, 1 << 21)
        return fd

    registry, factory = Registry(), Factory()
    source = _owned(registry, 1, factory)
    assert source.session is not None
    source.session.resources.set_memory([RamRegion(0, 1 << 21, ram())])
    frames = [wire.encode_json(FrameType.RECORD, 2 + i, r) for i, r in enumerate(SETUP)]
    assert all(f.type != FrameType.ERROR for f in send(source, *frames))
    (saved,) = send(source, wire.encode(FrameType.STATE_SAVE, 10))
    source.close()
    holder = _owned(registry, 2, factory)
    send(holder, wire.encode_json(FrameType.RECORD, 2, SETUP[0]))
    send(holder, wire.encode_json(FrameType.RECORD, 3, SETUP[1]))
    target = _owned(registry, 3, factory)
    assert target.session is not None
    fd = ram()
    target.session.resources.set_memory([RamRegion(0, 1 << 21, fd)])
    (refused,) = send(target, wire.encode(FrameType.STATE_LOAD, 2, saved.payload))
    assert "EBUSY" in refused.json()["error"]
    assert target.session.resources.layout() == [[0, 1 << 21]]
    os.fstat(fd)  # not closed by the refused rebuild
    holder.close()
    (loaded,) = send(target, wire.encode(FrameType.STATE_LOAD, 3, saved.payload))
    assert loaded.type == FrameType.STATE_LOADED
    target.close()
