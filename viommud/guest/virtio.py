"""Fast virtio-iommu request decoding: ``struct`` formats, one per request layout.

This is what the daemon runs on every request. The readable specification is the construct
declaration in ``protocols.virtio_iommu``; the formats below are written independently from
it (from virtio-iommu.md §2 and §5), and a parity test proves both decode every request
identically (``as_fields`` gives the construct helpers' flat dict). The numbers (request
types, table formats) are the protocol module's enums.

``decode(raw, draft)`` returns one frozen dataclass per request type, ``Unknown`` for a type
this device does not implement, or ``Malformed`` for a readable part of the wrong size. It
applies no rule: statuses are the frontend's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from protocols.virtio_iommu import RequestType, TableFormat, TableFormatC

__all__ = [
    "KIND_NAMES",
    "MAP_SIZE",
    "UNMAP_SIZE",
    "ArmPgtTable",
    "ArmPstTable",
    "ArmSteTable",
    "Attach",
    "AttachTable",
    "Decoded",
    "Detach",
    "Invalidate",
    "InvalidateA",
    "InvalidateB",
    "InvalidateC",
    "Malformed",
    "Map",
    "OpaqueTable",
    "Probe",
    "Table",
    "Unknown",
    "Unmap",
    "VtdTable",
    "as_fields",
    "decode",
    "kind_name",
    "request_type_of",
    "tail",
    "unpack_map",
    "unpack_unmap",
]

# head.type values (§2.1, §5) as module names: the comparisons below run per request
ATTACH = RequestType.ATTACH
DETACH = RequestType.DETACH
MAP = RequestType.MAP
UNMAP = RequestType.UNMAP
PROBE = RequestType.PROBE
ATTACH_TABLE = RequestType.ATTACH_TABLE
INVALIDATE = RequestType.INVALIDATE

KIND_NAMES: dict[int, str] = {t: t.name for t in RequestType}


def kind_name(request_type: int) -> str:
    """The report's name of a request type: ``ATTACH`` ... or ``type_0x09`` (docs/trace-format.md
    §3.2)."""
    return KIND_NAMES.get(request_type) or f"type_0x{request_type:02x}"


def request_type_of(raw: bytes) -> int:
    """``head.type`` of a request's readable part (§2.1); 0 for an empty one."""
    return raw[0] if raw else 0


# -- layouts (offsets in virtio-iommu.md §2 / §5) ------------------------------------------
_ATTACH = struct.Struct("<B3xIIII")  # type, domain, endpoint, flags, reserved
_DETACH = struct.Struct("<B3xII8x")  # type, domain, endpoint
_MAP = struct.Struct("<B3xIQQQI")  # type, domain, virt_start, virt_end, phys_start, flags
_UNMAP = struct.Struct("<B3xIQQI")  # type, domain, virt_start, virt_end, reserved
_PROBE = struct.Struct("<B3xI64x")  # type, endpoint
_TABLE_AB = struct.Struct("<B3xIIH")  # type, domain, endpoint, format (le16 @12)
_TABLE_C = struct.Struct("<B3xIIB")  # type, domain, endpoint, format (u8 @12)
_PST_ARM = struct.Struct("<BBQI48s")  # @14: s1fmt, s1dss, s1contextptr, s1cdmax, reserved
_PGT_ARM = struct.Struct("<HQQQQ28s")  # @14: asid, tcr, ttbr0, ttbr1, mair, reserved
_PGT_VTD = struct.Struct("<HQQI40s")  # @14: reserved0, vtd_flags, pgtbl_addr, addr_width, res.
_DESC_ARM = struct.Struct("<3sQQ92s")  # @13: reserved0, ste0, ste1, reserved
_DESC_VTD = struct.Struct("<3sQQI88s")  # @13: reserved0, vtd_flags, pgtbl_addr, addr_width, res.
_INV_A = struct.Struct("<B3xHHIIQQQB19s")
_INV_B = struct.Struct("<B3xHHHHIIIQQQB11s")
_INV_C = struct.Struct("<B3xBBHIIQQQB19s")

