"""An emulated iommufd: the kernel's /dev/iommu nested uAPI, errno for errno.

Reference: ``/work/shared/reference/iommufd.md`` ("§n" below). The model is mainline Linux
as described there (``kernel="pending"`` switches to the queued for-next behaviour of §2.7
and §3.6, see docs/backend.md); the VFIO cdev calls (bind / attach / detach) follow
``drivers/vfio/device_cdev.c`` and ``drivers/iommu/iommufd/device.c``; IOAS_MAP / UNMAP
follow ``ioas.c`` and ``io_pagetable.c``.

Layout, so that the next call or object kind has an obvious place:

* **size convention and copy rules** - ``copy_cmd_from_user`` (§0.2), ``copy_data_from_user``
  (§1.5), ``copy_array_entry`` (per-entry helper, §2.3) and ``copy_full_array`` (whole-array
  helper, §2.3). Every read of user memory goes through them; ``UserFault`` becomes EFAULT
  exactly there.
* **objects** - one class per iommufd object kind (``DeviceObject``, ``IoasObject``,
  ``HwptPagingObject``, ``HwptNestedObject``, ``ViommuObject``, ``VdeviceObject``,
  ``VeventqObject``, ``HwQueueObject``, ``FaultObject``, ``SelftestObject``). Each names the
  objects it keeps alive (``holds``), which is the whole reference graph of §0.3:
  IOMMU_DESTROY answers EBUSY while any live object (or open event fd) holds the target.
* **drivers** - ``ArmSmmuV3Driver`` and ``IntelVtdDriver`` play the IOMMU driver behind each
  physical IOMMU model (the kernel's ``iommu_ops`` / ``viommu_ops``): nested allocation, vSTE
  validation, attach rules, hardware info and cache invalidation. The selftest mock driver
  (§5) lives in ``viommud.backend.emulator.selftest`` and is loaded with ``selftest=True``.
* **the core** - ``EmulatedIommufd``: the ID space, the generic checks of each ioctl in
  kernel order and a dispatch dict per file kind (``_IOMMUFD_OPS`` for the iommufd,
  ``_DEVICE_OPS`` for device cdevs). A handler raises ``IoctlError`` where the kernel returns
  before writing anything back, and calls ``Call.respond`` where it copies the struct out.
* **caches** - ``viommud.backend.emulator.caches``: per physical IOMMU IOTLB and
  configuration caches and per device ATC / device TLB; every host invalidation (the ARM
  commands as issued on the host queue, the VT-d descriptors the kernel builds, and the
  kernel's own flushes at attach, IOAS_UNMAP and domain free) is applied there and journalled.

Deliberate choices where the reference leaves room are listed in ``NOTES`` below.
"""

from __future__ import annotations

import bisect
import errno
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt

from protocols import iommufd as uapi
from viommud.backend.base import UserFault, UserMemory
from viommud.backend.emulator.caches import (
    AtcEntry,
    CacheModel,
    CacheView,
    ConfigEntry,
    Removal,
    TlbEntry,
    granule_level_size,
    vtd_psi_mask,
)
from viommud.backend.emulator.usermem import EmulatedMemory
from viommud.host import HostConfig, PhysicalDevice, PhysicalIommu

__all__ = [
    "ARM_SMMUV3",
    "INTEL_VTD",
    "KERNEL_MAINLINE",
    "KERNEL_PENDING",
    "MOCK_IOMMU",
    "NOTES",
    "SELFTEST_MODEL",
    "Area",
    "ArmNestedData",
    "ArmSmmuV3Driver",
    "DeviceObject",
    "EmulatedIommufd",
    "FaultObject",
    "HwQueueObject",
    "HwptNestedObject",
    "HwptPagingObject",
    "IntelVtdDriver",
    "IoasObject",
    "IoctlError",
    "IommuDriver",
    "IommufdObject",
    "PhysicalIommuState",
    "SelftestObject",
    "UserArray",
    "UserData",
    "VdeviceObject",
    "VeventqObject",
    "ViommuObject",
    "VtdFlush",
    "copy_array_entry",
    "copy_cmd_from_user",
    "copy_data_from_user",
    "copy_full_array",
    "copy_struct_from_user",
]

ARM_SMMUV3 = "arm-smmuv3"
INTEL_VTD = "intel-vtd"
SELFTEST_MODEL = "iommufd-selftest"
MOCK_IOMMU = "iommufd-selftest"  # the one physical IOMMU of the mock devices
KERNEL_MAINLINE = "mainline"
KERNEL_PENDING = "pending"
KERNELS = (KERNEL_MAINLINE, KERNEL_PENDING)

NOTES = """\
Choices the reference leaves open, made here:
* Mainline by default; EmulatedIommufd(kernel="pending") switches the ARM vIOMMU
  invalidation to the queued for-next series (§2.7, §3.6), see docs/backend.md.
* Known iommufd ioctls that are not emulated (IOAS_ALLOW_IOVAS, IOAS_COPY, IOAS_IOVA_RANGES,
  OPTION, VFIO_IOAS, dirty tracking, IOAS_MAP_FILE, IOAS_CHANGE_PROCESS) answer ENOTTY, as
  does IOMMU_TEST_CMD unless the emulator is built with selftest=True (CONFIG_IOMMUFD_TEST).
* Emulated ARM and VT-d devices have no dirty-tracking capability (DIRTY_TRACKING:
  EOPNOTSUPP) and no PASID support on the VFIO side (ATTACH/DETACH with the PASID flag:
  EOPNOTSUPP); GET_HW_INFO reports out_max_pasid_log2 0 and no capabilities for them.
  Mock devices can track dirty pages unless created with MOCK_FLAGS_DEVICE_NO_DIRTY.
* Every emulated SMMU has FEAT_NESTING, S2FWB, range invalidation, ATS and coherent
  devices; every VT-d unit supports nesting. A VT-d paging domain may be attached by
  devices behind any VT-d unit (the units are identical, hence compatible); an ARM domain
  only by devices behind its own SMMU. GET_HW_INFO returns the fixed register values in
  ARM_HW_INFO / VTD_HW_INFO.
* ARM VMIDs belong to the nesting-parent stage-2 HWPT, as in mainline (arm_vsmmu_init takes
  the parent's VMID): allocated per physical SMMU, lowest free from 1, when the
  NEST_PARENT HWPT is created on an SMMU, released when it is destroyed. Every vIOMMU on
  that parent uses it. Other ARM paging domains are stage-1 domains with a host ASID
  (one ASID space shared by all SMMUs, lowest free from 1). Freeing a VMID flushes it
  (TLBI_S12_VMALL), freeing an ASID flushes it (TLBI_NH_ASID).
* VT-d domain IDs are allocated per unit, lowest free from 1, when the first device behind
  that unit attaches a domain, and released when the last one leaves; a nested domain is
  attached on PASID 0 (RID), so its IOTLB entries are tagged (DID, PASID 0).
* The ARM vIOMMU command array is refused with ENOMEM when entry_num * 16 exceeds 4 MiB
  (kcalloc's KMALLOC_MAX_SIZE with 4 KiB pages); the mock vIOMMU likewise at 12 bytes.
* VIOMMU_ALLOC driver data (data_len/data_uptr) is ignored for ARM_SMMUV3 (no copy).
* VFIO structures follow the classic argsz rule: minsz bytes are read, argsz < minsz is
  EINVAL, bytes past minsz are never checked (no E2BIG); only out fields are written back.
* inject_cmdq_error(): the failing group reached the queue (it is in issued() and its
  commands took effect on the caches) and the call reports e-1 (§3.4).
* VT-d invalidations are recorded as VtdFlush entries (vtd_flushes()), one per entry.
  npages 0 (not rejected by the kernel) flushes the one page at addr: the kernel's range
  arithmetic rounds 0 pages up to 1 on x86 (reference §7 calls the effect unspecified).
* Attaching to an IOAS is emulated (not refused): a compatible auto domain on that IOAS is
  reused, else a new HWPT_PAGING (auto_domain) is created and its id written back to pt_id;
  it is destroyed when its last device leaves, as iommufd_hw_pagetable_put does.
* A mixed host (ARM and VT-d units): a domain of one driver attached by a device of the
  other is EINVAL (domain owner mismatch); an ARM vIOMMU on a VT-d parent is EINVAL.
* Tombstoned vDEVICE ids are not objects: live_objects() omits them (tombstones() lists
  them); close() forgets them.
* Device fds: before BIND every other request is EINVAL; once bound, requests other than
  ATTACH/DETACH are ENOTTY (vfio-pci does not know them). close_device() of an unknown fd
  raises OSError(EBADF).
* IOAS: no device reserved regions (no SW_MSI window) are modelled; domain apertures are
  (ARM, VT-d: 48-bit input addresses; mock: MOCK_APERTURE_START..LAST). Pinning user pages
  (IOAS_MAP into an IOAS with a domain, HWPT_PAGING creation on a populated IOAS, HW queue
  pinning) checks that [user_va, user_va + length) is mapped in the emulated user memory:
  EFAULT otherwise. Pages are physically contiguous (HW_QUEUE never EFAULT for contiguity).
* Kernel-internal invalidations (attach/replace/detach, IOAS_UNMAP, VMID/ASID/DID release)
  are applied to the caches and journalled with a "kernel:" cause; they are not added to
  issued(), which lists what HWPT_INVALIDATE calls put on the host queue.
* Event fds (vEVENTQ, FAULT) are numbered like device fds; read()/write()/close_fd() stand
  for read(2)/write(2)/close(2) on them and answer (errno, data). close() closes them too.
* FAULT response cookies are allocated lowest free from 1; TRIGGER_IOPF reports one fault
  group of one fault with LAST_PAGE, and PASID_VALID when pasid != 0; it is dropped (the
  call still succeeds) when the device's domain has no FAULT object.
* The mock driver is the version of iommufd.md §5: iommu_hwpt_selftest is 4 bytes,
  iommu_viommu_selftest 8 bytes (no mmap fields); IOMMU_TEST_CMD ops other than
  MOCK_DOMAIN(_FLAGS), MOCK_DOMAIN_REPLACE, MD_CHECK_IOTLB, DEV_CHECK_CACHE,
  TRIGGER_VEVENT and TRIGGER_IOPF answer EOPNOTSUPP.
"""

ENOERR = 0
U64_MAX = (1 << 64) - 1
INT_MAX = (1 << 31) - 1
KMALLOC_MAX_SIZE = 4 << 20
ARM_CMD_BATCH = 63  # CMDQ_BATCH_ENTRIES - 1 commands per host CMD_SYNC (§3.4)
HOST_CMD_SYNC = struct.pack("<QQ", 0x46, 0)
_U32 = struct.Struct("<I")
_QQ = struct.Struct("<QQ")
PAGE_SIZE = 4096
ADDR48 = (1 << 48) - 1


class IoctlError(Exception):
    """Internal: a call fails with ``errno`` and nothing is written back."""

    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


S = TypeVar("S", bound=uapi.UapiStruct)

# ======================================================================================
# Copy rules (§0.2, §1.5, §2.3)
# ======================================================================================


def copy_cmd_from_user(arg: bytearray, cls: type[S]) -> tuple[S, int]:
    """The iommufd dispatch: read ``size``, check ``MIN_SIZE``, ``copy_struct_from_user``.

    ``arg`` is the user memory at the ioctl argument: bytes past ``len(arg)`` are unmapped.
    Returns the zero-filled structure and the user's ``size``.
    """
    if len(arg) < 4:
        raise IoctlError(errno.EFAULT)
    (user_size,) = _U32.unpack_from(arg)
    if user_size < cls.MIN_SIZE:
        raise IoctlError(errno.EINVAL)
    ksize = cls.FORMAT.size
    if user_size > ksize:
        tail = arg[ksize:user_size]
        if tail.count(0) != len(tail):
            raise IoctlError(errno.E2BIG)
        if user_size > len(arg):
            raise IoctlError(errno.EFAULT)
    n = min(user_size, ksize)
    if n > len(arg):
        raise IoctlError(errno.EFAULT)
    return uapi.decode(cls, arg[:n]), user_size


