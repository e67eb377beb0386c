"""Parity of the fast virtio-iommu decoder with the construct declarations, and the exact
byte layouts of virtio-iommu.md §1.2, §2, §4 and §5 (offsets checked field by field)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.virtio_iommu import (
    CONFIG,
    DRAFTS,
    FAULT,
    REQUESTS,
    TAIL,
    FaultFlag,
    FaultReason,
    ProbeType,
    RequestType,
    ResvMemSubtype,
    build_config,
    build_fault,
    build_request,
    build_resv_mem,
    build_tail,
    parse_config,
    parse_fault,
    parse_properties,
    parse_request,
    readable_size,
)
from viommud.guest.virtio import (
    ArmPstTable,
    AttachTable,
    InvalidateB,
    Malformed,
    Map,
    Unknown,
    as_fields,
    decode,
    kind_name,
    tail,
)

PARITY = settings(max_examples=150, deadline=None, database=None)

# (type, draft) for every declared layout
LAYOUTS = [(int(t), "B") for t in REQUESTS] + [
    (int(t), d) for d, table in DRAFTS.items() for t in table
]
TABLE_FORMATS = {
    "A": [1, 2, 3, 4, 0, 9, 0xFFFF],
    "B": [1, 2, 3, 4, 0, 7],
    "C": [1, 2, 3, 4, 5, 6, 0, 0xFF],
}


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str]:
    request_type, draft = draw(st.sampled_from(LAYOUTS))
    size = readable_size(request_type, draft)
    assert size is not None
    body = bytearray(draw(st.binary(min_size=size, max_size=size)))
    body[0] = request_type
    if request_type == RequestType.ATTACH_TABLE:
        fmt = draw(st.sampled_from(TABLE_FORMATS[draft]))
        width = 1 if draft == "C" else 2
        body[12 : 12 + width] = fmt.to_bytes(width, "little")
    return bytes(body), draft


@PARITY
@given(requests())
def test_fast_decoder_matches_construct(request: tuple[bytes, str]) -> None:
    raw, draft = request
    decoded = decode(raw, draft)
    assert not isinstance(decoded, Unknown | Malformed)
    assert as_fields(decoded) == parse_request(raw, draft)


@PARITY
@given(requests())
def test_build_gives_back_the_fields(request: tuple[bytes, str]) -> None:
    """Building from parsed fields reproduces the input minus the ignored reserved bytes."""
    raw, draft = request
    fields = parse_request(raw, draft)
    request_type = int(fields.pop("type"))
    rebuilt = build_request(request_type, draft, **fields)
    assert parse_request(rebuilt, draft) == parse_request(raw, draft)
    assert decode(rebuilt, draft) == decode(raw, draft)


@PARITY
@given(st.sampled_from(LAYOUTS), st.integers(0, 200))
def test_wrong_lengths_are_malformed(layout: tuple[int, str], length: int) -> None:
    request_type, draft = layout
    size = readable_size(request_type, draft)
    if length == size:
        return
    raw = bytes([request_type]) + bytes(max(length - 1, 0)) if length else b""
    decoded = decode(raw, draft)
    assert isinstance(decoded, Malformed)
    with pytest.raises(ValueError, match=r"bytes|empty"):
        parse_request(raw, draft)


@pytest.mark.parametrize("request_type", [0, 8, 9, 0x42, 0xFF])
def test_unknown_types(request_type: int) -> None:
    assert decode(bytes([request_type, 0, 0, 0])) == Unknown(request_type)
    with pytest.raises(ValueError, match="unknown"):
        parse_request(bytes([request_type, 0, 0, 0]))
    assert kind_name(request_type) == f"type_0x{request_type:02x}"


def test_vsva_types_are_unknown_without_the_feature() -> None:
    raw = build_request(RequestType.INVALIDATE, "B", domain=1)
    assert isinstance(decode(raw, "B"), InvalidateB)
    assert decode(raw, "B", vsva=False) == Unknown(7)


def test_report_names() -> None:
    names = [kind_name(t) for t in range(1, 8)]
    assert names == ["ATTACH", "DETACH", "MAP", "UNMAP", "PROBE", "ATTACH_TABLE", "INVALIDATE"]


# -- layouts, offset by offset -------------------------------------------------------------------


def test_standard_sizes() -> None:
    """Readable parts: §2.1's table minus the 4-byte tail."""
    sizes = {RequestType(t).name: readable_size(t) for t in REQUESTS}
    assert sizes == {"ATTACH": 20, "DETACH": 20, "MAP": 36, "UNMAP": 28, "PROBE": 72}
    assert TAIL.sizeof() == 4
    assert CONFIG.sizeof() == 40
    assert FAULT.sizeof() == 24