# MAP and UNMAP without a decoded value (the frontend's fast path; ``decode`` gives the same
# fields): (type, domain, virt_start, virt_end, phys_start, flags) and
# (type, domain, virt_start, virt_end, reserved)
MAP_SIZE = _MAP.size
UNMAP_SIZE = _UNMAP.size
unpack_map = _MAP.unpack
unpack_unmap = _UNMAP.unpack

TABLE_AB_SIZE = _TABLE_AB.size + 62  # 76
TABLE_C_SIZE = _TABLE_C.size + 111  # 124


# -- decoded requests ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Attach:
    domain: int
    endpoint: int
    flags: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Detach:
    domain: int
    endpoint: int


@dataclass(frozen=True, slots=True)
class Map:
    domain: int
    virt_start: int
    virt_end: int
    phys_start: int
    flags: int


@dataclass(frozen=True, slots=True)
class Unmap:
    domain: int
    virt_start: int
    virt_end: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Probe:
    endpoint: int


@dataclass(frozen=True, slots=True)
class ArmPstTable:
    """Drafts A/B, format 2: an SMMUv3 PASID (CD) table."""

    s1fmt: int
    s1dss: int
    s1contextptr: int
    s1cdmax: int
    reserved: bytes


@dataclass(frozen=True, slots=True)
class ArmPgtTable:
    """Drafts A/B, format 1: a single Arm LPAE page table."""

    asid: int
    tcr: int
    ttbr0: int
    ttbr1: int
    mair: int
    reserved: bytes


@dataclass(frozen=True, slots=True)
class VtdTable:
    """Drafts A/B format 4, draft C format 2 (viommud's layout): a VT-d first-stage table."""

    reserved0: int | bytes
    vtd_flags: int
    pgtbl_addr: int
    addr_width: int
    reserved: bytes


@dataclass(frozen=True, slots=True)
class ArmSteTable:
    """Draft C, format 1: the SMMUv3 STE words the guest would write."""

    reserved0: bytes
    ste0: int
    ste1: int
    reserved: bytes


@dataclass(frozen=True, slots=True)
class OpaqueTable:
    """A format this device does not know: the raw descriptor."""

    descriptor: bytes


Table = ArmPstTable | ArmPgtTable | VtdTable | ArmSteTable | OpaqueTable


@dataclass(frozen=True, slots=True)
class AttachTable:
    domain: int
    endpoint: int
    format: int
    table: Table


@dataclass(frozen=True, slots=True)
class InvalidateA:
    scope: int
    flags: int
    domain: int
    pasid: int
    id: int
    virt_start: int
    nr_pages: int
    granule: int
    reserved: bytes


@dataclass(frozen=True, slots=True)
class InvalidateB:
    inv_gran: int
    inv_type: int
    flags: int
    reserved1: int
    domain: int
    pasid: int
    reserved2: int
    archid: int
    virt_start: int
    nr_pages: int
    granule: int
    reserved3: bytes


@dataclass(frozen=True, slots=True)
class InvalidateC:
    scope: int
    caches: int
    flags: int
    domain: int
    pasid: int
    id: int
    address: int
    nr_pages: int
    page_size: int
    reserved: bytes


@dataclass(frozen=True, slots=True)
class Unknown:
    """A request type this device does not implement (or a draft type with vSVA off)."""

    type: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """A readable part whose length is not the type's: it cannot be parsed."""

    type: int
    length: int
    expected: int


Invalidate = InvalidateA | InvalidateB | InvalidateC
Decoded = Attach | Detach | Map | Unmap | Probe | AttachTable | Invalidate | Unknown | Malformed


def _size(request_type: int, draft: str) -> int:
    if request_type == ATTACH_TABLE:
        return TABLE_C_SIZE if draft == "C" else TABLE_AB_SIZE
    if request_type == INVALIDATE:
        return _INV_A.size
    return _SIZES[request_type]


_SIZES: dict[int, int] = {
    ATTACH: _ATTACH.size,
    DETACH: _DETACH.size,
    MAP: _MAP.size,
    UNMAP: _UNMAP.size,
    PROBE: _PROBE.size,
}


