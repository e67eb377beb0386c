"""What the I/O layer tells a virtio-iommu frontend: offered features, the policy where
implementations disagree, and what it knows of each endpoint (virtio-iommu.md §1, §2.6)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocols.virtio_iommu import ResvMemSubtype
from viommud.frontends.compat import ARCHITECTURE

__all__ = ["AttachSameDomain", "DevicePolicy", "EndpointInfo", "ResvRegion", "VirtioFeatures"]


@dataclass(frozen=True, slots=True)
class ResvRegion:
    """One reserved region of an endpoint (a PROBE RESV_MEM property, §2.6), inclusive."""

    start: int
    end: int
    subtype: ResvMemSubtype = ResvMemSubtype.RESERVED


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """What the frontend knows of an endpoint (given by the I/O layer at device_attach)."""

    resv: tuple[ResvRegion, ...] = ()
    table_models: frozenset[str] = frozenset()  # host IOMMU models whose tables it can use
    host: bool = True  # False: an emulated endpoint with no physical device


@dataclass(frozen=True, slots=True)
class VirtioFeatures:
    """What this device offers (and a Linux-like driver accepts, §1.1)."""

    probe: bool = True
    mmio: bool = True
    bypass_config: bool = True
    legacy_bypass: bool = False  # F_BYPASS: superseded; not offered by default
    vsva: bool = False  # the draft F_ATTACH_TABLE: requests 6 and 7
    vsva_draft: str = "B"


class AttachSameDomain(enum.Enum):
    KEEP = "keep"  # spec reading: it already is attached; nothing changes (cloud-hypervisor)
    REATTACH = "reattach"  # QEMU: detach (a sole-endpoint domain dies) then attach again


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """Where implementations disagree: the specification's reading is the default."""

    attach_same_domain: AttachSameDomain = AttachSameDomain.KEEP
    unmap_reserved_inval: bool = False  # UNMAP reserved != 0: INVAL (MAY); default ignore
    check_domain_range: bool = True  # ATTACH to a domain outside domain_range: RANGE
    max_mappings: int = 1 << 20  # per domain; one more: NOMEM
    max_domains: int = 1 << 16  # one more: NOMEM
    # "architecture" (the specification's reading) or "qemu": the requests QEMU's
    # hw/virtio/virtio-iommu.c answers otherwise are answered as it does (virtio-iommu.md,
    # "Compatibility policy")
    compat: str = ARCHITECTURE
