"""Topology: the guest-to-host mappings of one VT-d vIOMMU, kept as data (DESIGN.md point 3).

* Each physical VT-d unit the vIOMMU spans gets, at the first device attached behind it, a
  nesting-parent HWPT on the VM's IOAS (``UnitSlot``): the stage 2 (GPA -> HPA) every nested
  stage 1 of that unit sits on (iommufd.md §4.1).
* Each guest device is a source ID (``bus << 8 | devfn``) bound to its physical device
  (``VtdDevice``). Until the guest's entries say otherwise it is attached to the nesting
  parent, as a VFIO device is before QEMU first reads its context entry.
* What the guest's context entry (and, in scalable mode, the PASID-table entry of the
  context's RID_PASID) asks for is a ``Binding``: blocked, pass-through (the nesting parent)
  or nested, with a domain ID and a stage-1 configuration (``S1Config``, the
  ``iommu_hwpt_vtd_s1`` fields). A nested binding is a ``VTD_S1`` HWPT allocated on the
  unit's nesting parent; devices of one unit with equal (domain ID, stage-1 configuration)
  share one (``SharedHwpt``), refcounted by its users.
* Each shared HWPT remembers the host invalidations carried out on it (``FlushHistory``) and
  each device when it joined its HWPT: the device-TLB elision rule reads both
  (viommud/dispatcher/vtd.py, docs/vtd.md).

Teardown frees everything in the order the kernel's references require (iommufd.md §0.3):
devices detached before their HWPTs, nested HWPTs before the nesting parent, then the IOAS.
"""

from __future__ import annotations

import contextlib
import enum
from collections import deque
from dataclasses import InitVar, dataclass, field

from protocols import iommufd as uapi
from protocols.models import HostIommu
from protocols.vtd import (
    IQE,
    PGTT_FIRST_STAGE,
    PGTT_PASS_THROUGH,
    VTD_S1_ADDR_WIDTH,
    VTD_S1_STRUCT,
)
from viommud.backend.calls import BackendCallError, BoundDevice, Iommufd
from viommud.guest.vtd import LegacyContext, PasidEntry, VtdContext
from viommud.guest_memory import RamRegion
from viommud.host import HostConfig
from viommud.topology import PiommuStatus, TopologyError, TopologyStatus, VdeviceStatus
from viommud.topology.guest_ram import ParentRam

FULL_END = 1 << 64  # exclusive end of the whole 64-bit address space
HISTORY = 64  # host flushes remembered per HWPT for the device-TLB elision rule


class Mode(enum.Enum):
    """What the guest's entries ask the hardware to do with a device's requests."""

    BLOCKED = "blocked"  # not present, or an entry the hardware would fault on
    PASS_THROUGH = "pass_through"  # noqa: S105 - GPA = IOVA: the nesting parent alone
    NESTED = "nested"  # the guest's stage 1 on top of the nesting parent


@dataclass(frozen=True, slots=True)
class S1Config:
    """A guest stage-1 configuration: the ``iommu_hwpt_vtd_s1`` the kernel takes
    (``protocols.vtd.IOMMU_HWPT_VTD_S1_LAYOUT``)."""

    flags: int  # IOMMU_VTD_S1_SRE / EAFE / WPE
    pgtbl_addr: int  # guest-physical address of the stage-1 root
    addr_width: int

    def pack(self) -> bytes:
        return VTD_S1_STRUCT.pack(self.flags, self.pgtbl_addr, self.addr_width, 0)


@dataclass(frozen=True, slots=True)
class Binding:
    """What a device's requests without PASID translate through, per the guest's entries.

    ``pasid`` is the PASID its translations are tagged with (scalable mode: the context's
    RID_PASID; legacy mode: None, no PASID). ``why`` says why a binding is blocked."""

    mode: Mode
    did: int | None = None
    pasid: int | None = None
    s1: S1Config | None = None
    why: str = ""


BLOCKED_NOT_PRESENT = Binding(Mode.BLOCKED, why="not present")
LEGACY_SECOND_LEVEL = "legacy second-level table: not nestable, no shadow without guest memory"


