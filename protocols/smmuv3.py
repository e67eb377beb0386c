"""ARM SMMUv3 command-queue entries and Stream Table Entries, declared with construct.

This module is the readable specification of the guest-visible SMMUv3 formats that viommud
decodes (reference: ``smmuv3.md`` §0, §1 and §3; the architecture document is Arm IHI 0070,
"SMMUv3", whose section numbers are cited per declaration). The daemon itself decodes with
``viommud.guest.smmuv3`` (``struct`` plus shifts and masks); a parity test proves
both agree bit for bit.

Conventions
-----------
* A command is 16 bytes: two little-endian 64-bit words W0 (bytes 0-7) and W1 (bytes 8-15).
  Each word is declared as ``ByteSwapped(BitStruct(...))``: swapping the 8 bytes turns the
  little-endian word into a big-endian one, so the ``BitStruct`` lists its fields from bit 63
  down to bit 0. Every word declaration is checked to cover exactly 64 bits.
* Reserved (RES0) bits are ``Padding``: they are ignored when parsing, written as zero when
  building, and never returned as fields.
* Every field value is the raw field value, not shifted into place: ``addr`` is W1[63:12]
  (the byte address is ``addr << 12``), ``msi_address`` is W1[51:2] (``value << 2``),
  ``s1_context_ptr`` is STE D0[51:6] (``value << 6``), ``s2ttb`` is STE D3[51:4]
  (``value << 4``).
* Field names are snake_case; ``global_`` stands for the ATC_INV ``Global`` bit.

Deliberate choices where the sources are incomplete
---------------------------------------------------
* PREFETCH_ADDR Stride: the reference places it at W1[12:8], which overlaps Address
  W1[63:12] at bit 12. Address[63:12] is what Linux encodes, so Stride is declared as the
  four bits W1[11:8] (unverified against the architecture figure).
* Range invalidation SCALE is the 5-bit W0[24:20]; the architecture widens it to W0[25:20]
  when SMMU_IDR5.DS == 1, and adds TTL128 at W1[7]. Both extra bits are reserved here.

Only the helpers at the bottom (``parse_command``, ``build_command``, ``parse_ste``,
``build_ste``) should be used by other code: they exchange plain ``dict[str, int]``, never a
``construct.Container``.
"""

from __future__ import annotations

import enum
from typing import Any

from construct import (
    BitsInteger,
    BitStruct,
    ByteSwapped,
    Const,
    ConstructError,
    Int64ul,
    Padding,
    Struct,
)

from protocols.boundary import flatten_words

__all__ = [
    "CERROR_ILL",
    "CFGI_CD_OPS",
    "COMMANDS",
    "COMMAND_SIZE",
    "FORWARDED_OPS",
    "SID_OPS",
    "SSEC_OPS",
    "STE",
    "STE_SIZE",
    "TLBI_NH_OPS",
    "TLBI_OPS",
    "TLBI_RANGE_OPS",
    "TLBI_VM_WIDE_OPS",
    "Opcode",
    "build_command",
    "build_ste",
    "parse_command",
    "parse_ste",
]

COMMAND_SIZE = 16
STE_SIZE = 64
CERROR_ILL = "CERROR_ILL"  # SMMU_CMDQ_CONS.ERR = 1, an illegal command (smmuv3.md §2.3)


class Opcode(enum.IntEnum):
    """Command opcodes, W0[7:0] (SMMUv3 §4.1; reference table smmuv3.md §1.1).

    The Secure (0x50-0x60) and DPT (0x70, 0x73) values come from vendor headers.
    """

    PREFETCH_CONFIG = 0x01
    PREFETCH_ADDR = 0x02
    CFGI_STE = 0x03
    CFGI_STE_RANGE = 0x04
    CFGI_CD = 0x05
    CFGI_CD_ALL = 0x06
    CFGI_VMS_PIDM = 0x07
    TLBI_NH_ALL = 0x10
    TLBI_NH_ASID = 0x11
    TLBI_NH_VA = 0x12
    TLBI_NH_VAA = 0x13
    TLBI_EL3_ALL = 0x18
    TLBI_EL3_VA = 0x1A
    TLBI_EL2_ALL = 0x20
    TLBI_EL2_ASID = 0x21
    TLBI_EL2_VA = 0x22
    TLBI_EL2_VAA = 0x23
    TLBI_S12_VMALL = 0x28
    TLBI_S2_IPA = 0x2A
    TLBI_NSNH_ALL = 0x30
    ATC_INV = 0x40
    PRI_RESP = 0x41
    RESUME = 0x44
    STALL_TERM = 0x45
    CMD_SYNC = 0x46
    TLBI_S_EL2_ALL = 0x50
    TLBI_S_EL2_ASID = 0x51
    TLBI_S_EL2_VA = 0x52
    TLBI_S_EL2_VAA = 0x53
    TLBI_S_S12_VMALL = 0x58
    TLBI_S_S2_IPA = 0x5A
    TLBI_SNH_ALL = 0x60
    DPTI_ALL = 0x70
    DPTI_PA = 0x73


