"""Fast VT-d descriptor, context-entry and PASID-entry decoding: ``struct`` plus masks.

This is what the daemon runs on every guest descriptor. The readable specification is the
construct declaration in ``protocols.vtd``; the field tables below are written independently
from it (from vtd.md §1 and the VT-d context / PASID entry layouts), and a parity test proves
both decode every descriptor (both widths) and every entry identically.

A descriptor is two or four little-endian 64-bit words ``qw0``..``qw3``; only ``qw0`` and
``qw1`` hold fields (in a 256-bit queue ``qw2``/``qw3`` are reserved). A field is
``(word, lo, width)`` within one word; values are raw (``addr`` is qw1[63:12], so the byte
address is ``addr << 12``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from operator import attrgetter

from protocols.vtd import IOMMU_VTD_S1_EAFE, IOMMU_VTD_S1_SRE, IOMMU_VTD_S1_WPE

__all__ = [
    "DEFINED",
    "FIELDS",
    "KIND_NAMES",
    "QW2",
    "QW4",
    "Field",
    "LegacyContext",
    "PasidEntry",
    "ScalableContext",
    "VtdContext",
    "context_entry_fields",
    "decode_context_entry",
    "decode_fields",
    "decode_pasid_entry",
    "descriptor_type",
    "kind_name",
    "pasid_entry_fields",
]

QW2 = struct.Struct("<QQ")  # a 128-bit descriptor (or a legacy context entry)
QW4 = struct.Struct("<QQQQ")  # a 256-bit descriptor (or a scalable-mode context entry)
_QW8 = struct.Struct("<8Q")  # a PASID-table entry


@dataclass(frozen=True, slots=True)
class Field:
    """A bit field: ``width`` bits from bit ``lo`` of word ``word`` (0 = qw0, 1 = qw1, ...)."""

    name: str
    word: int
    lo: int
    width: int

    @property
    def mask(self) -> int:
        """The bits of this field, in place within its word."""
        return ((1 << self.width) - 1) << self.lo


# ---------------------------------------------------------------------------------------------
# Types (vtd.md §1.2): the by_kind names of the replay report (docs/trace-format.md §3.2)

KIND_NAMES: dict[int, str] = {
    0x1: "cc_inv",
    0x2: "iotlb_inv",
    0x3: "dev_tlb_inv",
    0x4: "iec_inv",
    0x5: "inv_wait",
    0x6: "p_iotlb_inv",
    0x7: "pc_inv",
    0x8: "p_dev_tlb_inv",
    0x9: "pgrp_resp",
}


def descriptor_type(qw0: int) -> int:
    """The 7-bit type: qw0[3:0] | qw0[11:9] << 4."""
    return (qw0 & 0xF) | ((qw0 >> 5) & 0x70)


def kind_name(kind: int) -> str:
    """``cc_inv`` ... ``pgrp_resp`` for a defined type, ``type_0x0c`` otherwise."""
    name = KIND_NAMES.get(kind)
    return name if name is not None else f"type_0x{kind:02x}"


# ---------------------------------------------------------------------------------------------
# Field tables (vtd.md §1.3-§1.11)

_Q0, _Q1 = 0, 1

_TYPE_LO = Field("type_lo", _Q0, 0, 4)
_TYPE_HI = Field("type_hi", _Q0, 9, 3)
_G54 = Field("g", _Q0, 4, 2)
_DID = Field("did", _Q0, 16, 16)
_PASID = Field("pasid", _Q0, 32, 20)
_AM = Field("am", _Q1, 0, 6)
_IH = Field("ih", _Q1, 6, 1)
_ADDR = Field("addr", _Q1, 12, 52)

_TABLE: dict[int, tuple[Field, ...]] = {
    0x1: (_G54, _DID, Field("sid", _Q0, 32, 16), Field("fm", _Q0, 48, 2)),
    0x2: (_G54, Field("dw", _Q0, 6, 1), Field("dr", _Q0, 7, 1), _DID, _AM, _IH, _ADDR),
    0x3: (
        Field("pfsid_lo", _Q0, 12, 4),
        Field("mip", _Q0, 16, 5),
        Field("sid", _Q0, 32, 16),
        Field("pfsid_hi", _Q0, 52, 12),
        Field("s", _Q1, 0, 1),
        _ADDR,
    ),
    0x4: (Field("g", _Q0, 4, 1), Field("im", _Q0, 27, 5), Field("iidx", _Q0, 32, 16)),
    0x5: (
        Field("if_", _Q0, 4, 1),
        Field("sw", _Q0, 5, 1),
        Field("fn", _Q0, 6, 1),
        Field("pd", _Q0, 7, 1),
        Field("status_data", _Q0, 32, 32),
        Field("status_addr", _Q1, 2, 62),
    ),
    0x6: (_G54, _DID, _PASID, _AM, _IH, _ADDR),
    0x7: (_G54, _DID, _PASID),
    0x8: (
        Field("mip", _Q0, 4, 5),
        Field("pfsid_lo", _Q0, 12, 4),
        Field("sid", _Q0, 16, 16),
        _PASID,
        Field("pfsid_hi", _Q0, 52, 12),
        Field("g", _Q1, 0, 1),
        Field("s", _Q1, 11, 1),
        _ADDR,
    ),
    0x9: (
        Field("pp", _Q0, 4, 1),
        Field("rc", _Q0, 12, 4),
        Field("rid", _Q0, 16, 16),
        _PASID,
        Field("lpig", _Q1, 2, 1),
        Field("prgi", _Q1, 3, 9),
    ),
}

#: Every field of every defined type (the type halves first), by word and position.
FIELDS: dict[int, tuple[Field, ...]] = {
    kind: tuple(sorted((_TYPE_LO, _TYPE_HI, *fields), key=attrgetter("word", "lo")))
    for kind, fields in _TABLE.items()
}


def _defined(fields: tuple[Field, ...]) -> tuple[int, int]:
    masks = [0, 0]
    for f in fields:
        if masks[f.word] & f.mask:
            raise AssertionError(f"field {f.name} overlaps another field")
        masks[f.word] |= f.mask
    return masks[0], masks[1]


#: Per defined type, the bits of qw0 and of qw1 that belong to a field (type bits included).
DEFINED: dict[int, tuple[int, int]] = {kind: _defined(fields) for kind, fields in FIELDS.items()}

# decode_fields' plan: (name, word, shift, mask) per field, the type halves left out.
_PLAN: dict[int, tuple[tuple[str, int, int, int], ...]] = {
    kind: tuple(
        (f.name, f.word, f.lo, (1 << f.width) - 1)
        for f in fields
        if f.name not in ("type_lo", "type_hi")
    )
    for kind, fields in FIELDS.items()
}


def decode_fields(qw0: int, qw1: int) -> dict[str, int]:
    """All fields of the descriptor ``(qw0, qw1, ...)``: the same dict
    ``protocols.vtd.parse_descriptor`` returns. Unknown types give ``{"type": t}``."""
    kind = descriptor_type(qw0)
    plan = _PLAN.get(kind)
    if plan is None:
        return {"type": kind}
    words = (qw0, qw1)
    out = {"type": kind}
    for name, word, lo, mask in plan:
        out[name] = (words[word] >> lo) & mask
    return out


# ---------------------------------------------------------------------------------------------
# Context entries (VT-d §9.3 legacy, §9.4 scalable mode) and PASID-table entries (§9.6)

_LEGACY_TABLE = (
    Field("p", 0, 0, 1),
    Field("fpd", 0, 1, 1),
    Field("tt", 0, 2, 2),
    Field("slptptr", 0, 12, 52),
    Field("aw", 1, 0, 3),
    Field("avail", 1, 3, 4),
    Field("did", 1, 8, 16),
)
_SCALABLE_TABLE = (
    Field("p", 0, 0, 1),
    Field("fpd", 0, 1, 1),
    Field("dte", 0, 2, 1),
    Field("paside", 0, 3, 1),
    Field("pre", 0, 4, 1),
    Field("pdts", 0, 9, 3),
    Field("pasiddirptr", 0, 12, 52),
    Field("rid_pasid", 1, 0, 20),
    Field("rid_priv", 1, 20, 1),
)
_PASID_TABLE = (
    Field("p", 0, 0, 1),
    Field("fpd", 0, 1, 1),
    Field("aw", 0, 2, 3),
    Field("slee", 0, 5, 1),
    Field("pgtt", 0, 6, 3),
    Field("slade", 0, 9, 1),
    Field("slptptr", 0, 12, 52),
    Field("did", 1, 0, 16),
    Field("pwsnp", 1, 23, 1),
    Field("pgsnp", 1, 24, 1),
    Field("cd", 1, 25, 1),
    Field("emte", 1, 26, 1),
    Field("emt", 1, 27, 3),
    Field("pwt", 1, 30, 1),
    Field("pcd", 1, 31, 1),
    Field("pat", 1, 32, 32),
    Field("sre", 2, 0, 1),
    Field("ere", 2, 1, 1),
    Field("flpm", 2, 2, 2),
    Field("wpe", 2, 4, 1),
    Field("nxe", 2, 5, 1),
    Field("smep", 2, 6, 1),
    Field("eafe", 2, 7, 1),
    Field("flptptr", 2, 12, 52),
    Field("qw3", 3, 0, 64),
    Field("qw4", 4, 0, 64),
    Field("qw5", 5, 0, 64),
    Field("qw6", 6, 0, 64),
    Field("qw7", 7, 0, 64),
)


def _extract(table: tuple[Field, ...], words: tuple[int, ...]) -> dict[str, int]:
    return {f.name: (words[f.word] >> f.lo) & ((1 << f.width) - 1) for f in table}


def _size(raw: bytes | bytearray | memoryview) -> int:
    return raw.nbytes if isinstance(raw, memoryview) else len(raw)


def context_entry_fields(raw: bytes | bytearray | memoryview) -> dict[str, int]:
    """Every field of a context entry (16 bytes legacy, 32 bytes scalable mode): the same
    dict ``protocols.vtd.parse_context_entry`` returns."""
    size = _size(raw)
    if size == QW2.size:
        return _extract(_LEGACY_TABLE, QW2.unpack(raw))
    if size == QW4.size:
        return _extract(_SCALABLE_TABLE, QW4.unpack(raw))
    raise ValueError(f"a VT-d context entry is 16 or 32 bytes, got {size}")


def pasid_entry_fields(raw: bytes | bytearray | memoryview) -> dict[str, int]:
    """Every field of a 64-byte PASID entry: the same dict ``protocols.vtd.parse_pasid_entry``
    returns."""
    size = _size(raw)
    if size != _QW8.size:
        raise ValueError(f"a VT-d PASID entry is {_QW8.size} bytes, got {size}")
    return _extract(_PASID_TABLE, _QW8.unpack(raw))


@dataclass(frozen=True, slots=True)
class LegacyContext:
    """The parts of a legacy-mode context entry the daemon acts on."""

    present: bool
    tt: int  # 0 untranslated requests only, 1 all requests (device TLB), 2 pass-through
    slptptr: int  # byte address of the second-level page table
    aw: int
    did: int
    reserved: bool  # a reserved bit is set (qw0[11:4], qw1[7], qw1[63:24])


@dataclass(frozen=True, slots=True)
class ScalableContext:
    """The parts of a scalable-mode context entry the daemon acts on."""

    present: bool
    dte: bool
    pasiddirptr: int  # byte address of the PASID directory
    rid_pasid: int
    reserved: bool  # qw0[8:5], qw1[63:21], qw2, qw3


@dataclass(frozen=True, slots=True)
class PasidEntry:
    """The parts of a PASID-table entry the daemon acts on (``key`` identifies the entry)."""

    present: bool
    pgtt: int
    did: int
    sre: bool
    wpe: bool
    eafe: bool
    flpm: int
    flptptr: int  # byte address of the first-stage page table
    key: tuple[int, int, int]  # qw0, qw1, qw2: what a PASID-cache re-read compares

    @property
    def s1_flags(self) -> int:
        """``iommu_hwpt_vtd_s1.flags`` for this entry's SRE, EAFE, WPE (iommufd.md §1.5)."""
        return (
            (IOMMU_VTD_S1_SRE if self.sre else 0)
            | (IOMMU_VTD_S1_EAFE if self.eafe else 0)
            | (IOMMU_VTD_S1_WPE if self.wpe else 0)
        )