def check_zeroed_user(memory: UserMemory, addr: int, size: int) -> int:
    """``check_zeroed_user``: 0 when all zero, E2BIG at a non-zero byte, EFAULT at a hole."""
    pos, end = addr, addr + size
    while pos < end:
        stop = min(end, (pos // PAGE_SIZE + 1) * PAGE_SIZE)
        try:
            chunk = memory.read(pos, stop - pos)
        except UserFault:
            for byte_addr in range(pos, stop):
                try:
                    if memory.read(byte_addr, 1) != b"\0":
                        return errno.E2BIG
                except UserFault:
                    return errno.EFAULT
            return errno.EFAULT  # pragma: no cover - the chunk read faulted somewhere
        if chunk.count(0) != len(chunk):
            return errno.E2BIG
        pos = stop
    return ENOERR


def copy_struct_from_user(memory: UserMemory, cls: type[S], addr: int, user_size: int) -> S:
    """``copy_struct_from_user(kernel_size, user_size)`` from user memory (§0.2 step 4)."""
    ksize = cls.FORMAT.size
    if user_size > ksize:
        rc = check_zeroed_user(memory, addr + ksize, user_size - ksize)
        if rc:
            raise IoctlError(rc)
    try:
        raw = memory.read(addr, min(user_size, ksize))
    except UserFault:
        raise IoctlError(errno.EFAULT) from None
    return uapi.decode(cls, raw)


@dataclass(frozen=True, slots=True)
class UserData:
    """``struct iommu_user_data``: typed driver data behind a user pointer."""

    type: int
    uptr: int
    len: int


@dataclass(frozen=True, slots=True)
class UserArray:
    """``struct iommu_user_data_array``: the invalidation array of HWPT_INVALIDATE."""

    type: int
    uptr: int
    entry_len: int
    entry_num: int


def copy_data_from_user(
    memory: UserMemory, cls: type[S], data: UserData, data_type: int, min_len: int
) -> S:
    """``iommu_copy_struct_from_user`` (§1.5): EINVAL type / length, EFAULT bad pointer."""
    if data.type != data_type:
        raise IoctlError(errno.EINVAL)
    if data.len < min_len or data.len > cls.FORMAT.size:
        raise IoctlError(errno.EINVAL)
    return copy_struct_from_user(memory, cls, data.uptr, data.len)


def copy_array_entry(
    memory: UserMemory, cls: type[S], array: UserArray, data_type: int, *, index: int, min_len: int
) -> S:
    """``iommu_copy_struct_from_user_array``: entry ``index`` alone, rules of §1.5 (§2.3)."""
    if index >= array.entry_num or not array.entry_num:
        raise IoctlError(errno.EINVAL)
    entry = UserData(array.type, array.uptr + array.entry_len * index, array.entry_len)
    return copy_data_from_user(memory, cls, entry, data_type, min_len)


def copy_full_array(memory: UserMemory, cls: type[S], array: UserArray, data_type: int) -> list[S]:
    """``iommu_copy_struct_from_full_user_array`` (§2.3): all entries or nothing.

    Short entries are zero-filled, long ones accepted when the extra bytes are zero (E2BIG
    otherwise); a fault anywhere is EFAULT.
    """
    if array.type != data_type:
        raise IoctlError(errno.EINVAL)
    if not array.entry_num:
        raise IoctlError(errno.EINVAL)
    if array.entry_len == cls.FORMAT.size:
        try:
            blob = memory.read(array.uptr, array.entry_num * array.entry_len)
        except UserFault:
            raise IoctlError(errno.EFAULT) from None
        return _decode_entries(cls, blob)
    return [
        copy_struct_from_user(memory, cls, array.uptr + array.entry_len * i, array.entry_len)
        for i in range(array.entry_num)
    ]


def _decode_entries(cls: type[S], blob: bytes) -> list[S]:
    """A packed array of ``cls`` entries (``entry_len`` == the struct size) decoded."""
    return [uapi.decode(cls, raw) for raw in _chunks(blob, cls.FORMAT.size)]


def _chunks(blob: bytes, size: int) -> Iterator[bytes]:
    for off in range(0, len(blob), size):
        yield blob[off : off + size]


# ======================================================================================
# Objects (§0.3)
# ======================================================================================


class IommufdObject:
    """One entry of the iommufd's ID space."""

    __slots__ = ()

    KIND: ClassVar[str]
    id: int

    def holds(self) -> tuple[int, ...]:
        """IDs of the objects this one keeps alive (the §0.3 reference graph)."""
        return ()


@dataclass(eq=False, slots=True)
class DeviceObject(IommufdObject):
    """A physical device bound with VFIO_DEVICE_BIND_IOMMUFD; busy while bound.

    Mock devices (selftest) have ``fd`` -1 and are owned by a ``SelftestObject``.
    """

    KIND: ClassVar[str] = "DEVICE"
    id: int
    pdev: PhysicalDevice
    fd: int
    hwpt_id: int = 0  # the HWPT the device is attached to (0: none)
    vdevice_id: int = 0  # its vDEVICE (at most one, on any vIOMMU)
    mock_flags: int = 0
    mock_cache: list[int] | None = None  # the selftest device cache (§5.2)

    def holds(self) -> tuple[int, ...]:
        return (self.hwpt_id,) if self.hwpt_id else ()


@dataclass(eq=False, slots=True)
class Area:
    """One IOAS_MAP'ed range of an IOAS (``struct iopt_area``)."""

    iova: int
    length: int
    user_va: int
    prot: int  # IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
    locks: int = 0  # HW queues pinning it (IOAS_UNMAP gives EBUSY while > 0)

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


@dataclass(eq=False, slots=True)
class IoasObject(IommufdObject):
    """An IO address space (the stage-2 / host IOVA space, §1.2) and its areas."""

    KIND: ClassVar[str] = "IOAS"
    id: int
    areas: list[Area] = field(default_factory=list)  # sorted by iova, never overlapping
    _starts: list[int] = field(default_factory=list)  # areas[i].iova, for bisection

    def areas_in(self, first: int, last: int) -> list[Area]:
        """The areas meeting ``[first, last]``, lowest first (O(log n + found)): areas do
        not overlap, so sorted by start they are sorted by end as well."""
        areas = self.areas
        hi = bisect.bisect_right(self._starts, last)
        lo = hi
        while lo and areas[lo - 1].last >= first:
            lo -= 1
        return areas[lo:hi]

    def insert(self, area: Area) -> None:
        index = bisect.bisect_right(self._starts, area.iova)
        self._starts.insert(index, area.iova)
        self.areas.insert(index, area)

    def remove(self, area: Area) -> None:
        index = bisect.bisect_left(self._starts, area.iova)
        assert self.areas[index] is area
        del self._starts[index]
        del self.areas[index]


@dataclass(frozen=True, eq=False, slots=True)
class HwptPagingObject(IommufdObject):
    """A kernel-managed page table on an IOAS (§1.4); ``vmid`` for ARM stage-2 parents.

    ``asid`` is the host ASID of an ARM stage-1 paging domain (not a nesting parent).
    """

    KIND: ClassVar[str] = "HWPT_PAGING"
    id: int
    ioas_id: int
    iommu: str  # the physical IOMMU the domain was allocated for
    model: str
    nest_parent: bool = False
    auto_domain: bool = False
    vmid: int = 0
    asid: int = 0
    dirty: bool = False
    fault_id: int = 0

    def holds(self) -> tuple[int, ...]:
        return (self.ioas_id, self.fault_id) if self.fault_id else (self.ioas_id,)


@dataclass(frozen=True, slots=True)
class ArmNestedData:
    """A validated vSTE (§3.1): EATS removed, V=0 zeroed; ``config`` 0/4/5."""

    ste0: int
    ste1: int
    config: int
    enable_ats: bool


@dataclass(eq=False, slots=True)
class MockNestedData:
    """A selftest nested domain (§5.2): its four mock IOTLB entries."""

    iotlb: list[int]


@dataclass(frozen=True, eq=False, slots=True)
class HwptNestedObject(IommufdObject):
    """A user-managed stage-1 (§1.4/§1.5) on an HWPT_PAGING parent or on a vIOMMU."""

    KIND: ClassVar[str] = "HWPT_NESTED"
    id: int
    parent_id: int  # the nesting-parent HWPT_PAGING (through the vIOMMU if any)
    viommu_id: int  # 0 when allocated directly on the parent
    iommu: str
    model: str
    data: ArmNestedData | uapi.HwptVtdS1 | MockNestedData
    fault_id: int = 0

    def holds(self) -> tuple[int, ...]:
        own = (self.viommu_id,) if self.viommu_id else (self.parent_id,)
        return (*own, self.fault_id) if self.fault_id else own


@dataclass(eq=False, slots=True)
class ViommuObject(IommufdObject):
    """A vIOMMU (§1.6): its nesting parent, VMID and ``virt_id -> vDEVICE id`` table."""

    KIND: ClassVar[str] = "VIOMMU"
    id: int
    type: int
    iommu: str
    parent_id: int
    vmid: int
    vdevs: dict[int, int] = field(default_factory=dict)
    hw_queues: dict[int, int] = field(default_factory=dict)  # index -> HW_QUEUE id

    def holds(self) -> tuple[int, ...]:
        return (self.parent_id,)


@dataclass(frozen=True, eq=False, slots=True)
class VdeviceObject(IommufdObject):
    """A device as the guest names it on one vIOMMU (§1.7)."""

    KIND: ClassVar[str] = "VDEVICE"
    id: int
    viommu_id: int
    dev_id: int
    virt_id: int

    def holds(self) -> tuple[int, ...]:
        return (self.viommu_id,)


@dataclass(eq=False, slots=True)
class Vevent:
    """One queued vEVENT record; ``lost`` marks the lost-events header (no payload)."""

    lost: bool
    sequence: int
    payload: bytes = b""


@dataclass(eq=False, slots=True)
class VeventqObject(IommufdObject):
    """A vEVENTQ (§1.8): at most ``depth`` events, then one lost-events header."""

    KIND: ClassVar[str] = "VEVENTQ"
    id: int
    viommu_id: int
    type: int
    depth: int
    deliver: list[Vevent] = field(default_factory=list)
    num_events: int = 0
    sequence: int = 0

    def holds(self) -> tuple[int, ...]:
        return (self.viommu_id,)

    def report(self, payload: bytes) -> None:
        """``iommufd_viommu_report_event`` + ``iommufd_vevent_handler``."""
        if self.num_events == self.depth:
            event = Vevent(True, 0)
        else:
            event = Vevent(False, 0, payload)
            self.num_events += 1
        if self.deliver and self.deliver[-1].lost:
            del self.deliver[-1]  # the lost-events header only ever sits at the tail
        event.sequence = self.sequence
        self.sequence = (self.sequence + 1) & INT_MAX
        self.deliver.append(event)

    def read(self, count: int) -> bytes:
        """``iommufd_veventq_fops_read``: whole records that fit, oldest first."""
        out = bytearray()
        while self.deliver:
            cur = self.deliver[0]
            room = count - len(out)
            if room < 8 or (not cur.lost and 8 + len(cur.payload) > room):
                break
            del self.deliver[0]
            flags = uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS if cur.lost else 0
            out += uapi.encode(uapi.VeventHeader(flags, cur.sequence)) + cur.payload
            if not cur.lost:
                self.num_events -= 1
        return bytes(out)


@dataclass(eq=False, slots=True)
class HwQueueObject(IommufdObject):
    """A HW queue (§1.9): pins its guest queue pages in the parent's IOAS."""

    KIND: ClassVar[str] = "HW_QUEUE"
    id: int
    viommu_id: int
    type: int
    index: int
    base_addr: int
    length: int
    prev_id: int = 0  # the mock's queue index - 1, destroyed after this one
    pinned: list[Area] = field(default_factory=list)

    def holds(self) -> tuple[int, ...]:
        return (self.viommu_id, self.prev_id) if self.prev_id else (self.viommu_id,)


@dataclass(eq=False, slots=True)
class FaultObject(IommufdObject):
    """A FAULT queue (§1.10): fault groups to read, cookies awaiting a response."""

    KIND: ClassVar[str] = "FAULT"
    id: int
    deliver: list[list[uapi.HwptPgfault]] = field(default_factory=list)
    response: dict[int, list[uapi.HwptPgfault]] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class SelftestObject(IommufdObject):
    """IOMMUFD_OBJ_SELFTEST: owns a mock device; destroying it unbinds the device."""

    KIND: ClassVar[str] = "SELFTEST"
    id: int
    dev_id: int


HwptObject = HwptPagingObject | HwptNestedObject


@dataclass(frozen=True, slots=True)
class VtdFlush:
    """One VT-d stage-1 invalidation that was carried out (§4.2, §4.3)."""

    hwpt_id: int
    addr: int
    npages: int
    leaf: bool
    iommus: tuple[str, ...]  # physical units of the devices attached at that moment


@dataclass(slots=True)
class PhysicalIommuState:
    """What the emulator keeps per physical IOMMU: VMIDs, DIDs and the host command queue."""

    unit: PhysicalIommu
    vmids: set[int] = field(default_factory=set)
    dids: dict[int, int] = field(default_factory=dict)  # hwpt id -> VT-d domain ID
    cmdq: list[bytes] = field(default_factory=list)
    pending_error: int = 0

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


@dataclass(slots=True)
class DeviceFile:
    """An open VFIO cdev; ``dev_id`` is set once bound to the iommufd."""

    fd: int
    pdev: PhysicalDevice
    dev_id: int = 0


@dataclass(slots=True)
class EventFile:
    """An anonymous fd of a vEVENTQ or FAULT object; it holds the object while open."""

    fd: int
    obj_id: int


# ======================================================================================
# Drivers (the per-model parts of the kernel)
# ======================================================================================

# vSTE fields (§3.1)
STE0_V = 1 << 0
STE0_CFG_SHIFT, STE0_CFG_MASK = 1, 0x7
STE0_NESTING_ALLOWED = 0xF80F_FFFF_FFFF_FFFF
STE1_NESTING_ALLOWED = 0x0000_0000_3800_00FF
STE1_EATS_SHIFT, STE1_EATS_MASK = 28, 0x3
STE_CFG_ABORT, STE_CFG_BYPASS, STE_CFG_S1_TRANS = 0, 4, 5
STE_EATS_ABT, STE_EATS_TRANS = 0, 1

# Command fields (§3.3)
CMDQ_0_OP = 0xFF
CMDQ_TLBI_0_VMID = 0xFFFF << 32
CMDQ_CFGI_0_SID = 0xFFFF_FFFF << 32
OP_CFGI_CD, OP_CFGI_CD_ALL = 0x05, 0x06
OP_TLBI_NH_ALL, OP_TLBI_NH_ASID, OP_TLBI_NH_VA, OP_TLBI_NH_VAA = 0x10, 0x11, 0x12, 0x13
OP_TLBI_NSNH_ALL = 0x30
OP_ATC_INV = 0x40
_TLBI_NH_OPS = frozenset({OP_TLBI_NH_ALL, OP_TLBI_NH_ASID, OP_TLBI_NH_VA, OP_TLBI_NH_VAA})
_SID_OPS = frozenset({OP_ATC_INV, OP_CFGI_CD, OP_CFGI_CD_ALL})

# The vectorised mainline walk (§3.3, §3.4): opcodes it converts (those whose rewrite is the
# VMID alone and can never fail), indexed by the opcode byte.
ARM_CMD_SIZE = 16  # struct iommu_viommu_arm_smmuv3_invalidate: two le64 words (§3.3)
_VMID_OPS = np.zeros(256, dtype=np.bool_)
_VMID_OPS[[*_TLBI_NH_OPS, OP_TLBI_NSNH_ALL]] = True
_LE64 = np.dtype("<u8")
_CMD_BYTES = np.dtype((np.void, ARM_CMD_SIZE))  # one whole command, for .tolist() -> bytes
_KEEP_ALL_BUT_VMID = np.uint64(~CMDQ_TLBI_0_VMID & U64_MAX)

# Field masks of the pending series' strict validation (§3.6): what each opcode may set.
_W0_VMID = 0xFFFF << 32
_W0_ASID = 0xFFFF << 48
_W0_NUM_SCALE = (0x1F << 12) | (0x1F << 20)
_W0_SID = 0xFFFF_FFFF << 32
_W0_SSID = 0xFFFFF << 12
_W0_SSV, _W0_GLOBAL = 1 << 11, 1 << 9
_W1_ADDR = 0xFFFF_FFFF_FFFF_F000
_W1_LEAF, _W1_TTL, _W1_TG = 1, 0x3 << 8, 0x3 << 10
_STRICT_FIELDS: dict[int, tuple[int, int]] = {
    OP_TLBI_NSNH_ALL: (0xFF, 0),
    OP_TLBI_NH_ALL: (0xFF | _W0_VMID, 0),
    OP_TLBI_NH_ASID: (0xFF | _W0_VMID | _W0_ASID, 0),
    OP_TLBI_NH_VA: (
        0xFF | _W0_VMID | _W0_ASID | _W0_NUM_SCALE,
        _W1_ADDR | _W1_LEAF | _W1_TTL | _W1_TG,
    ),
    OP_TLBI_NH_VAA: (0xFF | _W0_VMID | _W0_NUM_SCALE, _W1_ADDR | _W1_LEAF | _W1_TTL | _W1_TG),
    OP_ATC_INV: (0xFF | _W0_SID | _W0_SSID | _W0_SSV | _W0_GLOBAL, _W1_ADDR | 0x3F),
    OP_CFGI_CD: (0xFF | _W0_SID | _W0_SSID, _W1_LEAF),
    OP_CFGI_CD_ALL: (0xFF | _W0_SID, 0),
}

# GET_HW_INFO register values of the emulated units (NOTES)
ARM_HW_INFO = uapi.HwInfoArmSmmuv3(
    flags=0,
    # S2P S1P TTF=AArch64 COHACC ATS ASID16 MSI SEV VMID16 CD2L STALL_MODEL=1 ST_LEVEL=2lvl
    idr0=0x1
    | 0x2
    | (2 << 2)
    | (1 << 4)
    | (1 << 10)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 18)
    | (1 << 19)
    | (1 << 24)
    | (1 << 27),
    idr1=16 | (20 << 6) | (19 << 16) | (19 << 21),  # SIDSIZE 16, SSIDSIZE 20, EVTQ/CMDQ 2^19
    idr2=0,
    idr3=(1 << 8) | (1 << 10),  # FWB, RIL
    idr4=0,
    idr5=5 | (1 << 4) | (1 << 5) | (1 << 6),  # OAS 48 bits, 4K/16K/64K granules
    iidr=0,
    aidr=2,  # SMMUv3.2
)
VTD_CAP_MAMV = 18
VTD_HW_INFO = uapi.HwInfoVtd(
    flags=0,
    # ND=64K domains, SAGAW 4-level, MGAW 48, SLLPS 2M/1G, PSI, MAMV, DWD, DRD, FL1GP
    cap_reg=6
    | (0x4 << 8)
    | (47 << 16)
    | (0x3 << 34)
    | (1 << 39)
    | (VTD_CAP_MAMV << 48)
    | (1 << 54)
    | (1 << 55)
    | (1 << 56),
    # C QI DT IR EIM PT SC NEST PSS=19 PASID SMTS SLTS FLTS SMPWCS
    ecap_reg=1
    | (1 << 1)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 6)
    | (1 << 7)
    | (1 << 26)
    | (19 << 35)
    | (1 << 40)
    | (1 << 43)
    | (1 << 46)
    | (1 << 47)
    | (1 << 48),
)


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

    def hw_info(self, core: EmulatedIommufd, dev: DeviceObject, in_type: int) -> tuple[int, bytes]:
        """``ops->hw_info``: ``(out_data_type, data)``; EOPNOTSUPP for a foreign type."""
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - every driver has one

    def paging_alloc(
        self, core: EmulatedIommufd, dev: DeviceObject, flags: int, data: UserData | None
    ) -> None:
        """``domain_alloc_paging_flags``: refuse what this driver cannot allocate."""
        if data is not None:
            raise IoctlError(errno.EOPNOTSUPP)

    def domain_alloc_nested(
        self,
        core: EmulatedIommufd,
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
        core: EmulatedIommufd,
        dev: DeviceObject,
        parent: HwptPagingObject,
        data: UserData | None,
    ) -> None:
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - guarded by viommu_supported

    def viommu_alloc_domain_nested(
        self, core: EmulatedIommufd, viommu: ViommuObject, flags: int, data: UserData
    ) -> ArmNestedData | MockNestedData:
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - guarded by viommu_supported

    def paging_compatible(self, hwpt: HwptPagingObject, pdev: PhysicalDevice) -> bool:
        return hwpt.iommu == pdev.iommu

    def attach_paging(
        self, core: EmulatedIommufd, dev: DeviceObject, hwpt: HwptPagingObject
    ) -> int:
        return ENOERR if self.paging_compatible(hwpt, dev.pdev) else errno.EINVAL

    def attach_nested(
        self, core: EmulatedIommufd, dev: DeviceObject, hwpt: HwptNestedObject
    ) -> int:
        return errno.EINVAL  # pragma: no cover - overridden by every nesting driver

    def hwpt_cache_invalidate(
        self, core: EmulatedIommufd, hwpt: HwptNestedObject, array: UserArray
    ) -> tuple[int, int] | None:
        """``domain->ops->cache_invalidate_user``; None when the op does not exist."""
        return None

    def viommu_cache_invalidate(
        self, core: EmulatedIommufd, viommu: ViommuObject, array: UserArray
    ) -> tuple[int, int] | None:
        """``viommu->ops->cache_invalidate``; None when the op does not exist."""
        return None

    def hw_queue_supported(self, viommu: ViommuObject, queue_type: int) -> bool:
        """``get_hw_queue_size`` != 0."""
        return False

    def hw_queue_init(self, core: EmulatedIommufd, viommu: ViommuObject, index: int) -> int:
        """``hw_queue_init_phys``: the id of the queue this one depends on (0: none)."""
        raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - guarded by hw_queue_supported

    # -- cache model hooks ---------------------------------------------------------------------
    def ats_enabled(self, dev: DeviceObject, hwpt: IommufdObject | None) -> bool:
        """Whether the device's ATS is on while attached to ``hwpt``."""
        return False

    def dma_tags(
        self, core: EmulatedIommufd, dev: DeviceObject, hwpt: IommufdObject, asid: int
    ) -> tuple[int, int | None]:
        """``(tag, asid)`` of the IOTLB entries a DMA of ``dev`` creates (ValueError: none)."""
        raise ValueError(f"{self.model} devices have no modelled IOTLB")

    def attach_changed(
        self, core: EmulatedIommufd, dev: DeviceObject, old: IommufdObject | None
    ) -> None:
        """The kernel's own invalidations when the device's domain changes."""

    def unmap_flush(
        self, core: EmulatedIommufd, hwpt: HwptPagingObject, first: int, last: int
    ) -> None:
        """The kernel's invalidations when ``[first, last]`` leaves the domain (IOAS_UNMAP)."""

    def domain_freed(self, core: EmulatedIommufd, hwpt: HwptPagingObject) -> None:
        """The kernel's invalidations when a paging domain's tag (VMID, ASID) is released."""


