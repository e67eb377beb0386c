"""Fast SMMUv3 command and STE decoding: ``struct`` plus shifts and masks.

This is what the daemon runs on every guest command. The readable specification is the
construct declaration in ``protocols.smmuv3``; the field tables below are written
independently from it (from smmuv3.md §1 and §3.1), and a parity test proves that both
decode every command and STE identically.

A command is two little-endian 64-bit words, W0 (bytes 0-7) and W1 (bytes 8-15). A field is
``(word, lo, width)`` within one word. Field values are raw (not shifted into place): e.g.
``addr`` is W1[63:12], so the byte address is ``addr << 12``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from operator import attrgetter

from protocols.smmuv3 import Opcode

__all__ = [
    "COMMAND",
    "DEFINED",
    "FIELDS",
    "OPCODE_NAMES",
    "Field",
    "Ste",
    "decode_fields",
    "decode_ste",
    "kind_name",
    "split_words",
    "ste_fields",
]

COMMAND = struct.Struct("<QQ")
_STE_WORDS = struct.Struct("<8Q")


@dataclass(frozen=True, slots=True)
class Field:
    """A bit field of a command: ``width`` bits from bit ``lo`` of word ``word`` (0=W0, 1=W1)."""

    name: str
    word: int
    lo: int
    width: int

    def get(self, w0: int, w1: int) -> int:
        """The raw value of this field in the command ``(w0, w1)``."""
        return ((w1 if self.word else w0) >> self.lo) & ((1 << self.width) - 1)

    @property
    def mask(self) -> int:
        """The bits of this field, in place within its word."""
        return ((1 << self.width) - 1) << self.lo


# ---------------------------------------------------------------------------------------------
# Opcodes (smmuv3.md §1.1)

# The report's names ("CMD_" + the spec's mnemonic, SMMUv3 §4.1), from protocols.smmuv3.
OPCODE_NAMES: dict[int, str] = {
    int(op): op.name if op.name.startswith("CMD_") else f"CMD_{op.name}" for op in Opcode
}


def kind_name(opcode: int) -> str:
    """``CMD_<NAME>`` for a known opcode, ``CMD_0x5f`` (two lower-case hex digits) otherwise."""
    name = OPCODE_NAMES.get(opcode)
    return name if name is not None else f"CMD_0x{opcode:02x}"


# ---------------------------------------------------------------------------------------------
# Field tables (smmuv3.md §1.2, §1.3, §1.4)

_W0, _W1 = 0, 1

_OPCODE = Field("opcode", _W0, 0, 8)
_SSEC = Field("ssec", _W0, 10, 1)
_SSV = Field("ssv", _W0, 11, 1)
_SSID = Field("ssid", _W0, 12, 20)
_SID = Field("sid", _W0, 32, 32)
_VMID = Field("vmid", _W0, 32, 16)
_ASID = Field("asid", _W0, 48, 16)
_NUM = Field("num", _W0, 12, 5)
_SCALE = Field("scale", _W0, 20, 5)
_GLOBAL = Field("global_", _W0, 9, 1)
_AC = Field("ac", _W0, 12, 1)
_AB = Field("ab", _W0, 13, 1)
_CS = Field("cs", _W0, 12, 2)
_MSH = Field("msh", _W0, 22, 2)
_MSI_ATTR = Field("msi_attr", _W0, 24, 4)
_MSI_DATA = Field("msi_data", _W0, 32, 32)

_LEAF = Field("leaf", _W1, 0, 1)
_RANGE = Field("range", _W1, 0, 5)
_TTL = Field("ttl", _W1, 8, 2)
_TG = Field("tg", _W1, 10, 2)
_ADDR = Field("addr", _W1, 12, 52)  # Address[63:12]
_IPA = Field("addr", _W1, 12, 40)  # IPA[51:12]
_PREFETCH_SIZE = Field("size", _W1, 0, 5)
_STRIDE = Field("stride", _W1, 8, 4)  # W1[11:8]: W1[12] belongs to Address
_ATC_SIZE = Field("size", _W1, 0, 6)
_PRG_INDEX = Field("prg_index", _W1, 0, 9)
_RESP = Field("resp", _W1, 12, 2)
_STAG = Field("stag", _W1, 0, 16)
_MSI_ADDRESS = Field("msi_address", _W1, 2, 50)

_PREFETCH_W0 = (_SSEC, _SSV, _SSID, _SID)
_TLBI_VA_W1 = (_LEAF, _TTL, _TG, _ADDR)
_TLBI_IPA_W1 = (_LEAF, _TTL, _TG, _IPA)

_TABLE: dict[int, tuple[Field, ...]] = {
    0x01: _PREFETCH_W0,  # PREFETCH_CONFIG
    0x02: (*_PREFETCH_W0, _PREFETCH_SIZE, _STRIDE, _ADDR),  # PREFETCH_ADDR
    0x03: (_SSEC, _SID, _LEAF),  # CFGI_STE
    0x04: (_SSEC, _SID, _RANGE),  # CFGI_STE_RANGE
    0x05: (_SSEC, _SSID, _SID, _LEAF),  # CFGI_CD
    0x06: (_SSEC, _SID),  # CFGI_CD_ALL
    0x07: (_SSEC, _VMID),  # CFGI_VMS_PIDM
    0x10: (_VMID,),  # TLBI_NH_ALL
    0x11: (_VMID, _ASID),  # TLBI_NH_ASID
    0x12: (_NUM, _SCALE, _VMID, _ASID, *_TLBI_VA_W1),  # TLBI_NH_VA
    0x13: (_NUM, _SCALE, _VMID, *_TLBI_VA_W1),  # TLBI_NH_VAA
    0x18: (),  # TLBI_EL3_ALL
    0x1A: (_NUM, _SCALE, *_TLBI_VA_W1),  # TLBI_EL3_VA (W0 as EL2_VAA, unverified)
    0x20: (),  # TLBI_EL2_ALL
    0x21: (_ASID,),  # TLBI_EL2_ASID
    0x22: (_NUM, _SCALE, _ASID, *_TLBI_VA_W1),  # TLBI_EL2_VA
    0x23: (_NUM, _SCALE, *_TLBI_VA_W1),  # TLBI_EL2_VAA
    0x28: (_VMID,),  # TLBI_S12_VMALL
    0x2A: (_NUM, _SCALE, _VMID, *_TLBI_IPA_W1),  # TLBI_S2_IPA
    0x30: (),  # TLBI_NSNH_ALL
    0x40: (_GLOBAL, _SSV, _SSID, _SID, _ATC_SIZE, _ADDR),  # ATC_INV (no SSec: W0[10] RES0)
    0x41: (_SSV, _SSID, _SID, _PRG_INDEX, _RESP),  # PRI_RESP
    0x44: (_SSEC, _AC, _AB, _SID, _STAG),  # RESUME
    0x45: (_SSEC, _SID),  # STALL_TERM
    0x46: (_CS, _MSH, _MSI_ATTR, _MSI_DATA, _MSI_ADDRESS),  # CMD_SYNC
    # Secure and DPT commands: vendor-header layouts (unverified), shaped like the NS ones.
    0x50: (),  # TLBI_S_EL2_ALL
    0x51: (_ASID,),  # TLBI_S_EL2_ASID
    0x52: (_NUM, _SCALE, _ASID, *_TLBI_VA_W1),  # TLBI_S_EL2_VA
    0x53: (_NUM, _SCALE, *_TLBI_VA_W1),  # TLBI_S_EL2_VAA
    0x58: (_VMID,),  # TLBI_S_S12_VMALL
    0x5A: (_NUM, _SCALE, _VMID, *_TLBI_IPA_W1),  # TLBI_S_S2_IPA
    0x60: (),  # TLBI_SNH_ALL
    0x70: (),  # DPTI_ALL
    0x73: (_ADDR,),  # DPTI_PA
}

#: Every field of every known opcode, ``opcode`` first, then W0 and W1 fields by position.
FIELDS: dict[int, tuple[Field, ...]] = {
    op: (_OPCODE, *sorted(fields, key=attrgetter("word", "lo"))) for op, fields in _TABLE.items()
}


def _defined(fields: tuple[Field, ...]) -> tuple[int, int]:
    masks = [0, 0]
    for f in fields:
        if masks[f.word] & f.mask:
            raise AssertionError(f"field {f.name} overlaps another field")
        masks[f.word] |= f.mask
    return masks[0], masks[1]


#: Per known opcode, the bits of W0 and of W1 that belong to a field; the rest are reserved.
DEFINED: dict[int, tuple[int, int]] = {op: _defined(fields) for op, fields in FIELDS.items()}

# decode_fields' plan: (name, word, shift, mask) per field, precomputed.
_PLAN: dict[int, tuple[tuple[str, int, int, int], ...]] = {
    op: tuple((f.name, f.word, f.lo, (1 << f.width) - 1) for f in fields)
    for op, fields in FIELDS.items()
}


def decode_fields(w0: int, w1: int) -> dict[str, int]:
    """All fields of the command ``(w0, w1)``: the same dict ``protocols.smmuv3.parse_command``
    returns. Unknown opcodes give ``{"opcode": n}``; reserved bits are ignored."""
    opcode = w0 & 0xFF
    plan = _PLAN.get(opcode)
    if plan is None:
        return {"opcode": opcode}
    words = (w0, w1)
    return {name: (words[word] >> lo) & mask for name, word, lo, mask in plan}


def split_words(data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """Split a buffer of whole commands into ``(w0, w1)`` pairs."""
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size % COMMAND.size:
        raise ValueError(
            f"command buffer of {size} bytes is not a multiple of {COMMAND.size} bytes"
        )
    return list(COMMAND.iter_unpack(data))


# ---------------------------------------------------------------------------------------------
# Stream Table Entry (smmuv3.md §3.1; SMMUv3 §5.2). (name, word D0..D7, lo, width)

_STE_TABLE: tuple[tuple[str, int, int, int], ...] = (
    ("v", 0, 0, 1),
    ("config", 0, 1, 3),
    ("s1fmt", 0, 4, 2),
    ("s1_context_ptr", 0, 6, 46),  # D0[51:6]
    ("s1cdmax", 0, 59, 5),
    ("s1dss", 1, 0, 2),
    ("s1cir", 1, 2, 2),
    ("s1cor", 1, 4, 2),
    ("s1csh", 1, 6, 2),
    ("dre", 1, 12, 1),
    ("cont", 1, 13, 4),
    ("dcp", 1, 17, 1),
    ("ppar", 1, 18, 1),
    ("mev", 1, 19, 1),
    ("s2fwb", 1, 25, 1),
    ("s1mpam", 1, 26, 1),
    ("s1stalld", 1, 27, 1),
    ("eats", 1, 28, 2),
    ("strw", 1, 30, 2),
    ("mem_attr", 1, 32, 4),
    ("mtcfg", 1, 36, 1),
    ("alloccfg", 1, 37, 4),
    ("shcfg", 1, 44, 2),
    ("nscfg", 1, 46, 2),
    ("privcfg", 1, 48, 2),
    ("instcfg", 1, 50, 2),
    ("s2vmid", 2, 0, 16),
    ("s2t0sz", 2, 32, 6),
    ("s2sl0", 2, 38, 2),
    ("s2ir0", 2, 40, 2),
    ("s2or0", 2, 42, 2),
    ("s2sh0", 2, 44, 2),
    ("s2tg", 2, 46, 2),
    ("s2ps", 2, 48, 3),
    ("s2aa64", 2, 51, 1),
    ("s2endi", 2, 52, 1),
    ("s2affd", 2, 53, 1),
    ("s2ptw", 2, 54, 1),
    ("s2hd", 2, 55, 1),
    ("s2ha", 2, 56, 1),
    ("s2s", 2, 57, 1),
    ("s2r", 2, 58, 1),
    ("s2nsw", 3, 0, 1),
    ("s2nsa", 3, 1, 1),
    ("s2ttb", 3, 4, 48),  # D3[51:4]
    # D4-D7: layouts unverified (MPAM PARTID/PMG, VMSPtr, reserved), kept raw.
    ("d4", 4, 0, 64),
    ("d5", 5, 0, 64),
    ("d6", 6, 0, 64),
    ("d7", 7, 0, 64),
)
_STE_PLAN = tuple((name, word, lo, (1 << width) - 1) for name, word, lo, width in _STE_TABLE)


@dataclass(frozen=True, slots=True)
class Ste:
    """The parts of a guest STE (vSTE) the daemon acts on; ``d0``/``d1`` are the raw words
    handed to the kernel as ``iommu_hwpt_arm_smmuv3.ste``."""

    d0: int
    d1: int
    v: bool
    config: int
    s1fmt: int
    s1_context_ptr: int
    s1cdmax: int
    s1dss: int
    s1cir: int
    s1cor: int
    s1csh: int
    s1stalld: int
    eats: int


def _ste_words(raw: bytes | bytearray | memoryview) -> tuple[int, ...]:
    size = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    if size != _STE_WORDS.size:
        raise ValueError(f"an SMMUv3 STE is {_STE_WORDS.size} bytes, got {size}")
    return _STE_WORDS.unpack(raw)


def decode_ste(raw: bytes | bytearray | memoryview) -> Ste:
    """Decode the fields of a 64-byte STE that the daemon needs."""
    d0, d1, *_ = _ste_words(raw)
    return Ste(
        d0=d0,
        d1=d1,
        v=bool(d0 & 1),
        config=(d0 >> 1) & 0x7,
        s1fmt=(d0 >> 4) & 0x3,
        s1_context_ptr=(d0 >> 6) & ((1 << 46) - 1),
        s1cdmax=(d0 >> 59) & 0x1F,
        s1dss=d1 & 0x3,
        s1cir=(d1 >> 2) & 0x3,
        s1cor=(d1 >> 4) & 0x3,
        s1csh=(d1 >> 6) & 0x3,
        s1stalld=(d1 >> 27) & 0x1,
        eats=(d1 >> 28) & 0x3,
    )


def ste_fields(raw: bytes | bytearray | memoryview) -> dict[str, int]:
    """Every STE field (raw values, ``d4``-``d7`` as whole words): the same dict
    ``protocols.smmuv3.parse_ste`` returns."""
    words = _ste_words(raw)
    return {name: (words[word] >> lo) & mask for name, word, lo, mask in _STE_PLAN}
