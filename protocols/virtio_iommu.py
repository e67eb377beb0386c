"""virtio-iommu (virtio device type 23): config space, requests, probe properties, fault
events and the vSVA draft extensions, declared with construct.

This module is the readable specification of the guest-visible virtio-iommu formats viommud
decodes (reference: ``virtio-iommu.md``, cited as "§n"; the normative text is the OASIS
virtio specification, ``device-types/iommu``). The daemon decodes with
``viommud.guest.virtio`` (``struct``); a parity test proves both agree.

Conventions
-----------
* Every multi-byte field is little-endian; every structure is packed (§0).
* A request declaration covers the **device-readable** part only (head and body): that is
  what a trace ``request`` record carries. The device-writable part (tail, or properties and
  tail for PROBE) is what the device writes back; ``TAIL`` declares it.
* Reserved bytes the device MUST ignore (head, DETACH, PROBE, tail) are ``Padding``;
  reserved bytes whose value decides a status (ATTACH, UNMAP, the vSVA drafts) are named
  fields, because a non-zero value is an error the device reports (INVAL).
* Field names follow the Linux header (``include/uapi/linux/virtio_iommu.h``) and the drafts.

The vSVA extension (ATTACH_TABLE = 6, INVALIDATE = 7) exists only in mutually incompatible
drafts (§5). Three are declared, selected by name:

* ``"A"``: Brucker's 2018 "v0.9-devel" tree (§5.1): 80-byte ATTACH_TABLE with a le16
  ``format``; INVALIDATE with a scope bitmask and CONFIG/LEAF flags.
* ``"B"``: the Jan 2021 RFC (Gautam/Brucker, §5.2): the same ATTACH_TABLE; INVALIDATE with
  ``inv_gran`` DOMAIN/PASID/VA, ``inv_type`` IOTLB/DEV_IOTLB/PASID and PASID/ARCHID/LEAF
  flags. viommud's default: the only draft whose caches cover TLB, device TLB and
  configuration, which is the intermediate form's cache set.
* ``"C"``: the later hardware-accelerated draft (§5.3): 128-byte ATTACH_TABLE with a u8
  ``format`` and an architecture descriptor; INVALIDATE with an enumerated scope
  DOMAIN/PASID/ADDRESS and PASID/TLB caches.

No draft publishes a VT-d table descriptor for drafts A/B, nor the layout of draft C's
INTEL_PT descriptor; viommud declares its own (``PGT_VTD``): the fields of iommufd's
``iommu_hwpt_vtd_s1`` (iommufd.md §1.5) at the same offsets the Arm views use. It is
documented in docs/virtio-iommu.md.

Only the helpers at the bottom exchange values with other code, as plain dicts.
"""

from __future__ import annotations

import enum
from typing import Any

from construct import (
    Bytes,
    Const,
    ConstructError,
    Container,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
    Switch,
    this,
)

__all__ = [
    "CONFIG",
    "CONFIG_BYPASS_OFFSET",
    "CONFIG_SIZE",
    "DRAFTS",
    "FAULT",
    "FAULT_SIZE",
    "PROBE_PROPERTY_HEADER",
    "PROBE_RESV_MEM",
    "REQUESTS",
    "TAIL",
    "TAIL_SIZE",
    "AttachFlag",
    "FaultFlag",
    "FaultReason",
    "Feature",
    "MapFlag",
    "ProbeType",
    "RequestType",
    "ResvMemSubtype",
    "Status",
    "TableFormat",
    "build_config",
    "build_fault",
    "build_request",
    "build_resv_mem",
    "parse_config",
    "parse_fault",
    "parse_properties",
    "parse_request",
    "readable_size",
    "request_layout",
]

DEVICE_ID = 23
REQUESTQ = 0
EVENTQ = 1

CONFIG_SIZE = 40
CONFIG_BYPASS_OFFSET = 36  # the one field a driver writes (F_BYPASS_CONFIG, §1.2)
HEAD_SIZE = 4
TAIL_SIZE = 4
FAULT_SIZE = 24
PROPERTY_HEADER_SIZE = 4
RESV_MEM_SIZE = 24  # header (4) + value (20)
PROBE_TYPE_MASK = 0x0FFF  # bits 11:0 of the property header's first le16