class ArmSmmuV3Driver(IommuDriver):
    """arm-smmu-v3 with its iommufd vIOMMU (§3): nesting only through a vIOMMU."""

    model: ClassVar[str] = ARM_SMMUV3

    def __init__(self, *, fast_invalidate: bool = True) -> None:
        # False: every mainline vIOMMU invalidation takes the per-entry reference walk
        self.fast_invalidate = fast_invalidate

    def hw_info(self, core: EmulatedIommufd, dev: DeviceObject, in_type: int) -> tuple[int, bytes]:
        if in_type not in (uapi.IOMMU_HW_INFO_TYPE_NONE, uapi.IOMMU_HW_INFO_TYPE_ARM_SMMUV3):
            raise IoctlError(errno.EOPNOTSUPP)
        return uapi.IOMMU_HW_INFO_TYPE_ARM_SMMUV3, bytes(uapi.encode(ARM_HW_INFO))

    def viommu_supported(self, viommu_type: int) -> bool:
        return viommu_type == uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3

    def viommu_init(
        self,
        core: EmulatedIommufd,
        dev: DeviceObject,
        parent: HwptPagingObject,
        data: UserData | None,
    ) -> None:
        # arm_vsmmu_init: the stage-2 parent must live on the device's SMMU
        if parent.model != ARM_SMMUV3 or parent.iommu != dev.pdev.iommu:
            raise IoctlError(errno.EINVAL)

    def viommu_alloc_domain_nested(
        self, core: EmulatedIommufd, viommu: ViommuObject, flags: int, data: UserData
    ) -> ArmNestedData:
        if flags:
            raise IoctlError(errno.EOPNOTSUPP)
        arg = copy_data_from_user(
            core.memory, uapi.HwptArmSmmuv3, data, uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, 16
        )
        return self.validate_vste(arg.ste0, arg.ste1)

    @staticmethod
    def validate_vste(ste0: int, ste1: int) -> ArmNestedData:
        """``arm_smmu_validate_vste`` (§3.1), in its order; EIO for invalid STE data."""
        if not ste0 & STE0_V:
            return ArmNestedData(0, 0, STE_CFG_ABORT, enable_ats=False)
        if ste0 & ~STE0_NESTING_ALLOWED or ste1 & ~STE1_NESTING_ALLOWED:
            raise IoctlError(errno.EIO)
        cfg = (ste0 >> STE0_CFG_SHIFT) & STE0_CFG_MASK
        if cfg not in (STE_CFG_ABORT, STE_CFG_BYPASS, STE_CFG_S1_TRANS):
            raise IoctlError(errno.EIO)
        eats = (ste1 >> STE1_EATS_SHIFT) & STE1_EATS_MASK
        ste1 &= ~(STE1_EATS_MASK << STE1_EATS_SHIFT)
        if eats not in (STE_EATS_ABT, STE_EATS_TRANS):
            raise IoctlError(errno.EIO)
        ats = cfg == STE_CFG_S1_TRANS and eats == STE_EATS_TRANS
        return ArmNestedData(ste0, ste1, cfg, enable_ats=ats)

    def attach_nested(
        self, core: EmulatedIommufd, dev: DeviceObject, hwpt: HwptNestedObject
    ) -> int:
        # arm_smmu_attach_dev_nested: same SMMU, then a vDEVICE for S1-translate STEs
        if hwpt.iommu != dev.pdev.iommu:
            return errno.EINVAL
        assert isinstance(hwpt.data, ArmNestedData)
        if hwpt.data.config == STE_CFG_S1_TRANS:
            viommu = core.lookup(hwpt.viommu_id)
            assert isinstance(viommu, ViommuObject)
            if dev.id not in core.viommu_device_ids(viommu):
                return errno.ENOENT
        return ENOERR

    def viommu_cache_invalidate(
        self, core: EmulatedIommufd, viommu: ViommuObject, array: UserArray
    ) -> tuple[int, int]:
        """``arm_vsmmu_cache_invalidate``: mainline (§3.4, quirks included) or pending."""
        if core.kernel == KERNEL_PENDING:
            return self._cache_invalidate_pending(core, viommu, array)
        if array.entry_num * ARM_CMD_SIZE > KMALLOC_MAX_SIZE:
            return errno.ENOMEM, 0
        if self.fast_invalidate and _packed_arm_array(array) and array.entry_num >= VECTOR_MIN:
            return self._cache_invalidate_packed(core, viommu, array)
        try:
            cmds = copy_full_array(
                core.memory,
                uapi.ViommuArmSmmuv3Invalidate,
                array,
                uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
            )
        except IoctlError as exc:
            return exc.errno, 0
        return self._invalidate_entries(core, viommu, cmds)

    def _invalidate_entries(
        self,
        core: EmulatedIommufd,
        viommu: ViommuObject,
        cmds: list[uapi.ViommuArmSmmuv3Invalidate],
        base: int = 0,
    ) -> tuple[int, int]:
        """§3.4 steps 3-4, entry by entry: the reference walk.

        ``cmds`` are the entries from index ``base`` on; ``base`` is 0 or the start of a
        63-group whose predecessors were all issued without error, so the grouping (and
        every index reported) is that of the walk over the whole array.
        """
        unit = core.unit(viommu.iommu)
        converted: list[bytes] = []
        cur = last = 0
        end = len(cmds)
        while cur != end:
            raw = self.convert(core, viommu, cmds[cur])
            if raw is None:
                return errno.EIO, base + cur  # commands last..cur-1 never reach the queue
            converted.append(raw)
            cur += 1
            if cur != end and cur - last != ARM_CMD_BATCH:
                continue
            group = converted[last:cur]
            err = unit.issue(group)
            core.apply_host_commands(viommu.iommu, group)
            if err:
                return err, base + cur - 1
            last = cur
        return ENOERR, base + cur

    def _cache_invalidate_packed(
        self, core: EmulatedIommufd, viommu: ViommuObject, array: UserArray
    ) -> tuple[int, int]:
        """The mainline walk over an array of plain 16-byte entries, vectorised where it can be.

        The copy is ``copy_full_array``'s for ``entry_len`` == 16 (§2.3: one read, a fault
        anywhere is EFAULT). The leading complete 63-groups made only of TLBI_NH_* /
        TLBI_NSNH_ALL commands (all of them, when every command is one) are converted and
        issued at once by ``_issue_vmid_groups``; the rest, from the first group holding
        any other command, takes the reference walk.
        """
        try:
            blob = core.memory.read(array.uptr, array.entry_num * ARM_CMD_SIZE)
        except UserFault:
            return errno.EFAULT, 0
        fast_end = _vmid_prefix(blob, viommu.vmid)
        if fast_end:
            words = np.frombuffer(blob, dtype=_LE64, count=2 * fast_end).reshape(fast_end, 2)
            rc, done = self._issue_vmid_groups(core, viommu, words)
            if rc or fast_end == array.entry_num:
                return rc, done
        rest = _decode_entries(uapi.ViommuArmSmmuv3Invalidate, blob[fast_end * ARM_CMD_SIZE :])
        return self._invalidate_entries(core, viommu, rest, fast_end)

    @staticmethod
    def _issue_vmid_groups(
        core: EmulatedIommufd, viommu: ViommuObject, words: npt.NDArray[np.uint64]
    ) -> tuple[int, int]:
        """§3.4 steps 3-4 for commands that all convert (``_vmid_prefix``): every 63-group
        and the last one issued in order; a failing issue reports its end - 1.

        Applying them to the caches is skipped when it provably changes nothing: converted,
        they are TLBI_NH_* of the vIOMMU's VMID, which only ever remove stage-1 entries of
        that VMID (``CacheModel.holds_stage1``), and nothing here adds cache entries.
        """
        rows = _convert_vmid_ops(words, viommu.vmid).view(_CMD_BYTES).reshape(-1)
        commands = cast("list[bytes]", rows.tolist())  # a field-less void item is bytes
        unit = core.unit(viommu.iommu)
        apply = core.cache_model.holds_stage1(viommu.iommu, viommu.vmid)
        for start in range(0, len(commands), ARM_CMD_BATCH):
            group = commands[start : start + ARM_CMD_BATCH]
            err = unit.issue(group)
            if apply:
                core.apply_host_commands(viommu.iommu, group)
            if err:
                return err, start + len(group) - 1
        return ENOERR, len(commands)

    def _cache_invalidate_pending(
        self, core: EmulatedIommufd, viommu: ViommuObject, array: UserArray
    ) -> tuple[int, int]:
        """The for-next series (§2.7, §3.6): probe with 0 entries, all-or-nothing chunks."""
        if array.type != uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3:
            return errno.EINVAL, 0
        unit = core.unit(viommu.iommu)
        done = 0
        while done < array.entry_num:
            count = min(ARM_CMD_BATCH, array.entry_num - done)
            chunk = UserArray(
                array.type, array.uptr + done * array.entry_len, array.entry_len, count
            )
            try:
                cmds = copy_full_array(
                    core.memory, uapi.ViommuArmSmmuv3Invalidate, chunk, array.type
                )
            except IoctlError as exc:
                return exc.errno, done
            converted: list[bytes] = []
            for cmd in cmds:
                raw = self.convert_strict(core, viommu, cmd)
                if raw is None:
                    return errno.EIO, done  # nothing of this chunk was issued
                converted.append(raw)
            err = unit.issue(converted)
            core.apply_host_commands(viommu.iommu, converted)
            if err:
                return err, done
            done += count
        return ENOERR, done

    @staticmethod
    def convert(
        core: EmulatedIommufd, viommu: ViommuObject, cmd: uapi.ViommuArmSmmuv3Invalidate
    ) -> bytes | None:
        """``arm_vsmmu_convert_user_cmd`` (§3.3); None for EIO."""
        w0, w1 = cmd.cmd0, cmd.cmd1
        op = w0 & CMDQ_0_OP
        if op == OP_TLBI_NSNH_ALL:
            w0 = OP_TLBI_NH_ALL | (viommu.vmid << 32)
            w1 = 0
        elif op in _TLBI_NH_OPS:
            w0 = (w0 & ~CMDQ_TLBI_0_VMID) | (viommu.vmid << 32)
        elif op in _SID_OPS:
            pdev = core.vsid_to_pdev(viommu, w0 >> 32)
            if pdev is None:
                return None
            w0 = (w0 & ~CMDQ_CFGI_0_SID) | (pdev.sid << 32)
        else:
            return None
        return _QQ.pack(w0, w1)

    @classmethod
    def convert_strict(
        cls, core: EmulatedIommufd, viommu: ViommuObject, cmd: uapi.ViommuArmSmmuv3Invalidate
    ) -> bytes | None:
        """The pending series' validation (§3.6): only the listed fields; None for EIO."""
        w0, w1 = cmd.cmd0, cmd.cmd1
        op = w0 & CMDQ_0_OP
        allowed = _STRICT_FIELDS.get(op)
        if allowed is None or w0 & ~allowed[0] or w1 & ~allowed[1]:
            return None
        if op in (OP_TLBI_NH_VA, OP_TLBI_NH_VAA):
            tg = (w1 >> 10) & 0x3
            ttl = (w1 >> 8) & 0x3
            num_scale = w0 & _W0_NUM_SCALE
            if tg == 0 and (num_scale or ttl):
                return None  # a range or level hint needs a granule
            if tg == 2 and ttl == 1:
                return None  # 16K granule, level 1: only with DS (not implemented)
            if tg != 0 and not num_scale and not ttl:
                return None  # NUM = SCALE = 0 with TTL = 0 is reserved
        if op == OP_ATC_INV and (w1 & 0x3F) > 52:
            return None
        return cls.convert(core, viommu, cmd)

    # -- cache model hooks ---------------------------------------------------------------------
    def ats_enabled(self, dev: DeviceObject, hwpt: IommufdObject | None) -> bool:
        if not dev.pdev.ats:
            return False
        if isinstance(hwpt, HwptNestedObject):
            assert isinstance(hwpt.data, ArmNestedData)
            return hwpt.data.enable_ats
        return isinstance(hwpt, HwptPagingObject)

    def dma_tags(
        self, core: EmulatedIommufd, dev: DeviceObject, hwpt: IommufdObject, asid: int
    ) -> tuple[int, int | None]:
        if isinstance(hwpt, HwptNestedObject):
            assert isinstance(hwpt.data, ArmNestedData)
            viommu = core.lookup(hwpt.viommu_id)
            assert isinstance(viommu, ViommuObject)
            if hwpt.data.config == STE_CFG_ABORT:
                raise ValueError("the device's STE aborts DMA")
            if hwpt.data.config == STE_CFG_BYPASS:
                return viommu.vmid, None  # stage 1 bypassed: stage-2 entries
            return viommu.vmid, asid
        assert isinstance(hwpt, HwptPagingObject)
        if hwpt.nest_parent:
            return hwpt.vmid, None
        return 0, hwpt.asid

    def attach_changed(
        self, core: EmulatedIommufd, dev: DeviceObject, old: IommufdObject | None
    ) -> None:
        # arm_smmu_write_ste + CFGI_STE; arm_smmu_attach_commit flushes the whole ATC
        cause = "kernel:attach CFGI_STE"
        sid = dev.pdev.sid
        core.cache_model.drop_config(
            dev.pdev.iommu, lambda e: e.kind in ("ste", "cd", "l1cd") and e.sid == sid, cause
        )
        if dev.pdev.ats:
            core.cache_model.atc_flush_all(dev.pdev.id, "kernel:attach ATC_INV")

    def unmap_flush(
        self, core: EmulatedIommufd, hwpt: HwptPagingObject, first: int, last: int
    ) -> None:
        # arm_smmu_tlb_inv_range_domain (+ NH_ALL for a nest parent) + arm_smmu_atc_inv_domain
        unit = hwpt.iommu
        direct, nested = core.attached_devices(hwpt)
        if hwpt.nest_parent:
            vmid = hwpt.vmid
            core.cache_model.drop_iotlb(
                unit,
                lambda e: e.tag == vmid and e.asid is None and e.iova <= last and first <= e.last,
                "kernel:IOAS_UNMAP TLBI_S2_IPA",
            )
            core.cache_model.drop_iotlb(
                unit,
                lambda e: e.tag == vmid and e.asid is not None,
                "kernel:IOAS_UNMAP TLBI_NH_ALL",
            )
        else:
            asid = hwpt.asid
            core.cache_model.drop_iotlb(
                unit,
                lambda e: e.tag == 0 and e.asid == asid and e.iova <= last and first <= e.last,
                "kernel:IOAS_UNMAP TLBI_NH_VA",
            )
        for dev in direct:
            if self.ats_enabled(dev, hwpt):
                core.cache_model.drop_atc(
                    dev.pdev.id,
                    lambda e: e.iova <= last and first <= e.last,
                    "kernel:IOAS_UNMAP ATC_INV",
                )
        for dev in nested:
            core.cache_model.atc_flush_all(dev.pdev.id, "kernel:IOAS_UNMAP ATC_INV")

    def domain_freed(self, core: EmulatedIommufd, hwpt: HwptPagingObject) -> None:
        if hwpt.vmid:
            vmid = hwpt.vmid
            core.cache_model.drop_iotlb(
                hwpt.iommu, lambda e: e.tag == vmid, "kernel:VMID free TLBI_S12_VMALL"
            )
        elif hwpt.asid:
            asid = hwpt.asid
            for unit in core.units_of_model(ARM_SMMUV3):
                core.cache_model.drop_iotlb(
                    unit,
                    lambda e: e.tag == 0 and e.asid == asid and not e.global_,
                    "kernel:ASID free TLBI_NH_ASID",
                )


