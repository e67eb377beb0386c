"""The one intermediate form every frontend produces (DESIGN.md point 2).

A frontend turns guest bytes into these values; nothing downstream of a frontend looks at
guest encodings again, except ``Invalidation.raw`` which carries the guest's own command for
backends whose uAPI takes guest commands verbatim (the ARM vIOMMU invalidation array).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Cache(enum.Flag):
    """Which caches an invalidation targets."""

    TLB = enum.auto()  # IOTLB / walk caches of the physical IOMMU
    DEVICE_TLB = enum.auto()  # ATS translation cache in the device (ATC / device-TLB)
    CONFIG = enum.auto()  # configuration caches (STE/CD, context / PASID entries)


class Scope(enum.Enum):
    """How much of the cache an invalidation covers."""

    ALL = "all"  # every entry of the VM (all ASIDs, all devices)
    ASID = "asid"  # every entry tagged with one ASID / PASID
    RANGE = "range"  # an address range, within one ASID or (asid None) all of them
    DEVICE = "device"  # one device (config and device-TLB invalidations)


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One guest invalidation, in the model's terms.

    ``index`` is the command's position in its doorbell. ``device`` is the guest's ID of the
    device for device-scoped work (vSID / source ID / endpoint ID). ``addr``/``size`` are bytes;
    ``size == 0`` means the whole scope. ``granule`` is the translation granule in bytes when
    the guest named one (0 otherwise). ``raw`` is the guest's encoding of the command.
    """

    index: int
    caches: Cache
    scope: Scope
    device: int | None = None
    asid: int | None = None
    addr: int = 0
    size: int = 0
    granule: int = 0
    leaf: bool = False
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class StreamTableInvalidated:
    """SMMUv3 CFGI_STE / CFGI_STE_RANGE / CFGI_ALL: the VMM re-reads the vSTEs of the
    stream IDs ``first``..``last`` (inclusive) as the hardware would at this point."""

    index: int
    first: int
    last: int
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Barrier:
    """A guest completion point (SMMUv3 CMD_SYNC, VT-d wait descriptor, virtio used buffer).

    Everything the guest issued before ``index`` must have completed on the host before the
    barrier is reported done."""

    index: int


@dataclass(frozen=True, slots=True)
class GuestError:
    """A command the emulated IOMMU refuses; ``code`` is the guest-visible status."""

    index: int
    code: str  # e.g. "CERROR_ILL"
    reason: str
    raw: bytes


Event = Invalidation | StreamTableInvalidated | Barrier | GuestError
