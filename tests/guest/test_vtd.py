"""Parity of the fast VT-d decoder (``struct`` + masks) with the construct declarations.

``protocols.vtd`` is the readable specification; ``viommud.guest.vtd`` is what the
daemon runs. Their field tables are written independently, so these tests check that both
decode every descriptor type in both queue widths, and every context / PASID entry,
identically; that building from decoded fields gives back the input minus its reserved
bits; and that the worked encodings of vtd.md §5.5 decode to the documented values.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.vtd import (
    DESCRIPTORS,
    DESCRIPTORS_256,
    DescType,
    build_context_entry,
    build_descriptor,
    build_pasid_entry,
    build_scalable_context_entry,
    parse_context_entry,
    parse_descriptor,
    parse_pasid_entry,
)
from viommud.frontends.vtd.frontend import RESERVED
from viommud.guest.vtd import (
    DEFINED,
    FIELDS,
    KIND_NAMES,
    LegacyContext,
    ScalableContext,
    context_entry_fields,
    decode_context_entry,
    decode_fields,
    decode_pasid_entry,
    descriptor_type,
    kind_name,
    pasid_entry_fields,
)

U64 = (1 << 64) - 1
TYPES = list(DescType)
UNKNOWN = [0x0, 0xA, 0xC, 0xF, 0x11, 0x7F]
PARITY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def with_type(raw: bytes, kind: int) -> bytes:
    """``raw`` with its type bits (qw0[3:0], qw0[11:9]) set to ``kind``."""
    qw0 = int.from_bytes(raw[:8], "little") & ~0xE0F
    qw0 |= (kind & 0xF) | (kind >> 4) << 9
    return qw0.to_bytes(8, "little") + raw[8:]


def words(raw: bytes) -> tuple[int, int]:
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:16], "little")


# ---------------------------------------------------------------------------------------------
# Tables


def test_every_type_is_declared_on_both_sides() -> None:
    assert set(DESCRIPTORS) == set(DESCRIPTORS_256) == set(DescType)
    assert set(FIELDS) == set(DEFINED) == set(KIND_NAMES) == set(RESERVED) == set(TYPES)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (1, "cc_inv"),
        (2, "iotlb_inv"),
        (3, "dev_tlb_inv"),
        (4, "iec_inv"),
        (5, "inv_wait"),
        (6, "p_iotlb_inv"),
        (7, "pc_inv"),
        (8, "p_dev_tlb_inv"),
        (9, "pgrp_resp"),
        (0x0C, "type_0x0c"),
        (0x00, "type_0x00"),
        (0x15, "type_0x15"),
    ],
)
def test_kind_names_are_the_report_names(kind: int, name: str) -> None:
    assert kind_name(kind) == name


@pytest.mark.parametrize("kind", range(0x80))
def test_type_is_seven_bits(kind: int) -> None:
    raw = with_type(bytes(16), kind)
    assert descriptor_type(words(raw)[0]) == kind
    assert parse_descriptor(raw)["type"] == kind


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_qemu_masks_and_fields_partition_each_word(kind: DescType) -> None:
    """Every bit is either a field or reserved under QEMU's masks; they overlap only where
    this vIOMMU lacks the feature (PFSID without ECAP.DIT)."""
    m0, m1 = RESERVED[kind]
    d0, d1 = DEFINED[kind]
    assert m0 | d0 == U64
    assert m1 | d1 == U64
    pfsid = 0xFFF0_0000_0000_F000 if kind in (DescType.DEV_TLB_INV, DescType.P_DEV_TLB_INV) else 0
    assert m0 & d0 == pfsid
    assert m1 & d1 == 0


# ---------------------------------------------------------------------------------------------
# Parity, every type, both widths


@pytest.mark.parametrize("width", [16, 32])
@pytest.mark.parametrize("kind", [*TYPES, *UNKNOWN], ids=lambda k: f"type{int(k):#04x}")
@PARITY
@given(raw=st.binary(min_size=32, max_size=32))
def test_descriptor_parity(kind: int, width: int, raw: bytes) -> None:
    desc = with_type(raw[:width], kind)
    qw0, qw1 = words(desc)
    assert parse_descriptor(desc) == decode_fields(qw0, qw1)


@pytest.mark.parametrize("width", [16, 32])
@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
@PARITY
@given(raw=st.binary(min_size=32, max_size=32))
def test_build_gives_back_the_fields(kind: DescType, width: int, raw: bytes) -> None:
    desc = with_type(raw[:width], kind)
    fields = parse_descriptor(desc)
    kind_ = fields.pop("type")
    built = build_descriptor(kind_, width=width, **fields)
    qw0, qw1 = words(desc)
    d0, d1 = DEFINED[kind]
    assert words(built) == (qw0 & d0, qw1 & d1)
    assert built[16:] == bytes(width - 16)  # qw2/qw3 reserved


def test_build_refuses_unknown_fields_and_values() -> None:
    with pytest.raises(ValueError, match="no field"):
        build_descriptor(DescType.IOTLB_INV, sid=1)
    with pytest.raises(ValueError, match="am"):
        build_descriptor(DescType.IOTLB_INV, am=64)
    with pytest.raises(ValueError, match="16 or 32"):
        build_descriptor(DescType.IOTLB_INV, width=24)
    with pytest.raises(ValueError, match="7 bits"):
        build_descriptor(0x80)
    with pytest.raises(ValueError, match="no field"):
        build_descriptor(0x0C, g=1)
    assert build_descriptor(0x0C) == (0x0C).to_bytes(16, "little")
    with pytest.raises(ValueError, match="16 or 32"):
        parse_descriptor(bytes(8))


# ---------------------------------------------------------------------------------------------
# Context and PASID entries


@PARITY
@given(raw=st.binary(min_size=16, max_size=16) | st.binary(min_size=32, max_size=32))
def test_context_entry_parity(raw: bytes) -> None:
    fields = parse_context_entry(raw)
    assert fields == context_entry_fields(raw)
    ctx = decode_context_entry(raw)
    if len(raw) == 16:
        assert isinstance(ctx, LegacyContext)
        assert (ctx.present, ctx.tt, ctx.aw, ctx.did) == (
            bool(fields["p"]),
            fields["tt"],
            fields["aw"],
            fields["did"],
        )
        assert ctx.slptptr == fields["slptptr"] << 12
        assert build_context_entry(**fields) == legacy_clean(raw)
        assert ctx.reserved == (legacy_clean(raw) != raw)
    else:
        assert isinstance(ctx, ScalableContext)
        assert (ctx.present, ctx.dte, ctx.rid_pasid) == (
            bool(fields["p"]),
            bool(fields["dte"]),
            fields["rid_pasid"],
        )
        assert ctx.pasiddirptr == fields["pasiddirptr"] << 12
        assert ctx.reserved == (build_scalable_context_entry(**fields) != raw)


def legacy_clean(raw: bytes) -> bytes:
    """``raw`` without its reserved bits (qw0[11:4], qw1[7], qw1[63:24])."""
    qw0, qw1 = words(raw)
    return (qw0 & ~0xFF0).to_bytes(8, "little") + (qw1 & 0xFFFF7F).to_bytes(8, "little")


@PARITY
@given(raw=st.binary(min_size=64, max_size=64))
def test_pasid_entry_parity(raw: bytes) -> None:
    fields = parse_pasid_entry(raw)
    assert fields == pasid_entry_fields(raw)
    entry = decode_pasid_entry(raw)
    assert (entry.present, entry.pgtt, entry.did, entry.flpm) == (
        bool(fields["p"]),
        fields["pgtt"],
        fields["did"],
        fields["flpm"],
    )
    assert entry.flptptr == fields["flptptr"] << 12
    assert entry.s1_flags == fields["sre"] | fields["eafe"] << 1 | fields["wpe"] << 2
    rebuilt = build_pasid_entry(**fields)
    assert parse_pasid_entry(rebuilt) == fields
    assert rebuilt[24:] == raw[24:]  # qw3-qw7 are kept raw


def test_entry_sizes_are_checked() -> None:
    for bad in (bytes(8), bytes(24), bytes(64)):
        with pytest.raises(ValueError, match="context entry"):
            parse_context_entry(bad)
        with pytest.raises(ValueError, match="context entry"):
            context_entry_fields(bad)
        with pytest.raises(ValueError, match="context entry"):
            decode_context_entry(bad)
    with pytest.raises(ValueError, match="PASID entry"):
        parse_pasid_entry(bytes(32))
    with pytest.raises(ValueError, match="PASID entry"):
        pasid_entry_fields(bytes(32))
    with pytest.raises(ValueError, match="PASID entry"):
        decode_pasid_entry(bytes(32))
    with pytest.raises(ValueError, match="no field"):
        build_context_entry(rid_pasid=1)
    with pytest.raises(ValueError, match="no field"):
        build_pasid_entry(sid=1)
    with pytest.raises(ValueError, match="did"):
        build_context_entry(did=1 << 16)
    with pytest.raises(ValueError, match="did"):
        build_pasid_entry(did=1 << 16)


# ---------------------------------------------------------------------------------------------
# Worked encodings (vtd.md §5.5 and the bundled real trace)


def desc(qw0: int, qw1: int) -> bytes:
    return qw0.to_bytes(8, "little") + qw1.to_bytes(8, "little")


@pytest.mark.parametrize(
    ("qw0", "qw1", "expected"),
    [
        (
            0x0000000000020036,
            0x00000000FFFFF040,
            {"type": 6, "g": 3, "did": 2, "pasid": 0, "am": 0, "ih": 1, "addr": 0xFFFFF},
        ),
        (
            0x0000001000000003,
            0x00000000FFFFF000,
            {"type": 3, "sid": 0x10, "mip": 0, "s": 0, "addr": 0xFFFFF, "pfsid_lo": 0},
        ),
        (
            0x0000000200000025,
            0x1046004,
            {"type": 5, "sw": 1, "if_": 0, "fn": 0, "pd": 0, "status_data": 2},
        ),
        (0x00000000000200F2, 0, {"type": 2, "g": 3, "dw": 1, "dr": 1, "did": 2}),
        (0x0000030000000031, 0, {"type": 1, "g": 3, "sid": 0x300, "fm": 0}),
        (0x0000000100000014, 0, {"type": 4, "g": 1, "iidx": 1, "im": 0}),
        (0x20026, 0, {"type": 6, "g": 2, "did": 2}),
        (0x1000000003, 0x7FFFFFFFFFFFF001, {"type": 3, "s": 1, "addr": 0x7FFFFFFFFFFFF}),
    ],
)
def test_worked_encodings(qw0: int, qw1: int, expected: dict[str, int]) -> None:
    fields = decode_fields(qw0, qw1)
    assert fields == parse_descriptor(desc(qw0, qw1))
    assert {k: fields[k] for k in expected} == expected
    if fields["type"] == 5:
        assert fields["status_addr"] << 2 == qw1


def test_real_trace_context_entry() -> None:
    ctx = decode_context_entry(bytes.fromhex("05001020000000000208000000000000"))
    assert ctx == LegacyContext(True, 1, 0x20100000, 2, 8, False)
