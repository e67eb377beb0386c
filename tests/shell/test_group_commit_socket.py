"""Group commit through the socket: every fixture answers the same record by record with
and without it, the oracle finds nothing missed, and SMMUv3 traces need fewer calls."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from protocols.frames import FrameType
from tests.conftest import FIXTURES, Daemon
from viommud import wire
from viommud.shell.client import Client
from viommud.shell.replay import replay
from viommud.trace import Cmds, TraceReader, record_to_json

TRACES = sorted(p.name for p in FIXTURES.glob("*.jsonl*"))


async def _replay(daemon: Daemon, name: str, group: int) -> tuple[list[str], dict[str, Any]]:
    responses = io.StringIO()
    result = await replay(
        FIXTURES / name, daemon.socket, responses=responses, verify=True, group_commit=group
    )
    assert result.report is not None, result.error
    return responses.getvalue().splitlines(), result.report


@pytest.mark.parametrize("name", TRACES)
async def test_fixture_answers_the_same_with_group_commit(daemon: Daemon, name: str) -> None:
    alone, alone_report = await _replay(daemon, name, 0)
    grouped, grouped_report = await _replay(daemon, name, 128)
    assert grouped == alone
    for key in ("commands", "errors", "barriers", "baseline"):
        assert grouped_report[key] == alone_report[key], key
    assert grouped_report["verify"]["missed"] == alone_report["verify"]["missed"] == 0
    calls = grouped_report["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0)
    assert calls <= alone_report["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0)


async def test_real_smmuv3_trace_collapses_to_few_calls(daemon: Daemon) -> None:
    _, report = await _replay(daemon, "smmuv3-linux61-strict.jsonl.xz", 128)
    calls = report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"]
    # One call per group of waiting doorbells instead of one per doorbell (6,220).
    assert calls < report["baseline"]["invalidate_calls"] // 10
    assert report["verify"] == {"enabled": True, "missed": 0, "over": report["verify"]["over"]}
    assert report["group_commit"] == 128


@pytest.mark.parametrize("vcpus", [1, 4])
async def test_group_commit_n_bounds_the_doorbells_pending_together(
    daemon: Daemon, vcpus: int
) -> None:
    """``group_commit=N``: at most N doorbells of a vIOMMU wait at once, so a group holds at
    most N of them and the real trace (6,221 doorbells with forwarded work, one call each
    alone) needs at least 6,221 / N calls; N=1 is the per-doorbell count exactly."""
    _, alone = await _replay(daemon, "smmuv3-linux61-strict.jsonl.xz", 0)
    _, report = await _replay(daemon, "smmuv3-linux61-strict.jsonl.xz", vcpus)
    assert alone["group_commit"] == 0
    assert report["group_commit"] == vcpus
    per_doorbell = alone["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"]
    calls = report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"]
    if vcpus == 1:
        assert calls == per_doorbell
    else:
        assert -(-per_doorbell // vcpus) <= calls < per_doorbell
    assert report["verify"]["missed"] == 0


async def test_pipelined_group_keeps_order_around_records_and_refusals(daemon: Daemon) -> None:
    client = await Client.connect(daemon.socket)
    host = json.loads((FIXTURES / "smmuv3-every-opcode.jsonl").read_text().splitlines()[0])["host"]
    await client.hello(host=host, compact=True, group_commit=True)
    sync = bytes.fromhex("4620c00f000000000000000000000000")
    tlbi = bytes.fromhex("12000000000001000000000000100000")  # TLBI_NH_VA ASID 1
    frames = [
        wire.encode_json(
            FrameType.RECORD,
            client.next_seq(),
            {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]},
        ),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", tlbi + sync),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "nope", sync),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", sync[:9]),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", bytes([0x5F]) + bytes(15)),
        wire.encode_json(FrameType.STATS, client.next_seq(), {}),
        wire.encode_guest_data(FrameType.CMDS, client.next_seq(), "v", sync + sync),
    ]
    for frame in frames:
        client.send(frame)
    await client.drain()
    replies = [await client.receive() for _ in frames]
    seqs = [r.seq for r in replies]
    assert seqs == sorted(set(seqs))  # one reply per frame, in order
    kinds = [r.type for r in replies]
    assert kinds == [
        FrameType.RESPONSE,
        FrameType.CMDS_OK,
        FrameType.ERROR,
        FrameType.ERROR,
        FrameType.RESPONSE,
        FrameType.STATS_OK,
        FrameType.CMDS_OK,
    ]
    assert "nope" in replies[2].json()["error"]
    assert replies[4].response()["errors"][0]["code"] == "CERROR_ILL"
    assert replies[6].response() == {"consumed": 2, "errors": [], "syncs": 2}
    await client.close()


async def _vtd_replies(daemon: Daemon, **hello: Any) -> list[tuple[int, Any]]:
    client = await Client.connect(daemon.socket)
    with TraceReader(FIXTURES / "vtd-linux61-strict-ats-excerpt.jsonl.xz") as reader:
        await client.hello(host=reader.header.host.to_json(), **hello)
        sent = 0
        for record in reader:
            seq = client.next_seq()
            if isinstance(record, Cmds):
                client.send(wire.encode_guest_data(FrameType.CMDS, seq, record.viommu, record.data))
            else:
                client.send(wire.encode_json(FrameType.RECORD, seq, record_to_json(record)))
            sent += 1
    await client.drain()
    replies = [await client.receive() for _ in range(sent)]
    await client.close()
    return [(r.type, r.response()) for r in replies]


async def test_compact_status_writes_stand_for_the_json_response(daemon: Daemon) -> None:
    plain = await _vtd_replies(daemon)
    compact = await _vtd_replies(daemon, compact=True, compact_writes=True, group_commit=True)
    assert [body for _, body in compact] == [body for _, body in plain]
    kinds = {kind for kind, _ in compact}
    assert FrameType.CMDS_OK_WRITES in kinds
    assert all(kind == FrameType.RESPONSE for kind, _ in plain)


@pytest.mark.parametrize("value", [True, -1])
async def test_group_commit_must_be_a_number_of_vcpus(daemon: Daemon, value: int) -> None:
    with pytest.raises(ValueError, match="number of racing vCPUs"):
        await replay(FIXTURES / "smmuv3-every-opcode.jsonl", daemon.socket, group_commit=value)