class IntelVtdDriver(IommuDriver):
    """intel-iommu nesting (§4): nested HWPTs directly on a nest parent; no vIOMMU."""

    model: ClassVar[str] = INTEL_VTD
    has_domain_alloc_nested: ClassVar[bool] = True

    def hw_info(self, core: EmulatedIommufd, dev: DeviceObject, in_type: int) -> tuple[int, bytes]:
        if in_type not in (uapi.IOMMU_HW_INFO_TYPE_NONE, uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD):
            raise IoctlError(errno.EOPNOTSUPP)
        return uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD, bytes(uapi.encode(VTD_HW_INFO))

    def domain_alloc_nested(
        self,
        core: EmulatedIommufd,
        dev: DeviceObject,
        parent: HwptPagingObject,
        flags: int,
        data: UserData,
    ) -> uapi.HwptVtdS1:
        # intel_iommu_domain_alloc_nested (§4.1)
        if flags & ~uapi.IOMMU_HWPT_ALLOC_PASID:
            raise IoctlError(errno.EOPNOTSUPP)  # pragma: no cover - the core refuses first
        if data.type != uapi.IOMMU_HWPT_DATA_VTD_S1:
            raise IoctlError(errno.EOPNOTSUPP)
        if not parent.nest_parent or parent.model != INTEL_VTD:
            raise IoctlError(errno.EINVAL)  # pragma: no cover - the core refuses first
        return copy_data_from_user(
            core.memory, uapi.HwptVtdS1, data, uapi.IOMMU_HWPT_DATA_VTD_S1, 24
        )

    def paging_compatible(self, hwpt: HwptPagingObject, pdev: PhysicalDevice) -> bool:
        return True  # identical emulated units: any VT-d domain fits any VT-d device

    def attach_nested(
        self, core: EmulatedIommufd, dev: DeviceObject, hwpt: HwptNestedObject
    ) -> int:
        return ENOERR

    def hwpt_cache_invalidate(
        self, core: EmulatedIommufd, hwpt: HwptNestedObject, array: UserArray
    ) -> tuple[int, int]:
        """``intel_nested_cache_invalidate_user`` (§4.2): entry by entry."""
        if array.type != uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1:
            return errno.EINVAL, 0
        done = 0
        for index in range(array.entry_num):
            try:
                inv = copy_array_entry(
                    core.memory,
                    uapi.HwptVtdS1Invalidate,
                    array,
                    uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                    index=index,
                    min_len=24,
                )
            except IoctlError as exc:
                return exc.errno, done
            if inv.flags & ~uapi.IOMMU_VTD_INV_FLAGS_LEAF or inv.reserved:
                return errno.EOPNOTSUPP, done
            if inv.addr % PAGE_SIZE or (inv.npages == U64_MAX and inv.addr):
                return errno.EINVAL, done
            core.record_vtd_flush(hwpt, inv)
            done += 1
        return ENOERR, done

    # -- cache model hooks ---------------------------------------------------------------------
    def ats_enabled(self, dev: DeviceObject, hwpt: IommufdObject | None) -> bool:
        return dev.pdev.ats and hwpt is not None

    def dma_tags(
        self, core: EmulatedIommufd, dev: DeviceObject, hwpt: IommufdObject, asid: int
    ) -> tuple[int, int | None]:
        did = core.unit(dev.pdev.iommu).did(hwpt.id)
        if isinstance(hwpt, HwptNestedObject):
            return did, 0  # first-stage (nested) entries of the RID's PASID 0
        return did, None

    def attach_changed(
        self, core: EmulatedIommufd, dev: DeviceObject, old: IommufdObject | None
    ) -> None:
        # intel_pasid_tear_down_entry / replace: PASID cache, IOTLB DSI, full device TLB
        if old is None:
            return  # a first attach with CM=0 only flushes the write buffer
        unit = dev.pdev.iommu
        sid = dev.pdev.sid
        core.cache_model.vtd_pasid_cache(unit, sid, 0, "kernel:attach PASID-cache")
        old_did = core.unit(unit).dids.get(old.id)
        if old_did is not None:
            core.cache_model.vtd_iotlb_dsi(unit, old_did, "kernel:attach IOTLB-DSI")
        core.cache_model.vtd_devtlb(dev.pdev.id, 0, None, "kernel:attach DEVTLB")

    def unmap_flush(
        self, core: EmulatedIommufd, hwpt: HwptPagingObject, first: int, last: int
    ) -> None:
        # cache_tag_flush_range on the parent: IOTLB / NESTING_IOTLB / DEVTLB / NESTING_DEVTLB
        addr, am = vtd_psi_mask(first, last)
        direct, nested = core.attached_devices(hwpt)
        users = {dev.pdev.iommu: dev for dev in direct}
        for unit in sorted(users):
            did = core.unit(unit).dids.get(hwpt.id)
            if did is None:  # pragma: no cover - an attached device's unit has a DID
                continue
            if am is None or am > VTD_CAP_MAMV:
                core.cache_model.vtd_iotlb_dsi(unit, did, "kernel:IOAS_UNMAP IOTLB-DSI")
            else:
                core.cache_model.vtd_iotlb_psi(
                    unit, did, addr=addr, am=am, ih=False, cause="kernel:IOAS_UNMAP IOTLB-PSI"
                )
        for dev in nested:
            did = core.unit(dev.pdev.iommu).dids.get(dev.hwpt_id)
            if did is not None:
                core.cache_model.vtd_iotlb_dsi(
                    dev.pdev.iommu, did, "kernel:IOAS_UNMAP NESTING-IOTLB"
                )
        for dev in direct:
            if self.ats_enabled(dev, hwpt):
                core.cache_model.vtd_devtlb(dev.pdev.id, addr, am, "kernel:IOAS_UNMAP DEVTLB")
        for dev in nested:
            if self.ats_enabled(dev, hwpt):
                core.cache_model.vtd_devtlb(
                    dev.pdev.id, 0, None, "kernel:IOAS_UNMAP NESTING-DEVTLB"
                )


# Arrays shorter than this take the per-entry walk: numpy's fixed cost per call is larger
# than the loop's for a handful of commands (both give the same results; see the tests).
VECTOR_MIN = 16


def _packed_arm_array(array: UserArray) -> bool:
    """An ARM command array that ``copy_full_array`` would read in one piece (§2.3)."""
    return (
        array.type == uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3
        and array.entry_num > 0
        and array.entry_len == ARM_CMD_SIZE
    )


def _vmid_prefix(blob: bytes, vmid: int) -> int:
    """How many leading commands of ``blob`` the vectorised walk takes (§3.4).

    Every command when all opcodes only get the VMID rewritten (§3.3: TLBI_NH_*,
    TLBI_NSNH_ALL), else the complete 63-groups before the first other command: a group
    reaches the queue only once all of its commands converted, so what happens to the
    group holding that command is the reference walk's to decide.
    """
    if len(blob) % ARM_CMD_SIZE or not 0 <= vmid <= 0xFFFF:
        return 0  # pragma: no cover - UserMemory.read returns what was asked; VMIDs are 16 bits
    other = ~_VMID_OPS[np.frombuffer(blob, dtype=np.uint8)[::ARM_CMD_SIZE]]
    if not other.any():
        return len(other)
    first = int(other.argmax())
    return first - first % ARM_CMD_BATCH


