"""Structured log events: one INFO line per batch, one DEBUG line per command, errors."""

from __future__ import annotations

import io
import json
import struct

import pytest
import structlog
from structlog.testing import capture_logs

from protocols.smmuv3 import Opcode, build_command
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.session import Session
from viommud.shell import logs
from viommud.trace import DeviceAttach, Ste, ViommuCreate

HOST = HostConfig.from_json(
    {
        "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
        "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": 256}],
    }
)


def test_batch_and_guest_error_events() -> None:
    with capture_logs() as events:
        session = Session(EmulatedIommufd(HOST), log=structlog.get_logger().bind(client=7))
        as_json(session.handle(ViommuCreate(2, "v", "smmuv3", ("smmu0",))))
        as_json(session.handle(DeviceAttach(3, "v", 8, "0000:01:00.0")))
        as_json(
            session.handle(
                Ste(4, "v", 8, struct.pack("<8Q", 0xB | 0x40000000, 0xD6, 0, 0, 0, 0, 0, 0))
            )
        )
        as_json(session.doorbell("v", build_command(Opcode.CFGI_STE, sid=8, leaf=1)))
        bad = struct.pack("<QQ", 0x5F, 0)
        as_json(
            session.doorbell(
                "v",
                build_command(Opcode.TLBI_NH_ASID, asid=1) + bad + build_command(Opcode.CMD_SYNC),
            )
        )
        session.close()
    names = [e["event"] for e in events]
    assert names.count("command_decoded") == 4
    batch = [e for e in events if e["event"] == "batch_forwarded"][1]
    assert batch.pop("duration_ms") >= 0
    assert batch == {
        "event": "batch_forwarded",
        "log_level": "info",
        "client": 7,
        "viommu": "v",
        "commands": 3,
        "syncs": 1,
        "errors": 1,
        "backend_calls": 1,
    }
    error = next(e for e in events if e["event"] == "guest_error")
    assert (error["code"], error["index"], error["raw_hex"]) == ("CERROR_ILL", 1, bad.hex())
    assert error["log_level"] == "warning"
    assert {"viommu_created", "device_attached"} <= set(names)


def test_json_configuration_filters_by_level() -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    try:
        log = structlog.get_logger("viommud").bind(client=1)
        log.debug("command_decoded", index=0)
        log.info("batch_forwarded", viommu="v", commands=2)
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x["event"] for x in lines] == ["batch_forwarded"]
        assert lines[0]["client"] == 1
        assert lines[0]["level"] == "info"
        assert "timestamp" in lines[0]
    finally:
        structlog.reset_defaults()


def test_per_batch_lines_are_not_built_when_the_session_logger_drops_them() -> None:
    """A session's logger lowers ``batch_forwarded`` to DEBUG: at INFO the model skips the
    line (and the per-command ones) altogether, at DEBUG both go out."""
    for level, wanted in (("info", False), ("debug", True)):
        stream = io.StringIO()
        logs.configure(level, "json", stream)
        try:
            log = logs.SessionLogger(structlog.get_logger("viommud").bind(client=1))
            assert log.batch_lines is wanted
            session = Session(EmulatedIommufd(HOST), log=log)
            session.handle(ViommuCreate(2, "v", "smmuv3", ("smmu0",)))
            model = session.viommus["v"]
            assert getattr(model, "batch") is wanted  # noqa: B009 - the protocol has no field
            tlbi, sync = build_command(Opcode.TLBI_NH_ALL), build_command(Opcode.CMD_SYNC)
            session.doorbell("v", tlbi + sync)
            session.close()
            events = [json.loads(x)["event"] for x in stream.getvalue().splitlines()]
            assert ("batch_forwarded" in events) is wanted
            assert events.count("command_decoded") == (2 if wanted else 0)
        finally:
            structlog.reset_defaults()


HOST_ALL = HostConfig.from_json(
    {
        "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}, {"id": "vtd0", "model": "intel-vtd"}],
        "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": 256}],
    }
)
VTD_WAIT = struct.pack("<QQ", 0x2000_0002_5, 0x1000)  # wait descriptor, SW=1, status 2


@pytest.mark.parametrize("level", ["info", "debug"])
@pytest.mark.parametrize(
    ("model", "iommus", "data", "line"),
    [
        ("vtd", ("vtd0",), VTD_WAIT, "batch_forwarded"),
        ("virtio-iommu", (), struct.pack("<BxxxIII4x", 1, 1, 8, 0), "request_completed"),
    ],
    ids=["vtd", "virtio-iommu"],
)
def test_vtd_and_virtio_skip_their_per_batch_lines_at_info(
    level: str, model: str, iommus: tuple[str, ...], data: bytes, line: str
) -> None:
    wanted = level == "debug"
    stream = io.StringIO()
    logs.configure(level, "json", stream)
    try:
        log = logs.SessionLogger(structlog.get_logger("viommud").bind(client=1))
        session = Session(EmulatedIommufd(HOST_ALL), log=log)
        options = {"emulated_endpoints": [8]} if model == "virtio-iommu" else {}
        session.handle(ViommuCreate(2, "v", model, iommus, options))
        assert getattr(session.viommus["v"], "batch") is wanted  # noqa: B009
        if model == "vtd":
            session.doorbell("v", data)
        else:
            session.request("v", data)
        session.close()
        events = [json.loads(x)["event"] for x in stream.getvalue().splitlines()]
        assert (line in events) is wanted
    finally:
        structlog.reset_defaults()
