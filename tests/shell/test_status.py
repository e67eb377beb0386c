"""`viommud status`: a running daemon's clients, vIOMMUs, vdevices, HWPTs and counters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.conftest import running
from viommud import wire
from viommud.shell.cli import main
from viommud.shell.client import Client, status
from viommud.shell.status import Totals, describe_viommu, render_table
from viommud.trace import Cmds, TraceReader, ViommuDestroy, record_to_json

TRACE = FIXTURES / "smmuv3-every-opcode.jsonl"


async def hold_a_session(socket: Path, vm: str) -> Client:
    """A client that replays TRACE up to (not including) its viommu_destroy and stays."""
    client = await Client.connect(socket)
    with TraceReader(TRACE) as reader:
        await client.hello(host=reader.header.host.to_json(), trace=reader.header.name, vm=vm)
        for record in reader:
            if isinstance(record, ViommuDestroy):
                break
            seq = client.next_seq()
            if isinstance(record, Cmds):
                client.send(wire.encode_guest_data(FrameType.CMDS, seq, record.viommu, record.data))
            else:
                client.send(wire.encode_json(FrameType.RECORD, seq, record_to_json(record)))
            await client.drain()
            reply = await client.receive()
            assert reply.type == FrameType.RESPONSE
    return client


async def test_status_shows_live_viommus_vdevices_and_hwpts(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        holder = await hold_a_session(server.socket_path, vm="guest-a")
        try:
            reply = await status(server.socket_path)
        finally:
            await holder.close()
        await server.wait_idle()
        after = await status(server.socket_path)
    assert reply["server"].startswith("viommud/")
    assert reply["listeners"] == [{"kind": "unix", "address": str(server.socket_path)}]
    assert reply["connected_clients"] == 1  # the asker is not listed
    (client,) = reply["clients"]
    session = client["session"]
    assert session["vm"] == "guest-a"
    assert session["trace"] == "smmuv3-every-opcode"
    (viommu,) = session["viommus"]
    assert viommu["name"] == "v0"
    assert viommu["model"] == "smmuv3"
    assert viommu["commands"] == 25
    assert [d["vid"] for d in viommu["vdevices"]] == [8, 16]
    assert {d["device"] for d in viommu["vdevices"]} == {"0000:01:00.0", "0000:02:00.0"}
    (piommu,) = viommu["piommus"]
    assert all(d["hwpt_id"] in piommu["nested_hwpts"] for d in viommu["vdevices"])
    assert viommu["hwpts"] == 1 + len(piommu["nested_hwpts"])
    assert session["objects"]["VDEVICE"] == 2
    assert session["objects"]["VIOMMU"] == 1
    assert reply["objects"] == session["objects"]
    assert reply["totals"]["commands"]["total"] == 25
    # Once the client has gone, its counters stay in the totals and its objects are freed.
    assert after["clients"] == []
    assert after["sessions"] == {"active": 0, "closed": 1}
    assert after["objects"] == {}
    assert after["totals"]["commands"] == reply["totals"]["commands"]
    assert after["totals"]["backend"]["calls"]["IOMMU_DESTROY"] > 0


async def test_status_cli_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(tmp_path) as server:
        holder = await hold_a_session(server.socket_path, vm="guest-b")
        try:
            code = await asyncio.to_thread(main, ["status", "--socket", str(server.socket_path)])
            table = capsys.readouterr().out
            code_json = await asyncio.to_thread(
                main, ["status", "--socket", str(server.socket_path), "--json"]
            )
            reply = json.loads(capsys.readouterr().out)
        finally:
            await holder.close()
    assert code == code_json == 0
    assert "VIOMMU" in table
    assert "guest-b" in table
    assert "live objects" in table
    assert reply["clients"][0]["session"]["vm"] == "guest-b"


def test_status_of_a_daemon_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--socket", str(tmp_path / "absent.sock")]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_totals_add_reports_and_compute_the_coalescing_ratio() -> None:
    report: dict[str, Any] = {
        "commands": {"total": 3, "by_kind": {"smmuv3:CMD_SYNC": 1, "smmuv3:CMD_TLBI_NH_VA": 2}},
        "errors": {"total": 1, "by_code": {"CERROR_ILL": 1}},
        "barriers": 1,
        "backend": {
            "calls": {"IOMMU_HWPT_INVALIDATE": 1},
            "invalidation_entries": 2,
            "errnos": {"EIO": 1},
        },
        "baseline": {"invalidate_calls": 2},
        "config_errors": 0,
    }
    one, two = Totals(), Totals()
    one.add(report)
    two.add(report)
    both = one.merged(two)
    assert both.sessions == 2
    assert both.commands == {"smmuv3:CMD_SYNC": 2, "smmuv3:CMD_TLBI_NH_VA": 4}
    assert both.coalescing_ratio == 2.0
    assert Totals().coalescing_ratio is None
    as_json = both.to_json()
    assert as_json["errors"] == {"total": 2, "by_code": {"CERROR_ILL": 2}}
    assert as_json["backend"]["errnos"] == {"EIO": 2}


def test_render_table_without_clients() -> None:
    reply = {
        "server": "viommud/0.1.0",
        "pid": 1,
        "uptime_s": 3725.0,
        "connected_clients": 0,
        "sessions": {"active": 0, "closed": 0},
        "listeners": [{"kind": "tcp", "address": "10.0.0.1:7070", "netns": "vmm"}],
        "clients": [],
        "objects": {},
        "totals": Totals().to_json(),
    }
    text = render_table(reply)
    assert "up 1h02m" in text
    assert "tcp 10.0.0.1:7070 (netns vmm)" in text
    assert "no clients connected" in text
    assert "live objects none" in text


def test_describe_viommu_reads_the_models_status() -> None:
    """``Viommu.status`` (typed, from the topology) is what ``viommud status`` shows: the
    nesting parent and nested HWPT per unit, and each device's HWPT."""
    from tests.models.vtd_harness import A, Vm, first_stage, scalable
    from tests.models.vtd_harness import T as Desc

    vm = Vm(dw=256)
    vm.attach(A)
    vm.context(A, scalable())
    vm.pasid(A, first_stage(2, 0x40000000))
    vm.run(vm.d(Desc.CC_INV, g=3, sid=A), vm.wait())
    shown = describe_viommu(vm.viommu)
    assert shown["name"] == "v"
    assert shown["model"] == "vtd"
    assert shown["commands"] == 2
    [unit] = shown["piommus"]
    assert unit["viommu_id"] is None  # VT-d makes no iommufd vIOMMU object
    assert unit["s2_hwpt_id"] is not None
    assert unit["nested_hwpts"] == [vm.hwpt_of(A)]
    assert shown["hwpts"] == 2
    [device] = shown["vdevices"]
    assert (device["vid"], device["hwpt_id"]) == (A, vm.hwpt_of(A))
