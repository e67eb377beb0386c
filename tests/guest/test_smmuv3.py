"""Parity of the fast SMMUv3 decoder (``struct`` + masks) with the construct declarations.

``protocols.smmuv3`` is the readable specification; ``viommud.guest.smmuv3`` is
what the daemon runs. Their field tables are written independently, so these tests check
that both decode every command and STE identically, that building from decoded fields gives
back the input minus its reserved bits, and that the worked encodings of smmuv3.md §1.5
decode to the documented values.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.smmuv3 import (
    COMMANDS,
    Opcode,
    build_command,
    build_ste,
    parse_command,
    parse_ste,
)
from viommud.guest.smmuv3 import (
    COMMAND,
    DEFINED,
    FIELDS,
    OPCODE_NAMES,
    Field,
    Ste,
    decode_fields,
    decode_ste,
    kind_name,
    split_words,
    ste_fields,
)

# Random commands are drawn as 16 raw bytes (cheaper to generate than two 64-bit integers).
COMMAND_BYTES = st.binary(min_size=16, max_size=16)
KNOWN = sorted(int(op) for op in Opcode)
UNKNOWN = sorted(set(range(256)) - set(KNOWN))
PARITY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _pack(w0: int, w1: int) -> bytes:
    return COMMAND.pack(w0, w1)


# ---------------------------------------------------------------------------------------------
# Tables


def test_every_opcode_is_declared_on_both_sides() -> None:
    assert set(COMMANDS) == set(Opcode)
    assert set(FIELDS) == set(KNOWN)
    assert set(DEFINED) == set(KNOWN)
    assert set(OPCODE_NAMES) == set(KNOWN)


@pytest.mark.parametrize("op", list(Opcode), ids=[op.name for op in Opcode])
def test_opcode_names(op: Opcode) -> None:
    expected = op.name if op.name.startswith("CMD_") else f"CMD_{op.name}"
    assert OPCODE_NAMES[op] == expected
    assert kind_name(op) == expected


@pytest.mark.parametrize(
    ("opcode", "name"),
    [(0x12, "CMD_TLBI_NH_VA"), (0x46, "CMD_SYNC"), (0x5F, "CMD_0x5f"), (0x00, "CMD_0x00")],
)
def test_kind_name(opcode: int, name: str) -> None:
    assert kind_name(opcode) == name


@pytest.mark.parametrize("opcode", KNOWN, ids=hex)
def test_fields_table_is_consistent(opcode: int) -> None:
    fields = FIELDS[opcode]
    assert fields[0] == Field("opcode", 0, 0, 8)
    names = [f.name for f in fields]
    assert len(names) == len(set(names))
    masks = [0, 0]
    for f in fields:
        assert f.word in (0, 1)
        assert f.width > 0
        assert f.lo + f.width <= 64
        mask = ((1 << f.width) - 1) << f.lo
        assert masks[f.word] & mask == 0, f"{f.name} overlaps another field"
        masks[f.word] |= mask
    assert DEFINED[opcode] == (masks[0], masks[1])


@pytest.mark.parametrize("opcode", KNOWN, ids=hex)
def test_construct_defines_the_same_bits(opcode: int) -> None:
    """Building every field at its maximum from the construct side sets exactly DEFINED."""
    all_ones = (1 << 64) - 1
    fields = parse_command(_pack(all_ones & ~0xFF | opcode, all_ones))
    w0, w1 = COMMAND.unpack(build_command(**fields))
    m0, m1 = DEFINED[opcode]
    assert m0 & 0xFF == 0xFF
    assert (w0, w1) == (m0 & ~0xFF | opcode, m1)


@pytest.mark.parametrize("opcode", KNOWN, ids=hex)
def test_each_field_lands_where_decode_expects(opcode: int) -> None:
    """One field at a time, at its maximum value: construct places it on decode's bits."""
    for f in FIELDS[opcode][1:]:
        top = (1 << f.width) - 1
        w0, w1 = COMMAND.unpack(build_command(opcode, **{f.name: top}))
        expected = [opcode, 0]
        expected[f.word] |= top << f.lo
        assert (w0, w1) == tuple(expected), f.name
        decoded = decode_fields(w0, w1)
        assert decoded == {g.name: (top if g is f else 0) for g in FIELDS[opcode]} | {
            "opcode": opcode
        }


# ---------------------------------------------------------------------------------------------
# Randomised parity


