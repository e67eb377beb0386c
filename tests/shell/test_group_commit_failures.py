"""Host failures with group commit on a connection: virtio-iommu requests are answered one
by one whatever the HELLO says, so a request whose host call fails gets the same status
with ``group_commit`` as without (docs/coalescing.md, "Host failures"). The faults are
injected into the emulated kernel (``testing.inject_invalidate_error``) before the session
starts, persistently, on both host IOMMU models of the trace."""

from __future__ import annotations

import json
from typing import Any

import structlog

from protocols.frames import FrameType
from tests.conftest import FIXTURES
from tests.shell.conftest import replies
from viommud import wire
from viommud.backend.base import Backend
from viommud.backend.emulator import EmulatedIommufd, testing
from viommud.host import HostConfig
from viommud.shell.connection import Connection
from viommud.trace import Cmds, Request, TraceReader, record_to_json

TRACE = FIXTURES / "virtio-vsva.jsonl"


def _faulty(host: HostConfig) -> Backend:
    backend = EmulatedIommufd(host)
    # every VT-d stage-1 entry, and every ARM TLBI_NH_VA, fails
    testing.inject_invalidate_error(backend, "dmar0", lambda e: True, times=None)
    testing.inject_invalidate_error(backend, "smmu0", lambda e: e[0] == 0x12, times=None)
    return backend


def _answers(group_commit: bool) -> list[Any]:
    reader = TraceReader(TRACE)
    header = json.loads(TRACE.read_text().splitlines()[0])
    log = structlog.get_logger("viommud").bind(client=1)
    conn = Connection(1, _faulty, None, log)
    frames = [
        wire.encode_json(
            FrameType.HELLO,
            1,
            {"protocol": 1, "host": header["host"], "group_commit": group_commit},
        )
    ]
    for seq, record in enumerate(reader, 2):
        if isinstance(record, Cmds):
            frames.append(wire.encode_guest_data(FrameType.CMDS, seq, record.viommu, record.data))
        elif isinstance(record, Request):
            frames.append(
                wire.encode_guest_data(FrameType.REQUEST, seq, record.viommu, record.data)
            )
        else:
            frames.append(wire.encode_json(FrameType.RECORD, seq, record_to_json(record)))
    out = replies(conn.receive(b"".join(frames)))  # one read: everything waits together
    return [(f.type, f.seq, f.json() if f.type != FrameType.CMDS_OK else f.payload) for f in out]


def test_virtio_request_status_after_a_host_failure_is_the_same_with_group_commit() -> None:
    alone = _answers(False)
    grouped = _answers(True)
    assert grouped == alone
    failed = [body for kind, _, body in alone if kind == FrameType.RESPONSE and "status" in body]
    reasons = [body.get("reason", "") for body in failed]
    assert "IOMMU_HWPT_INVALIDATE failed: EIO" in reasons  # the ARM entry
    assert "IOMMU_HWPT_INVALIDATE failed: EINVAL" in reasons  # the VT-d entry
