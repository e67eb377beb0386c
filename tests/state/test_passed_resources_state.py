"""STATE_SAVE / STATE_LOAD of a session given guest RAM memfds and device cdevs.

Fds cannot travel in a JSON document: it records the RAM's guest-physical layout and the
devices bound through a passed cdev (``resources``); the loading session must have been
given the same layout and a cdev for each of those devices before STATE_LOAD, or the load is
refused whole with a reason saying what to pass. A load that succeeds moves the RAM and the
unused cdevs to the rebuilt session; a refused one leaves them with the old session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.backend.test_emulated import HOST
from viommud import state
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.backend.emulator.objects import IoasObject
from viommud.guest_memory import RamRegion
from viommud.replies import ConfigReply
from viommud.session import Session
from viommud.trace import DeviceAttach, ViommuCreate

MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int = 16 * MiB) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def ok(session: Session, record: ViommuCreate | DeviceAttach) -> None:
    reply = session.handle(record)
    assert isinstance(reply, ConfigReply)
    assert reply.ok, reply.error


def given(ram: bool = True, device: bool = True, gpa: int = 0) -> Session:
    s = Session(EmulatedIommufd(HOST))
    if ram:
        s.resources.set_memory([RamRegion(gpa, 16 * MiB, memfd())])
    if device:
        s.resources.add_device("a0", os.open("/dev/null", os.O_RDWR))
    return s


@pytest.fixture
def saved() -> Iterator[bytes]:
    base = open_fds()
    s = given()
    ok(s, ViommuCreate(1, "x", "smmuv3", ("smmu0",), {}))
    ok(s, DeviceAttach(2, "x", 8, "a0"))
    yield state.save(s)
    s.close()
    assert open_fds() == base


def test_the_document_records_the_layout_and_the_passed_devices(saved: bytes) -> None:
    doc = json.loads(saved)
    assert doc["resources"] == {"ram": [[0, 16 * MiB]], "devices": ["a0"]}


def test_a_session_without_passed_resources_saves_no_resources_key() -> None:
    s = Session(EmulatedIommufd(HOST))
    ok(s, ViommuCreate(1, "x", "smmuv3", ("smmu0",), {}))
    assert "resources" not in json.loads(state.save(s))
    s.close()


def test_load_without_the_ram_is_refused_and_nothing_moves(saved: bytes) -> None:
    like = given(ram=False)
    with pytest.raises(state.StateError, match="pass the same RAM"):
        state.load(saved, like, EmulatedIommufd(HOST))
    assert "a0" in like.resources.devices  # still the old session's
    like.close()


def test_load_with_another_layout_is_refused(saved: bytes) -> None:
    like = given(gpa=1 << 30)
    with pytest.raises(state.StateError, match="guest RAM layout differs"):
        state.load(saved, like, EmulatedIommufd(HOST))
    assert like.resources.regions
    like.close()


def test_load_without_the_device_cdev_is_refused(saved: bytes) -> None:
    like = given(device=False)
    with pytest.raises(state.StateError, match="a0 through a cdev its VMM passed"):
        state.load(saved, like, EmulatedIommufd(HOST))
    assert like.resources.regions  # the RAM stays with the old session
    like.close()


def test_load_with_them_rebuilds_on_the_passed_ram(saved: bytes) -> None:
    base = open_fds()
    like = given()
    new = state.load(saved, like, EmulatedIommufd(HOST))
    assert like.resources.regions == ()
    assert like.resources.devices == {}
    like.close()  # closes nothing of the VMM's: it moved
    assert new.resources.regions
    backend = new.backend
    assert isinstance(backend, EmulatedIommufd)
    ioas = [backend.lookup(i) for i, kind in backend.live_objects() if kind == "IOAS"]
    assert [
        [(a.iova, a.length) for a in obj.areas if a.file is not None]
        for obj in ioas
        if isinstance(obj, IoasObject)
    ] == [[(0, 16 * MiB)]]
    assert [f.pdev.id for f in backend._files.values() if f.os_fd >= 0] == ["a0"]
    new.close()
    assert open_fds() == base  # the memfd and the cdev closed once, by the new session


@pytest.mark.parametrize(
    "resources",
    [
        {"ram": "all"},
        {"ram": [[0]]},
        {"ram": [[0, -1]]},
        {"devices": [1]},
        [],
        {"ram": [[0, True]]},
    ],
)
def test_a_malformed_resources_key_is_refused(resources: object) -> None:
    s = Session(EmulatedIommufd(HOST))
    doc = json.loads(state.save(s))
    doc["resources"] = resources
    with pytest.raises(state.StateError, match="'resources' must be"):
        state.decode(state.encode(doc))
    s.close()