class Feature(enum.IntFlag):
    """Device feature bits of the final specification (§1.1)."""

    INPUT_RANGE = 1 << 0
    DOMAIN_RANGE = 1 << 1
    MAP_UNMAP = 1 << 2
    BYPASS = 1 << 3  # legacy; superseded by BYPASS_CONFIG
    PROBE = 1 << 4
    MMIO = 1 << 5
    BYPASS_CONFIG = 1 << 6


# F_ATTACH_TABLE per draft (§1.1: every draft numbers it differently, colliding with
# standard bits; viommud never writes feature bits anywhere, the table is informative).
ATTACH_TABLE_FEATURE_BIT = {"A": 5, "B": 6, "C": 7}


class RequestType(enum.IntEnum):
    """``head.type`` (§2.1). 6 and 7 are the vSVA drafts' (§5); unknown types stay ints."""

    ATTACH = 1
    DETACH = 2
    MAP = 3
    UNMAP = 4
    PROBE = 5
    ATTACH_TABLE = 6
    INVALIDATE = 7


class Status(enum.IntEnum):
    """``tail.status`` (§3)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
    DEVERR = 3
    INVAL = 4
    RANGE = 5
    NOENT = 6
    FAULT = 7
    NOMEM = 8


class AttachFlag(enum.IntFlag):
    """ATTACH ``flags`` (§2.2)."""

    BYPASS = 1 << 0


class MapFlag(enum.IntFlag):
    """MAP ``flags`` (§2.4): mask 0x7 in the final specification."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMIO = 1 << 2


MAP_FLAGS_MASK = 0x7


class ProbeType(enum.IntEnum):
    """Probe property types (§2.6); 2-7 exist only in the drafts (§5.2)."""

    NONE = 0
    RESV_MEM = 1
    PAGE_SIZE_MASK = 2
    INPUT_RANGE = 3
    OUTPUT_SIZE = 4
    PASID_SIZE = 5
    PAGE_TABLE_FMT = 6
    PASID_TABLE_FMT = 7


class ResvMemSubtype(enum.IntEnum):
    """RESV_MEM ``subtype`` (§2.6); a driver treats unknown subtypes as RESERVED."""

    RESERVED = 0
    MSI = 1


class FaultReason(enum.IntEnum):
    """``virtio_iommu_fault.reason`` (§4)."""

    UNKNOWN = 0
    DOMAIN = 1
    MAPPING = 2