def legacy_binding(ctx: LegacyContext) -> Binding:
    """The binding a legacy-mode context entry asks for (VT-d §9.3).

    TT=2 is pass-through (the unit's nesting parent: GPA = IOVA). TT=0/1 name a
    second-level table, which the host cannot take: its only nested format is the
    first-stage one (``IOMMU_HWPT_DATA_VTD_S1``; a second-level PTE's bits 0/1 are read and
    write, a first-stage PTE's bit 0 is present and bit 2 user). QEMU keeps such a device on
    its default stage-2 HWPT and shadows the guest's table into that HWPT's IOAS at each
    IOTLB invalidation, which needs the guest's page-table memory; a trace does not carry
    it. So the device is blocked: it never translates more than the guest programmed and
    holds no stale translation (docs/vtd.md, "Legacy mode")."""
    if not ctx.present:
        return BLOCKED_NOT_PRESENT
    if ctx.reserved:
        return Binding(Mode.BLOCKED, ctx.did, why="reserved bits set in the context entry")
    if ctx.tt == 2:
        return Binding(Mode.PASS_THROUGH, ctx.did)
    if ctx.tt == 3:
        return Binding(Mode.BLOCKED, ctx.did, why="reserved translation type TT=3")
    if ctx.aw not in (1, 2):
        return Binding(Mode.BLOCKED, ctx.did, why=f"address width AW={ctx.aw} not supported")
    return Binding(Mode.BLOCKED, ctx.did, why=LEGACY_SECOND_LEVEL)


def pasid_binding(entry: PasidEntry | None, rid_pasid: int) -> Binding:
    """The binding a scalable-mode PASID-table entry asks for (VT-d §9.6), as QEMU's
    ``x-flts=on`` vIOMMU derives it: first-stage (PGTT=1) becomes a nested HWPT from
    FLPTPTR, SRE/WPE/EAFE and the 4-level width; PGTT=4 is pass-through; second-stage and
    nested PGTTs are refused by this first-stage-only vIOMMU (ECAP.FSTS, no SSTS)."""
    if entry is None or not entry.present:
        return BLOCKED_NOT_PRESENT
    if entry.pgtt == PGTT_PASS_THROUGH:
        return Binding(Mode.PASS_THROUGH, entry.did, rid_pasid)
    if entry.pgtt != PGTT_FIRST_STAGE:
        return Binding(Mode.BLOCKED, entry.did, why=f"PGTT {entry.pgtt} is not supported")
    if entry.flpm != 0:
        return Binding(Mode.BLOCKED, entry.did, why="5-level first stage is not supported")
    s1 = S1Config(entry.s1_flags, entry.flptptr, VTD_S1_ADDR_WIDTH)
    return Binding(Mode.NESTED, entry.did, rid_pasid, s1)


@dataclass(slots=True)
class FlushHistory:
    """Host invalidations carried out on one nested HWPT: ``(clock, start, end)`` of the
    last ``HISTORY`` ranges (end exclusive) and the clock of the latest whole-space one."""

    full: int = -1
    recent: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def record(self, clock: int, start: int, end: int) -> None:
        if start == 0 and end >= FULL_END:
            self.full = clock
            self.recent.clear()
        else:
            self.recent.append((clock, start, end))


@dataclass(slots=True)
class SharedHwpt:
    """A nested VTD_S1 HWPT and the devices attached to it."""

    hwpt_id: int
    iommu: str
    did: int
    s1: S1Config
    users: set[int] = field(default_factory=set)  # source IDs
    flushes: FlushHistory = field(default_factory=FlushHistory)


@dataclass(slots=True)
class UnitSlot:
    """The backend objects one vIOMMU holds on one physical VT-d unit."""

    iommu: str
    parent_hwpt_id: int
    devices: set[int] = field(default_factory=set)  # source IDs
    hwpts: dict[tuple[int, S1Config], SharedHwpt] = field(default_factory=dict)


@dataclass(slots=True)
class VtdDevice:
    """A guest device (source ID) and what it is attached to on the host."""

    vid: int
    bound: BoundDevice
    ats: bool  # the physical device has an ATC (device TLB)
    binding: Binding | None = None  # None: the guest's entries were never read
    hwpt: SharedHwpt | None = None  # set when the binding is nested
    joined: int = 0  # topology clock when it joined ``hwpt``
    attached: bool = True  # False while blocked (detached from every HWPT)
    # The context cache and PASID cache of this device, as the VMM last read them.
    context: VtdContext | None = None
    pasid_entry: PasidEntry | None = None

    @property
    def iommu(self) -> str:
        return self.bound.iommu