@pytest.mark.parametrize("opcode", KNOWN, ids=hex)
@PARITY
@given(data=COMMAND_BYTES)
def test_command_parity(opcode: int, data: bytes) -> None:
    raw = bytes([opcode]) + data[1:]
    w0, w1 = COMMAND.unpack(raw)
    fast = decode_fields(w0, w1)
    spec = parse_command(raw)
    assert fast == spec
    assert set(fast) == {f.name for f in FIELDS[opcode]}
    # Rebuilding from the decoded fields reproduces the command without its reserved bits.
    m0, m1 = DEFINED[opcode]
    assert build_command(**spec) == _pack(w0 & m0, w1 & m1)
    # Reserved bits never influence a decoded field.
    assert decode_fields(w0 & m0, w1 & m1) == fast


@PARITY
@given(opcode=st.sampled_from(UNKNOWN), data=COMMAND_BYTES)
def test_unknown_opcode(opcode: int, data: bytes) -> None:
    w0, w1 = COMMAND.unpack(bytes([opcode]) + data[1:])
    assert decode_fields(w0, w1) == {"opcode": opcode}
    assert parse_command(_pack(w0, w1)) == {"opcode": opcode}
    assert build_command(opcode) == _pack(opcode, 0)
    assert kind_name(opcode) == f"CMD_0x{opcode:02x}"


@settings(max_examples=200, deadline=None, database=None)
@given(raw=st.binary(min_size=64, max_size=64))
def test_ste_parity(raw: bytes) -> None:
    fast = ste_fields(raw)
    spec = parse_ste(raw)
    assert fast == spec

    ste = decode_ste(raw)
    d0 = int.from_bytes(raw[0:8], "little")
    d1 = int.from_bytes(raw[8:16], "little")
    assert (ste.d0, ste.d1) == (d0, d1)
    assert ste.v is bool(spec["v"])
    for name in Ste.__slots__:
        if name not in {"d0", "d1", "v"}:
            assert getattr(ste, name) == spec[name], name

    # Rebuilding keeps exactly the defined bits: re-decoding gives the same fields.
    rebuilt = build_ste(**spec)
    assert ste_fields(rebuilt) == fast
    assert rebuilt == build_ste(**parse_ste(rebuilt))


def test_ste_each_field_lands_where_decode_expects() -> None:
    widths = ste_fields(b"\xff" * 64)  # every field at its maximum value
    assert widths == parse_ste(b"\xff" * 64)
    for name, top in widths.items():
        assert top & (top + 1) == 0, f"{name}: maximum {top:#x} is not all ones"
        assert ste_fields(build_ste(**{name: top})) == {
            n: (top if n == name else 0) for n in widths
        }
        assert ste_fields(build_ste(**{name: 1})) == {n: (1 if n == name else 0) for n in widths}


def test_ste_reserved_bits_are_ignored() -> None:
    reserved = build_ste()  # all fields zero
    assert reserved == bytes(64)
    ones = b"\xff" * 64
    defined = build_ste(**parse_ste(ones))
    inverse = bytes(b ^ 0xFF for b in defined)  # only reserved bits set
    assert ste_fields(inverse) == ste_fields(bytes(64))
    assert parse_ste(inverse) == parse_ste(bytes(64))


# ---------------------------------------------------------------------------------------------
# Worked encodings (smmuv3.md §1.5)

GOLDEN: list[tuple[str, int, int, dict[str, int]]] = [
    (
        "CMD_SYNC no MSI",
        0x0FC02046,
        0,
        {"opcode": 0x46, "cs": 2, "msh": 3, "msi_attr": 0xF, "msi_data": 0, "msi_address": 0},
    ),
    (
        "CMD_SYNC MSI polling",
        0x0FC01046,
        0x8_1234_5670,
        {
            "opcode": 0x46,
            "cs": 1,
            "msh": 3,
            "msi_attr": 0xF,
            "msi_data": 0,
            "msi_address": 0x8_1234_5670 >> 2,
        },
    ),
    ("CFGI_ALL", 0x04, 0x1F, {"opcode": 0x04, "ssec": 0, "sid": 0, "range": 31}),
    (
        "CFGI_STE",
        0x0000010800000003,
        1,
        {"opcode": 0x03, "ssec": 0, "sid": 0x0108, "leaf": 1},
    ),
    (
        "CFGI_CD",
        0x0000010800000005,
        1,
        {"opcode": 0x05, "ssec": 0, "ssid": 0, "sid": 0x0108, "leaf": 1},
    ),
    ("TLBI_NSNH_ALL", 0x30, 0, {"opcode": 0x30}),
    ("TLBI_NH_ASID", 0x0001000000000011, 0, {"opcode": 0x11, "vmid": 0, "asid": 1}),
    (
        "TLBI_NH_VA 4K page",
        0x0001000000000012,
        0xFFFF0701,
        {
            "opcode": 0x12,
            "num": 0,
            "scale": 0,
            "vmid": 0,
            "asid": 1,
            "leaf": 1,
            "ttl": 3,
            "tg": 1,
            "addr": 0xFFFF0,
        },
    ),
    (
        "TLBI_NH_VA 2M block",
        0x0001000000900012,
        0x40000601,
        {
            "opcode": 0x12,
            "num": 0,
            "scale": 9,
            "vmid": 0,
            "asid": 1,
            "leaf": 1,
            "ttl": 2,
            "tg": 1,
            "addr": 0x40000,
        },
    ),
    (
        "ATC_INV all",
        0x0000010800000040,
        0x34,
        {
            "opcode": 0x40,
            "global_": 0,
            "ssv": 0,
            "ssid": 0,
            "sid": 0x0108,
            "size": 52,
            "addr": 0,
        },
    ),
    (
        "PREFETCH_CONFIG",
        0x0000010800000001,
        0,
        {"opcode": 0x01, "ssec": 0, "ssv": 0, "ssid": 0, "sid": 0x0108},
    ),
]


