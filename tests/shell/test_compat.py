"""The compatibility policy through the protocol: HELLO ``compat`` (a session default for
smmuv3 vIOMMUs), the vIOMMU's own ``options.compat`` (which wins), a bad value refused, and
``viommud replay --compat`` (docs/smmuv3.md, "Compatibility policy")."""

from __future__ import annotations

import io
from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from protocols.smmuv3 import Opcode, build_command
from tests.conftest import FIXTURES
from tests.shell.conftest import replies
from viommud import wire
from viommud.backend.base import Backend
from viommud.backend.emulator import EmulatedIommufd
from viommud.host import HostConfig
from viommud.shell.connection import Connection
from viommud.shell.replay import replay_embedded

HOST = {"iommus": [{"id": "smmu0", "model": "arm-smmuv3"}], "devices": []}
EL2 = build_command(Opcode.TLBI_EL2_ALL)


def _connection() -> Connection:
    def factory(host: HostConfig) -> Backend:
        return EmulatedIommufd(host)

    return Connection(1, factory, None, structlog.get_logger("viommud").bind(client=1))


def _el2_answer(hello: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    conn = _connection()
    create = {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]}
    frames = [
        wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST, **hello}),
        wire.encode_json(FrameType.RECORD, 2, {**create, "options": options}),
        wire.encode_guest_data(FrameType.CMDS, 3, "v", EL2),
    ]
    out = replies(conn.receive(b"".join(frames)))
    assert out[1].json() == {"ok": True}
    body: dict[str, Any] = out[2].json()
    return body


@pytest.mark.parametrize(
    ("hello", "options", "refused"),
    [
        ({}, {}, True),  # the default: the architecture's reading
        ({"compat": "architecture"}, {}, True),
        ({"compat": "qemu"}, {}, False),
        ({}, {"compat": "qemu"}, False),
        ({"compat": "qemu"}, {"compat": "architecture"}, True),  # the vIOMMU's own wins
        ({"compat": "architecture"}, {"compat": "qemu"}, False),
    ],
)
def test_hello_default_and_viommu_option(
    hello: dict[str, Any], options: dict[str, Any], refused: bool
) -> None:
    answer = _el2_answer(hello, options)
    assert [e["code"] for e in answer["errors"]] == (["CERROR_ILL"] if refused else [])


def test_a_bad_compat_in_hello_is_fatal() -> None:
    conn = _connection()
    (frame,) = replies(
        conn.receive(
            wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST, "compat": "kvm"})
        )
    )
    assert frame.type == FrameType.ERROR
    assert frame.json() == {
        "error": "bad HELLO: 'compat' must be 'architecture' or 'qemu'",
        "fatal": True,
    }


async def test_replay_compat_qemu_accepts_what_qemu_accepts() -> None:
    trace = FIXTURES / "smmuv3-guest-errors.jsonl"
    strict, lenient = io.StringIO(), io.StringIO()
    arch = await replay_embedded(trace, responses=strict)
    qemu = await replay_embedded(trace, responses=lenient, compat="qemu")
    assert arch.report is not None
    assert qemu.report is not None
    assert qemu.report["errors"]["total"] < arch.report["errors"]["total"]
    assert qemu.report["verify"]["missed"] == 0