def _ops(*ops: Opcode) -> frozenset[int]:
    return frozenset(int(op) for op in ops)


# Opcode sets, as plain ints: fast paths test ``op in SET`` on the opcode byte, and an enum
# member there would cost more than the test. Numpy tables are derived from these.

#: Stage-1 TLB invalidations of the Non-secure EL1&0 regime (SMMUv3 §4.4.1): TLBI_NH_*.
TLBI_NH_OPS = _ops(Opcode.TLBI_NH_ALL, Opcode.TLBI_NH_ASID, Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA)
#: The TLB invalidations a stage-1-only vSMMU forwards: TLBI_NH_* and TLBI_NSNH_ALL (which
#: the kernel turns into TLBI_NH_ALL of the vIOMMU's VMID, iommufd.md §3.3).
TLBI_OPS = TLBI_NH_OPS | _ops(Opcode.TLBI_NSNH_ALL)
#: TLBIs that cover every stage-1 entry of the VM.
TLBI_VM_WIDE_OPS = _ops(Opcode.TLBI_NH_ALL, Opcode.TLBI_NSNH_ALL)
#: TLBIs by address, which may use the range encoding TG/NUM/SCALE/TTL (§4.4.1.1).
TLBI_RANGE_OPS = _ops(Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA)
#: Configuration-cache invalidations of context descriptors (§4.3; smmuv3.md §1.3).
CFGI_CD_OPS = _ops(Opcode.CFGI_CD, Opcode.CFGI_CD_ALL)
#: Commands scoped by a StreamID, which the kernel translates vSID -> pSID (iommufd.md §3.3).
SID_OPS = CFGI_CD_OPS | _ops(Opcode.ATC_INV)
#: Every command the kernel's vIOMMU invalidation accepts (iommufd.md §3.3).
FORWARDED_OPS = TLBI_OPS | SID_OPS
#: Commands whose W0[10] is SSec, which must be 0 on the Non-secure queue (smmuv3.md §1.2).
SSEC_OPS = CFGI_CD_OPS | _ops(
    Opcode.PREFETCH_CONFIG,
    Opcode.PREFETCH_ADDR,
    Opcode.CFGI_STE,
    Opcode.CFGI_STE_RANGE,
    Opcode.CFGI_VMS_PIDM,
    Opcode.RESUME,
    Opcode.STALL_TERM,
)


# ---------------------------------------------------------------------------------------------
# Building blocks


def _word(*fields: Any, doc: str = "") -> Any:
    """One little-endian 64-bit word whose bit fields are listed from bit 63 down to bit 0."""
    word = ByteSwapped(BitStruct(*fields))
    if word.sizeof() != 8:
        raise AssertionError(f"word declaration covers {word.sizeof() * 8} bits, not 64")
    return word * doc if doc else word


def _command(doc: str, w0: Any, w1: Any) -> Any:
    """A 16-byte command: W0 (bytes 0-7, holds the opcode) then W1 (bytes 8-15)."""
    return Struct("w0" / w0, "w1" / w1) * doc


def _documented(doc: str, construct: Any) -> Any:
    """Attach a doc string (construct's ``* "..."`` docs) to a declaration."""
    return construct * doc


def _opcode(opcode: Opcode) -> Any:
    """W0[7:0]: the opcode, fixed per command declaration."""
    return "opcode" / Const(int(opcode), BitsInteger(8))


# Shared W1 layouts (W1 carries no opcode, so commands with the same operands share one).

W1_ZERO = _word(Padding(64), doc="W1: reserved (RES0)")

W1_LEAF = _word(
    Padding(63),  # W1[63:1]
    "leaf" / BitsInteger(1),  # W1[0]
    doc="W1: Leaf[0] (SMMUv3 §4.3 CFGI_STE / CFGI_CD)",
)

W1_STE_RANGE = _word(
    Padding(59),  # W1[63:5]
    "range" / BitsInteger(5),  # W1[4:0]: 2^(Range+1) StreamIDs; 31 = CFGI_ALL
    doc="W1: Range[4:0] (SMMUv3 §4.3 CFGI_STE_RANGE)",
)