@pytest.mark.parametrize(
    ("w0", "w1", "expected"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_golden(w0: int, w1: int, expected: dict[str, int]) -> None:
    assert decode_fields(w0, w1) == expected
    assert parse_command(_pack(w0, w1)) == expected
    assert build_command(**expected) == _pack(w0, w1)


def test_golden_byte_addresses() -> None:
    fields = decode_fields(0x0001000000000012, 0xFFFF0701)
    assert fields["addr"] << 12 == 0xFFFF0000
    sync = decode_fields(0x0FC01046, 0x8_1234_5670)
    assert sync["msi_address"] << 2 == 0x8_1234_5670


def test_split_words() -> None:
    commands = [(0x0FC02046, 0), (0x0001000000000012, 0xFFFF0701)]
    buf = b"".join(_pack(*c) for c in commands)
    assert split_words(buf) == commands
    assert split_words(memoryview(buf)) == commands
    assert split_words(b"") == []
    assert [decode_fields(*c)["opcode"] for c in split_words(buf)] == [0x46, 0x12]


def test_golden_ste() -> None:
    # Typical Linux-guest vSTE (smmuv3.md §3.2): S1 translate, linear CD table, ATS on.
    cd_table = 0x8_1234_5000
    raw = build_ste(
        v=1, config=5, s1_context_ptr=cd_table >> 6, s1dss=2, s1cir=1, s1cor=1, s1csh=3, eats=1
    )
    d0, d1 = COMMAND.unpack(raw[:16])
    assert d0 == cd_table | (5 << 1) | 1
    assert d1 == 0x100000D6
    ste = decode_ste(raw)
    assert ste == Ste(
        d0=d0,
        d1=d1,
        v=True,
        config=5,
        s1fmt=0,
        s1_context_ptr=cd_table >> 6,
        s1cdmax=0,
        s1dss=2,
        s1cir=1,
        s1cor=1,
        s1csh=3,
        s1stalld=0,
        eats=1,
    )


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("size", [0, 1, 15, 17, 32])
def test_command_length_errors(size: int) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        parse_command(bytes(size))


@pytest.mark.parametrize("size", [1, 15, 17, 31, 33])
def test_split_words_length_errors(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        split_words(bytes(size))


@pytest.mark.parametrize("size", [0, 8, 63, 65, 128])
def test_ste_length_errors(size: int) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        parse_ste(bytes(size))
    with pytest.raises(ValueError, match="64 bytes"):
        decode_ste(bytes(size))
    with pytest.raises(ValueError, match="64 bytes"):
        ste_fields(bytes(size))


def test_build_errors() -> None:
    with pytest.raises(ValueError, match="no field"):
        build_command(Opcode.TLBI_NH_ASID, sid=1)
    with pytest.raises(ValueError, match="no field"):
        build_command(0x5F, sid=1)
    with pytest.raises(ValueError, match="out of range"):
        build_command(Opcode.TLBI_NH_ASID, asid=1 << 16)
    with pytest.raises(ValueError, match="out of range"):
        build_command(Opcode.CFGI_STE, sid=-1)
    with pytest.raises(ValueError, match="8 bits"):
        build_command(0x100)
    with pytest.raises(ValueError, match="no field"):
        build_ste(s1contextptr=1)
    with pytest.raises(ValueError, match="out of range"):
        build_ste(config=8)
