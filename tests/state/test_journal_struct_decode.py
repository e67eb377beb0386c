"""The journal reads a virtio-iommu MAP / UNMAP with the ``struct`` decoders
(``guest.virtio.unpack_map`` / ``unpack_unmap``) instead of ``decode`` (issue 17). A journal
that still decodes every request (the code before, kept here) gets the same requests and
replies: the records, the followed mappings and the count of unfollowed ones must match.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.virtio_iommu import RequestType, build_request
from viommud.guest.virtio import Map, Unmap, decode
from viommud.journal import _VIRTIO_PLAIN, Journal, _Live
from viommud.replies import RequestReply
from viommud.trace import Request, ViommuCreate, ViommuDestroy

PAGE = 4096
OK = RequestReply("OK", b"", 4)
INVAL = RequestReply("INVAL", b"", 4, "no")


class DecodingJournal(Journal):
    """``Journal.request`` as it was: every MAP / UNMAP decoded into a value."""

    def request(self, viommu: str, data: bytes, reply: RequestReply) -> None:
        live: _Live | None = self.live.get(viommu)
        if live is None or reply.status != "OK" or not data or data[0] in _VIRTIO_PLAIN:
            return
        if data[0] == RequestType.MAP:
            req = decode(data)
            if isinstance(req, Map):
                key = self._add(live, Request(0, viommu, bytes(data)))
                live.maps[req.domain, req.virt_start, req.virt_end] = key
                return
        elif data[0] == RequestType.UNMAP:
            req = decode(data)
            if isinstance(req, Unmap):
                if not self._unmapped(live, req.domain, req.virt_start, req.virt_end):
                    self._add(live, Request(0, viommu, bytes(data)))
                return
        live.forget()
        self._add(live, Request(0, viommu, bytes(data)))


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, bool]:
    kind = draw(st.sampled_from(["map", "map", "unmap", "unmap", "attach", "probe"]))
    domain = draw(st.integers(1, 2))
    page = draw(st.integers(0, 12))
    pages = draw(st.integers(1, 3))
    start, end = page * PAGE, (page + pages) * PAGE - 1
    if kind == "map":
        raw = build_request(
            RequestType.MAP, domain=domain, virt_start=start, virt_end=end, phys_start=0, flags=3
        )
    elif kind == "unmap":
        raw = build_request(RequestType.UNMAP, domain=domain, virt_start=start, virt_end=end)
    elif kind == "attach":
        raw = build_request(RequestType.ATTACH, domain=domain, endpoint=1)
    else:
        raw = build_request(RequestType.PROBE, endpoint=1)
    size = draw(st.sampled_from(["exact"] * 6 + ["long", "short", "empty"]))
    if size == "long":
        raw += bytes(draw(st.integers(1, 8)))
    elif size == "short":
        raw = raw[: -draw(st.integers(1, 4))]
    elif size == "empty":
        raw = b""
    return raw, draw(st.booleans()) or draw(st.booleans())


def _state(journal: Journal) -> Any:
    return (
        journal.records(),
        {name: (dict(live.maps), live.unindexed) for name, live in journal.live.items()},
    )


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(request(), st.sampled_from(["v", "w", "x"]), st.integers(0, 15))))
def test_struct_decoders_keep_the_same_journal(steps: Any) -> None:
    """Requests to two virtio-iommu vIOMMUs and one unknown name, the vIOMMUs at times
    destroyed and made again (the records name the vIOMMU of their incarnation)."""
    fast, slow = Journal(), DecodingJournal()
    for journal in (fast, slow):
        journal.config(ViommuCreate(1, "v", "virtio-iommu", (), {}), ok=True)
        journal.config(ViommuCreate(2, "w", "virtio-iommu", (), {}), ok=True)
    for (raw, ok), target, roll in steps:
        for journal in (fast, slow):
            if roll == 0:  # made again
                journal.config(ViommuDestroy(3, target), ok=True)
                journal.config(ViommuCreate(4, target, "virtio-iommu", (), {}), ok=True)
            journal.request(target, raw, OK if ok else INVAL)
        assert _state(fast) == _state(slow)


def test_the_sizes_are_the_decoders() -> None:
    """An exact-length MAP / UNMAP is followed; one byte more or less is not (it forgets)."""
    journal = Journal()
    journal.config(ViommuCreate(1, "v", "virtio-iommu", (), {}), ok=True)
    raw = build_request(
        RequestType.MAP, domain=1, virt_start=0, virt_end=PAGE - 1, phys_start=0, flags=3
    )
    journal.request("v", raw, OK)
    assert journal.live["v"].maps == {(1, 0, PAGE - 1): 2}
    journal.request("v", raw + b"\0", OK)
    assert journal.live["v"].maps == {}
    assert journal.live["v"].unindexed == 1
    assert struct.unpack_from("<B", raw)[0] == RequestType.MAP