W1_PREFETCH_ADDR = _word(
    "addr" / BitsInteger(52),  # W1[63:12]: Address[63:12]
    "stride" / BitsInteger(4),  # W1[11:8]: prefetch stride 2^(12+Stride); bits unverified
    Padding(3),  # W1[7:5]
    "size" / BitsInteger(5),  # W1[4:0]: 2^Size translations
    doc="W1: Size[4:0], Stride[11:8], Address[63:12] (SMMUv3 §4.2.2 CMD_PREFETCH_ADDR)",
)

W1_TLBI_VA = _word(
    "addr" / BitsInteger(52),  # W1[63:12]: VA[63:12]
    "tg" / BitsInteger(2),  # W1[11:10]: range granule, 0 = not a range command
    "ttl" / BitsInteger(2),  # W1[9:8]: level hint
    Padding(7),  # W1[7:1] (W1[7] is TTL128 in later revisions; reserved here)
    "leaf" / BitsInteger(1),  # W1[0]
    doc="W1: Leaf[0], TTL[9:8], TG[11:10], Address[63:12] (SMMUv3 §4.4.1 common TLBI fields)",
)

W1_TLBI_IPA = _word(
    Padding(12),  # W1[63:52]
    "addr" / BitsInteger(40),  # W1[51:12]: IPA[51:12]
    "tg" / BitsInteger(2),  # W1[11:10]
    "ttl" / BitsInteger(2),  # W1[9:8]
    Padding(7),  # W1[7:1]
    "leaf" / BitsInteger(1),  # W1[0]
    doc="W1: Leaf[0], TTL[9:8], TG[11:10], IPA[51:12] (SMMUv3 §4.4 TLBI_S2_IPA)",
)

W1_ATC_INV = _word(
    "addr" / BitsInteger(52),  # W1[63:12]: Address[63:12]
    Padding(6),  # W1[11:6]
    "size" / BitsInteger(6),  # W1[5:0]: 2^Size 4 KiB pages; 52 = everything
    doc="W1: Size[5:0], Address[63:12] (SMMUv3 §4.5 CMD_ATC_INV)",
)

W1_PRI_RESP = _word(
    Padding(50),  # W1[63:14]
    "resp" / BitsInteger(2),  # W1[13:12]: 0 Deny, 1 Fail, 2 Success
    Padding(3),  # W1[11:9]
    "prg_index" / BitsInteger(9),  # W1[8:0]
    doc="W1: PRGIndex[8:0], Resp[13:12] (SMMUv3 §4.6 CMD_PRI_RESP)",
)

W1_RESUME = _word(
    Padding(48),  # W1[63:16]
    "stag" / BitsInteger(16),  # W1[15:0]
    doc="W1: STAG[15:0] (SMMUv3 §4.7 CMD_RESUME)",
)

W1_SYNC = _word(
    Padding(12),  # W1[63:52]
    "msi_address" / BitsInteger(50),  # W1[51:2]: MSIAddress[51:2]
    Padding(2),  # W1[1:0]
    doc="W1: MSIAddress[51:2] (SMMUv3 §4.7.3 CMD_SYNC)",
)

W1_DPTI_PA = _word(
    "addr" / BitsInteger(52),  # W1[63:12]: PA[63:12]
    Padding(12),  # W1[11:0]
    doc="W1: Address[63:12] (DPTI_PA; vendor headers, unverified)",
)


# ---------------------------------------------------------------------------------------------
# Prefetch (SMMUv3 §4.2)

CMD_PREFETCH_CONFIG = _command(
    "CMD_PREFETCH_CONFIG 0x01 (SMMUv3 §4.2.1): SSec, SSV, SubstreamID, StreamID",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        "ssid" / BitsInteger(20),  # W0[31:12]
        "ssv" / BitsInteger(1),  # W0[11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.PREFETCH_CONFIG),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_PREFETCH_ADDR = _command(
    "CMD_PREFETCH_ADDR 0x02 (SMMUv3 §4.2.2): W0 as PREFETCH_CONFIG; W1 Size, Stride, Address. "
    "Stride is declared at W1[11:8] (unverified; the NS parameter is not declared).",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        "ssid" / BitsInteger(20),  # W0[31:12]
        "ssv" / BitsInteger(1),  # W0[11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.PREFETCH_ADDR),  # W0[7:0]
    ),
    W1_PREFETCH_ADDR,
)

# ---------------------------------------------------------------------------------------------
# Configuration invalidation (SMMUv3 §4.3)

CMD_CFGI_STE = _command(
    "CMD_CFGI_STE 0x03 (SMMUv3 §4.3.1): SSec, StreamID; W1 Leaf",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        Padding(21),  # W0[31:11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.CFGI_STE),  # W0[7:0]
    ),
    W1_LEAF,
)