class FaultFlag(enum.IntFlag):
    """``virtio_iommu_fault.flags`` (§4). EXEC is Linux's; PASID is the drafts' (§5.3)."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC = 1 << 2
    ADDRESS = 1 << 8
    PASID = 1 << 9


class TableFormat(enum.IntEnum):
    """ATTACH_TABLE ``format`` values of drafts A/B (§5.1, §5.2; 4 is the Intel fork's)."""

    ARM_LPAE = 1  # PGTF_ARM_LPAE: one Arm LPAE page table (TCR/TTBR/MAIR)
    ARM_SMMUV3_PST = 2  # PSTF_ARM_SV3: an SMMUv3 PASID (context-descriptor) table
    VIRT = 3  # the v0.12 "virt" page table (not supported by viommud)
    VTD = 4  # an Intel VT-d first-stage page table


class TableFormatC(enum.IntEnum):
    """ATTACH_TABLE ``format`` values of draft C (§5.3)."""

    ARM_SMMU3 = 1
    INTEL_PT = 2
    RISCV = 4
    AMD_GCR3 = 5
    AMD_PT = 6


# INVALIDATE bit values per draft (§5.1-§5.3)
INV_A_SCOPE_DOMAIN, INV_A_SCOPE_PASID, INV_A_SCOPE_VA = 1 << 0, 1 << 1, 1 << 2
INV_A_F_CONFIG, INV_A_F_LEAF = 1 << 0, 1 << 1
INV_B_GRAN_DOMAIN, INV_B_GRAN_PASID, INV_B_GRAN_VA = 1 << 0, 1 << 1, 1 << 2
INV_B_TYPE_IOTLB, INV_B_TYPE_DEV_IOTLB, INV_B_TYPE_PASID = 1 << 0, 1 << 1, 1 << 2
INV_B_F_PASID, INV_B_F_ARCHID, INV_B_F_LEAF = 1 << 0, 1 << 1, 1 << 2
INV_C_SCOPE_DOMAIN, INV_C_SCOPE_PASID, INV_C_SCOPE_ADDRESS = 1, 2, 3
INV_C_CACHE_PASID, INV_C_CACHE_TLB = 1 << 0, 1 << 1
INV_C_F_LEAF, INV_C_F_PASID, INV_C_F_ID, INV_C_F_GLOBAL = 1 << 0, 1 << 1, 1 << 2, 1 << 3

# PASID-table (Arm SMMUv3 CD table) descriptor values of drafts A/B (§5.1, §5.2)
PST_S1FMT_LINEAR, PST_S1FMT_4KL2, PST_S1FMT_64KL2 = 0, 1, 2
PST_S1DSS_TERMINATE, PST_S1DSS_BYPASS, PST_S1DSS_SSID0 = 0, 1, 2

# --------------------------------------------------------------------------------------
# Configuration space (§1.2)
# --------------------------------------------------------------------------------------

CONFIG = (
    Struct(
        "page_size_mask" / Int64ul * "lowest set bit = the granule; at least one bit set",
        "input_range_start" / Int64ul * "valid with F_INPUT_RANGE",
        "input_range_end" / Int64ul * "inclusive",
        "domain_range_start" / Int32ul * "valid with F_DOMAIN_RANGE",
        "domain_range_end" / Int32ul * "inclusive",
        "probe_size" / Int32ul * "valid with F_PROBE: byte size of the PROBE properties area",
        "bypass" / Int8ul * "valid with F_BYPASS_CONFIG: 0 or 1",
        Padding(3) * "reserved",
    )
    * "struct virtio_iommu_config, 40 bytes (§1.2)"
)

# --------------------------------------------------------------------------------------
# Requests: the device-readable part (§2)
# --------------------------------------------------------------------------------------


def _head(request_type: int) -> list[Any]:
    """``struct virtio_iommu_req_head`` (§2.1): type, then 3 reserved bytes to ignore."""
    return [
        "type" / Const(request_type, Int8ul),
        Padding(3) * "head.reserved: the device MUST ignore it",
    ]


ATTACH = (
    Struct(
        *_head(RequestType.ATTACH),
        "domain" / Int32ul,
        "endpoint" / Int32ul,
        "flags" / Int32ul * "bit 0 ATTACH_F_BYPASS; any other bit: INVAL (MUST)",
        "reserved" / Int32ul * "reserved[4]: non-zero gives INVAL (MUST)",
    )
    * "struct virtio_iommu_req_attach, readable part: 20 bytes (+ 4-byte tail) (§2.2)"
)

DETACH = (
    Struct(
        *_head(RequestType.DETACH),
        "domain" / Int32ul,
        "endpoint" / Int32ul,
        Padding(8) * "reserved[8]: the device MUST ignore it (no INVAL)",
    )
    * "struct virtio_iommu_req_detach, readable part: 20 bytes (+ 4-byte tail) (§2.3)"
)

MAP = (
    Struct(
        *_head(RequestType.MAP),
        "domain" / Int32ul,
        "virt_start" / Int64ul,
        "virt_end" / Int64ul * "inclusive",
        "phys_start" / Int64ul,
        "flags" / Int32ul * "READ 1, WRITE 2, MMIO 4; any other bit: INVAL (MUST)",
    )
    * "struct virtio_iommu_req_map, readable part: 36 bytes (+ 4-byte tail) (§2.4)"
)

UNMAP = (
    Struct(
        *_head(RequestType.UNMAP),
        "domain" / Int32ul,
        "virt_start" / Int64ul,
        "virt_end" / Int64ul * "inclusive",
        "reserved" / Int32ul * "reserved[4]: the device MAY answer INVAL",
    )
    * "struct virtio_iommu_req_unmap, readable part: 28 bytes (+ 4-byte tail) (§2.5)"
)

PROBE = (
    Struct(
        *_head(RequestType.PROBE),
        "endpoint" / Int32ul,
        Padding(64) * "reserved[64]: the device MUST ignore it",
    )
    * "struct virtio_iommu_req_probe, readable part: 72 bytes (+ probe_size + 4) (§2.6)"
)

TAIL = (
    Struct(
        "status" / Int8ul * "enum Status",
        Padding(3) * "tail.reserved: the device SHOULD write zeros",
    )
    * "struct virtio_iommu_req_tail, 4 bytes, device-writable (§2.1)"
)

REQUESTS: dict[int, Any] = {
    RequestType.ATTACH: ATTACH,
    RequestType.DETACH: DETACH,
    RequestType.MAP: MAP,
    RequestType.UNMAP: UNMAP,
    RequestType.PROBE: PROBE,
}

# --------------------------------------------------------------------------------------
# Probe properties (§2.6)
# --------------------------------------------------------------------------------------

PROBE_PROPERTY_HEADER = (
    Struct(
        "type" / Int16ul * "bits 11:0 type, bits 15:12 reserved (split by the helpers)",
        "length" / Int16ul * "size of the value that follows, header excluded",
    )
    * "struct virtio_iommu_probe_property, 4 bytes (§2.6)"
)

PROBE_RESV_MEM = (
    Struct(
        "type" / Const(int(ProbeType.RESV_MEM), Int16ul),
        "length" / Const(RESV_MEM_SIZE - PROPERTY_HEADER_SIZE, Int16ul),
        "subtype" / Int8ul * "0 RESERVED, 1 MSI",
        Padding(3) * "reserved",
        "start" / Int64ul,
        "end" / Int64ul * "inclusive",
    )
    * "struct virtio_iommu_probe_resv_mem, 24 bytes with its header (§2.6)"
)

PROBE_TABLE_FMT = (
    Struct(
        "type" / Int16ul * "PAGE_TABLE_FMT (6) or PASID_TABLE_FMT (7)",
        "length" / Const(4, Int16ul),
        "format" / Int16ul * "TableFormat",
        Padding(2) * "reserved",
    )
    * "drafts A/B: struct virtio_iommu_probe_{page,pasid}_table_format, 8 bytes (§5.2)"
)

# --------------------------------------------------------------------------------------
# Fault event (§4)
# --------------------------------------------------------------------------------------

FAULT = (
    Struct(
        "reason" / Int8ul * "enum FaultReason",
        Padding(3) * "reserved: the driver drops a report where it is non-zero",
        "flags" / Int32ul * "READ 1, WRITE 2, EXEC 4 (Linux), ADDRESS 0x100, PASID 0x200 (drafts)",
        "endpoint" / Int32ul,
        "pasid" / Int32ul * "reserved1 in the final spec; the drafts' pasid (with F_PASID)",
        "address" / Int64ul * "valid with F_ADDRESS",
    )
    * "struct virtio_iommu_fault, 24 bytes, written to an eventq buffer (§4)"
)

# --------------------------------------------------------------------------------------
# vSVA drafts (§5): ATTACH_TABLE and INVALIDATE
# --------------------------------------------------------------------------------------

# Drafts A and B share the 80-byte ATTACH_TABLE: a le16 format at 12, then 62 bytes whose
# meaning depends on the format.
PST_ARM = Struct(
    "s1fmt" / Int8ul * "0 LINEAR, 1 4K-L2, 2 64K-L2",
    "s1dss" / Int8ul * "0 TERMINATE, 1 BYPASS, 2 SSID0",
    "s1contextptr" / Int64ul * "guest physical address of the CD table",
    "s1cdmax" / Int32ul * "log2 of the number of CDs (STE.S1CDMax)",
    "reserved" / Bytes(48) * "non-zero: INVAL",
)
PGT_ARM = Struct(
    "asid" / Int16ul,
    "tcr" / Int64ul * "TCR_EL1 layout",
    "ttbr0" / Int64ul,
    "ttbr1" / Int64ul,
    "mair" / Int64ul,
    "reserved" / Bytes(28) * "non-zero: INVAL",
)
PGT_VTD = Struct(
    "reserved0" / Int16ul * "viommud's layout (no draft publishes one); non-zero: INVAL",
    "vtd_flags" / Int64ul * "iommu_hwpt_vtd_s1.flags: SRE 1, EAFE 2, WPE 4",
    "pgtbl_addr" / Int64ul * "guest physical address of the first-stage table root",
    "addr_width" / Int32ul * "input address width in bits (39, 48 or 57)",
    "reserved" / Bytes(40) * "non-zero: INVAL",
)

ATTACH_TABLE_AB = (
    Struct(
        *_head(RequestType.ATTACH_TABLE),
        "domain" / Int32ul,
        "endpoint" / Int32ul,
        "format" / Int16ul * "TableFormat",
        "table"
        / Switch(
            this.format,
            {
                TableFormat.ARM_SMMUV3_PST: PST_ARM,
                TableFormat.ARM_LPAE: PGT_ARM,
                TableFormat.VTD: PGT_VTD,
            },
            default=Bytes(62),
        ),
    )
    * "drafts A/B: struct virtio_iommu_req_attach_table, readable part 76 bytes (§5.1, §5.2)"
)

# Draft C: a u8 format at 12, then a 111-byte architecture descriptor.
DESC_C_ARM = Struct(
    "reserved0" / Bytes(3),
    "ste0" / Int64ul * "SMMUv3 STE word 0 (V, Config, S1Fmt, S1ContextPtr, S1CDMax)",
    "ste1" / Int64ul * "SMMUv3 STE word 1 (S1DSS, S1CIR/COR/CSH, S1STALLD, EATS)",
    "reserved" / Bytes(92),
)
DESC_C_VTD = Struct(
    "reserved0" / Bytes(3),
    "vtd_flags" / Int64ul * "viommud's INTEL_PT layout, as PGT_VTD",
    "pgtbl_addr" / Int64ul,
    "addr_width" / Int32ul,
    "reserved" / Bytes(88),
)

ATTACH_TABLE_C = (
    Struct(
        *_head(RequestType.ATTACH_TABLE),
        "domain" / Int32ul,
        "endpoint" / Int32ul,
        "format" / Int8ul * "TableFormatC",
        "table"
        / Switch(
            this.format,
            {TableFormatC.ARM_SMMU3: DESC_C_ARM, TableFormatC.INTEL_PT: DESC_C_VTD},
            default=Bytes(111),
        ),
    )
    * "draft C: struct virtio_iommu_req_attach_table, readable part 124 bytes (§5.3)"
)

INVALIDATE_A = (
    Struct(
        *_head(RequestType.INVALIDATE),
        "scope" / Int16ul * "bitmask: DOMAIN 1, PASID 2, VA 4",
        "flags" / Int16ul * "CONFIG 1, LEAF 2",
        "domain" / Int32ul,
        "pasid" / Int32ul,
        "id" / Int64ul * "architecture tag (Arm ASID)",
        "virt_start" / Int64ul,
        "nr_pages" / Int64ul,
        "granule" / Int8ul * "log2 of the page size",
        "reserved" / Bytes(19),
    )
    * "draft A: struct virtio_iommu_req_invalidate, readable part 60 bytes (§5.1)"
)

INVALIDATE_B = (
    Struct(
        *_head(RequestType.INVALIDATE),
        "inv_gran" / Int16ul * "bitmask: DOMAIN 1, PASID 2, VA 4",
        "inv_type" / Int16ul * "IOTLB 1, DEV_IOTLB 2, PASID 4 (configuration)",
        "flags" / Int16ul * "PASID valid 1, ARCHID valid 2, LEAF 4",
        "reserved1" / Int16ul,
        "domain" / Int32ul,
        "pasid" / Int32ul,
        "reserved2" / Int32ul,
        "archid" / Int64ul,
        "virt_start" / Int64ul,
        "nr_pages" / Int64ul,
        "granule" / Int8ul * "log2 of the page size",
        "reserved3" / Bytes(11),
    )
    * "draft B: struct virtio_iommu_req_invalidate, readable part 60 bytes (§5.2)"
)

INVALIDATE_C = (
    Struct(
        *_head(RequestType.INVALIDATE),
        "scope" / Int8ul * "enumerated: DOMAIN 1, PASID 2, ADDRESS 3",
        "caches" / Int8ul * "PASID (configuration) 1, TLB 2",
        "flags" / Int16ul * "LEAF 1, PASID valid 2, ID valid 4, GLOBAL 8",
        "domain" / Int32ul,
        "pasid" / Int32ul,
        "id" / Int64ul * "Arm: ASID in bits 15:0",
        "address" / Int64ul,
        "nr_pages" / Int64ul,
        "page_size" / Int8ul * "log2 of the page size",
        "reserved" / Bytes(19),
    )
    * "draft C: struct virtio_iommu_req_invalidate, readable part 60 bytes (§5.3)"
)

DRAFTS: dict[str, dict[int, Any]] = {
    "A": {RequestType.ATTACH_TABLE: ATTACH_TABLE_AB, RequestType.INVALIDATE: INVALIDATE_A},
    "B": {RequestType.ATTACH_TABLE: ATTACH_TABLE_AB, RequestType.INVALIDATE: INVALIDATE_B},
    "C": {RequestType.ATTACH_TABLE: ATTACH_TABLE_C, RequestType.INVALIDATE: INVALIDATE_C},
}

# --------------------------------------------------------------------------------------
# Boundary: plain dicts in and out, no construct.Container escapes.
# --------------------------------------------------------------------------------------

Fields = dict[str, int | bytes]


def request_layout(request_type: int, draft: str = "B") -> Any:
    """The construct declaration of ``request_type`` under ``draft``; KeyError if none."""
    layout = REQUESTS.get(request_type)
    if layout is not None:
        return layout
    return DRAFTS[draft][request_type]


def readable_size(request_type: int, draft: str = "B") -> int | None:
    """Bytes of the readable part of ``request_type``; None for an unknown type."""
    try:
        layout = request_layout(request_type, draft)
    except KeyError:
        return None
    if request_type == RequestType.ATTACH_TABLE:
        return 124 if draft == "C" else 76
    return int(layout.sizeof())


def _flatten(parsed: Container) -> Fields:
    out: Fields = {}
    for key, value in parsed.items():
        if key.startswith("_"):  # construct's hidden "_io"
            continue
        if isinstance(value, dict):
            for name, raw in value.items():
                if not name.startswith("_"):
                    out[name] = raw if isinstance(raw, bytes) else int(raw)
        elif isinstance(value, bytes):
            out["descriptor" if key == "table" else key] = value
        else:
            out[key] = int(value)
    return out


def parse_request(raw: bytes, draft: str = "B") -> Fields:
    """Decode a request's readable part into ``{"type": n, field: value, ...}``.

    Raises ValueError for an unknown type or a length other than the type's readable size.
    """
    if not raw:
        raise ValueError("an empty request has no head")
    request_type = raw[0]
    size = readable_size(request_type, draft)
    if size is None:
        raise ValueError(f"unknown request type {request_type}")
    if len(raw) != size:
        raise ValueError(f"request type {request_type} is {size} readable bytes, got {len(raw)}")
    return _flatten(request_layout(request_type, draft).parse(bytes(raw)))


def build_request(request_type: int, draft: str = "B", **fields: int | bytes) -> bytes:
    """Encode a request's readable part; omitted fields are zero (reserved bytes too).

    ATTACH_TABLE takes the table fields flat (``format=2, s1contextptr=...``) or, for an
    unknown format, ``descriptor=bytes``.
    """
    layout = request_layout(request_type, draft)
    obj: dict[str, Any] = {}
    table: dict[str, Any] = {}
    zero = layout.parse(_zero_request(request_type, draft, fields.get("format", 0)))
    for key, value in zero.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            table = {k: v for k, v in value.items() if not k.startswith("_")}
        elif key == "table":
            table = {"descriptor": value}
        else:
            obj[key] = value
    for key, value in fields.items():
        if key in obj:
            obj[key] = value
        elif key in table:
            table[key] = value
        else:
            raise ValueError(f"request type {request_type} has no field {key!r}")
    if request_type == RequestType.ATTACH_TABLE:
        obj["table"] = table.get("descriptor", table)
    obj.pop("type", None)
    try:
        return bytes(layout.build(obj))
    except ConstructError as exc:
        raise ValueError(str(exc)) from exc


def _zero_request(request_type: int, draft: str, table_format: Any) -> bytes:
    size = readable_size(request_type, draft)
    assert size is not None
    raw = bytearray(size)
    raw[0] = request_type
    if request_type == RequestType.ATTACH_TABLE:
        width = 1 if draft == "C" else 2
        raw[12 : 12 + width] = int(table_format).to_bytes(width, "little")
    return bytes(raw)


def build_tail(status: int) -> bytes:
    """The 4-byte tail with ``status`` and zeroed reserved bytes."""
    return bytes(TAIL.build({"status": status}))


def build_config(**fields: int) -> bytes:
    """Encode the 40-byte configuration space; omitted fields are zero."""
    values = dict.fromkeys(_CONFIG_FIELDS, 0)
    unknown = set(fields) - set(values)
    if unknown:
        raise ValueError(f"the config space has no field(s) {sorted(unknown)}")
    values.update(fields)
    return bytes(CONFIG.build(values))


def parse_config(raw: bytes) -> dict[str, int]:
    if len(raw) != CONFIG_SIZE:
        raise ValueError(f"the config space is {CONFIG_SIZE} bytes, got {len(raw)}")
    return {k: int(v) for k, v in CONFIG.parse(raw).items() if not k.startswith("_")}


_CONFIG_FIELDS = tuple(parse_config(bytes(CONFIG_SIZE)))


def build_resv_mem(subtype: int, start: int, end: int) -> bytes:
    """One RESV_MEM property, header included (24 bytes)."""
    return bytes(PROBE_RESV_MEM.build({"subtype": subtype, "start": start, "end": end}))


def parse_properties(area: bytes) -> list[dict[str, Any]]:
    """Walk a PROBE properties area as Linux does (§2.6).

    Each entry is ``{"type", "reserved", "length", "value"}``, with RESV_MEM values decoded
    (``subtype``, ``start``, ``end``). Stops at a NONE property or at the end of the area.
    """
    out: list[dict[str, Any]] = []
    pos = 0
    while pos + PROPERTY_HEADER_SIZE <= len(area):
        header = PROBE_PROPERTY_HEADER.parse(area[pos : pos + PROPERTY_HEADER_SIZE])
        ptype = int(header.type) & PROBE_TYPE_MASK
        if ptype == ProbeType.NONE:
            break
        length = int(header.length)
        value = bytes(area[pos + PROPERTY_HEADER_SIZE : pos + PROPERTY_HEADER_SIZE + length])
        entry: dict[str, Any] = {
            "type": ptype,
            "reserved": int(header.type) >> 12,
            "length": length,
            "value": value,
        }
        if ptype == ProbeType.RESV_MEM and length == RESV_MEM_SIZE - PROPERTY_HEADER_SIZE:
            resv = PROBE_RESV_MEM.parse(area[pos : pos + RESV_MEM_SIZE])
            entry.update(subtype=int(resv.subtype), start=int(resv.start), end=int(resv.end))
        out.append(entry)
        pos += PROPERTY_HEADER_SIZE + length
    return out


def build_fault(reason: int, flags: int, endpoint: int, address: int = 0, pasid: int = 0) -> bytes:
    """One 24-byte fault record."""
    return bytes(
        FAULT.build(
            {
                "reason": reason,
                "flags": flags,
                "endpoint": endpoint,
                "pasid": pasid,
                "address": address,
            }
        )
    )


def parse_fault(raw: bytes) -> dict[str, int]:
    if len(raw) != FAULT_SIZE:
        raise ValueError(f"a fault record is {FAULT_SIZE} bytes, got {len(raw)}")
    return {k: int(v) for k, v in FAULT.parse(raw).items() if not k.startswith("_")}