@dataclass(slots=True)
class VtdTopology:
    """One VT-d vIOMMU: its physical units, devices and shared nested HWPTs."""

    name: str
    iommus: tuple[str, ...]
    host: HostConfig
    iommufd: Iommufd
    ioas_id: int | None = None
    # The FAULT object its stage-1 HWPTs send I/O page faults to (IOMMU_HWPT_FAULT_ID_VALID;
    # docs/vtd.md "Page requests"); 0: none.
    fault_id: int = 0
    # Guest RAM the VMM passed, mapped into the IOAS at its allocation (empty: none).
    ram_regions: InitVar[tuple[RamRegion, ...]] = ()
    ram: ParentRam = field(init=False)
    slots: dict[str, UnitSlot] = field(default_factory=dict)
    vdevices: dict[int, VtdDevice] = field(default_factory=dict)
    clock: int = 0  # orders attachments and host flushes (device-TLB elision rule)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # -- lookups ------------------------------------------------------------------------
    def vdevice(self, vid: int) -> VtdDevice | None:
        return self.vdevices.get(vid)

    def nested_in(self, did: int | None, pasid: int | None) -> tuple[list[SharedHwpt], int]:
        """HWPTs holding translations of domain ``did`` (None: all) tagged ``pasid`` (None:
        any), in first-attachment order, and the number of devices bound to them."""
        hwpts: dict[int, SharedHwpt] = {}
        devices = 0
        for vdev in self.vdevices.values():
            hwpt, binding = vdev.hwpt, vdev.binding
            if hwpt is None or binding is None:
                continue
            if (did is None or binding.did == did) and (pasid is None or binding.pasid == pasid):
                hwpts.setdefault(hwpt.hwpt_id, hwpt)
                devices += 1
        return list(hwpts.values()), devices

    # -- device_attach / device_detach --------------------------------------------------
    def attach(self, vid: int, device: str) -> VtdDevice:
        if vid in self.vdevices:
            raise TopologyError(f"source ID {vid:#06x} is already attached")
        if not 0 <= vid < 1 << 16:
            raise TopologyError(f"source ID {vid} is out of range (16 bits)")
        try:
            pdev = self.host.device(device)
        except KeyError:
            raise TopologyError(f"host device {device!r} does not exist") from None
        if pdev.iommu not in self.iommus:
            raise TopologyError(
                f"host device {device} sits behind {pdev.iommu}, "
                f"which vIOMMU {self.name} does not span"
            )
        if self.host.iommu(pdev.iommu).model != HostIommu.INTEL_VTD:
            raise TopologyError(f"{pdev.iommu} is not an Intel VT-d unit")
        fd = self.iommufd
        bound = fd.bind(device, pdev.iommu)
        made: list[int] = []
        try:
            slot = self.slots.get(pdev.iommu)
            if slot is None:
                if self.ioas_id is None:
                    self.ioas_id = self._parent_ioas(pdev.iommu)
                parent = fd.hwpt_alloc(
                    pdev.iommu,
                    bound.dev_id,
                    self.ioas_id,
                    flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT,
                )
                made.append(parent)
                slot = UnitSlot(pdev.iommu, parent)
            fd.attach(bound, slot.parent_hwpt_id)
        except BackendCallError as exc:
            for obj in reversed(made):
                self._try_destroy(pdev.iommu, obj)
            fd.unbind(bound)
            raise TopologyError(f"attaching {device}: {exc}") from None
        self.slots[pdev.iommu] = slot
        slot.devices.add(vid)
        vdev = VtdDevice(vid, bound, pdev.ats)
        self.vdevices[vid] = vdev
        return vdev

    def detach(self, vid: int) -> None:
        vdev = self.vdevices.get(vid)
        if vdev is None:
            raise TopologyError(f"source ID {vid:#06x} is not attached")
        fd = self.iommufd
        slot = self.slots[vdev.iommu]
        if vdev.attached:
            fd.detach(vdev.bound)
        if vdev.hwpt is not None:
            self._release(slot, vdev.hwpt, vid)
        fd.unbind(vdev.bound)
        del self.vdevices[vid]
        slot.devices.discard(vid)
        if not slot.devices:
            fd.destroy(slot.iommu, slot.parent_hwpt_id)
            del self.slots[slot.iommu]

    def describe(self) -> TopologyStatus:
        """The backend objects this vIOMMU holds, for ``viommud status`` (VT-d makes no
        iommufd vIOMMU object: its nested HWPTs hang off the nesting parent)."""
        return TopologyStatus(
            piommus=tuple(
                PiommuStatus(
                    slot.iommu,
                    None,
                    slot.parent_hwpt_id,
                    tuple(sorted(s.hwpt_id for s in slot.hwpts.values())),
                )
                for _, slot in sorted(self.slots.items())
            ),
            vdevices=tuple(
                VdeviceStatus(
                    vid,
                    d.bound.name,
                    d.bound.iommu,
                    None,
                    d.hwpt.hwpt_id if d.hwpt is not None else None,
                )
                for vid, d in sorted(self.vdevices.items())
            ),
            hwpts=sum(1 + len(slot.hwpts) for slot in self.slots.values()),
        )

    def __post_init__(self, ram_regions: tuple[RamRegion, ...]) -> None:
        self.ram = ParentRam(self.iommufd, ram_regions)

    def _parent_ioas(self, iommu: str) -> int:
        """The VM's IOAS, holding the passed guest RAM at IOVA = GPA (docs: guest memory)."""
        return self.ram.new_ioas(iommu)

    def destroy(self) -> None:
        """Free everything this vIOMMU holds on the backend (the IOAS with its RAM)."""
        for vid in sorted(self.vdevices):
            self.detach(vid)
        if self.ioas_id is not None:
            self.iommufd.destroy(None, self.ioas_id)
            self.ioas_id = None
        self.ram.close()

    # -- binding changes (context-cache and PASID-cache invalidations) -------------------
    def bind(self, vid: int, binding: Binding) -> bool:
        """Make device ``vid`` translate as ``binding`` says; False when nothing changed.

        Raises TopologyError (guest code IQE) when the host refuses a call; the device then
        stays where it was."""
        vdev = self.vdevices[vid]
        if binding == vdev.binding:
            return False
        slot = self.slots[vdev.iommu]
        fd = self.iommufd
        old = vdev.hwpt
        try:
            if binding.mode is Mode.NESTED:
                assert binding.s1 is not None
                assert binding.did is not None
                shared = self._hwpt(slot, vdev, binding.did, binding.s1)
                if shared is not old:
                    self._attach(vdev, shared.hwpt_id, shared, slot)
                    shared.users.add(vid)
                    vdev.hwpt, vdev.joined = shared, self.tick()
            elif binding.mode is Mode.PASS_THROUGH:
                if old is not None or not vdev.attached:
                    fd.attach(vdev.bound, slot.parent_hwpt_id)
                vdev.hwpt = None
            else:
                if vdev.attached:
                    fd.detach(vdev.bound)
                vdev.hwpt = None
        except BackendCallError as exc:
            raise TopologyError(
                f"source ID {vid:#06x}: host {exc.ioctl} failed ({exc.errno_name})", IQE
            ) from None
        vdev.attached = binding.mode is not Mode.BLOCKED
        vdev.binding = binding
        if old is not None and old is not vdev.hwpt:
            self._release(slot, old, vid)
        return True

    def _hwpt(self, slot: UnitSlot, vdev: VtdDevice, did: int, s1: S1Config) -> SharedHwpt:
        key = (did, s1)
        shared = slot.hwpts.get(key)
        if shared is None:
            hwpt_id = self.iommufd.hwpt_alloc(
                slot.iommu,
                vdev.bound.dev_id,
                slot.parent_hwpt_id,
                data_type=uapi.IOMMU_HWPT_DATA_VTD_S1,
                data=s1.pack(),
                fault_id=self.fault_id,
            )
            shared = SharedHwpt(hwpt_id, slot.iommu, did, s1)
            slot.hwpts[key] = shared
        return shared

    def _attach(self, vdev: VtdDevice, pt_id: int, shared: SharedHwpt, slot: UnitSlot) -> None:
        try:
            self.iommufd.attach(vdev.bound, pt_id)
        except BackendCallError:
            if not shared.users:  # allocated for this attach: nobody else needs it
                del slot.hwpts[(shared.did, shared.s1)]
                self._try_destroy(slot.iommu, shared.hwpt_id)
            raise

    def _release(self, slot: UnitSlot, shared: SharedHwpt, vid: int) -> None:
        shared.users.discard(vid)
        if not shared.users:
            del slot.hwpts[(shared.did, shared.s1)]
            self.iommufd.destroy(slot.iommu, shared.hwpt_id)

    def _try_destroy(self, iommu: str, obj_id: int) -> None:
        # Rollback of a half-made object: the error that caused it is what gets reported.
        with contextlib.suppress(BackendCallError):
            self.iommufd.destroy(iommu, obj_id)
