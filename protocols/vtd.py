"""Intel VT-d queued-invalidation descriptors and translation-structure entries (construct).

This module is the readable specification of the guest-visible VT-d formats viommud decodes
(reference: ``vtd.md`` §1 for the descriptors; the Intel VT-d architecture specification,
"Intel Virtualization Technology for Directed I/O", whose section numbers are cited per
declaration). The daemon decodes with ``viommud.guest.vtd`` (``struct`` plus shifts
and masks); a parity test proves both agree bit for bit, for every type and both widths.

Conventions
-----------
* A descriptor is two (128-bit queue, IQA.DW=0) or four (256-bit queue, DW=1) little-endian
  64-bit words ``qw0``..``qw3``. Each word is ``ByteSwapped(BitStruct(...))``: the fields are
  listed from bit 63 down to bit 0, and every word declaration is checked to cover 64 bits.
* The type is seven bits split in two: ``qw0[3:0]`` and ``qw0[11:9]`` (Type[6:4]). Each
  declaration fixes both halves with ``Const``; the helpers report them as one ``type``.
* Reserved bits are ``Padding``: ignored when parsing, written as zero when building. Which
  of them the emulated vIOMMU checks (and answers with IQE) is the frontend's business
  (QEMU's masks, vtd.md §1); some declared fields are reserved there too (PFSID without
  ECAP.DIT, the wait descriptor's PD without ECAP.PDS).
* In a 256-bit queue ``qw2`` and ``qw3`` of every defined descriptor are reserved.
* Field values are raw, not shifted into place: ``addr`` is qw1[63:12] (the byte address is
  ``addr << 12``), ``status_addr`` is qw1[63:2] (``value << 2``), the table pointers of the
  context and PASID entries are bits 63:12 of their word (``value << 12``).
* Field names are snake_case; ``if_`` is the wait descriptor's IF bit.

Only the helpers at the bottom (``parse_descriptor``, ``build_descriptor``,
``parse_context_entry``, ``build_context_entry``, ``build_scalable_context_entry``,
``parse_pasid_entry``, ``build_pasid_entry``) should be used by other code: they exchange
plain ``dict[str, int]``, never a ``construct.Container``.

What a first-stage PASID entry becomes on the host is declared here too, once: ``struct
iommu_hwpt_vtd_s1`` (the nested HWPT's data) and ``struct iommu_hwpt_vtd_s1_invalidate`` (the
entries of an ``IOMMU_HWPT_INVALIDATE`` on it), with the flag bits and the ``struct`` format
the daemon packs them with (``VTD_S1_STRUCT``).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

from construct import (
    BitsInteger,
    BitStruct,
    ByteSwapped,
    Const,
    ConstructError,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

from protocols.boundary import flatten_words

__all__ = [
    "CONTEXT_ENTRY_SIZES",
    "DESCRIPTORS",
    "DESCRIPTORS_256",
    "DESCRIPTOR_SIZES",
    "ICE",
    "IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT",
    "IOMMU_HWPT_VTD_S1_LAYOUT",
    "IOMMU_VTD_INV_FLAGS_LEAF",
    "IOMMU_VTD_S1_EAFE",
    "IOMMU_VTD_S1_FLAGS",
    "IOMMU_VTD_S1_SRE",
    "IOMMU_VTD_S1_WPE",
    "IQE",
    "ITE",
    "LEGACY_CONTEXT_ENTRY",
    "PAGE_REQUEST",
    "PAGE_REQUEST_SIZE",
    "PASID_ENTRY",
    "PASID_ENTRY_SIZE",
    "PGTT_FIRST_STAGE",
    "PGTT_PASS_THROUGH",
    "PGTT_SECOND_STAGE",
    "SCALABLE_CONTEXT_ENTRY",
    "VTD_INV_ALL_PAGES",
    "VTD_S1_ADDR_WIDTH",
    "VTD_S1_SIZE",
    "VTD_S1_STRUCT",
    "DescType",
    "build_context_entry",
    "build_descriptor",
    "build_page_request",
    "build_pasid_entry",
    "build_scalable_context_entry",
    "parse_context_entry",
    "parse_descriptor",
    "parse_page_request",
    "parse_pasid_entry",
]

DESCRIPTOR_SIZES = (16, 32)  # 128-bit and 256-bit queues
CONTEXT_ENTRY_SIZES = (16, 32)  # legacy and scalable-mode context entries
PASID_ENTRY_SIZE = 64

# Invalidation-queue errors the guest sees in FSTS_REG, by their bit names (docs/vtd.md, "IQE").
IQE = "IQE"  # invalidation queue error: a descriptor the hardware refuses
ITE = "ITE"  # invalidation time-out error (device-TLB invalidations)
ICE = "ICE"  # invalidation completion error (device-TLB invalidations)


class DescType(enum.IntEnum):
    """Invalidation descriptor types, ``qw0[3:0] | qw0[11:9] << 4`` (vtd.md §1.2)."""

    CC_INV = 0x1  # context-cache invalidate
    IOTLB_INV = 0x2  # IOTLB invalidate
    DEV_TLB_INV = 0x3  # device-TLB invalidate
    IEC_INV = 0x4  # interrupt-entry-cache invalidate
    INV_WAIT = 0x5  # invalidation wait
    P_IOTLB_INV = 0x6  # PASID-based IOTLB invalidate (256-bit queue only)
    PC_INV = 0x7  # PASID-cache invalidate (256-bit queue only)
    P_DEV_TLB_INV = 0x8  # PASID-based device-TLB invalidate (256-bit queue only)
    PGRP_RESP = 0x9  # page group response


# ---------------------------------------------------------------------------------------------
# Building blocks


def _word(*fields: Any, doc: str = "") -> Any:
    """One little-endian 64-bit word whose bit fields are listed from bit 63 down to bit 0."""
    word = ByteSwapped(BitStruct(*fields))
    if word.sizeof() != 8:
        raise AssertionError(f"word declaration covers {word.sizeof() * 8} bits, not 64")
    return word * doc if doc else word


def _type_hi(kind: DescType) -> Any:
    """qw0[11:9]: Type[6:4]."""
    return "type_hi" / Const(int(kind) >> 4, BitsInteger(3))


def _type_lo(kind: DescType) -> Any:
    """qw0[3:0]: Type[3:0]."""
    return "type_lo" / Const(int(kind) & 0xF, BitsInteger(4))


QW_RESERVED = _word(Padding(64), doc="reserved (must be zero)")

# Shared qw1 layouts.
QW1_IOTLB = _word(
    "addr" / BitsInteger(52),  # qw1[63:12]: ADDR[63:12]
    Padding(5),  # qw1[11:7]
    "ih" / BitsInteger(1),  # qw1[6]: invalidation hint (leaf entries only)
    "am" / BitsInteger(6),  # qw1[5:0]: address mask, 2^AM pages
    doc="qw1: AM[5:0], IH[6], ADDR[63:12] (VT-d §6.5.2.3, §6.5.2.4)",
)


#: 128-bit declarations by type (filled by ``_desc``).
DESCRIPTORS: dict[DescType, Any] = {}
#: 256-bit declarations by type: the 128-bit layout followed by two reserved words.
DESCRIPTORS_256: dict[DescType, Any] = {}


def _desc(kind: DescType, doc: str, qw0: Any, qw1: Any) -> Any:
    """Declare descriptor ``kind`` in both widths; returns the 128-bit form.

    128-bit: qw0 (holds the type) then qw1. 256-bit: the same, then qw2 and qw3 reserved."""
    DESCRIPTORS[kind] = Struct("qw0" / qw0, "qw1" / qw1) * doc
    DESCRIPTORS_256[kind] = (
        Struct("qw0" / qw0, "qw1" / qw1, "qw2" / QW_RESERVED, "qw3" / QW_RESERVED)
        * f"{doc} [256-bit form: qw2 and qw3 reserved]"
    )
    return DESCRIPTORS[kind]


# ---------------------------------------------------------------------------------------------
# The descriptors (VT-d §6.5.2; vtd.md §1.3-§1.11)

CC_INV = _desc(
    DescType.CC_INV,
    "Context-cache invalidate, type 0x1 (VT-d §6.5.2.1): G 1 global / 2 domain / 3 device; "
    "DID, SID, FM (function mask)",
    _word(
        Padding(14),  # qw0[63:50]
        "fm" / BitsInteger(2),  # qw0[49:48]
        "sid" / BitsInteger(16),  # qw0[47:32]
        "did" / BitsInteger(16),  # qw0[31:16]
        Padding(4),  # qw0[15:12]
        _type_hi(DescType.CC_INV),  # qw0[11:9]
        Padding(3),  # qw0[8:6]
        "g" / BitsInteger(2),  # qw0[5:4]
        _type_lo(DescType.CC_INV),  # qw0[3:0]
    ),
    QW_RESERVED,
)

IOTLB_INV = _desc(
    DescType.IOTLB_INV,
    "IOTLB invalidate, type 0x2 (VT-d §6.5.2.3): G 1 global / 2 domain / 3 page-selective; "
    "DW, DR (drain hints), DID; qw1 AM, IH, ADDR",
    _word(
        Padding(32),  # qw0[63:32]
        "did" / BitsInteger(16),  # qw0[31:16]
        Padding(4),  # qw0[15:12]
        _type_hi(DescType.IOTLB_INV),  # qw0[11:9]
        Padding(1),  # qw0[8]
        "dr" / BitsInteger(1),  # qw0[7]: drain reads
        "dw" / BitsInteger(1),  # qw0[6]: drain writes
        "g" / BitsInteger(2),  # qw0[5:4]
        _type_lo(DescType.IOTLB_INV),  # qw0[3:0]
    ),
    QW1_IOTLB,
)

DEV_TLB_INV = _desc(
    DescType.DEV_TLB_INV,
    "Device-TLB invalidate, type 0x3 (VT-d §6.5.2.5): PFSID (with ECAP.DIT), MIP, SID; "
    "qw1 S (size in ADDR, PCIe ATS encoding), ADDR",
    _word(
        "pfsid_hi" / BitsInteger(12),  # qw0[63:52]: PFSID[15:4]
        Padding(4),  # qw0[51:48]
        "sid" / BitsInteger(16),  # qw0[47:32]
        Padding(11),  # qw0[31:21]
        "mip" / BitsInteger(5),  # qw0[20:16]: max invalidations pending
        "pfsid_lo" / BitsInteger(4),  # qw0[15:12]: PFSID[3:0]
        _type_hi(DescType.DEV_TLB_INV),  # qw0[11:9]
        Padding(5),  # qw0[8:4]
        _type_lo(DescType.DEV_TLB_INV),  # qw0[3:0]
    ),
    _word(
        "addr" / BitsInteger(52),  # qw1[63:12]
        Padding(11),  # qw1[11:1]
        "s" / BitsInteger(1),  # qw1[0]
    ),
)

IEC_INV = _desc(
    DescType.IEC_INV,
    "Interrupt-entry-cache invalidate, type 0x4 (VT-d §6.5.2.2): G 0 global / 1 index-selective; "
    "IM (index mask), IIDX (first IRTE index)",
    _word(
        Padding(16),  # qw0[63:48]
        "iidx" / BitsInteger(16),  # qw0[47:32]
        "im" / BitsInteger(5),  # qw0[31:27]
        Padding(15),  # qw0[26:12]
        _type_hi(DescType.IEC_INV),  # qw0[11:9]
        Padding(4),  # qw0[8:5]
        "g" / BitsInteger(1),  # qw0[4]
        _type_lo(DescType.IEC_INV),  # qw0[3:0]
    ),
    QW_RESERVED,
)

INV_WAIT = _desc(
    DescType.INV_WAIT,
    "Invalidation wait, type 0x5 (VT-d §6.5.2.8): IF, SW, FN, PD (with ECAP.PDS), STATUS_DATA; "
    "qw1 STATUS_ADDR (dword aligned)",
    _word(
        "status_data" / BitsInteger(32),  # qw0[63:32]
        Padding(20),  # qw0[31:12]
        _type_hi(DescType.INV_WAIT),  # qw0[11:9]
        Padding(1),  # qw0[8]
        "pd" / BitsInteger(1),  # qw0[7]: page-request drain
        "fn" / BitsInteger(1),  # qw0[6]: fence
        "sw" / BitsInteger(1),  # qw0[5]: status write
        "if_" / BitsInteger(1),  # qw0[4]: interrupt flag
        _type_lo(DescType.INV_WAIT),  # qw0[3:0]
    ),
    _word(
        "status_addr" / BitsInteger(62),  # qw1[63:2]
        Padding(2),  # qw1[1:0]
    ),
)

P_IOTLB_INV = _desc(
    DescType.P_IOTLB_INV,
    "PASID-based IOTLB invalidate, type 0x6 (VT-d §6.5.2.4): G 2 PASID-selective / "
    "3 page-selective within PASID; DID, PASID; qw1 AM, IH, ADDR",
    _word(
        Padding(12),  # qw0[63:52]
        "pasid" / BitsInteger(20),  # qw0[51:32]
        "did" / BitsInteger(16),  # qw0[31:16]
        Padding(4),  # qw0[15:12]
        _type_hi(DescType.P_IOTLB_INV),  # qw0[11:9]
        Padding(3),  # qw0[8:6]
        "g" / BitsInteger(2),  # qw0[5:4]
        _type_lo(DescType.P_IOTLB_INV),  # qw0[3:0]
    ),
    QW1_IOTLB,
)

PC_INV = _desc(
    DescType.PC_INV,
    "PASID-cache invalidate, type 0x7 (VT-d §6.5.2.1): G 0 domain / 1 PASID-selective / "
    "3 global; DID, PASID",
    _word(
        Padding(12),  # qw0[63:52]
        "pasid" / BitsInteger(20),  # qw0[51:32]
        "did" / BitsInteger(16),  # qw0[31:16]
        Padding(4),  # qw0[15:12]
        _type_hi(DescType.PC_INV),  # qw0[11:9]
        Padding(3),  # qw0[8:6]
        "g" / BitsInteger(2),  # qw0[5:4]
        _type_lo(DescType.PC_INV),  # qw0[3:0]
    ),
    QW_RESERVED,
)

P_DEV_TLB_INV = _desc(
    DescType.P_DEV_TLB_INV,
    "PASID-based device-TLB invalidate, type 0x8 (VT-d §6.5.2.6): MIP, PFSID, SID, PASID; "
    "qw1 G (all PASIDs), S (bit 11 here), ADDR. SID and MIP sit elsewhere than in type 0x3.",
    _word(
        "pfsid_hi" / BitsInteger(12),  # qw0[63:52]: PFSID[15:4]
        "pasid" / BitsInteger(20),  # qw0[51:32]
        "sid" / BitsInteger(16),  # qw0[31:16]
        "pfsid_lo" / BitsInteger(4),  # qw0[15:12]: PFSID[3:0]
        _type_hi(DescType.P_DEV_TLB_INV),  # qw0[11:9]
        "mip" / BitsInteger(5),  # qw0[8:4]
        _type_lo(DescType.P_DEV_TLB_INV),  # qw0[3:0]
    ),
    _word(
        "addr" / BitsInteger(52),  # qw1[63:12]
        "s" / BitsInteger(1),  # qw1[11]
        Padding(10),  # qw1[10:1]
        "g" / BitsInteger(1),  # qw1[0]
    ),
)

PGRP_RESP = _desc(
    DescType.PGRP_RESP,
    "Page group response, type 0x9 (VT-d §6.5.2.7): PP (PASID present), RC (response code), "
    "RID, PASID; qw1 LPIG, PRGI",
    _word(
        Padding(12),  # qw0[63:52]
        "pasid" / BitsInteger(20),  # qw0[51:32]
        "rid" / BitsInteger(16),  # qw0[31:16]
        "rc" / BitsInteger(4),  # qw0[15:12]
        _type_hi(DescType.PGRP_RESP),  # qw0[11:9]
        Padding(4),  # qw0[8:5]
        "pp" / BitsInteger(1),  # qw0[4]
        _type_lo(DescType.PGRP_RESP),  # qw0[3:0]
    ),
    _word(
        Padding(52),  # qw1[63:12]
        "prgi" / BitsInteger(9),  # qw1[11:3]: page request group index
        "lpig" / BitsInteger(1),  # qw1[2]: last page in group
        Padding(2),  # qw1[1:0]
    ),
)


# ---------------------------------------------------------------------------------------------
# Translation-structure entries the guest writes (VT-d §9.3, §9.4, §9.6)

LEGACY_CONTEXT_ENTRY = (
    Struct(
        "qw0"
        / _word(
            "slptptr" / BitsInteger(52),  # qw0[63:12]: second-level page-table pointer
            Padding(8),  # qw0[11:4]
            "tt" / BitsInteger(2),  # qw0[3:2]: 0 untranslated only, 1 all (ATS), 2 pass-through
            "fpd" / BitsInteger(1),  # qw0[1]: fault processing disable
            "p" / BitsInteger(1),  # qw0[0]: present
        ),
        "qw1"
        / _word(
            Padding(40),  # qw1[63:24]
            "did" / BitsInteger(16),  # qw1[23:8]: domain identifier
            Padding(1),  # qw1[7]
            "avail" / BitsInteger(4),  # qw1[6:3]: ignored by hardware, available to software
            "aw" / BitsInteger(3),  # qw1[2:0]: 1 = 39-bit (3-level), 2 = 48-bit, 3 = 57-bit
        ),
    )
    * "Legacy-mode context entry, 128 bits (VT-d §9.3): P, FPD, TT, SLPTPTR; AW, DID"
)

SCALABLE_CONTEXT_ENTRY = (
    Struct(
        "qw0"
        / _word(
            "pasiddirptr" / BitsInteger(52),  # qw0[63:12]: PASID directory pointer
            "pdts" / BitsInteger(3),  # qw0[11:9]: PASID directory holds 2^(PDTS+7) entries
            Padding(4),  # qw0[8:5]
            "pre" / BitsInteger(1),  # qw0[4]: page request enable
            "paside" / BitsInteger(1),  # qw0[3]: PASID enable
            "dte" / BitsInteger(1),  # qw0[2]: device-TLB enable
            "fpd" / BitsInteger(1),  # qw0[1]
            "p" / BitsInteger(1),  # qw0[0]
        ),
        "qw1"
        / _word(
            Padding(43),  # qw1[63:21]
            "rid_priv" / BitsInteger(1),  # qw1[20]
            "rid_pasid" / BitsInteger(20),  # qw1[19:0]: PASID of requests without PASID
        ),
        "qw2" / QW_RESERVED,
        "qw3" / QW_RESERVED,
    )
    * "Scalable-mode context entry, 256 bits (VT-d §9.4): P, FPD, DTE, PASIDE, PRE, PDTS, "
    "PASIDDIRPTR; RID_PASID, RID_PRIV"
)

PASID_ENTRY = (
    Struct(
        "qw0"
        / _word(
            "slptptr" / BitsInteger(52),  # qw0[63:12]: second-stage page-table pointer
            Padding(2),  # qw0[11:10]
            "slade" / BitsInteger(1),  # qw0[9]: second-stage accessed/dirty enable
            "pgtt" / BitsInteger(3),  # qw0[8:6]: 1 first-stage, 2 second-stage, 3 nested, 4 PT
            "slee" / BitsInteger(1),  # qw0[5]: second-stage execute enable
            "aw" / BitsInteger(3),  # qw0[4:2]: second-stage address width
            "fpd" / BitsInteger(1),  # qw0[1]
            "p" / BitsInteger(1),  # qw0[0]
        ),
        "qw1"
        / _word(
            "pat" / BitsInteger(32),  # qw1[63:32]
            "pcd" / BitsInteger(1),  # qw1[31]
            "pwt" / BitsInteger(1),  # qw1[30]
            "emt" / BitsInteger(3),  # qw1[29:27]
            "emte" / BitsInteger(1),  # qw1[26]
            "cd" / BitsInteger(1),  # qw1[25]
            "pgsnp" / BitsInteger(1),  # qw1[24]: page snoop
            "pwsnp" / BitsInteger(1),  # qw1[23]: page-walk snoop
            Padding(7),  # qw1[22:16]
            "did" / BitsInteger(16),  # qw1[15:0]
        ),
        "qw2"
        / _word(
            "flptptr" / BitsInteger(52),  # qw2[63:12]: first-stage page-table pointer
            Padding(4),  # qw2[11:8]
            "eafe" / BitsInteger(1),  # qw2[7]: extended accessed flag enable
            "smep" / BitsInteger(1),  # qw2[6]: supervisor mode execute prevention
            "nxe" / BitsInteger(1),  # qw2[5]: no-execute enable
            "wpe" / BitsInteger(1),  # qw2[4]: write protect enable
            "flpm" / BitsInteger(2),  # qw2[3:2]: 0 = 4-level (48-bit), 1 = 5-level (57-bit)
            "ere" / BitsInteger(1),  # qw2[1]: execute request enable
            "sre" / BitsInteger(1),  # qw2[0]: supervisor request enable
        ),
        # qw3-qw7: fields of later revisions (unverified here), kept as raw words.
        "qw3" / Int64ul,
        "qw4" / Int64ul,
        "qw5" / Int64ul,
        "qw6" / Int64ul,
        "qw7" / Int64ul,
    )
    * "Scalable-mode PASID-table entry, 512 bits (VT-d §9.6): P, FPD, AW, SLEE, PGTT, SLADE, "
    "SLPTPTR; DID, PWSNP, PGSNP, CD, EMTE, EMT, PWT, PCD, PAT; SRE, ERE, FLPM, WPE, NXE, "
    "SMEP, EAFE, FLPTPTR; qw3-qw7 raw"
)

_RAW_PASID_WORDS = ("qw3", "qw4", "qw5", "qw6", "qw7")

PGTT_FIRST_STAGE = 1  # PASID entry PGTT (VT-d §9.6): first-stage translation
PGTT_SECOND_STAGE = 2  # PGTT: second-stage translation
PGTT_PASS_THROUGH = 4  # PGTT: pass-through


# ---------------------------------------------------------------------------------------------
# A first-stage PASID entry on the host: the nested HWPT's data and its invalidation entries
# (iommufd.md §1.5, §4.1, §4.2). The flags are the PASID entry's qw2 bits SRE, EAFE and WPE.

IOMMU_VTD_S1_SRE = 1 << 0  # supervisor requests (PASID entry SRE, qw2[0])
IOMMU_VTD_S1_EAFE = 1 << 1  # extended accessed flag (PASID entry EAFE, qw2[7])
IOMMU_VTD_S1_WPE = 1 << 2  # write protect (PASID entry WPE, qw2[4])
IOMMU_VTD_S1_FLAGS = IOMMU_VTD_S1_SRE | IOMMU_VTD_S1_EAFE | IOMMU_VTD_S1_WPE
VTD_S1_ADDR_WIDTH = 48  # addr_width of a 4-level first stage (PASID entry FLPM = 0)
IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0  # only leaf entries changed (the guest's IH)
VTD_INV_ALL_PAGES = (1 << 64) - 1  # npages of an invalidation of the whole address space

IOMMU_HWPT_VTD_S1_LAYOUT = (
    Struct(
        "flags" / Int64ul * "IOMMU_VTD_S1_SRE | IOMMU_VTD_S1_EAFE | IOMMU_VTD_S1_WPE",
        "pgtbl_addr" / Int64ul * "guest stage-1 root (GPA): FLPTPTR, or a legacy SLPTPTR",
        "addr_width" / Int32ul * "input address width in bits: 39, 48 or 57",
        "reserved" / Int32ul * "__reserved: not checked at allocation, maybe at attach",
    )
    * "struct iommu_hwpt_vtd_s1, 24 bytes, min_len 24 (iommufd.md §1.5, §4.1)"
)

IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT = (
    Struct(
        "addr" / Int64ul * "start, 4 KiB aligned",
        "npages" / Int64ul * "4 KiB pages; VTD_INV_ALL_PAGES (U64_MAX) = everything",
        "flags" / Int32ul * "bit0 IOMMU_VTD_INV_FLAGS_LEAF",
        "reserved" / Int32ul * "__reserved: non-zero gives EOPNOTSUPP",
    )
    * "struct iommu_hwpt_vtd_s1_invalidate, 24 bytes (iommufd.md §4.2)"
)

#: Both layouts as the daemon packs them: two u64 then two u32, little-endian.
VTD_S1_STRUCT = struct.Struct("<QQII")
VTD_S1_SIZE = VTD_S1_STRUCT.size
for _layout in (IOMMU_HWPT_VTD_S1_LAYOUT, IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT):
    if _layout.sizeof() != VTD_S1_SIZE:
        raise AssertionError("VTD_S1_STRUCT does not match the iommu_hwpt_vtd_s1 layouts")


# ---------------------------------------------------------------------------------------------
# Page request descriptor: what the remapping hardware writes into the guest's page request
# queue for a PCIe page request (VT-d §7.5.1, "Page Request Descriptor"; the layout Linux's
# ``struct page_req_dsc`` reads). 256 bits: qw0, qw1, then the private data qw2 and qw3.

PAGE_REQUEST_TYPE = 0x1
PAGE_REQUEST_SIZE = 32
PAGE_REQUEST = (
    Struct(
        "qw0"
        / _word(
            Padding(10),  # qw0[63:54]
            "pm_req" / BitsInteger(1),  # qw0[53]: privileged-mode access requested
            "exe_req" / BitsInteger(1),  # qw0[52]: execute access requested
            "pasid" / BitsInteger(20),  # qw0[51:32]
            "rid" / BitsInteger(16),  # qw0[31:16]: requester ID (bus, device, function)
            Padding(6),  # qw0[15:10]
            "pdp" / BitsInteger(1),  # qw0[9]: private data present
            "pp" / BitsInteger(1),  # qw0[8]: PASID present
            "type" / Const(PAGE_REQUEST_TYPE, BitsInteger(8)),  # qw0[7:0]
        ),
        "qw1"
        / _word(
            "addr" / BitsInteger(52),  # qw1[63:12]: page address [63:12]
            "prgi" / BitsInteger(9),  # qw1[11:3]: page request group index
            "lpig" / BitsInteger(1),  # qw1[2]: last page in group
            "wr_req" / BitsInteger(1),  # qw1[1]: write access requested
            "rd_req" / BitsInteger(1),  # qw1[0]: read access requested
        ),
        "private0" / Int64ul,  # qw2: private data (when PDP)
        "private1" / Int64ul,  # qw3
    )
    * "Page request descriptor, 256 bits (VT-d §7.5.1)"
)
if PAGE_REQUEST.sizeof() != PAGE_REQUEST_SIZE:
    raise AssertionError("the page request descriptor is 32 bytes")


def build_page_request(**fields: int) -> bytes:
    """Encode a page request descriptor; omitted fields are zero."""
    qw0 = {k: fields.pop(k, 0) for k in ("pm_req", "exe_req", "pasid", "rid", "pdp", "pp")}
    qw1 = {k: fields.pop(k, 0) for k in ("addr", "prgi", "lpig", "wr_req", "rd_req")}
    private = {k: fields.pop(k, 0) for k in ("private0", "private1")}
    if fields:
        raise ValueError(f"not page request fields: {', '.join(sorted(fields))}")
    return bytes(PAGE_REQUEST.build({"qw0": qw0, "qw1": qw1, **private}))


def parse_page_request(raw: bytes) -> dict[str, int]:
    """Decode a page request descriptor into its fields (``type`` included)."""
    return flatten_words(PAGE_REQUEST.parse(raw))


# ---------------------------------------------------------------------------------------------
# Boundary: plain dicts in and out, no construct.Container escapes.


def _descriptor_type(qw0: int) -> int:
    return (qw0 & 0xF) | (((qw0 >> 9) & 0x7) << 4)


def _with_type(fields: dict[str, int]) -> dict[str, int]:
    kind = fields.pop("type_lo") | fields.pop("type_hi") << 4
    return {"type": kind} | fields


def _descriptor_field_names(kind: DescType) -> frozenset[str]:
    raw = (int(kind) & 0xF | (int(kind) >> 4) << 9).to_bytes(16, "little")
    return frozenset(_with_type(flatten_words(DESCRIPTORS[kind].parse(raw))))


_DESCRIPTOR_FIELDS: dict[int, frozenset[str]] = {
    int(kind): _descriptor_field_names(kind) for kind in DESCRIPTORS
}


def parse_descriptor(raw: bytes) -> dict[str, int]:
    """Decode one 16- or 32-byte descriptor into ``{"type": t, field: raw value, ...}``.

    Unknown types decode to ``{"type": t}``; reserved bits (qw2/qw3 included) are ignored.
    """
    if len(raw) not in DESCRIPTOR_SIZES:
        raise ValueError(f"a VT-d descriptor is 16 or 32 bytes, got {len(raw)}")
    kind = _descriptor_type(int.from_bytes(raw[:8], "little"))
    if kind not in _DESCRIPTOR_FIELDS:
        return {"type": kind}
    table = DESCRIPTORS if len(raw) == 16 else DESCRIPTORS_256
    return _with_type(flatten_words(table[DescType(kind)].parse(bytes(raw))))


def build_descriptor(kind: int, *, width: int = 16, **fields: int) -> bytes:
    """Encode a descriptor of ``width`` bytes (16 or 32); omitted fields are zero, reserved
    bits are zero. An unknown type may only be built without fields.

    Raises ValueError for a field the type does not have or a value that does not fit.
    """
    if width not in DESCRIPTOR_SIZES:
        raise ValueError(f"a VT-d descriptor is 16 or 32 bytes, not {width}")
    if not 0 <= kind < 0x80:
        raise ValueError(f"descriptor type {kind} does not fit in 7 bits")
    known = _DESCRIPTOR_FIELDS.get(kind, frozenset({"type"}))
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"descriptor type 0x{kind:02x} has no field(s) {sorted(unknown)}")
    if kind not in _DESCRIPTOR_FIELDS:
        qw0 = (kind & 0xF) | (kind >> 4) << 9
        return qw0.to_bytes(width, "little")
    values = dict.fromkeys(known - {"type"}, 0)
    values.update(fields)
    words: dict[str, Any] = {"qw0": values, "qw1": values}
    if width == 32:
        words |= {"qw2": {}, "qw3": {}}
    table = DESCRIPTORS if width == 16 else DESCRIPTORS_256
    try:
        built = table[DescType(kind)].build(words)
    except ConstructError as exc:
        raise ValueError(str(exc)) from exc
    return bytes(built)


def _entry_fields(declaration: Any, size: int) -> tuple[str, ...]:
    return tuple(flatten_words(declaration.parse(bytes(size))))


_CONTEXT_DECLS: dict[int, Any] = {16: LEGACY_CONTEXT_ENTRY, 32: SCALABLE_CONTEXT_ENTRY}
_CONTEXT_FIELDS: dict[int, tuple[str, ...]] = {
    size: _entry_fields(decl, size) for size, decl in _CONTEXT_DECLS.items()
}
_PASID_FIELDS: tuple[str, ...] = _entry_fields(PASID_ENTRY, PASID_ENTRY_SIZE)


def parse_context_entry(raw: bytes) -> dict[str, int]:
    """Decode a context entry: 16 bytes legacy mode, 32 bytes scalable mode."""
    decl = _CONTEXT_DECLS.get(len(raw))
    if decl is None:
        raise ValueError(f"a VT-d context entry is 16 or 32 bytes, got {len(raw)}")
    return flatten_words(decl.parse(bytes(raw)))


def _build_context(size: int, fields: dict[str, int]) -> bytes:
    known = _CONTEXT_FIELDS[size]
    unknown = set(fields) - set(known)
    if unknown:
        mode = "scalable-mode" if size == 32 else "legacy"
        raise ValueError(f"a {mode} context entry has no field(s) {sorted(unknown)}")
    values = dict.fromkeys(known, 0)
    values.update(fields)
    words: dict[str, Any] = {"qw0": values, "qw1": values}
    if size == 32:
        words |= {"qw2": {}, "qw3": {}}
    try:
        built = _CONTEXT_DECLS[size].build(words)
    except ConstructError as exc:
        raise ValueError(str(exc)) from exc
    return bytes(built)


def build_context_entry(**fields: int) -> bytes:
    """Encode a legacy-mode (16-byte) context entry; omitted fields and reserved bits are 0."""
    return _build_context(16, fields)


def build_scalable_context_entry(**fields: int) -> bytes:
    """Encode a scalable-mode (32-byte) context entry; omitted fields and reserved bits are 0."""
    return _build_context(32, fields)


def parse_pasid_entry(raw: bytes) -> dict[str, int]:
    """Decode a 64-byte scalable-mode PASID-table entry (qw0-qw2 fields, raw qw3-qw7)."""
    if len(raw) != PASID_ENTRY_SIZE:
        raise ValueError(f"a VT-d PASID entry is {PASID_ENTRY_SIZE} bytes, got {len(raw)}")
    return flatten_words(PASID_ENTRY.parse(bytes(raw)))


def build_pasid_entry(**fields: int) -> bytes:
    """Encode a PASID-table entry; omitted fields are zero, reserved bits are zero."""
    unknown = set(fields) - set(_PASID_FIELDS)
    if unknown:
        raise ValueError(f"a PASID entry has no field(s) {sorted(unknown)}")
    values = dict.fromkeys(_PASID_FIELDS, 0)
    values.update(fields)
    obj: dict[str, Any] = {name: values[name] for name in _RAW_PASID_WORDS}
    obj |= {"qw0": values, "qw1": values, "qw2": values}
    try:
        built = PASID_ENTRY.build(obj)
    except ConstructError as exc:
        raise ValueError(str(exc)) from exc
    return bytes(built)
