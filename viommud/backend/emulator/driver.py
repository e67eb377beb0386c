"""What an IOMMU driver offers iommufd, and what iommufd offers it back.

``IommuDriver`` mirrors the iommufd-facing parts of ``struct iommu_ops``,
``struct iommu_domain_ops`` and ``struct iommufd_viommu_ops`` (``include/linux/iommu.h``,
``include/linux/iommufd.h``): hardware info, domain and vIOMMU allocation, attach rules,
cache invalidation and HW queues, plus the hooks through which the emulated caches see the
kernel's own invalidations. ``IommufdCore`` is the other direction: the few services of
the iommufd core a driver calls (the core passes itself), declared structurally so that
no driver imports the core. ``PhysicalIommuState`` is the per-unit state a driver keeps
(``struct arm_smmu_device`` / ``struct intel_iommu`` in the kernel).
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

from protocols import iommufd as uapi
from protocols.smmuv3 import Opcode
from viommud.backend.base import UserMemory
from viommud.backend.emulator.caches import CacheModel
from viommud.backend.emulator.objects import (
    ArmNestedData,
    DeviceObject,
    HwptNestedObject,
    HwptPagingObject,
    IommufdObject,
    MockNestedData,
    ViommuObject,
)
from viommud.backend.emulator.usercopy import ENOERR, PAGE_SIZE, IoctlError, UserArray, UserData
from viommud.host import PhysicalDevice, PhysicalIommu

__all__ = [
    "ADDR48",
    "KERNELS",
    "KERNEL_MAINLINE",
    "KERNEL_PENDING",
    "EntryFault",
    "IommuDriver",
    "IommufdCore",
    "PhysicalIommuState",
]

KERNEL_MAINLINE = "mainline"
KERNEL_PENDING = "pending"
KERNELS = (KERNEL_MAINLINE, KERNEL_PENDING)
ADDR48 = (1 << 48) - 1
HOST_CMD_SYNC = struct.pack("<QQ", Opcode.CMD_SYNC, 0)
# The host command queue and the VT-d flushes are history for tests (``testing.issued``,
# ``testing.vtd_flushes``); nothing decides on them. A session lives as long as its VM, so
# only the latest entries are kept (a ring, like the hardware queue itself).
ISSUED_HISTORY = 4096


@dataclass(slots=True)
class EntryFault:
    """An injected host failure of the ``IOMMU_HWPT_INVALIDATE`` entries that ``match``
    (the entry's bytes as the VMM passed them, before any kernel rewrite), for test code
    (``testing.inject_invalidate_error``). ``at`` says how the kernel fails: ``"entry"`` as
    a refused entry (ARM: ``arm_vsmmu_convert_user_cmd`` fails, EIO, ``entry_num`` is the
    entry's index and its 63-group's earlier entries never reach the queue; VT-d: the entry
    is refused, ``entry_num`` is its index, the earlier entries were carried out);
    ``"issue"`` (ARM only) as a failed issue of the 63-group holding it (the group reached
    the queue, ``entry_num`` is the group's last index). ``times`` failures, then it is
    spent (None: every time); ``hits`` counts them."""

    match: Callable[[bytes], bool]
    err: int
    at: Literal["entry", "issue"] = "entry"
    times: int | None = 1
    hits: int = 0

    def hit(self, entry: bytes) -> bool:
        """Whether ``entry`` fails now (a failure is counted)."""
        if self.times is not None and self.hits >= self.times:
            return False
        if not self.match(entry):
            return False
        self.hits += 1
        return True


@dataclass(slots=True)
class PhysicalIommuState:
    """What the emulator keeps per physical IOMMU: VMIDs, DIDs and the host command queue."""

    unit: PhysicalIommu
    vmids: set[int] = field(default_factory=set)
    dids: dict[int, int] = field(default_factory=dict)  # hwpt id -> VT-d domain ID
    cmdq: deque[bytes] = field(default_factory=lambda: deque(maxlen=ISSUED_HISTORY))
    pending_error: int = 0
    faults: list[EntryFault] = field(default_factory=list)

    def entry_fault(self, entry: bytes, at: str) -> int:
        """The errno an injected ``EntryFault`` gives ``entry`` failing ``at``, or 0."""
        for fault in self.faults:
            if fault.at == at and fault.hit(entry):
                return fault.err
        return 0

    def alloc_vmid(self) -> int:
        vmid = 1
        while vmid in self.vmids:
            vmid += 1
        if vmid >= 1 << 16:
            raise IoctlError(errno.ENOSPC)
        self.vmids.add(vmid)
        return vmid

    def did(self, hwpt_id: int) -> int:
        """The domain ID of ``hwpt_id`` on this unit, allocated on first use."""
        did = self.dids.get(hwpt_id)
        if did is None:
            used = set(self.dids.values())
            did = 1
            while did in used:
                did += 1
            self.dids[hwpt_id] = did
        return did

    def issue(self, commands: list[bytes]) -> int:
        """``arm_smmu_cmdq_issue_cmdlist(..., sync=true)``: the group plus a CMD_SYNC."""
        self.cmdq.extend(commands)
        self.cmdq.append(HOST_CMD_SYNC)
        err, self.pending_error = self.pending_error, 0
        return err


class IommufdCore(Protocol):
    """The services of the iommufd core that drivers use (``core`` in every driver hook)."""

    memory: UserMemory
    kernel: str
    cache_model: CacheModel

    def lookup(self, obj_id: int) -> IommufdObject | None: ...

    def unit(self, iommu_id: str) -> PhysicalIommuState: ...

    def units_of_model(self, model: str) -> list[str]: ...

    def viommu_device_ids(self, viommu: ViommuObject) -> set[int]: ...

    def vsid_to_device(self, viommu: ViommuObject, virt_id: int) -> DeviceObject | None: ...

    def vsid_to_pdev(self, viommu: ViommuObject, virt_id: int) -> PhysicalDevice | None: ...

    def attached_devices(
        self, hwpt: HwptPagingObject
    ) -> tuple[list[DeviceObject], list[DeviceObject]]: ...

    def apply_host_commands(self, iommu_id: str, commands: list[bytes]) -> None: ...

    def record_vtd_flush(self, hwpt: HwptNestedObject, inv: uapi.HwptVtdS1Invalidate) -> None: ...


class IommuDriver:
    """The kernel driver of one IOMMU model; the core calls these where the kernel does."""

    model: ClassVar[str]
    has_domain_alloc_nested: ClassVar[bool] = False
    pgsize: ClassVar[int] = PAGE_SIZE  # smallest page size of its paging domains
    aperture: ClassVar[tuple[int, int]] = (0, ADDR48)  # input range of its paging domains

    def dirty_capable(self, dev: DeviceObject) -> bool:
        return False

    def max_pasid_log2(self, dev: DeviceObject) -> int:
        """``ilog2(dev->iommu->max_pasids)`` for GET_HW_INFO; 0 without PASID support."""
        return 0

    def hw_info(self, core: IommufdCore, dev: DeviceObject, in_type: int) -> tuple[int, bytes]:
        """``ops->hw_info``: ``(out_data_type, data)``; EOPNOTSUPP for a foreign type."""
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - every driver has one

    def paging_alloc(
        self, core: IommufdCore, dev: DeviceObject, flags: int, data: UserData | None
    ) -> None:
        """``domain_alloc_paging_flags``: refuse what this driver cannot allocate."""
        if data is not None:
            raise IoctlError(errno.EOPNOTSUPP)

    def domain_alloc_nested(
        self,
        core: IommufdCore,
        dev: DeviceObject,
        parent: HwptPagingObject,
        flags: int,
        data: UserData,
    ) -> uapi.HwptVtdS1 | MockNestedData:
        raise IoctlError(errno.EOPNOTSUPP)

    def viommu_supported(self, viommu_type: int) -> bool:
        """``get_viommu_size`` != 0."""
        return False

    def viommu_init(
        self,
        core: IommufdCore,
        dev: DeviceObject,
        parent: HwptPagingObject,
        data: UserData | None,
    ) -> None:
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - guarded by viommu_supported

    def viommu_alloc_domain_nested(
        self, core: IommufdCore, viommu: ViommuObject, flags: int, data: UserData
    ) -> ArmNestedData | MockNestedData:
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - guarded by viommu_supported

    def paging_compatible(self, hwpt: HwptPagingObject, pdev: PhysicalDevice) -> bool:
        return hwpt.iommu == pdev.iommu

    def attach_paging(self, core: IommufdCore, dev: DeviceObject, hwpt: HwptPagingObject) -> int:
        return ENOERR if self.paging_compatible(hwpt, dev.pdev) else errno.EINVAL

    def attach_nested(self, core: IommufdCore, dev: DeviceObject, hwpt: HwptNestedObject) -> int:
        return errno.EINVAL  # pragma: no cover - overridden by every nesting driver

    def hwpt_cache_invalidate(
        self, core: IommufdCore, hwpt: HwptNestedObject, array: UserArray
    ) -> tuple[int, int] | None:
        """``domain->ops->cache_invalidate_user``; None when the op does not exist."""
        return None

    def viommu_cache_invalidate(
        self, core: IommufdCore, viommu: ViommuObject, array: UserArray
    ) -> tuple[int, int] | None:
        """``viommu->ops->cache_invalidate``; None when the op does not exist."""
        return None

    def hw_queue_supported(self, viommu: ViommuObject, queue_type: int) -> bool:
        """``get_hw_queue_size`` != 0."""
        return False

    def hw_queue_init(self, core: IommufdCore, viommu: ViommuObject, index: int) -> int:
        """``hw_queue_init_phys``: the id of the queue this one depends on (0: none)."""
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - guarded by hw_queue_supported

    # -- cache model hooks ---------------------------------------------------------------------
    def ats_enabled(self, dev: DeviceObject, hwpt: IommufdObject | None) -> bool:
        """Whether the device's ATS is on while attached to ``hwpt``."""
        return False

    def dma_tags(
        self, core: IommufdCore, dev: DeviceObject, hwpt: IommufdObject, asid: int
    ) -> tuple[int, int | None]:
        """``(tag, asid)`` of the IOTLB entries a DMA of ``dev`` creates (ValueError: none)."""
        raise ValueError(f"{self.model} devices have no modelled IOTLB")

    def attach_changed(
        self, core: IommufdCore, dev: DeviceObject, old: IommufdObject | None
    ) -> None:
        """The kernel's own invalidations when the device's domain changes."""

    def unmap_flush(self, core: IommufdCore, hwpt: HwptPagingObject, first: int, last: int) -> None:
        """The kernel's invalidations when ``[first, last]`` leaves the domain (IOAS_UNMAP)."""

    def domain_freed(self, core: IommufdCore, hwpt: HwptPagingObject) -> None:
        """The kernel's invalidations when a paging domain's tag (VMID, ASID) is released."""