def _convert_vmid_ops(words: npt.NDArray[np.uint64], vmid: int) -> npt.NDArray[np.uint64]:
    """``arm_vsmmu_convert_user_cmd`` (§3.3) of TLBI_NH_* / TLBI_NSNH_ALL rows, at once.

    NSNH_ALL becomes NH_ALL of ``vmid`` with cmd[1] = 0; the others keep every bit but
    the VMID field, which becomes ``vmid``. Little-endian, like the host queue's bytes.
    """
    w0, w1 = words[:, 0], words[:, 1]
    vmid_field = np.uint64(vmid << 32)
    nsnh = (w0 & np.uint64(CMDQ_0_OP)) == np.uint64(OP_TLBI_NSNH_ALL)
    out = np.empty((len(words), 2), dtype=_LE64)
    out[:, 0] = np.where(
        nsnh, np.uint64(OP_TLBI_NH_ALL) | vmid_field, (w0 & _KEEP_ALL_BUT_VMID) | vmid_field
    )
    out[:, 1] = np.where(nsnh, np.uint64(0), w1)
    return out


DRIVERS: dict[str, IommuDriver] = {
    ARM_SMMUV3: ArmSmmuV3Driver(),
    INTEL_VTD: IntelVtdDriver(),
}

# ======================================================================================
# The core
# ======================================================================================

NESTED_FLAGS = uapi.IOMMU_HWPT_FAULT_ID_VALID | uapi.IOMMU_HWPT_ALLOC_PASID
PAGING_FLAGS = (
    uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
    | uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | uapi.IOMMU_HWPT_FAULT_ID_VALID
    | uapi.IOMMU_HWPT_ALLOC_PASID
)
MAP_FLAGS = (
    uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_WRITEABLE | uapi.IOMMU_IOAS_MAP_READABLE
)
MAP_PROT = uapi.IOMMU_IOAS_MAP_WRITEABLE | uapi.IOMMU_IOAS_MAP_READABLE
IOMMUFD_FD = 3
_ENTRY_NUM_OFFSET = 24  # iommu_hwpt_invalidate.entry_num (§2.1)
PGFAULT_SIZE = 40
PAGE_RESPONSE_SIZE = 8


@dataclass(slots=True)
class Call(Generic[S]):
    """One accepted iommufd ioctl: the copied-in struct and the way back to the user."""

    arg: bytearray
    cmd: S
    user_size: int

    def respond(self, cmd: S) -> int:
        """``iommufd_ucmd_respond``: copy ``min(user, kernel)`` bytes back; 0 or EFAULT."""
        n = min(self.user_size, type(cmd).FORMAT.size)
        if n > len(self.arg):
            return errno.EFAULT  # pragma: no cover - the same bytes were just read
        self.arg[:n] = uapi.encode(cmd)[:n]
        return ENOERR


def _roundup_pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()


