"""Every step of QEMU's tests/qtest/virtio-iommu-test.c, replayed through the daemon's
socket as trace ``request`` records (virtio-iommu.md §7.1).

Each parametrised case replays its test from a fresh vIOMMU up to and including the step,
then checks that step's status byte and the whole reply (the tail's reserved bytes are zero,
as the qtest asserts on every reply); the steps before it must have answered as tabulated
too. The bundled trace holds both tests; replaying it checks every step at once. The
"config" test reads the configuration space, which no trace record carries: it is checked
on the vIOMMU instance the daemon creates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from protocols.virtio_iommu import parse_config
from tests.conftest import FIXTURES, Daemon
from tests.models.virtio_replaying import GEN, replay_file, replay_records, tail
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.session import Session
from viommud.trace import ViommuCreate

CASES = [
    pytest.param(test, number, id=f"{test}-step{number:02d}")
    for test, steps in GEN.QTEST.items()
    for number in range(1, len(steps) + 1)
]


def _records(test: str, upto: int) -> list[dict[str, Any]]:
    viommu = f"qtest-{test}"
    out: list[dict[str, Any]] = [GEN.create(viommu, GEN.QTEST_OPTIONS)]
    for step in GEN.QTEST[test][:upto]:
        out.append(GEN.request(viommu, step.readable(), step.describe()))
    return out


@pytest.mark.parametrize(("test", "number"), CASES)
async def test_qtest_step(daemon: Daemon, tmp_path: Path, test: str, number: int) -> None:
    steps = GEN.QTEST[test][:number]
    replayed = await replay_records(daemon, tmp_path, _records(test, number))
    answers = replayed.requests()
    assert [a["status"] for a in answers] == [s.expect for s in steps]
    last = answers[-1]
    assert last["reply"] == tail(steps[-1].expect), steps[-1].describe()
    assert last["used"] == 4
    assert replayed.report["errors"]["total"] == sum(s.expect != "OK" for s in steps)


async def test_qtest_bundled_trace(daemon: Daemon) -> None:
    replayed = await replay_file(daemon, FIXTURES / "virtio-qemu-qtest.jsonl")
    expected = [step.expect for steps in GEN.QTEST.values() for step in steps]
    answers = replayed.requests()
    assert [a["status"] for a in answers] == expected
    assert all(a["reply"] == tail(a["status"]) for a in answers)
    report = replayed.report
    assert report["commands"]["by_kind"] == {
        "virtio:ATTACH": 5,
        "virtio:DETACH": 4,
        "virtio:MAP": 17,
        "virtio:UNMAP": 13,
    }
    assert report["errors"] == {"total": 9, "by_code": {"INVAL": 3, "NOENT": 4, "RANGE": 2}}
    assert report["barriers"] == len(expected)
    # endpoint 0 is the emulated host bridge: nothing reaches the backend
    assert report["backend"]["calls"] == {}
    [backend] = daemon.backends
    assert backend.live_objects() == []


def test_qtest_config() -> None:
    """The "config" test: input_range.start 0, end >= 2^32-1, domain_range 0..2^32-1, bypass 1."""
    host = HostConfig.from_json({"iommus": [], "devices": []})
    session = Session(EmulatedIommufd(host))
    response = as_json(session.handle(ViommuCreate(2, "v", "virtio-iommu", (), GEN.QTEST_OPTIONS)))
    assert response == {"ok": True}
    config = parse_config(session.viommus["v"].config_space())  # type: ignore[attr-defined]
    assert config["input_range_start"] == 0
    assert config["input_range_end"] >= 0xFFFFFFFF
    assert config["domain_range_start"] == 0
    assert config["domain_range_end"] == 0xFFFFFFFF
    assert config["bypass"] == 1
    session.close()


async def test_qtest_unmap_garbage_reserved(daemon: Daemon, tmp_path: Path) -> None:
    """QEMU's qtest sends UNMAP with stack garbage in ``reserved``; the default policy ignores
    it (every implementation does; the spec only allows INVAL), so the statuses are the same."""
    viommu = "qtest-map_unmap"
    records: list[dict[str, Any]] = [GEN.create(viommu, GEN.QTEST_OPTIONS)]
    for step in GEN.QTEST["map_unmap"]:
        fields = dict(step.fields)
        if step.type == GEN.UNMAP:
            fields["reserved"] = 0xDEADBEEF
        records.append(GEN.request(viommu, GEN.build_request(step.type, **fields), ""))
    replayed = await replay_records(daemon, tmp_path, records)
    assert [a["status"] for a in replayed.requests()] == [s.expect for s in GEN.QTEST["map_unmap"]]