CMD_CFGI_STE_RANGE = _command(
    "CMD_CFGI_STE_RANGE 0x04 (SMMUv3 §4.3.2; Range=31 is CMD_CFGI_ALL, §4.3.6): SSec, SID; Range",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        Padding(21),  # W0[31:11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.CFGI_STE_RANGE),  # W0[7:0]
    ),
    W1_STE_RANGE,
)

CMD_CFGI_CD = _command(
    "CMD_CFGI_CD 0x05 (SMMUv3 §4.3.3): SSec, SubstreamID, StreamID; W1 Leaf",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        "ssid" / BitsInteger(20),  # W0[31:12]
        Padding(1),  # W0[11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.CFGI_CD),  # W0[7:0]
    ),
    W1_LEAF,
)

CMD_CFGI_CD_ALL = _command(
    "CMD_CFGI_CD_ALL 0x06 (SMMUv3 §4.3.4): SSec, StreamID",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        Padding(21),  # W0[31:11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.CFGI_CD_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_CFGI_VMS_PIDM = _command(
    "CMD_CFGI_VMS_PIDM 0x07 (SMMUv3 §4.3.5, MPAM): SSec, VMID",
    _word(
        Padding(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(21),  # W0[31:11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.CFGI_VMS_PIDM),  # W0[7:0]
    ),
    W1_ZERO,
)

# ---------------------------------------------------------------------------------------------
# TLB invalidation (SMMUv3 §4.4). NUM W0[16:12] / SCALE W0[24:20] are the range operands
# (§4.4.1.1); VMID is W0[47:32], ASID W0[63:48].

CMD_TLBI_NH_ALL = _command(
    "CMD_TLBI_NH_ALL 0x10 (SMMUv3 §4.4 TLB invalidation, stage 1): VMID",
    _word(
        Padding(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(24),  # W0[31:8]
        _opcode(Opcode.TLBI_NH_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_NH_ASID = _command(
    "CMD_TLBI_NH_ASID 0x11 (SMMUv3 §4.4 TLB invalidation, stage 1): VMID, ASID",
    _word(
        "asid" / BitsInteger(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(24),  # W0[31:8]
        _opcode(Opcode.TLBI_NH_ASID),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_NH_VA = _command(
    "CMD_TLBI_NH_VA 0x12 (SMMUv3 §4.4 TLB invalidation, stage 1): NUM, SCALE, VMID, ASID; VA",
    _word(
        "asid" / BitsInteger(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(7),  # W0[31:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_NH_VA),  # W0[7:0]
    ),
    W1_TLBI_VA,
)

CMD_TLBI_NH_VAA = _command(
    "CMD_TLBI_NH_VAA 0x13 (SMMUv3 §4.4 TLB invalidation, stage 1): NUM, SCALE, VMID; VA",
    _word(
        Padding(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(7),  # W0[31:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_NH_VAA),  # W0[7:0]
    ),
    W1_TLBI_VA,
)

CMD_TLBI_EL3_ALL = _command(
    "CMD_TLBI_EL3_ALL 0x18 (SMMUv3 §4.4 TLB invalidation, EL3): no operands",
    _word(
        Padding(56),  # W0[63:8]
        _opcode(Opcode.TLBI_EL3_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_EL3_VA = _command(
    "CMD_TLBI_EL3_VA 0x1A (SMMUv3 §4.4 TLB invalidation, EL3): NUM, SCALE; VA. "
    "The W0 operands are assumed to be laid out as TLBI_EL2_VAA (unverified).",
    _word(
        Padding(39),  # W0[63:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_EL3_VA),  # W0[7:0]
    ),
    W1_TLBI_VA,
)

CMD_TLBI_EL2_ALL = _command(
    "CMD_TLBI_EL2_ALL 0x20 (SMMUv3 §4.4 TLB invalidation, EL2): no operands",
    _word(
        Padding(56),  # W0[63:8]
        _opcode(Opcode.TLBI_EL2_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_EL2_ASID = _command(
    "CMD_TLBI_EL2_ASID 0x21 (SMMUv3 §4.4 TLB invalidation, EL2): ASID",
    _word(
        "asid" / BitsInteger(16),  # W0[63:48]
        Padding(40),  # W0[47:8]
        _opcode(Opcode.TLBI_EL2_ASID),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_EL2_VA = _command(
    "CMD_TLBI_EL2_VA 0x22 (SMMUv3 §4.4 TLB invalidation, EL2): NUM, SCALE, ASID; VA",
    _word(
        "asid" / BitsInteger(16),  # W0[63:48]
        Padding(23),  # W0[47:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_EL2_VA),  # W0[7:0]
    ),
    W1_TLBI_VA,
)

CMD_TLBI_EL2_VAA = _command(
    "CMD_TLBI_EL2_VAA 0x23 (SMMUv3 §4.4 TLB invalidation, EL2): NUM, SCALE; VA",
    _word(
        Padding(39),  # W0[63:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_EL2_VAA),  # W0[7:0]
    ),
    W1_TLBI_VA,
)

CMD_TLBI_S12_VMALL = _command(
    "CMD_TLBI_S12_VMALL 0x28 (SMMUv3 §4.4 TLB invalidation, stage 2): VMID",
    _word(
        Padding(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(24),  # W0[31:8]
        _opcode(Opcode.TLBI_S12_VMALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_S2_IPA = _command(
    "CMD_TLBI_S2_IPA 0x2A (SMMUv3 §4.4 TLB invalidation, stage 2): NUM, SCALE, VMID; IPA",
    _word(
        Padding(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(7),  # W0[31:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_S2_IPA),  # W0[7:0]
    ),
    W1_TLBI_IPA,
)

CMD_TLBI_NSNH_ALL = _command(
    "CMD_TLBI_NSNH_ALL 0x30 (SMMUv3 §4.4 TLB invalidation): no operands",
    _word(
        Padding(56),  # W0[63:8]
        _opcode(Opcode.TLBI_NSNH_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

# ---------------------------------------------------------------------------------------------
# ATS, PRI, stall and synchronisation (SMMUv3 §4.5-§4.7)

CMD_ATC_INV = _command(
    "CMD_ATC_INV 0x40 (SMMUv3 §4.5 ATS/ATC invalidation): Global, SSV, SubstreamID, StreamID; "
    "Size, Address. ATC_INV has no SSec field: W0[10] is declared reserved.",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        "ssid" / BitsInteger(20),  # W0[31:12]
        "ssv" / BitsInteger(1),  # W0[11]
        Padding(1),  # W0[10]: no SSec in ATC_INV, reserved
        "global_" / BitsInteger(1),  # W0[9]
        Padding(1),  # W0[8]
        _opcode(Opcode.ATC_INV),  # W0[7:0]
    ),
    W1_ATC_INV,
)

CMD_PRI_RESP = _command(
    "CMD_PRI_RESP 0x41 (SMMUv3 §4.6 PRI): SSV, SubstreamID, StreamID; PRGIndex, Resp",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        "ssid" / BitsInteger(20),  # W0[31:12]
        "ssv" / BitsInteger(1),  # W0[11]
        Padding(3),  # W0[10:8]
        _opcode(Opcode.PRI_RESP),  # W0[7:0]
    ),
    W1_PRI_RESP,
)

CMD_RESUME = _command(
    "CMD_RESUME 0x44 (SMMUv3 §4.7 stall): SSec, Ac, Ab, StreamID; STAG",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        Padding(18),  # W0[31:14]
        "ab" / BitsInteger(1),  # W0[13]: abort
        "ac" / BitsInteger(1),  # W0[12]: retry
        Padding(1),  # W0[11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.RESUME),  # W0[7:0]
    ),
    W1_RESUME,
)

CMD_STALL_TERM = _command(
    "CMD_STALL_TERM 0x45 (SMMUv3 §4.7 stall): SSec, StreamID",
    _word(
        "sid" / BitsInteger(32),  # W0[63:32]
        Padding(21),  # W0[31:11]
        "ssec" / BitsInteger(1),  # W0[10]
        Padding(2),  # W0[9:8]
        _opcode(Opcode.STALL_TERM),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_SYNC = _command(
    "CMD_SYNC 0x46 (SMMUv3 §4.7.3): CS, MSH, MSIAttr, MSIData; MSIAddress",
    _word(
        "msi_data" / BitsInteger(32),  # W0[63:32]
        Padding(4),  # W0[31:28]
        "msi_attr" / BitsInteger(4),  # W0[27:24]
        "msh" / BitsInteger(2),  # W0[23:22]
        Padding(8),  # W0[21:14]
        "cs" / BitsInteger(2),  # W0[13:12]: 0 SIG_NONE, 1 SIG_IRQ, 2 SIG_SEV
        Padding(4),  # W0[11:8]
        _opcode(Opcode.CMD_SYNC),  # W0[7:0]
    ),
    W1_SYNC,
)

# ---------------------------------------------------------------------------------------------
# Secure and DPT commands. Opcodes and layouts are from vendor headers (unverified against
# the architecture text): each is declared with the shape of its Non-secure equivalent.

CMD_TLBI_S_EL2_ALL = _command(
    "CMD_TLBI_S_EL2_ALL 0x50 (SMMUv3 §4.4, Secure): as TLBI_EL2_ALL; vendor headers, unverified",
    _word(
        Padding(56),  # W0[63:8]
        _opcode(Opcode.TLBI_S_EL2_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_S_EL2_ASID = _command(
    "CMD_TLBI_S_EL2_ASID 0x51 (SMMUv3 §4.4, Secure): as TLBI_EL2_ASID; vendor headers, unverified",
    _word(
        "asid" / BitsInteger(16),  # W0[63:48]
        Padding(40),  # W0[47:8]
        _opcode(Opcode.TLBI_S_EL2_ASID),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_S_EL2_VA = _command(
    "CMD_TLBI_S_EL2_VA 0x52 (SMMUv3 §4.4, Secure): as TLBI_EL2_VA; vendor headers, unverified",
    _word(
        "asid" / BitsInteger(16),  # W0[63:48]
        Padding(23),  # W0[47:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_S_EL2_VA),  # W0[7:0]
    ),
    W1_TLBI_VA,
)

CMD_TLBI_S_EL2_VAA = _command(
    "CMD_TLBI_S_EL2_VAA 0x53 (SMMUv3 §4.4, Secure): as TLBI_EL2_VAA; vendor headers, unverified",
    _word(
        Padding(39),  # W0[63:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_S_EL2_VAA),  # W0[7:0]
    ),
    W1_TLBI_VA,
)

CMD_TLBI_S_S12_VMALL = _command(
    "CMD_TLBI_S_S12_VMALL 0x58 (SMMUv3 §4.4, Secure): as TLBI_S12_VMALL; "
    "vendor headers, unverified",
    _word(
        Padding(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(24),  # W0[31:8]
        _opcode(Opcode.TLBI_S_S12_VMALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_TLBI_S_S2_IPA = _command(
    "CMD_TLBI_S_S2_IPA 0x5A (SMMUv3 §4.4, Secure): as TLBI_S2_IPA; vendor headers, unverified",
    _word(
        Padding(16),  # W0[63:48]
        "vmid" / BitsInteger(16),  # W0[47:32]
        Padding(7),  # W0[31:25]
        "scale" / BitsInteger(5),  # W0[24:20]
        Padding(3),  # W0[19:17]
        "num" / BitsInteger(5),  # W0[16:12]
        Padding(4),  # W0[11:8]
        _opcode(Opcode.TLBI_S_S2_IPA),  # W0[7:0]
    ),
    W1_TLBI_IPA,
)

CMD_TLBI_SNH_ALL = _command(
    "CMD_TLBI_SNH_ALL 0x60 (SMMUv3 §4.4, Secure): opcode only; vendor headers, unverified",
    _word(
        Padding(56),  # W0[63:8]
        _opcode(Opcode.TLBI_SNH_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_DPTI_ALL = _command(
    "CMD_DPTI_ALL 0x70 (SMMUv3.3 DPT): opcode only; vendor headers, unverified",
    _word(
        Padding(56),  # W0[63:8]
        _opcode(Opcode.DPTI_ALL),  # W0[7:0]
    ),
    W1_ZERO,
)

CMD_DPTI_PA = _command(
    "CMD_DPTI_PA 0x73 (SMMUv3.3 DPT): Address W1[63:12]; vendor headers, unverified",
    _word(
        Padding(56),  # W0[63:8]
        _opcode(Opcode.DPTI_PA),  # W0[7:0]
    ),
    W1_DPTI_PA,
)

#: Every declared command, by opcode.
COMMANDS: dict[Opcode, Any] = {
    Opcode.PREFETCH_CONFIG: CMD_PREFETCH_CONFIG,
    Opcode.PREFETCH_ADDR: CMD_PREFETCH_ADDR,
    Opcode.CFGI_STE: CMD_CFGI_STE,
    Opcode.CFGI_STE_RANGE: CMD_CFGI_STE_RANGE,
    Opcode.CFGI_CD: CMD_CFGI_CD,
    Opcode.CFGI_CD_ALL: CMD_CFGI_CD_ALL,
    Opcode.CFGI_VMS_PIDM: CMD_CFGI_VMS_PIDM,
    Opcode.TLBI_NH_ALL: CMD_TLBI_NH_ALL,
    Opcode.TLBI_NH_ASID: CMD_TLBI_NH_ASID,
    Opcode.TLBI_NH_VA: CMD_TLBI_NH_VA,
    Opcode.TLBI_NH_VAA: CMD_TLBI_NH_VAA,
    Opcode.TLBI_EL3_ALL: CMD_TLBI_EL3_ALL,
    Opcode.TLBI_EL3_VA: CMD_TLBI_EL3_VA,
    Opcode.TLBI_EL2_ALL: CMD_TLBI_EL2_ALL,
    Opcode.TLBI_EL2_ASID: CMD_TLBI_EL2_ASID,
    Opcode.TLBI_EL2_VA: CMD_TLBI_EL2_VA,
    Opcode.TLBI_EL2_VAA: CMD_TLBI_EL2_VAA,
    Opcode.TLBI_S12_VMALL: CMD_TLBI_S12_VMALL,
    Opcode.TLBI_S2_IPA: CMD_TLBI_S2_IPA,
    Opcode.TLBI_NSNH_ALL: CMD_TLBI_NSNH_ALL,
    Opcode.ATC_INV: CMD_ATC_INV,
    Opcode.PRI_RESP: CMD_PRI_RESP,
    Opcode.RESUME: CMD_RESUME,
    Opcode.STALL_TERM: CMD_STALL_TERM,
    Opcode.CMD_SYNC: CMD_SYNC,
    Opcode.TLBI_S_EL2_ALL: CMD_TLBI_S_EL2_ALL,
    Opcode.TLBI_S_EL2_ASID: CMD_TLBI_S_EL2_ASID,
    Opcode.TLBI_S_EL2_VA: CMD_TLBI_S_EL2_VA,
    Opcode.TLBI_S_EL2_VAA: CMD_TLBI_S_EL2_VAA,
    Opcode.TLBI_S_S12_VMALL: CMD_TLBI_S_S12_VMALL,
    Opcode.TLBI_S_S2_IPA: CMD_TLBI_S_S2_IPA,
    Opcode.TLBI_SNH_ALL: CMD_TLBI_SNH_ALL,
    Opcode.DPTI_ALL: CMD_DPTI_ALL,
    Opcode.DPTI_PA: CMD_DPTI_PA,
}

# ---------------------------------------------------------------------------------------------
# Stream Table Entry (SMMUv3 §5.2; reference smmuv3.md §3.1): eight little-endian words D0-D7.

STE = _documented(
    "Stream Table Entry, 64 bytes (SMMUv3 §5.2 STE): fields of D0-D3, raw D4-D7",
    Struct(
        "d0"
        / _word(
            "s1cdmax" / BitsInteger(5),  # D0[63:59]: log2(number of CDs)
            Padding(7),  # D0[58:52]
            "s1_context_ptr" / BitsInteger(46),  # D0[51:6]: CD table address[51:6]
            "s1fmt" / BitsInteger(2),  # D0[5:4]
            "config" / BitsInteger(3),  # D0[3:1]: 0b0xx abort, 4 bypass, 5 S1, 6 S2, 7 nested
            "v" / BitsInteger(1),  # D0[0]
        ),
        "d1"
        / _word(
            Padding(12),  # D1[63:52]
            "instcfg" / BitsInteger(2),  # D1[51:50]
            "privcfg" / BitsInteger(2),  # D1[49:48]
            "nscfg" / BitsInteger(2),  # D1[47:46]
            "shcfg" / BitsInteger(2),  # D1[45:44]
            Padding(3),  # D1[43:41]
            "alloccfg" / BitsInteger(4),  # D1[40:37]
            "mtcfg" / BitsInteger(1),  # D1[36]
            "mem_attr" / BitsInteger(4),  # D1[35:32]
            "strw" / BitsInteger(2),  # D1[31:30]
            "eats" / BitsInteger(2),  # D1[29:28]
            "s1stalld" / BitsInteger(1),  # D1[27]
            "s1mpam" / BitsInteger(1),  # D1[26]
            "s2fwb" / BitsInteger(1),  # D1[25]
            Padding(5),  # D1[24:20]
            "mev" / BitsInteger(1),  # D1[19]
            "ppar" / BitsInteger(1),  # D1[18]
            "dcp" / BitsInteger(1),  # D1[17]
            "cont" / BitsInteger(4),  # D1[16:13]
            "dre" / BitsInteger(1),  # D1[12]
            Padding(4),  # D1[11:8]
            "s1csh" / BitsInteger(2),  # D1[7:6]
            "s1cor" / BitsInteger(2),  # D1[5:4]
            "s1cir" / BitsInteger(2),  # D1[3:2]
            "s1dss" / BitsInteger(2),  # D1[1:0]
        ),
        "d2"
        / _word(
            Padding(5),  # D2[63:59]
            "s2r" / BitsInteger(1),  # D2[58]
            "s2s" / BitsInteger(1),  # D2[57]
            "s2ha" / BitsInteger(1),  # D2[56]
            "s2hd" / BitsInteger(1),  # D2[55]
            "s2ptw" / BitsInteger(1),  # D2[54]
            "s2affd" / BitsInteger(1),  # D2[53]
            "s2endi" / BitsInteger(1),  # D2[52]
            "s2aa64" / BitsInteger(1),  # D2[51]
            "s2ps" / BitsInteger(3),  # D2[50:48]
            "s2tg" / BitsInteger(2),  # D2[47:46]
            "s2sh0" / BitsInteger(2),  # D2[45:44]
            "s2or0" / BitsInteger(2),  # D2[43:42]
            "s2ir0" / BitsInteger(2),  # D2[41:40]
            "s2sl0" / BitsInteger(2),  # D2[39:38]
            "s2t0sz" / BitsInteger(6),  # D2[37:32]
            Padding(16),  # D2[31:16]
            "s2vmid" / BitsInteger(16),  # D2[15:0]
        ),
        "d3"
        / _word(
            Padding(12),  # D3[63:52]
            "s2ttb" / BitsInteger(48),  # D3[51:4]: stage-2 table base[51:4]
            Padding(2),  # D3[3:2]
            "s2nsa" / BitsInteger(1),  # D3[1]
            "s2nsw" / BitsInteger(1),  # D3[0]
        ),
        # D4/D5 carry MPAM PARTID/PMG and VMSPtr, D6/D7 are reserved: their layouts are not
        # verified, so they are kept as raw words.
        "d4" / Int64ul,
        "d5" / Int64ul,
        "d6" / Int64ul,
        "d7" / Int64ul,
    ),
)

# Words of STE that are bit-field structures (the rest are raw Int64ul words).
_STE_BITFIELD_WORDS = ("d0", "d1", "d2", "d3")


# ---------------------------------------------------------------------------------------------
# Boundary: plain dicts in and out, no construct.Container escapes.


def _command_field_names(opcode: Opcode) -> tuple[str, ...]:
    zero = int(opcode).to_bytes(COMMAND_SIZE, "little")
    return tuple(flatten_words(COMMANDS[opcode].parse(zero)))


_COMMAND_FIELDS: dict[int, frozenset[str]] = {
    int(op): frozenset(_command_field_names(op)) for op in COMMANDS
}
_STE_FIELDS: tuple[str, ...] = tuple(flatten_words(STE.parse(bytes(STE_SIZE))))


def parse_command(raw: bytes) -> dict[str, int]:
    """Decode one 16-byte command into ``{"opcode": n, field: raw value, ...}``.

    Unknown opcodes decode to ``{"opcode": n}``; reserved bits are ignored.
    """
    if len(raw) != COMMAND_SIZE:
        raise ValueError(f"an SMMUv3 command is {COMMAND_SIZE} bytes, got {len(raw)}")
    opcode = raw[0]
    if opcode not in _COMMAND_FIELDS:
        return {"opcode": opcode}
    fields = flatten_words(COMMANDS[Opcode(opcode)].parse(bytes(raw)))
    return {"opcode": opcode} | fields


def build_command(opcode: int, **fields: int) -> bytes:
    """Encode a command; omitted fields are zero, reserved bits are written as zero.

    An unknown opcode may only be built without fields (it yields the opcode byte and zeros).
    Raises ValueError for a field the opcode does not have or a value that does not fit.
    """
    if not 0 <= opcode <= 0xFF:
        raise ValueError(f"opcode {opcode} does not fit in 8 bits")
    known = _COMMAND_FIELDS.get(opcode, frozenset({"opcode"}))
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"opcode 0x{opcode:02x} has no field(s) {sorted(unknown)}")
    if opcode not in _COMMAND_FIELDS:
        return opcode.to_bytes(COMMAND_SIZE, "little")
    values = dict.fromkeys(known, 0)
    values.update(fields)
    values["opcode"] = opcode
    try:
        built = COMMANDS[Opcode(opcode)].build({"w0": values, "w1": values})
    except ConstructError as exc:
        raise ValueError(str(exc)) from exc
    return bytes(built)


def parse_ste(raw: bytes) -> dict[str, int]:
    """Decode a 64-byte STE into ``{field: raw value}`` (D0-D3 fields and raw ``d4``-``d7``)."""
    if len(raw) != STE_SIZE:
        raise ValueError(f"an SMMUv3 STE is {STE_SIZE} bytes, got {len(raw)}")
    return flatten_words(STE.parse(bytes(raw)))


def build_ste(**fields: int) -> bytes:
    """Encode an STE from field values; omitted fields are zero, reserved bits are zero."""
    unknown = set(fields) - set(_STE_FIELDS)
    if unknown:
        raise ValueError(f"the STE has no field(s) {sorted(unknown)}")
    values = dict.fromkeys(_STE_FIELDS, 0)
    values.update(fields)
    # Each bit-field word picks its own names out of the flat dict; d4-d7 are plain ints.
    obj: dict[str, Any] = dict(values)
    obj.update(dict.fromkeys(_STE_BITFIELD_WORDS, values))
    try:
        built = STE.build(obj)
    except ConstructError as exc:
        raise ValueError(str(exc)) from exc
    return bytes(built)
