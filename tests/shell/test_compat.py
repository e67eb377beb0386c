"""The compatibility policy through the protocol: HELLO ``compat`` (a session default for
every vIOMMU: smmuv3, vtd, virtio-iommu), the vIOMMU's own ``options.compat`` (which wins),
a bad value refused, and ``viommud replay --compat`` (docs/smmuv3.md, docs/vtd.md,
docs/virtio-iommu.md, "Compatibility policy")."""

from __future__ import annotations

import io
from typing import Any

import pytest
import structlog

from protocols.frames import FrameType
from protocols.smmuv3 import Opcode, build_command
from protocols.vtd import DescType, build_descriptor
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


# -- VT-d and virtio-iommu: the same session default and override --------------------------

VTD_HOST = {"iommus": [{"id": "dmar0", "model": "intel-vtd"}], "devices": []}
VIRTIO_HOST: dict[str, Any] = {"iommus": [], "devices": []}
# a wait with FN alone: a barrier for the architecture, an IQE for QEMU <= 10.1
WAIT_FN = build_descriptor(DescType.INV_WAIT, width=16, fn=1)
UNKNOWN_REQUEST = bytes([0x42, 0, 0, 0])  # IOERR (nothing written) / QEMU: UNSUPP


def _answer(
    host: dict[str, Any],
    create: dict[str, Any],
    frame: FrameType,
    data: bytes,
    hello: dict[str, Any],
) -> dict[str, Any]:
    conn = _connection()
    frames = [
        wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": host, **hello}),
        wire.encode_json(FrameType.RECORD, 2, {"op": "viommu_create", "viommu": "v", **create}),
        wire.encode_guest_data(frame, 3, "v", data),
    ]
    out = replies(conn.receive(b"".join(frames)))
    assert out[1].json() == {"ok": True}
    body: dict[str, Any] = out[2].json()
    return body


@pytest.mark.parametrize(
    ("hello", "options", "qemu"),
    [
        ({}, {}, False),
        ({"compat": "qemu"}, {}, True),
        ({}, {"compat": "qemu"}, True),
        ({"compat": "qemu"}, {"compat": "architecture"}, False),
    ],
)
def test_vtd_takes_the_hello_default_and_its_own_option(
    hello: dict[str, Any], options: dict[str, Any], qemu: bool
) -> None:
    create = {"model": "vtd", "iommus": ["dmar0"], "options": options}
    body = _answer(VTD_HOST, create, FrameType.CMDS, WAIT_FN, hello)
    assert [e["code"] for e in body["errors"]] == (["IQE"] if qemu else [])


@pytest.mark.parametrize(
    ("hello", "options", "status"),
    [
        ({}, {}, "IOERR"),
        ({"compat": "qemu"}, {}, "UNSUPP"),
        ({}, {"compat": "qemu"}, "UNSUPP"),
        ({"compat": "qemu"}, {"compat": "architecture"}, "IOERR"),
    ],
)
def test_virtio_takes_the_hello_default_and_its_own_option(
    hello: dict[str, Any], options: dict[str, Any], status: str
) -> None:
    create = {"model": "virtio-iommu", "iommus": [], "options": options}
    body = _answer(VIRTIO_HOST, create, FrameType.REQUEST, UNKNOWN_REQUEST, hello)
    assert body["status"] == status


@pytest.mark.parametrize("model", ["vtd", "virtio-iommu"])
def test_a_bad_compat_option_is_refused_for_every_model(model: str) -> None:
    conn = _connection()
    host = VTD_HOST if model == "vtd" else VIRTIO_HOST
    iommus = ["dmar0"] if model == "vtd" else []
    frames = [
        wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": host}),
        wire.encode_json(
            FrameType.RECORD,
            2,
            {
                "op": "viommu_create",
                "viommu": "v",
                "model": model,
                "iommus": iommus,
                "options": {"compat": "kvm"},
            },
        ),
    ]
    out = replies(conn.receive(b"".join(frames)))
    body = out[1].json()
    assert body["ok"] is False
    assert f"{model} option 'compat' must be 'architecture' or 'qemu'" in body["error"]


async def test_replay_compat_qemu_reaches_vtd_and_virtio() -> None:
    """``viommud replay --compat qemu`` (replay_embedded's ``compat``) reaches VT-d and
    virtio-iommu vIOMMUs: the bundled every-descriptor trace holds a page group response
    and FN-only waits (QEMU 10.0: IQE), the spec cases unknown request types (QEMU:
    UNSUPP, not a used length of 0)."""
    vtd = FIXTURES / "vtd-every-descriptor.jsonl"
    arch = await replay_embedded(vtd, responses=io.StringIO())
    qemu = await replay_embedded(vtd, responses=io.StringIO(), compat="qemu", verify=True)
    assert arch.report is not None
    assert qemu.report is not None
    assert arch.report["errors"]["total"] == 0
    assert qemu.report["errors"]["by_code"].get("IQE", 0) > 0
    assert qemu.report["verify"]["missed"] == 0
    virtio = FIXTURES / "virtio-spec-cases.jsonl"
    arch = await replay_embedded(virtio, responses=io.StringIO())
    qemu = await replay_embedded(virtio, responses=io.StringIO(), compat="qemu", verify=True)
    assert arch.report is not None
    assert qemu.report is not None
    assert arch.report["errors"]["by_code"].get("IOERR", 0) > 0
    assert "UNSUPP" not in arch.report["errors"]["by_code"]
    assert "IOERR" not in qemu.report["errors"]["by_code"]
    assert qemu.report["errors"]["by_code"].get("UNSUPP", 0) > 0
    assert qemu.report["verify"]["missed"] == 0