def decode(raw: bytes, draft: str = "B", *, vsva: bool = True) -> Decoded:
    """Decode one request's readable part; ``vsva=False`` makes types 6/7 unknown."""
    if not raw:
        return Malformed(0, 0, 4)
    request_type = raw[0]
    if request_type not in KIND_NAMES or (not vsva and request_type >= ATTACH_TABLE):
        return Unknown(request_type)
    expected = _size(request_type, draft)
    if len(raw) != expected:
        return Malformed(request_type, len(raw), expected)
    if request_type == MAP:
        _, domain, virt_start, virt_end, phys_start, flags = _MAP.unpack(raw)
        return Map(domain, virt_start, virt_end, phys_start, flags)
    if request_type == UNMAP:
        _, domain, virt_start, virt_end, reserved = _UNMAP.unpack(raw)
        return Unmap(domain, virt_start, virt_end, reserved)
    if request_type == ATTACH:
        _, domain, endpoint, flags, reserved = _ATTACH.unpack(raw)
        return Attach(domain, endpoint, flags, reserved)
    if request_type == DETACH:
        _, domain, endpoint = _DETACH.unpack(raw)
        return Detach(domain, endpoint)
    if request_type == PROBE:
        _, endpoint = _PROBE.unpack(raw)
        return Probe(endpoint)
    if request_type == ATTACH_TABLE:
        return _attach_table(raw, draft)
    if draft == "A":
        return InvalidateA(*_INV_A.unpack(raw)[1:])
    if draft == "B":
        return InvalidateB(*_INV_B.unpack(raw)[1:])
    return InvalidateC(*_INV_C.unpack(raw)[1:])


def _attach_table(raw: bytes, draft: str) -> AttachTable:
    table: Table
    if draft == "C":
        _, domain, endpoint, fmt = _TABLE_C.unpack_from(raw)
        body = raw[_TABLE_C.size :]
        if fmt == TableFormatC.ARM_SMMU3:
            table = ArmSteTable(*_DESC_ARM.unpack(body))
        elif fmt == TableFormatC.INTEL_PT:
            table = VtdTable(*_DESC_VTD.unpack(body))
        else:
            table = OpaqueTable(bytes(body))
        return AttachTable(domain, endpoint, fmt, table)
    _, domain, endpoint, fmt = _TABLE_AB.unpack_from(raw)
    body = raw[_TABLE_AB.size :]
    if fmt == TableFormat.ARM_SMMUV3_PST:
        table = ArmPstTable(*_PST_ARM.unpack(body))
    elif fmt == TableFormat.ARM_LPAE:
        table = ArmPgtTable(*_PGT_ARM.unpack(body))
    elif fmt == TableFormat.VTD:
        table = VtdTable(*_PGT_VTD.unpack(body))
    else:
        table = OpaqueTable(bytes(body))
    return AttachTable(domain, endpoint, fmt, table)


_TAILS = tuple(struct.pack("<B3x", status) for status in range(256))


def tail(status: int) -> bytes:
    """The 4-byte ``virtio_iommu_req_tail``: ``status``, then three zero reserved bytes."""
    return _TAILS[status]


_TYPES: dict[type, int] = {
    Attach: ATTACH,
    Detach: DETACH,
    Map: MAP,
    Unmap: UNMAP,
    Probe: PROBE,
    AttachTable: ATTACH_TABLE,
    InvalidateA: INVALIDATE,
    InvalidateB: INVALIDATE,
    InvalidateC: INVALIDATE,
}


def as_fields(decoded: Decoded) -> dict[str, int | bytes]:
    """The flat field dict ``protocols.virtio_iommu.parse_request`` gives for the same bytes."""
    out: dict[str, int | bytes] = {"type": _TYPES[type(decoded)]}
    for item in fields(decoded):
        value = getattr(decoded, item.name)
        if item.name == "table":
            for sub in fields(value):
                out[sub.name] = getattr(value, sub.name)
        else:
            out[item.name] = value
    return out