@pytest.mark.parametrize(("draft", "table", "inv"), [("A", 76, 60), ("B", 76, 60), ("C", 124, 60)])
def test_draft_sizes(draft: str, table: int, inv: int) -> None:
    assert readable_size(RequestType.ATTACH_TABLE, draft) == table
    assert readable_size(RequestType.INVALIDATE, draft) == inv


def test_attach_offsets() -> None:
    raw = build_request(
        RequestType.ATTACH, domain=0x11223344, endpoint=0x55667788, flags=1, reserved=9
    )
    assert raw[0] == 1
    assert raw[1:4] == bytes(3)
    assert struct.unpack_from("<IIII", raw, 4) == (0x11223344, 0x55667788, 1, 9)


def test_map_offsets() -> None:
    raw = build_request(
        RequestType.MAP, domain=7, virt_start=0x1000, virt_end=0x1FFF, phys_start=0xA000, flags=3
    )
    assert struct.unpack("<B3xIQQQI", raw) == (3, 7, 0x1000, 0x1FFF, 0xA000, 3)
    assert decode(raw) == Map(7, 0x1000, 0x1FFF, 0xA000, 3)


def test_unmap_and_detach_offsets() -> None:
    raw = build_request(RequestType.UNMAP, domain=7, virt_start=1, virt_end=2, reserved=5)
    assert struct.unpack("<B3xIQQI", raw) == (4, 7, 1, 2, 5)
    raw = build_request(RequestType.DETACH, domain=7, endpoint=8)
    assert raw == bytes([2, 0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0]) + bytes(8)


def test_head_and_detach_reserved_are_ignored() -> None:
    raw = bytearray(build_request(RequestType.DETACH, domain=1, endpoint=2))
    raw[1:4] = b"\xff\xff\xff"
    raw[12:20] = b"\xee" * 8
    assert parse_request(bytes(raw)) == {"type": 2, "domain": 1, "endpoint": 2}
    assert as_fields(decode(bytes(raw))) == {"type": 2, "domain": 1, "endpoint": 2}


def test_probe_layout() -> None:
    raw = build_request(RequestType.PROBE, endpoint=0x100)
    assert len(raw) == 72
    assert raw[4:8] == b"\x00\x01\x00\x00"
    assert raw[8:] == bytes(64)


def test_attach_table_draft_b_arm_view() -> None:
    raw = build_request(
        RequestType.ATTACH_TABLE,
        "B",
        domain=1,
        endpoint=2,
        format=2,
        s1fmt=1,
        s1dss=2,
        s1contextptr=0x40001000,
        s1cdmax=4,
    )
    assert struct.unpack_from("<IIHBBQI", raw, 4) == (1, 2, 2, 1, 2, 0x40001000, 4)
    assert raw[28:76] == bytes(48)
    decoded = decode(raw, "B")
    assert isinstance(decoded, AttachTable)
    assert decoded.table == ArmPstTable(1, 2, 0x40001000, 4, bytes(48))