class EmulatedIommufd:
    """One emulated /dev/iommu context plus the VFIO cdevs of ``host`` (``Backend``).

    ``kernel`` selects mainline (default) or the pending for-next behaviour (§2.7, §3.6);
    ``selftest`` adds the iommufd selftest mock driver and IOMMU_TEST_CMD (§5).
    """

    name = "emulated"

    def __init__(
        self,
        host: HostConfig,
        memory: UserMemory | None = None,
        *,
        kernel: str = KERNEL_MAINLINE,
        selftest: bool = False,
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        self.host = host
        self.memory: UserMemory = memory if memory is not None else EmulatedMemory()
        self.kernel = kernel
        self.selftest = selftest
        self.iommufd = IOMMUFD_FD
        self.cache_model = CacheModel()
        self._open = True
        self._objects: dict[int, IommufdObject] = {}
        self._tombstones: set[int] = set()
        self._files: dict[int, DeviceFile] = {}
        self._event_files: dict[int, EventFile] = {}
        self._units = {unit.id: PhysicalIommuState(unit) for unit in host.iommus}
        self._drivers: dict[str, IommuDriver] = dict(DRIVERS)
        self._pdevs: dict[str, PhysicalDevice] = {d.id: d for d in host.devices}
        self._sid_maps: dict[str, dict[int, str]] = {unit: {} for unit in self._units}
        for pdev in host.devices:
            self._sid_maps[pdev.iommu][pdev.sid] = pdev.id
        self._vtd_flushes: list[VtdFlush] = []
        self._asids: set[int] = set()
        self._mock_devices = 0
        self._mark = 0
        if selftest:
            from viommud.backend.emulator.selftest import MockDriver  # noqa: PLC0415 - mock imports us

            if MOCK_IOMMU in self._units:
                raise ValueError(f"host already has an IOMMU named {MOCK_IOMMU!r}")
            self._drivers[SELFTEST_MODEL] = MockDriver()
            self._units[MOCK_IOMMU] = PhysicalIommuState(PhysicalIommu(MOCK_IOMMU, SELFTEST_MODEL))
            self._sid_maps[MOCK_IOMMU] = {}

    # -- Backend ------------------------------------------------------------------------
    def open_device(self, device: str) -> int:
        try:
            pdev = self.host.device(device)
        except KeyError:
            raise OSError(errno.ENODEV, f"no host device {device!r}") from None
        if any(f.pdev.id == device for f in self._files.values()):
            raise OSError(errno.EBUSY, f"device {device!r} is already open")
        fd = self._new_fd()
        self._files[fd] = DeviceFile(fd, pdev)
        return fd

    def close_device(self, fd: int) -> None:
        self._mark = len(self.cache_model.journal)
        file = self._files.pop(fd, None)
        if file is None:
            raise OSError(errno.EBADF, f"fd {fd} is not an open device")
        if file.dev_id:
            self._unbind(file.dev_id)

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        self._mark = len(self.cache_model.journal)
        if fd == self.iommufd and self._open:
            return self._iommufd_ioctl(request, arg)
        file = self._files.get(fd)
        if file is None:
            return errno.ENOTTY if fd in self._event_files else errno.EBADF
        return self._device_ioctl(file, request, arg)

    def close(self) -> None:
        self._mark = len(self.cache_model.journal)
        for fd in sorted(self._event_files):
            del self._event_files[fd]
        for fd in sorted(self._files):
            self.close_device(fd)
        while self._objects:
            leaves = [obj for obj in self._objects.values() if not self._busy(obj)]
            assert leaves, "reference cycle in the object graph"
            for obj in sorted(leaves, key=lambda o: o.id, reverse=True):
                if self._objects.get(obj.id) is obj and not self._busy(obj):
                    self._destroy(obj)
        self._tombstones.clear()
        self._open = False

    # -- event fds (read(2) / write(2) / close(2) / poll(2)) ------------------------------
    def read(self, fd: int, count: int) -> tuple[int, bytes]:
        """``read(fd, count)`` on a vEVENTQ or FAULT fd: ``(errno, data)``."""
        file = self._event_files.get(fd)
        if file is None:
            return (errno.EINVAL if fd in self._files else errno.EBADF), b""
        obj = self._objects.get(file.obj_id)
        if isinstance(obj, VeventqObject):
            return ENOERR, obj.read(count)
        assert isinstance(obj, FaultObject)
        if count % PGFAULT_SIZE:
            return errno.ESPIPE, b""
        return ENOERR, self._fault_read(obj, count)

    def write(self, fd: int, data: bytes) -> tuple[int, int]:
        """``write(fd, data)``: page responses on a FAULT fd; ``(errno, bytes consumed)``."""
        file = self._event_files.get(fd)
        if file is None:
            return (errno.EINVAL if fd in self._files else errno.EBADF), 0
        obj = self._objects.get(file.obj_id)
        if not isinstance(obj, FaultObject):
            return errno.EINVAL, 0  # a vEVENTQ fd has no write
        if len(data) % PAGE_RESPONSE_SIZE:
            return errno.ESPIPE, 0
        done = 0
        while done < len(data):
            resp = uapi.decode(uapi.HwptPageResponse, data[done : done + PAGE_RESPONSE_SIZE])
            if resp.code not in (uapi.IOMMUFD_PAGE_RESP_SUCCESS, uapi.IOMMUFD_PAGE_RESP_INVALID):
                return (errno.EINVAL, 0) if not done else (ENOERR, done)
            if obj.response.pop(resp.cookie, None) is None:
                return (errno.EINVAL, 0) if not done else (ENOERR, done)
            done += PAGE_RESPONSE_SIZE
        return ENOERR, done

    def poll(self, fd: int) -> bool:
        """EPOLLIN: something to read on a vEVENTQ or FAULT fd."""
        file = self._event_files.get(fd)
        obj = self._objects.get(file.obj_id) if file else None
        return isinstance(obj, VeventqObject | FaultObject) and bool(obj.deliver)

    def close_fd(self, fd: int) -> None:
        """``close(fd)`` of an event fd (or a device fd, like close_device)."""
        if self._event_files.pop(fd, None) is not None:
            return
        self.close_device(fd)

    # -- introspection ------------------------------------------------------------------
    def live_objects(self) -> list[tuple[int, str]]:
        """``(id, kind)`` of every live object, by id (tombstones are not objects)."""
        return sorted((obj.id, obj.KIND) for obj in self._objects.values())

    def lookup(self, obj_id: int) -> IommufdObject | None:
        return self._objects.get(obj_id)

    def tombstones(self) -> list[int]:
        return sorted(self._tombstones)

    def issued(self, iommu_id: str) -> list[bytes]:
        """Commands that reached the host command queue of physical SMMU ``iommu_id``."""
        return list(self._units[iommu_id].cmdq)

    def clear_issued(self) -> None:
        for unit in self._units.values():
            unit.cmdq.clear()
        self._vtd_flushes.clear()

    def vtd_flushes(self) -> list[VtdFlush]:
        """VT-d stage-1 invalidations carried out, in order."""
        return list(self._vtd_flushes)

    def inject_cmdq_error(self, iommu_id: str, err: int = errno.ETIMEDOUT) -> None:
        """Make the next command-queue issue on ``iommu_id`` fail with ``err`` (§3.4)."""
        self._units[iommu_id].pending_error = err

    def mock_devices(self) -> dict[int, str]:
        """Device object id -> device name of the selftest mock devices alive."""
        return {
            obj.id: obj.pdev.id
            for obj in self._objects.values()
            if isinstance(obj, DeviceObject) and obj.pdev.iommu == MOCK_IOMMU
        }

    # -- caches (test API) -----------------------------------------------------------------
    def caches(self, iommu_id: str) -> CacheView:
        """IOTLB and configuration cache of ``iommu_id`` and the ATCs of its devices."""
        devices = sorted(d for d, p in self._pdevs.items() if p.iommu == iommu_id)
        return self.cache_model.view(iommu_id, devices)

    def atc(self, device: str) -> tuple[AtcEntry, ...]:
        """The ATC / device TLB of host device ``device``."""
        return tuple(self.cache_model.atc.get(device, ()))

    def populate_iotlb(self, iommu_id: str, entry: TlbEntry) -> None:
        """Put ``entry`` in the IOTLB of ``iommu_id`` (no check that DMA could make it)."""
        if iommu_id not in self._units:
            raise KeyError(iommu_id)
        self.cache_model.add_iotlb(iommu_id, entry)

    def populate_atc(self, device: str, entry: AtcEntry) -> None:
        """Put ``entry`` in the ATC of ``device``; ValueError unless its ATS is enabled."""
        dev = self._bound(device)
        hwpt = self._objects.get(dev.hwpt_id) if dev.hwpt_id else None
        if not self.driver(dev.pdev.iommu).ats_enabled(dev, hwpt):
            raise ValueError(f"ATS is not enabled for {device}")
        self.cache_model.add_atc(device, entry)

    def populate_config(self, iommu_id: str, entry: ConfigEntry) -> None:
        if iommu_id not in self._units:
            raise KeyError(iommu_id)
        self.cache_model.add_config(iommu_id, entry)

    def dma(
        self,
        device: str,
        iova: int,
        *,
        size: int = PAGE_SIZE,
        granule: int = PAGE_SIZE,
        asid: int = 0,
        ssid: int | None = None,
        walk: bool = True,
        global_: bool = False,
    ) -> list[TlbEntry | AtcEntry | ConfigEntry]:
        """Fill the caches as a translated DMA of ``device`` at ``iova`` would.

        The IOTLB gets a leaf entry of ``size`` (a page or block of the ``granule``) tagged
        from the device's attachment (``asid`` is the guest's ASID for an SMMUv3 stage-1
        STE; VT-d nested entries carry PASID 0), and with ``walk`` the walk-cache entries
        of the table levels above it (levels 1 .. leaf-1); the ATC gets the translation
        (with ``ssid`` as its PASID) when the device's ATS is enabled; the configuration
        cache gets the STE (and the CD for a stage-1 STE) or the context and PASID
        entries. Returns what was added; ValueError when such a DMA cannot be cached.
        """
        dev = self._bound(device)
        if not dev.hwpt_id:
            raise ValueError(f"{device} is not attached")
        hwpt = self._objects[dev.hwpt_id]
        driver = self.driver(dev.pdev.iommu)
        tag, tlb_asid = driver.dma_tags(self, dev, hwpt, asid)
        level = next((lvl for lvl in (3, 2, 1) if granule_level_size(granule, lvl) == size), None)
        if level is None or granule not in (4096, 16384, 65536):
            raise ValueError(f"{size:#x} is not a page or block size of a {granule:#x} granule")
        unit = dev.pdev.iommu
        added: list[TlbEntry | AtcEntry | ConfigEntry] = []
        base = iova & ~(size - 1)
        tlb = [TlbEntry(tag, tlb_asid, base, size, True, level, granule, global_)]
        if walk:
            for lvl in range(1, level):
                region = granule_level_size(granule, lvl)
                tlb.append(
                    TlbEntry(tag, tlb_asid, iova & ~(region - 1), region, False, lvl, granule)
                )
        for entry in tlb:
            self.cache_model.add_iotlb(unit, entry)
            added.append(entry)
        if driver.ats_enabled(dev, hwpt):
            atc = AtcEntry(base, size, ssid, global_)
            self.cache_model.add_atc(dev.pdev.id, atc)
            added.append(atc)
        config: list[ConfigEntry] = []
        if driver.model == ARM_SMMUV3:
            config.append(ConfigEntry("ste", dev.pdev.sid))
            if isinstance(hwpt, HwptNestedObject) and tlb_asid is not None:
                config.append(ConfigEntry("cd", dev.pdev.sid, ssid or 0))
        else:
            config += [ConfigEntry("context", dev.pdev.sid), ConfigEntry("pasid", dev.pdev.sid)]
        for centry in config:
            self.cache_model.add_config(unit, centry)
            added.append(centry)
        return added

    def last_removed(self) -> list[Removal]:
        """Cache entries removed by the most recent ioctl / close_device / close."""
        return self.cache_model.journal[self._mark :]

    def removals(self) -> list[Removal]:
        """Every cache entry removed so far, in order."""
        return list(self.cache_model.journal)

    def inject_event(self, device: str, record: bytes) -> int:
        """A host SMMUv3 event record (32 bytes) for ``device``, forwarded as a vEVENT.

        The StreamID field (evt[0] bits 63:32) is replaced by the vSID (§3.5). Returns 0,
        ENOENT when the device has no vDEVICE, EOPNOTSUPP when its vIOMMU has no vEVENTQ
        of type ARM_SMMUV3 (the event is dropped).
        """
        dev = self._bound(device)
        if not dev.vdevice_id:
            return errno.ENOENT
        vdev = self._objects[dev.vdevice_id]
        assert isinstance(vdev, VdeviceObject)
        viommu = self._objects[vdev.viommu_id]
        assert isinstance(viommu, ViommuObject)
        evt = uapi.decode(uapi.VeventArmSmmuv3, record)
        evt = replace(evt, evt0=(evt.evt0 & 0xFFFF_FFFF) | ((vdev.virt_id & 0xFFFF_FFFF) << 32))
        return self.report_vevent(
            viommu, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, bytes(uapi.encode(evt))
        )

    # -- services for drivers -----------------------------------------------------------
    def unit(self, iommu_id: str) -> PhysicalIommuState:
        return self._units[iommu_id]

    def driver(self, iommu_id: str) -> IommuDriver:
        """The driver of physical IOMMU ``iommu_id`` (by its model)."""
        return self._drivers[self._units[iommu_id].unit.model]

    def units_of_model(self, model: str) -> list[str]:
        return sorted(u for u, state in self._units.items() if state.unit.model == model)

    def viommu_device_ids(self, viommu: ViommuObject) -> set[int]:
        out: set[int] = set()
        for vdev_id in viommu.vdevs.values():
            vdev = self._objects[vdev_id]
            assert isinstance(vdev, VdeviceObject)
            out.add(vdev.dev_id)
        return out

    def vsid_to_device(self, viommu: ViommuObject, virt_id: int) -> DeviceObject | None:
        vdev_id = viommu.vdevs.get(virt_id)
        if vdev_id is None:
            return None
        vdev = self._objects[vdev_id]
        assert isinstance(vdev, VdeviceObject)
        dev = self._objects[vdev.dev_id]
        assert isinstance(dev, DeviceObject)
        return dev

    def vsid_to_pdev(self, viommu: ViommuObject, virt_id: int) -> PhysicalDevice | None:
        dev = self.vsid_to_device(viommu, virt_id)
        return dev.pdev if dev is not None else None

    def attached_devices(
        self, hwpt: HwptPagingObject
    ) -> tuple[list[DeviceObject], list[DeviceObject]]:
        """Devices attached to ``hwpt`` directly, and through nested HWPTs on it."""
        direct: list[DeviceObject] = []
        nested: list[DeviceObject] = []
        for obj in self._objects.values():
            if not isinstance(obj, DeviceObject) or not obj.hwpt_id:
                continue
            if obj.hwpt_id == hwpt.id:
                direct.append(obj)
                continue
            child = self._objects.get(obj.hwpt_id)
            if isinstance(child, HwptNestedObject) and child.parent_id == hwpt.id:
                nested.append(obj)
        return direct, nested

    def apply_host_commands(self, iommu_id: str, commands: list[bytes]) -> None:
        """Apply commands issued on the host queue of ``iommu_id`` to its caches."""
        sids = self._sid_maps[iommu_id]
        for raw in commands:
            w0, w1 = _QQ.unpack(raw)
            self.cache_model.smmu_command(iommu_id, w0, w1, sids)

    def record_vtd_flush(self, hwpt: HwptNestedObject, inv: uapi.HwptVtdS1Invalidate) -> None:
        """One VT-d stage-1 invalidation: P_IOTLB per unit, device TLBs of ATS devices."""
        devices = [
            obj
            for obj in self._objects.values()
            if isinstance(obj, DeviceObject) and obj.hwpt_id == hwpt.id
        ]
        units = sorted({dev.pdev.iommu for dev in devices})
        leaf = bool(inv.flags & uapi.IOMMU_VTD_INV_FLAGS_LEAF)
        self._vtd_flushes.append(VtdFlush(hwpt.id, inv.addr, inv.npages, leaf, tuple(units)))
        last = (inv.addr + inv.npages * PAGE_SIZE - 1) & U64_MAX
        addr, am = vtd_psi_mask(inv.addr, last)
        for unit in units:
            did = self._units[unit].dids.get(hwpt.id)
            if did is not None:
                self.cache_model.vtd_p_iotlb(
                    unit, did, 0, addr=addr, am=am, ih=leaf, cause="P_IOTLB"
                )
        driver = self._drivers[INTEL_VTD]
        for dev in devices:
            if driver.ats_enabled(dev, hwpt):
                self.cache_model.vtd_devtlb(dev.pdev.id, addr, am, "DEVTLB")

    def report_vevent(self, viommu: ViommuObject, event_type: int, payload: bytes) -> int:
        """``iommufd_viommu_report_event``: 0, or EOPNOTSUPP without such a vEVENTQ."""
        queue = self._veventq(viommu, event_type)
        if queue is None:
            return errno.EOPNOTSUPP
        queue.report(payload)
        return ENOERR

    def report_fault(self, dev: DeviceObject, fault: uapi.HwptPgfault) -> None:
        """An I/O page fault of ``dev``: a group of one, to its domain's FAULT object."""
        hwpt = self._objects.get(dev.hwpt_id) if dev.hwpt_id else None
        fault_id = getattr(hwpt, "fault_id", 0)
        queue = self._objects.get(fault_id) if fault_id else None
        if isinstance(queue, FaultObject):
            queue.deliver.append([replace(fault, dev_id=dev.id)])

    def new_mock_device(self) -> PhysicalDevice:
        """A fresh selftest device behind the mock IOMMU (``mock_dev_create``)."""
        n = self._mock_devices
        self._mock_devices += 1
        pdev = PhysicalDevice(f"mock{n}", MOCK_IOMMU, n)
        self._pdevs[pdev.id] = pdev
        return pdev

    # -- ID space and the reference graph -------------------------------------------------
    def _insert(self, make: Callable[[int], IommufdObject]) -> IommufdObject:
        obj_id = 1
        while obj_id in self._objects or obj_id in self._tombstones:
            obj_id += 1
        if obj_id >= 1 << 31:
            raise IoctlError(errno.EBUSY)  # pragma: no cover - xa_limit_31b exhausted
        obj = make(obj_id)
        self._objects[obj_id] = obj
        return obj

    def _get(self, obj_id: int, kind: type[IommufdObject]) -> Any:
        obj = self._objects.get(obj_id)
        if not isinstance(obj, kind):
            raise IoctlError(errno.ENOENT)
        return obj

    def _bound(self, device: str) -> DeviceObject:
        for obj in self._objects.values():
            if isinstance(obj, DeviceObject) and obj.pdev.id == device:
                return obj
        raise ValueError(f"{device} is not bound to this iommufd")

    def _busy(self, obj: IommufdObject) -> bool:
        if isinstance(obj, DeviceObject):
            return True  # the bound VFIO driver (or selftest object) is a user until unbind
        if any(f.obj_id == obj.id for f in self._event_files.values()):
            return True  # an open vEVENTQ / FAULT fd
        return any(obj.id in other.holds() for other in self._objects.values())

    def _new_fd(self) -> int:
        fd = IOMMUFD_FD + 1
        while fd in self._files or fd in self._event_files:
            fd += 1
        return fd

    def _alloc_asid(self) -> int:
        asid = 1
        while asid in self._asids:
            asid += 1
        if asid >= 1 << 16:
            raise IoctlError(errno.ENOSPC)
        self._asids.add(asid)
        return asid

    def _veventq(self, viommu: ViommuObject, event_type: int) -> VeventqObject | None:
        for obj in self._objects.values():
            if (
                isinstance(obj, VeventqObject)
                and obj.viommu_id == viommu.id
                and obj.type == event_type
            ):
                return obj
        return None

    def _destroy(self, obj: IommufdObject) -> None:
        """Remove an unreferenced object and undo its side effects."""
        del self._objects[obj.id]
        if isinstance(obj, VdeviceObject):
            viommu = self._objects[obj.viommu_id]
            assert isinstance(viommu, ViommuObject)
            del viommu.vdevs[obj.virt_id]
            dev = self._objects.get(obj.dev_id)
            if isinstance(dev, DeviceObject):
                dev.vdevice_id = 0
        elif isinstance(obj, HwptPagingObject):
            self.driver(obj.iommu).domain_freed(self, obj)
            if obj.vmid:
                self._units[obj.iommu].vmids.discard(obj.vmid)
            if obj.asid:
                self._asids.discard(obj.asid)
        elif isinstance(obj, HwQueueObject):
            for area in obj.pinned:
                area.locks -= 1
            viommu = self._objects[obj.viommu_id]
            assert isinstance(viommu, ViommuObject)
            viommu.hw_queues.pop(obj.index, None)
        elif isinstance(obj, SelftestObject):
            self._unbind(obj.dev_id)

    # -- dispatch -------------------------------------------------------------------------
    def _iommufd_ioctl(self, request: int, arg: bytearray) -> int:
        op = _IOMMUFD_OPS.get(request)
        if op is None or (request == uapi.IOMMU_TEST_CMD and not self.selftest):
            return errno.ENOTTY
        cls, handler = op
        try:
            cmd, user_size = copy_cmd_from_user(arg, cls)
            return handler(self, Call(arg, cmd, user_size))
        except IoctlError as exc:
            return exc.errno

    def _device_ioctl(self, file: DeviceFile, request: int, arg: bytearray) -> int:
        handler: _DeviceHandler
        if request == uapi.VFIO_DEVICE_BIND_IOMMUFD:
            handler = EmulatedIommufd._vfio_bind
        else:
            if not file.dev_id:
                return errno.EINVAL  # only BIND before the device is bound
            found = _DEVICE_OPS.get(request)
            if found is None:
                return errno.ENOTTY  # the vfio-pci driver does not know it
            handler = found
        try:
            return handler(self, file, arg)
        except IoctlError as exc:
            return exc.errno

    # -- IOMMU_DESTROY (§1.1) ----------------------------------------------------------------
    def _ioctl_destroy(self, call: Call[uapi.Destroy]) -> int:
        obj = self._objects.get(call.cmd.id)
        if obj is None:
            return errno.ENOENT
        if self._busy(obj):
            return errno.EBUSY
        self._destroy(obj)
        return ENOERR

    # -- IOMMU_IOAS_ALLOC (§1.2) -------------------------------------------------------------
    def _ioctl_ioas_alloc(self, call: Call[uapi.IoasAlloc]) -> int:
        if call.cmd.flags:
            return errno.EOPNOTSUPP
        ioas = self._insert(IoasObject)
        return self._finish(call, replace(call.cmd, out_ioas_id=ioas.id), ioas)

    def _finish(self, call: Call[S], out: S, obj: IommufdObject) -> int:
        """Write back a creation's result; a fault destroys the new object (§0.2 step 5)."""
        if call.respond(out):
            self._destroy(obj)  # pragma: no cover - respond cannot fault here
            return errno.EFAULT  # pragma: no cover
        return ENOERR

    # -- the IO page table of an IOAS (io_pagetable.c) -----------------------------------
    def _domains(self, ioas: IoasObject) -> list[HwptPagingObject]:
        return [
            obj
            for obj in self._objects.values()
            if isinstance(obj, HwptPagingObject) and obj.ioas_id == ioas.id
        ]

    def _iova_alignment(self, ioas: IoasObject) -> int:
        """``iopt->iova_alignment``: 1, or the largest smallest page size of its domains."""
        align = 1
        for hwpt in self._domains(ioas):
            align = max(align, self._drivers[hwpt.model].pgsize)
        return align

    def _reserved(self, ioas: IoasObject) -> list[tuple[int, int]]:
        """The IOVA ranges outside the apertures of the IOAS's domains."""
        out: list[tuple[int, int]] = []
        for hwpt in self._domains(ioas):
            start, end = self._drivers[hwpt.model].aperture
            if start:
                out.append((0, start - 1))
            if end != U64_MAX:
                out.append((end + 1, U64_MAX))
        return out

    def _pinnable(self, user_va: int, length: int) -> bool:
        """Whether ``pin_user_pages`` would succeed on ``[user_va, user_va + length)``."""
        mapped = getattr(self.memory, "mapped", None)
        if callable(mapped):
            return bool(mapped(user_va, length))
        try:  # a UserMemory without ``mapped``: probe both ends
            self.memory.read(user_va, 1)
            self.memory.read(user_va + length - 1, 1)
        except UserFault:
            return False
        return True

    def _add_domain_check(self, ioas: IoasObject, driver: IommuDriver) -> None:
        """``iopt_table_add_domain``: alignment, aperture and filling (pinning) checks."""
        new_align = max(driver.pgsize, self._iova_alignment(ioas))
        if new_align > PAGE_SIZE:
            raise IoctlError(errno.EINVAL)  # pragma: no cover - every driver maps 4 KiB
        mask = new_align - 1
        for area in ioas.areas:
            if area.iova & mask or area.length & mask or (area.user_va % PAGE_SIZE) & mask:
                raise IoctlError(errno.EADDRINUSE)
        start, end = driver.aperture
        for area in ioas.areas:
            if area.iova < start or area.last > end:
                raise IoctlError(errno.EADDRINUSE)
        for area in ioas.areas:
            if not self._pinnable(area.user_va, area.length):
                raise IoctlError(errno.EFAULT)

    def _alloc_iova(self, ioas: IoasObject, uptr: int, length: int, iopt_align: int) -> int:
        """``iopt_alloc_iova``: the lowest fitting hole above PAGE_SIZE."""
        if length == 0 or length >= U64_MAX // 2:
            raise IoctlError(errno.EOVERFLOW)
        align = _roundup_pow2(length)
        if uptr:
            align = min(align, uptr & -uptr)
        if align < iopt_align:
            raise IoctlError(errno.EINVAL)
        page_offset = uptr % PAGE_SIZE
        lo, hi = PAGE_SIZE, U64_MAX - PAGE_SIZE
        start = ((lo + align - 1) & ~(align - 1)) | page_offset
        if start > hi or hi - start < length - 1:
            raise IoctlError(errno.ENOSPC)  # pragma: no cover - the span is 2^64 - 8 KiB
        used = sorted([*self._reserved(ioas), *((a.iova, a.last) for a in ioas.areas)])
        hole_start = lo
        for first, last in [*used, (hi + 1, hi + 1)]:
            if first > hole_start:
                hole_last = min(first - 1, hi)
                cand = ((hole_start + align - 1) & ~(align - 1)) | page_offset
                if cand <= hole_last and hole_last - cand >= length - 1:
                    return cand
            hole_start = max(hole_start, last + 1)
            if hole_start > hi:
                break
        raise IoctlError(errno.ENOSPC)

    # -- IOMMU_IOAS_MAP ---------------------------------------------------------------------
    def _ioctl_ioas_map(self, call: Call[uapi.IoasMap]) -> int:
        cmd = call.cmd
        if cmd.flags & ~MAP_FLAGS or cmd.reserved:
            return errno.EOPNOTSUPP
        if cmd.iova >= U64_MAX or cmd.length >= U64_MAX:
            return errno.EOVERFLOW
        if not cmd.flags & MAP_PROT:
            return errno.EINVAL
        ioas: IoasObject = self._get(cmd.ioas_id, IoasObject)
        # iopt_alloc_user_pages / iopt_alloc_pages
        if cmd.user_va + cmd.length > U64_MAX:
            return errno.EOVERFLOW
        if cmd.length == 0 or cmd.length > U64_MAX - PAGE_SIZE:
            return errno.EINVAL
        # iopt_alloc_area_pages
        align = self._iova_alignment(ioas)
        if cmd.length & (align - 1):
            return errno.EINVAL
        if cmd.flags & uapi.IOMMU_IOAS_MAP_FIXED_IOVA:
            iova = cmd.iova
            if iova & (align - 1):
                return errno.EINVAL
            last = iova + cmd.length - 1
            if last > U64_MAX:
                return errno.EOVERFLOW
            if any(first <= last and iova <= end for first, end in self._reserved(ioas)):
                return errno.EINVAL
            if ioas.areas_in(iova, last):
                return errno.EEXIST
        else:
            iova = self._alloc_iova(ioas, cmd.user_va, cmd.length, align)
        # iopt_insert_area
        if (cmd.user_va % PAGE_SIZE) & (align - 1):
            return errno.EINVAL
        # iopt_fill_domains_pages: pin the user pages when a domain needs them
        if self._domains(ioas) and not self._pinnable(cmd.user_va, cmd.length):
            return errno.EFAULT
        area = Area(iova, cmd.length, cmd.user_va, cmd.flags & MAP_PROT)
        ioas.insert(area)
        if call.respond(replace(cmd, iova=iova)):
            return errno.EFAULT  # pragma: no cover - respond cannot fault here
        return ENOERR

    # -- IOMMU_IOAS_UNMAP -------------------------------------------------------------------
    def _ioctl_ioas_unmap(self, call: Call[uapi.IoasUnmap]) -> int:
        cmd = call.cmd
        ioas: IoasObject = self._get(cmd.ioas_id, IoasObject)
        if cmd.iova == 0 and cmd.length == U64_MAX:
            rc, unmapped = self._unmap_range(ioas, 0, U64_MAX)
            if rc == errno.ENOENT:
                rc = ENOERR  # unmapping everything of an empty IOAS succeeds
        else:
            if cmd.iova >= U64_MAX or cmd.length >= U64_MAX:
                return errno.EOVERFLOW
            if not cmd.length:
                return errno.EINVAL
            if cmd.iova + cmd.length - 1 > U64_MAX:
                return errno.EOVERFLOW
            rc, unmapped = self._unmap_range(ioas, cmd.iova, cmd.iova + cmd.length - 1)
        if rc:
            return rc
        if call.respond(replace(cmd, length=unmapped)):
            return errno.EFAULT  # pragma: no cover - respond cannot fault here
        return ENOERR

    def _unmap_range(self, ioas: IoasObject, start: int, last: int) -> tuple[int, int]:
        """``iopt_unmap_iova_range``: whole areas only, lowest first; partial progress."""
        unmapped = 0
        while True:
            found = ioas.areas_in(start, last)
            if not found:
                break
            area = found[0]
            if area.locks:
                return errno.EBUSY, unmapped
            if area.iova < start or area.last > last:
                return errno.ENOENT, unmapped
            ioas.remove(area)
            for hwpt in self._domains(ioas):
                self._drivers[hwpt.model].unmap_flush(self, hwpt, area.iova, area.last)
            unmapped += area.length
        return (ENOERR if unmapped else errno.ENOENT), unmapped

    # -- IOMMU_GET_HW_INFO (§1.3) ------------------------------------------------------------
    def _ioctl_get_hw_info(self, call: Call[uapi.GetHwInfo]) -> int:
        cmd = call.cmd
        if cmd.flags & ~uapi.IOMMU_HW_INFO_FLAG_INPUT_TYPE:
            return errno.EOPNOTSUPP
        in_type = cmd.data_type if cmd.flags & uapi.IOMMU_HW_INFO_FLAG_INPUT_TYPE else 0
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        driver = self.driver(dev.pdev.iommu)
        out_type, data = driver.hw_info(self, dev, in_type)
        copy_len = min(cmd.data_len, len(data))
        try:
            self.memory.write(cmd.data_uptr, data[:copy_len])
            if copy_len < cmd.data_len:
                self.memory.write(cmd.data_uptr + copy_len, bytes(cmd.data_len - copy_len))
        except UserFault:
            return errno.EFAULT
        caps = uapi.IOMMU_HW_CAP_DIRTY_TRACKING if driver.dirty_capable(dev) else 0
        out = replace(
            cmd,
            data_len=len(data),
            data_type=out_type,
            out_capabilities=caps,
            out_max_pasid_log2=driver.max_pasid_log2(dev),
        )
        if call.respond(out):
            return errno.EFAULT  # pragma: no cover - respond cannot fault here
        return ENOERR

    # -- IOMMU_HWPT_ALLOC (§1.4) -------------------------------------------------------------
    def _ioctl_hwpt_alloc(self, call: Call[uapi.HwptAlloc]) -> int:
        cmd = call.cmd
        if cmd.reserved:
            return errno.EOPNOTSUPP
        if (cmd.data_type == uapi.IOMMU_HWPT_DATA_NONE) != (cmd.data_len == 0):
            return errno.EINVAL
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        pt = self._objects.get(cmd.pt_id)
        data = UserData(cmd.data_type, cmd.data_uptr, cmd.data_len)
        make: Callable[[int], IommufdObject]
        if isinstance(pt, IoasObject):
            make = self._hwpt_paging_alloc(dev, pt, cmd.flags, data if data.len else None)
        elif isinstance(pt, HwptPagingObject):
            make = self._hwpt_nested_alloc(dev, pt, cmd.flags, data)
        elif isinstance(pt, ViommuObject):
            if pt.iommu != dev.pdev.iommu:
                return errno.EINVAL
            make = self._viommu_alloc_hwpt_nested(pt, cmd.flags, data)
        else:
            return errno.EINVAL  # not found (step 4) or any other kind (step 8)
        fault_id = 0
        if cmd.flags & uapi.IOMMU_HWPT_FAULT_ID_VALID:
            if not isinstance(self._objects.get(cmd.fault_id), FaultObject):
                return errno.ENOENT  # step 9: the new HWPT is discarded
            fault_id = cmd.fault_id
        hwpt = self._insert(lambda obj_id: _with_fault(make(obj_id), fault_id))
        return self._finish(call, replace(cmd, out_hwpt_id=hwpt.id), hwpt)

    def _hwpt_paging_alloc(
        self, dev: DeviceObject, ioas: IoasObject, flags: int, data: UserData | None
    ) -> Callable[[int], IommufdObject]:
        driver = self.driver(dev.pdev.iommu)
        if flags & ~PAGING_FLAGS:
            raise IoctlError(errno.EOPNOTSUPP)
        dirty = bool(flags & uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        if dirty and not driver.dirty_capable(dev):
            raise IoctlError(errno.EOPNOTSUPP)
        if flags & uapi.IOMMU_HWPT_FAULT_ID_VALID and flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT:
            raise IoctlError(errno.EOPNOTSUPP)
        driver.paging_alloc(self, dev, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, data)
        self._add_domain_check(ioas, driver)
        nest_parent = bool(flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
        return self._paging_maker(dev, ioas, driver, nest_parent=nest_parent, dirty=dirty)

    def _paging_maker(
        self,
        dev: DeviceObject,
        ioas: IoasObject,
        driver: IommuDriver,
        *,
        nest_parent: bool = False,
        dirty: bool = False,
        auto: bool = False,
    ) -> Callable[[int], IommufdObject]:
        unit = self._units[dev.pdev.iommu]

        def make(obj_id: int) -> IommufdObject:
            vmid = asid = 0
            if driver.model == ARM_SMMUV3:
                # a nesting parent is a stage-2 domain with a VMID, others stage-1 with an ASID
                if nest_parent:
                    vmid = unit.alloc_vmid()
                else:
                    asid = self._alloc_asid()
            return HwptPagingObject(
                obj_id,
                ioas.id,
                dev.pdev.iommu,
                driver.model,
                nest_parent,
                auto_domain=auto,
                vmid=vmid,
                asid=asid,
                dirty=dirty,
            )

        return make

    def _hwpt_nested_alloc(
        self, dev: DeviceObject, parent: HwptPagingObject, flags: int, data: UserData
    ) -> Callable[[int], IommufdObject]:
        driver = self.driver(dev.pdev.iommu)
        if flags & ~NESTED_FLAGS or not data.len or not driver.has_domain_alloc_nested:
            raise IoctlError(errno.EOPNOTSUPP)
        if parent.auto_domain or not parent.nest_parent or parent.model != driver.model:
            raise IoctlError(errno.EINVAL)
        nested = driver.domain_alloc_nested(
            self, dev, parent, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, data
        )

        def make(obj_id: int) -> IommufdObject:
            return HwptNestedObject(obj_id, parent.id, 0, dev.pdev.iommu, driver.model, nested)

        return make

    def _viommu_alloc_hwpt_nested(
        self, viommu: ViommuObject, flags: int, data: UserData
    ) -> Callable[[int], IommufdObject]:
        if flags & ~NESTED_FLAGS or not data.len:
            raise IoctlError(errno.EOPNOTSUPP)
        driver = self.driver(viommu.iommu)
        nested = driver.viommu_alloc_domain_nested(
            self, viommu, flags & ~uapi.IOMMU_HWPT_FAULT_ID_VALID, data
        )

        def make(obj_id: int) -> IommufdObject:
            return HwptNestedObject(
                obj_id, viommu.parent_id, viommu.id, viommu.iommu, driver.model, nested
            )

        return make

    # -- IOMMU_VIOMMU_ALLOC (§1.6) -----------------------------------------------------------
    def _ioctl_viommu_alloc(self, call: Call[uapi.ViommuAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags or cmd.type == uapi.IOMMU_VIOMMU_TYPE_DEFAULT:
            return errno.EOPNOTSUPP
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        driver = self.driver(dev.pdev.iommu)
        if not driver.viommu_supported(cmd.type):
            return errno.EOPNOTSUPP
        parent: HwptPagingObject = self._get(cmd.hwpt_id, HwptPagingObject)
        if not parent.nest_parent:
            return errno.EINVAL
        data = UserData(cmd.type, cmd.data_uptr, cmd.data_len) if cmd.data_len else None
        driver.viommu_init(self, dev, parent, data)
        viommu = self._insert(
            lambda obj_id: ViommuObject(obj_id, cmd.type, dev.pdev.iommu, parent.id, parent.vmid)
        )
        return self._finish(call, replace(cmd, out_viommu_id=viommu.id), viommu)

    # -- IOMMU_VDEVICE_ALLOC (§1.7) ----------------------------------------------------------
    def _ioctl_vdevice_alloc(self, call: Call[uapi.VdeviceAlloc]) -> int:
        cmd = call.cmd
        # virt_id > ULONG_MAX cannot happen on a 64-bit host
        viommu: ViommuObject = self._get(cmd.viommu_id, ViommuObject)
        dev: DeviceObject = self._get(cmd.dev_id, DeviceObject)
        if viommu.iommu != dev.pdev.iommu:
            return errno.EINVAL
        if dev.vdevice_id:
            return errno.EEXIST
        if cmd.virt_id in viommu.vdevs:
            return errno.EEXIST
        vdev = self._insert(lambda obj_id: VdeviceObject(obj_id, viommu.id, dev.id, cmd.virt_id))
        viommu.vdevs[cmd.virt_id] = vdev.id
        dev.vdevice_id = vdev.id
        return self._finish(call, replace(cmd, out_vdevice_id=vdev.id), vdev)

    # -- IOMMU_VEVENTQ_ALLOC (§1.8) ----------------------------------------------------------
    def _ioctl_veventq_alloc(self, call: Call[uapi.VeventqAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags or cmd.reserved or cmd.type == uapi.IOMMU_VEVENTQ_TYPE_DEFAULT:
            return errno.EOPNOTSUPP
        if not cmd.veventq_depth:
            return errno.EINVAL
        viommu: ViommuObject = self._get(cmd.viommu_id, ViommuObject)
        if self._veventq(viommu, cmd.type) is not None:
            return errno.EEXIST
        queue = self._insert(
            lambda obj_id: VeventqObject(obj_id, viommu.id, cmd.type, cmd.veventq_depth)
        )
        fd = self._new_fd()
        if call.respond(replace(cmd, out_veventq_id=queue.id, out_veventq_fd=fd)):
            self._destroy(queue)  # pragma: no cover - respond cannot fault here
            return errno.EFAULT  # pragma: no cover
        self._event_files[fd] = EventFile(fd, queue.id)
        return ENOERR

    # -- IOMMU_HW_QUEUE_ALLOC (§1.9) ---------------------------------------------------------
    def _ioctl_hw_queue_alloc(self, call: Call[uapi.HwQueueAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags or cmd.type == uapi.IOMMU_HW_QUEUE_TYPE_DEFAULT:
            return errno.EOPNOTSUPP
        if not cmd.length:
            return errno.EINVAL
        if cmd.nesting_parent_iova + cmd.length - 1 > U64_MAX:
            return errno.EOVERFLOW
        viommu: ViommuObject = self._get(cmd.viommu_id, ViommuObject)
        driver = self.driver(viommu.iommu)
        if not driver.hw_queue_supported(viommu, cmd.type):
            return errno.EOPNOTSUPP
        # iommufd_hw_queue_alloc_phys: pin the page-aligned range through an access
        offset = cmd.nesting_parent_iova % PAGE_SIZE
        length = offset + cmd.length + PAGE_SIZE - 1
        if length > U64_MAX:
            return errno.ERANGE
        length -= length % PAGE_SIZE
        parent = self._objects[viommu.parent_id]
        assert isinstance(parent, HwptPagingObject)
        ioas = self._objects[parent.ioas_id]
        assert isinstance(ioas, IoasObject)
        pinned = self._access_pin(ioas, cmd.nesting_parent_iova - offset, length)
        prev_id = driver.hw_queue_init(self, viommu, cmd.index)
        queue = self._insert(
            lambda obj_id: HwQueueObject(
                obj_id,
                viommu.id,
                cmd.type,
                cmd.index,
                cmd.nesting_parent_iova,
                cmd.length,
                prev_id,
                pinned,
            )
        )
        for area in pinned:
            area.locks += 1
        viommu.hw_queues[cmd.index] = queue.id
        return self._finish(call, replace(cmd, out_hw_queue_id=queue.id), queue)

    def _access_pin(self, ioas: IoasObject, iova: int, length: int) -> list[Area]:
        """``iommufd_access_pin_pages``: contiguous areas covering the range, pinned."""
        last = iova + length - 1
        if last > U64_MAX:
            raise IoctlError(errno.EOVERFLOW)  # pragma: no cover - checked by the caller
        areas = ioas.areas_in(iova, last)
        cur = iova
        for area in areas:
            if area.iova > cur:
                break
            cur = area.last + 1
        if not areas or areas[0].iova > iova or cur <= last:
            raise IoctlError(errno.ENOENT)
        for area in areas:
            first = max(area.iova, iova)
            end = min(area.last, last)
            if not self._pinnable(area.user_va + (first - area.iova), end - first + 1):
                raise IoctlError(errno.EFAULT)
        return areas

    # -- IOMMU_FAULT_QUEUE_ALLOC (§1.10) -----------------------------------------------------
    def _ioctl_fault_queue_alloc(self, call: Call[uapi.FaultQueueAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags:
            return errno.EOPNOTSUPP
        fault = self._insert(FaultObject)
        fd = self._new_fd()
        if call.respond(replace(cmd, out_fault_id=fault.id, out_fault_fd=fd)):
            self._destroy(fault)  # pragma: no cover - respond cannot fault here
            return errno.EFAULT  # pragma: no cover
        self._event_files[fd] = EventFile(fd, fault.id)
        return ENOERR

    def _fault_read(self, fault: FaultObject, count: int) -> bytes:
        """``iommufd_fault_fops_read``: whole groups that fit; each gets a cookie."""
        out = bytearray()
        while fault.deliver:
            group = fault.deliver[0]
            if len(group) * PGFAULT_SIZE > count - len(out):
                break
            del fault.deliver[0]
            cookie = 1
            while cookie in fault.response:
                cookie += 1
            fault.response[cookie] = group
            for item in group:
                out += uapi.encode(replace(item, cookie=cookie))
        return bytes(out)

    # -- IOMMU_TEST_CMD (§5) -----------------------------------------------------------------
    def _ioctl_test_cmd(self, call: Call[uapi.TestCmd]) -> int:
        from viommud.backend.emulator.selftest import test_cmd  # noqa: PLC0415 - mock imports us

        return test_cmd(self, call)

    # -- IOMMU_HWPT_INVALIDATE (§2.2) --------------------------------------------------------
    def _ioctl_hwpt_invalidate(self, call: Call[uapi.HwptInvalidate]) -> int:
        rc, done = self._hwpt_invalidate(call.cmd)
        # The write-back of the whole struct (§2.2 step 6) changes only entry_num; MIN_SIZE
        # is the whole struct, so the user's copy always covers it.
        _U32.pack_into(call.arg, _ENTRY_NUM_OFFSET, done)
        return rc

    def _hwpt_invalidate(self, cmd: uapi.HwptInvalidate) -> tuple[int, int]:
        if cmd.reserved:
            return errno.EOPNOTSUPP, 0
        if cmd.entry_num and (not cmd.data_uptr or not cmd.entry_len):
            return errno.EINVAL, 0
        obj = self._objects.get(cmd.hwpt_id)
        if obj is None:
            return errno.ENOENT, 0
        array = UserArray(cmd.data_type, cmd.data_uptr, cmd.entry_len, cmd.entry_num)
        result: tuple[int, int] | None
        if isinstance(obj, HwptNestedObject):
            result = self._drivers[obj.model].hwpt_cache_invalidate(self, obj, array)
        elif isinstance(obj, ViommuObject):
            result = self.driver(obj.iommu).viommu_cache_invalidate(self, obj, array)
        else:
            return errno.EINVAL, 0
        if result is None:
            return errno.EOPNOTSUPP, 0
        return result

    # -- VFIO_DEVICE_BIND_IOMMUFD --------------------------------------------------------------
    def _vfio_bind(self, file: DeviceFile, arg: bytearray) -> int:
        cls = uapi.VfioDeviceBindIommufd
        cmd = _copy_vfio_minsz(arg, cls)
        if cmd.argsz < cls.MIN_SIZE or cmd.flags or cmd.iommufd < 0:
            return errno.EINVAL
        if file.dev_id:
            return errno.EINVAL  # one device cannot be bound twice
        if cmd.iommufd != self.iommufd or not self._open:
            return errno.EBADFD if cmd.iommufd in self._files else errno.EBADF
        dev = self._insert(lambda obj_id: DeviceObject(obj_id, file.pdev, file.fd))
        file.dev_id = dev.id
        arg[12:16] = _U32.pack(dev.id)  # copy_to_user(&arg->out_devid)
        return ENOERR

    def _unbind(self, dev_id: int) -> None:
        dev = self._objects[dev_id]
        assert isinstance(dev, DeviceObject)
        self._detach(dev)
        if dev.vdevice_id:
            vdev = self._objects[dev.vdevice_id]
            self._destroy(vdev)
            self._tombstones.add(vdev.id)  # §0.3: its ID stays taken until close
        del self._objects[dev.id]

    # -- VFIO_DEVICE_ATTACH_IOMMUFD_PT / DETACH ------------------------------------------
    def _vfio_attach(self, file: DeviceFile, arg: bytearray) -> int:
        cls = uapi.VfioDeviceAttachIommufdPt
        cmd = _copy_vfio_minsz(arg, cls)
        if cmd.argsz < cls.MIN_SIZE:
            return errno.EINVAL
        if cmd.flags & ~uapi.VFIO_DEVICE_ATTACH_PASID:
            return errno.EINVAL
        if cmd.flags & uapi.VFIO_DEVICE_ATTACH_PASID:
            return errno.EOPNOTSUPP  # no pasid_attach_ioas on emulated devices
        dev = self._objects[file.dev_id]
        assert isinstance(dev, DeviceObject)
        rc, pt_id = self.attach_pt(dev, cmd.pt_id)
        if rc:
            return rc
        arg[8:12] = _U32.pack(pt_id)  # copy_to_user(&arg->pt_id)
        return ENOERR

    def attach_pt(self, dev: DeviceObject, pt_id: int) -> tuple[int, int]:
        """``iommufd_device_attach`` / ``_replace``: ``(errno, hwpt id attached)``."""
        pt = self._objects.get(pt_id)
        if pt is None:
            return errno.ENOENT, 0
        if isinstance(pt, HwptPagingObject | HwptNestedObject):
            return self._attach(dev, pt), pt.id
        if isinstance(pt, IoasObject):
            return self._attach_ioas(dev, pt)
        return errno.EINVAL, 0

    def _vfio_detach(self, file: DeviceFile, arg: bytearray) -> int:
        cls = uapi.VfioDeviceDetachIommufdPt
        cmd = _copy_vfio_minsz(arg, cls)
        if cmd.argsz < cls.MIN_SIZE:
            return errno.EINVAL
        if cmd.flags & ~uapi.VFIO_DEVICE_DETACH_PASID:
            return errno.EINVAL
        if cmd.flags & uapi.VFIO_DEVICE_DETACH_PASID:
            return errno.EOPNOTSUPP
        dev = self._objects[file.dev_id]
        assert isinstance(dev, DeviceObject)
        self._detach(dev)  # detaching a detached device is a silent no-op
        return ENOERR

    def _attach(self, dev: DeviceObject, hwpt: HwptObject) -> int:
        """Attach or replace (vfio picks replace when attached); 0 or the driver's errno."""
        if dev.hwpt_id == hwpt.id:
            return ENOERR  # replacing with the same HWPT is a no-op
        driver = self.driver(dev.pdev.iommu)
        if hwpt.model != driver.model:
            return errno.EINVAL  # domain owned by another driver
        if isinstance(hwpt, HwptPagingObject):
            rc = driver.attach_paging(self, dev, hwpt)
        else:
            rc = driver.attach_nested(self, dev, hwpt)
        if rc:
            return rc
        self._set_attachment(dev, hwpt.id)
        return ENOERR

    def _set_attachment(self, dev: DeviceObject, new_id: int) -> None:
        """Move ``dev`` to ``new_id`` (0: detached) with the kernel's own invalidations."""
        old_id = dev.hwpt_id
        old = self._objects.get(old_id) if old_id else None
        driver = self.driver(dev.pdev.iommu)
        unit = self._units[dev.pdev.iommu]
        if new_id and driver.model == INTEL_VTD:
            unit.did(new_id)
        dev.hwpt_id = new_id
        driver.attach_changed(self, dev, old)
        if old_id and driver.model == INTEL_VTD:
            still = any(
                isinstance(obj, DeviceObject)
                and obj.hwpt_id == old_id
                and obj.pdev.iommu == dev.pdev.iommu
                for obj in self._objects.values()
            )
            if not still:
                unit.dids.pop(old_id, None)
        if old_id:
            self._hwpt_put(old_id)

    def _attach_ioas(self, dev: DeviceObject, ioas: IoasObject) -> tuple[int, int]:
        """``iommufd_device_auto_get_domain``: reuse a fitting auto domain or make one."""
        autos = [
            obj
            for obj in self._objects.values()  # insertion order == the IOAS's hwpt_list order
            if isinstance(obj, HwptPagingObject) and obj.auto_domain and obj.ioas_id == ioas.id
        ]
        for hwpt in autos:
            rc = self._attach(dev, hwpt)
            if rc == errno.EINVAL:
                continue  # incompatible: try the next one
            if rc:
                return rc, 0
            return ENOERR, hwpt.id
        driver = self.driver(dev.pdev.iommu)
        try:
            self._add_domain_check(ioas, driver)
            hwpt_new = self._insert(self._paging_maker(dev, ioas, driver, auto=True))
        except IoctlError as exc:
            return exc.errno, 0
        assert isinstance(hwpt_new, HwptPagingObject)
        rc = self._attach(dev, hwpt_new)
        if rc:  # pragma: no cover - a fresh domain always fits its own device
            self._destroy(hwpt_new)
            return rc, 0
        return ENOERR, hwpt_new.id

    def _detach(self, dev: DeviceObject) -> None:
        if dev.hwpt_id:
            self._set_attachment(dev, 0)

    def _hwpt_put(self, hwpt_id: int) -> None:
        """Drop an attachment reference; an unused auto domain goes away with it."""
        hwpt = self._objects.get(hwpt_id)
        if isinstance(hwpt, HwptPagingObject) and hwpt.auto_domain and not self._busy(hwpt):
            self._destroy(hwpt)


def _with_fault(obj: IommufdObject, fault_id: int) -> IommufdObject:
    if fault_id and isinstance(obj, HwptPagingObject | HwptNestedObject):
        return replace(obj, fault_id=fault_id)
    return obj


def _copy_vfio_minsz(arg: bytearray, cls: type[S]) -> S:
    """VFIO's ``copy_from_user(&cmd, arg, minsz)``: EFAULT if the first minsz bytes are missing."""
    if len(arg) < cls.MIN_SIZE:
        raise IoctlError(errno.EFAULT)
    return uapi.decode(cls, arg[: cls.MIN_SIZE])


_Handler = Callable[[EmulatedIommufd, Any], int]
_DeviceHandler = Callable[[EmulatedIommufd, DeviceFile, bytearray], int]

# request -> (structure, handler). Known but not emulated requests are absent (ENOTTY).
_IOMMUFD_OPS: dict[int, tuple[type[uapi.UapiStruct], _Handler]] = {
    uapi.IOMMU_DESTROY: (uapi.Destroy, EmulatedIommufd._ioctl_destroy),
    uapi.IOMMU_IOAS_ALLOC: (uapi.IoasAlloc, EmulatedIommufd._ioctl_ioas_alloc),
    uapi.IOMMU_IOAS_MAP: (uapi.IoasMap, EmulatedIommufd._ioctl_ioas_map),
    uapi.IOMMU_IOAS_UNMAP: (uapi.IoasUnmap, EmulatedIommufd._ioctl_ioas_unmap),
    uapi.IOMMU_HWPT_ALLOC: (uapi.HwptAlloc, EmulatedIommufd._ioctl_hwpt_alloc),
    uapi.IOMMU_GET_HW_INFO: (uapi.GetHwInfo, EmulatedIommufd._ioctl_get_hw_info),
    uapi.IOMMU_HWPT_INVALIDATE: (uapi.HwptInvalidate, EmulatedIommufd._ioctl_hwpt_invalidate),
    uapi.IOMMU_FAULT_QUEUE_ALLOC: (uapi.FaultQueueAlloc, EmulatedIommufd._ioctl_fault_queue_alloc),
    uapi.IOMMU_VIOMMU_ALLOC: (uapi.ViommuAlloc, EmulatedIommufd._ioctl_viommu_alloc),
    uapi.IOMMU_VDEVICE_ALLOC: (uapi.VdeviceAlloc, EmulatedIommufd._ioctl_vdevice_alloc),
    uapi.IOMMU_VEVENTQ_ALLOC: (uapi.VeventqAlloc, EmulatedIommufd._ioctl_veventq_alloc),
    uapi.IOMMU_HW_QUEUE_ALLOC: (uapi.HwQueueAlloc, EmulatedIommufd._ioctl_hw_queue_alloc),
    uapi.IOMMU_TEST_CMD: (uapi.TestCmd, EmulatedIommufd._ioctl_test_cmd),
}

# requests on a bound device cdev (BIND is handled before the bound check)
_DEVICE_OPS: dict[int, _DeviceHandler] = {
    uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT: EmulatedIommufd._vfio_attach,
    uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT: EmulatedIommufd._vfio_detach,
}
