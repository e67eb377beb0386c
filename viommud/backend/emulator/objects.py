"""The iommufd objects and the reference graph between them (reference §0.3).

Mirrors the object types of ``drivers/iommu/iommufd/iommufd_private.h`` and what
``device.c``, ``ioas.c`` / ``io_pagetable.h``, ``hw_pagetable.c``, ``viommu.c``,
``eventq.c`` and ``selftest.c`` keep in them. Each class names the objects it keeps
alive (``holds``): IOMMU_DESTROY answers EBUSY while any live object (or open event fd)
holds the target. The per-driver data of a nested domain (``ArmNestedData``,
``MockNestedData``) is declared here too, since ``HwptNestedObject`` carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sortedcontainers import SortedList

from protocols import iommufd as uapi
from viommud.backend.emulator.files import FileRef
from viommud.host import PhysicalDevice

__all__ = [
    "INT_MAX",
    "Area",
    "ArmNestedData",
    "DeviceObject",
    "FaultObject",
    "HwQueueObject",
    "HwptNestedObject",
    "HwptObject",
    "HwptPagingObject",
    "IoasObject",
    "IommufdObject",
    "MockNestedData",
    "SelftestObject",
    "VdeviceObject",
    "Vevent",
    "VeventqObject",
    "ViommuObject",
]

INT_MAX = (1 << 31) - 1


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
    """One IOAS_MAP'ed or IOAS_MAP_FILE'd range of an IOAS (``struct iopt_area``).

    ``user_va`` is where its pages come from: a user virtual address, or with ``file`` set
    (IOAS_MAP_FILE) the byte offset in that file; the area holds a reference to the file.
    """

    iova: int
    length: int
    user_va: int
    prot: int  # IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
    locks: int = 0  # HW queues pinning it (IOAS_UNMAP gives EBUSY while > 0)
    file: FileRef | None = None

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


@dataclass(eq=False, slots=True)
class IoasObject(IommufdObject):
    """An IO address space (the stage-2 / host IOVA space, §1.2) and its areas.

    The kernel keeps areas in an interval tree; here a sorted list of start IOVAs (a
    ``SortedList``: O(log n) insert and delete, where a plain list moves every later entry)
    and a dict from start to area, since areas never overlap.
    """

    KIND: ClassVar[str] = "IOAS"
    id: int
    _starts: SortedList[int] = field(default_factory=SortedList)
    _by_start: dict[int, Area] = field(default_factory=dict)

    @property
    def areas(self) -> list[Area]:
        """Every area, lowest IOVA first (O(n): for inspection and whole-IOAS checks)."""
        by_start = self._by_start
        return [by_start[start] for start in self._starts]

    def areas_in(self, first: int, last: int) -> list[Area]:
        """The areas meeting ``[first, last]``, lowest first (O(log n + found)): areas do
        not overlap, so sorted by start they are sorted by end as well."""
        starts, by_start = self._starts, self._by_start
        hi = starts.bisect_right(last)
        lo = hi
        while lo and by_start[starts[lo - 1]].last >= first:
            lo -= 1
        return [by_start[start] for start in starts[lo:hi]]

    def insert(self, area: Area) -> None:
        assert area.iova not in self._by_start
        self._starts.add(area.iova)
        self._by_start[area.iova] = area

    def remove(self, area: Area) -> None:
        assert self._by_start.get(area.iova) is area
        self._starts.remove(area.iova)
        del self._by_start[area.iova]
        if area.file is not None:
            area.file.put()  # iopt_release_pages: the pages' file reference goes

    def clear(self) -> None:
        """Remove every area (the IOAS is destroyed: ``iopt_unmap_all``)."""
        for area in self.areas:
            self.remove(area)


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
