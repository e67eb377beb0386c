"""Whatever a client sends, a connection answers with frames and never raises."""

from __future__ import annotations

import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.frames import FrameType
from tests.shell.conftest import replies
from viommud import wire
from viommud.backend.select import emulated_backend
from viommud.shell.connection import Connection

HOST = {
    "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}, {"id": "dmar0", "model": "intel-vtd"}],
    "devices": [
        {"id": "0000:01:00.0", "iommu": "smmu0", "sid": 256, "ats": True},
        {"id": "0000:02:00.0", "iommu": "dmar0", "sid": 512, "ats": True},
    ],
}
SETUP = [
    wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": HOST}),
    wire.encode_json(
        FrameType.RECORD,
        2,
        {"op": "viommu_create", "viommu": "s", "model": "smmuv3", "iommus": ["smmu0"]},
    ),
    wire.encode_json(
        FrameType.RECORD,
        3,
        {"op": "device_attach", "viommu": "s", "vid": 8, "device": "0000:01:00.0"},
    ),
    wire.encode_json(
        FrameType.RECORD,
        4,
        {"op": "viommu_create", "viommu": "d", "model": "vtd", "iommus": ["dmar0"]},
    ),
    wire.encode_json(
        FrameType.RECORD,
        5,
        {"op": "device_attach", "viommu": "d", "vid": 16, "device": "0000:02:00.0"},
    ),
    wire.encode_json(
        FrameType.RECORD,
        6,
        {"op": "viommu_create", "viommu": "v", "model": "virtio-iommu", "iommus": []},
    ),
]

guest_frames = st.builds(
    lambda kind, name, data: wire.encode_guest_data(kind, 9, name, data),
    st.sampled_from([FrameType.CMDS, FrameType.REQUEST]),
    st.sampled_from(["s", "d", "v", "nope"]),
    st.one_of(st.binary(max_size=200), st.binary(min_size=16, max_size=16).map(lambda b: b * 4)),
)
json_frames = st.builds(
    lambda obj: wire.encode_json(FrameType.RECORD, 9, obj),
    st.dictionaries(
        st.sampled_from(["op", "viommu", "vid", "device", "data", "sid"]),
        st.one_of(st.text(max_size=8), st.integers(-5, 300)),
        max_size=5,
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(guest_frames, json_frames, st.binary(max_size=40)), max_size=12))
def test_connection_survives_anything(chunks: list[bytes]) -> None:
    connection = Connection(1, emulated_backend, None, structlog.get_logger())
    out = connection.receive(b"".join(SETUP))
    assert [f.type for f in replies(out)] == [FrameType.HELLO_OK] + [FrameType.RESPONSE] * 5
    for chunk in chunks:
        if connection.closing:
            break
        for frame in replies(connection.receive(chunk)):
            assert frame.type in (FrameType.RESPONSE, FrameType.CMDS_OK, FrameType.ERROR)
            if frame.type == FrameType.ERROR:
                assert "internal error" not in frame.json()["error"]
    connection.close()  # frees the session; must not raise either