VtdContext = LegacyContext | ScalableContext
"""A decoded context entry: its size says its mode."""


_LEGACY_RSVD = (0xFF0, 0xFFFF_FFFF_FF00_0080)
_SCALABLE_RSVD = (0x1E0, 0xFFFF_FFFF_FFE0_0000)


def decode_context_entry(raw: bytes | bytearray | memoryview) -> VtdContext:
    """Decode a context entry; its size says its mode (16 legacy, 32 scalable)."""
    size = _size(raw)
    if size == QW2.size:
        q0, q1 = QW2.unpack(raw)
        return LegacyContext(
            present=bool(q0 & 1),
            tt=(q0 >> 2) & 3,
            slptptr=q0 & ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF,
            aw=q1 & 7,
            did=(q1 >> 8) & 0xFFFF,
            reserved=bool(q0 & _LEGACY_RSVD[0] or q1 & _LEGACY_RSVD[1]),
        )
    if size == QW4.size:
        q0, q1, q2, q3 = QW4.unpack(raw)
        return ScalableContext(
            present=bool(q0 & 1),
            dte=bool(q0 & 4),
            pasiddirptr=q0 & ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF,
            rid_pasid=q1 & 0xFFFFF,
            reserved=bool(q0 & _SCALABLE_RSVD[0] or q1 & _SCALABLE_RSVD[1] or q2 or q3),
        )
    raise ValueError(f"a VT-d context entry is 16 or 32 bytes, got {size}")


def decode_pasid_entry(raw: bytes | bytearray | memoryview) -> PasidEntry:
    """Decode the fields of a 64-byte PASID entry the daemon needs."""
    size = _size(raw)
    if size != _QW8.size:
        raise ValueError(f"a VT-d PASID entry is {_QW8.size} bytes, got {size}")
    q0, q1, q2, *_ = _QW8.unpack(raw)
    return PasidEntry(
        present=bool(q0 & 1),
        pgtt=(q0 >> 6) & 7,
        did=q1 & 0xFFFF,
        sre=bool(q2 & 1),
        wpe=bool(q2 & 0x10),
        eafe=bool(q2 & 0x80),
        flpm=(q2 >> 2) & 3,
        flptptr=q2 & ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF,
        key=(q0, q1, q2),
    )
