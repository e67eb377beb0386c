"""The frontend's MAP / UNMAP fast path (issue 17) answers as the general path.

``receive_request`` takes a well-formed MAP or UNMAP through ``_receive_map`` (no decoded
value, no type dispatch); ``_receive`` is the general path every request can take. Two
frontends get the same requests, one through each: every reply, every event, the counters
and the mappings must be equal, whatever the fields (flags, alignment, ranges, reserved
regions, overlaps, splits, the mapping cap, absent or bypass domains), the writable size,
the compatibility policy and host refusals.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.virtio_iommu import AttachFlag, RequestType, ResvMemSubtype, Status, build_request
from viommud.frontends.compat import QEMU
from viommud.frontends.virtio.frontend import VirtioIommuFrontend
from viommud.frontends.virtio.options import DevicePolicy, EndpointInfo, ResvRegion
from viommud.guest.virtio import MAP_SIZE, UNMAP_SIZE

PAGE = 4096
MSI = ResvRegion(0x8000, 0x8FFF, ResvMemSubtype.MSI)  # page 8 of the small address space
_MAP = struct.Struct("<B3sIQQQI")
_UNMAP = struct.Struct("<B3sIQQI")

addr = st.builds(
    lambda page, delta: max(page * PAGE + delta, 0),
    st.integers(0, 24),
    st.sampled_from([0, 0, 0, -1, 1]),
)
domain = st.integers(0, 3)
pad = st.sampled_from([b"\0\0\0", b"\x01\0\0"])
maps = st.builds(
    lambda p, d, s, n, phys, flags: _MAP.pack(RequestType.MAP, p, d, s, max(s + n, 0), phys, flags),
    pad,
    domain,
    addr,
    st.sampled_from([PAGE - 1, 2 * PAGE - 1, 3 * PAGE - 1, PAGE, -1, 0]),
    st.sampled_from([0, PAGE, 5 * PAGE, 7, (1 << 64) - PAGE]),
    st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0x10]),
)
unmaps = st.builds(
    lambda p, d, s, n, reserved: _UNMAP.pack(RequestType.UNMAP, p, d, s, max(s + n, 0), reserved),
    pad,
    domain,
    addr,
    st.sampled_from([PAGE - 1, 2 * PAGE - 1, 4 * PAGE - 1, 0, -1]),
    st.sampled_from([0, 0, 1]),
)
attaches = st.builds(
    lambda d, ep, flags: build_request(RequestType.ATTACH, domain=d, endpoint=ep, flags=flags),
    domain,
    st.sampled_from([0, 8]),
    st.sampled_from([0, 0, 0, int(AttachFlag.BYPASS)]),
)
detaches = st.builds(
    lambda d, ep: build_request(RequestType.DETACH, domain=d, endpoint=ep),
    domain,
    st.sampled_from([0, 8]),
)
mangled = st.builds(  # MAP / UNMAP of a wrong length: the general path on both sides
    lambda raw, cut: raw[:cut] if cut < len(raw) else raw + b"\0",
    st.one_of(maps, unmaps),
    st.sampled_from([1, MAP_SIZE - 1, UNMAP_SIZE - 1, UNMAP_SIZE + 1, 99]),
)
requests = st.tuples(
    st.one_of(maps, maps, unmaps, unmaps, attaches, detaches, mangled),
    st.sampled_from([None, None, None, 0, 3, 4, 8, 64]),  # device-writable size
    st.sampled_from([None] * 6 + [Status.DEVERR, Status.NOMEM, Status.FAULT]),  # host says
)


def _frontend(qemu: bool, cap: int, unmap_reserved_inval: bool) -> VirtioIommuFrontend:
    policy = DevicePolicy(
        max_mappings=cap,
        unmap_reserved_inval=unmap_reserved_inval,
        compat=QEMU if qemu else "architecture",
    )
    frontend = VirtioIommuFrontend(policy=policy)
    frontend.add_endpoint(0, EndpointInfo((MSI,), host=False))
    frontend.add_endpoint(8, EndpointInfo((), host=False))
    return frontend


def _state(frontend: VirtioIommuFrontend) -> Any:
    return (
        {d.id: (d.kind, sorted(d.endpoints), list(d.mappings)) for d in frontend.domains.values()},
        dict(frontend.attached),
        frontend.requests,
        dict(frontend.kind_counts_),
        dict(frontend.error_counts),
    )


def _is_map_or_unmap(raw: bytes) -> bool:
    return (raw[0], len(raw)) in ((RequestType.MAP, MAP_SIZE), (RequestType.UNMAP, UNMAP_SIZE))


@settings(max_examples=400, deadline=None)
@given(
    st.booleans(),
    st.sampled_from([2, 3, 1 << 20]),
    st.booleans(),
    st.lists(requests, min_size=1, max_size=60),
)
def test_fast_path_is_the_general_path(
    qemu: bool, cap: int, reserved_inval: bool, steps: list[Any]
) -> None:
    fast = _frontend(qemu, cap, reserved_inval)
    general = _frontend(qemu, cap, reserved_inval)
    fast_taken = 0
    for raw, writable, host in steps:
        fast.receive_request(raw, writable)
        general._receive(raw, writable)  # the general path, whatever the request
        fast_taken += _is_map_or_unmap(raw) and (writable is None or writable >= 4)
        assert fast.events() == general.events()
        reply = fast.complete(host)
        assert reply == general.complete(host)
        if reply.status is not None:  # what the device writes: zeros, then the tail
            room = 4 if writable is None else writable
            assert reply.data == bytes(room - 4) + bytes((reply.status, 0, 0, 0))
        assert _state(fast) == _state(general)
    if fast_taken:
        assert fast.requests == general.requests >= fast_taken


def test_the_fast_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A well-formed MAP with room for the tail does not reach the general path."""
    frontend = _frontend(False, 1 << 20, False)
    frontend.receive_request(build_request(RequestType.ATTACH, domain=1, endpoint=0))
    frontend.complete()

    def refuse(*_: Any) -> None:
        raise AssertionError("the general path")

    monkeypatch.setattr(VirtioIommuFrontend, "_receive", refuse)
    frontend.receive_request(
        build_request(
            RequestType.MAP, domain=1, virt_start=0, virt_end=PAGE - 1, phys_start=0, flags=3
        )
    )
    assert frontend.complete().status is Status.OK
    assert len(frontend.domains[1].mappings) == 1