def test_attach_table_draft_c_views() -> None:
    raw = build_request(
        RequestType.ATTACH_TABLE, "C", domain=1, endpoint=2, format=1, ste0=0xB, ste1=0xD6
    )
    assert raw[12] == 1
    assert struct.unpack_from("<QQ", raw, 16) == (0xB, 0xD6)
    raw = build_request(
        RequestType.ATTACH_TABLE,
        "C",
        domain=1,
        endpoint=2,
        format=2,
        pgtbl_addr=0x5000,
        addr_width=48,
    )
    assert struct.unpack_from("<QQI", raw, 16) == (0, 0x5000, 48)


def test_invalidate_layouts() -> None:
    a = build_request(
        RequestType.INVALIDATE,
        "A",
        scope=4,
        flags=2,
        domain=3,
        pasid=1,
        id=5,
        virt_start=0x1000,
        nr_pages=2,
        granule=12,
    )
    assert struct.unpack_from("<HHIIQQQB", a, 4) == (4, 2, 3, 1, 5, 0x1000, 2, 12)
    b = build_request(
        RequestType.INVALIDATE,
        "B",
        inv_gran=4,
        inv_type=3,
        flags=7,
        domain=3,
        pasid=1,
        archid=5,
        virt_start=0x1000,
        nr_pages=2,
        granule=12,
    )
    assert struct.unpack_from("<HHHHIIIQQQB", b, 4) == (4, 3, 7, 0, 3, 1, 0, 5, 0x1000, 2, 12)
    c = build_request(
        RequestType.INVALIDATE,
        "C",
        scope=3,
        caches=2,
        flags=1,
        domain=3,
        pasid=1,
        id=5,
        address=0x1000,
        nr_pages=2,
        page_size=12,
    )
    assert struct.unpack_from("<BBHIIQQQB", c, 4) == (3, 2, 1, 3, 1, 5, 0x1000, 2, 12)


def test_tail_config_resv_mem_and_fault_bytes() -> None:
    assert build_tail(6) == b"\x06\x00\x00\x00"
    assert all(tail(s) == build_tail(s) for s in range(256))  # the fast tails
    config = build_config(
        page_size_mask=0xFFFFF000,
        input_range_start=0,
        input_range_end=0xFFFFFFFFFFFF,
        domain_range_start=0,
        domain_range_end=0xFFFFFFFF,
        probe_size=512,
        bypass=1,
    )
    assert struct.unpack("<QQQIIIB3x", config) == (
        0xFFFFF000,
        0,
        0xFFFFFFFFFFFF,
        0,
        0xFFFFFFFF,
        512,
        1,
    )
    assert parse_config(config)["probe_size"] == 512
    prop = build_resv_mem(ResvMemSubtype.MSI, 0xFEE00000, 0xFEEFFFFF)
    assert prop.hex() == "01001400010000000000e0fe00000000ffffeffe00000000"
    [parsed] = parse_properties(prop + bytes(8))
    assert (parsed["type"], parsed["length"], parsed["subtype"]) == (ProbeType.RESV_MEM, 20, 1)
    fault = build_fault(FaultReason.MAPPING, FaultFlag.ADDRESS | FaultFlag.WRITE, 0x100, 0xDEAD000)
    assert struct.unpack("<B3xIIIQ", fault) == (2, 0x102, 0x100, 0, 0xDEAD000)
    assert parse_fault(fault)["address"] == 0xDEAD000


def test_property_walk_masks_type_and_stops_at_none() -> None:
    """Linux masks bits 11:0 of the header word and advances by length + 4 (§2.6)."""
    odd = (0x7001).to_bytes(2, "little") + (4).to_bytes(2, "little") + b"abcd"
    props = parse_properties(
        odd + build_resv_mem(0, 0x1000, 0x1FFF) + bytes(4) + build_resv_mem(1, 0, 1)
    )
    assert [(p["type"], p["reserved"]) for p in props] == [(1, 7), (1, 0)]
    assert props[1]["start"] == 0x1000
