"""Topology: the guest-to-host mappings of one vIOMMU, kept as data (DESIGN.md point 3).

For an SMMUv3 vIOMMU:

* each physical SMMU the vIOMMU spans gets, at the first device attached behind it, a
  nesting-parent stage-2 HWPT on the VM's IOAS and an iommufd vIOMMU object (``PiommuSlot``);
* each guest device is an iommufd vDEVICE (vdev_id = vSID) on the vIOMMU object of its
  physical SMMU (``VDevice``);
* the guest's STE decides what the device is attached to: a nested HWPT allocated on that
  vIOMMU object from the vSTE words alone (the VMM never reads guest CD tables). Devices on
  the same physical SMMU whose vSTEs are equal share one HWPT (``SharedHwpt``, refcounted).

Teardown frees everything in the order the kernel's references require (iommufd.md §0.3).
"""

from __future__ import annotations

import contextlib
import enum
import struct
from dataclasses import InitVar, dataclass, field

from protocols import iommufd as uapi
from protocols.models import HostIommu
from protocols.smmuv3 import CERROR_ILL
from viommud.backend.calls import BackendCallError, BoundDevice, Iommufd
from viommud.guest.smmuv3 import decode_ste
from viommud.guest_memory import RamRegion
from viommud.host import HostConfig
from viommud.topology import PiommuStatus, TopologyError, TopologyStatus, VdeviceStatus
from viommud.topology.guest_ram import ParentRam

# QEMU's masks on the vSTE before IOMMU_HWPT_ALLOC (smmuv3.md §3.2): D0 keeps V, Config,
# S1Fmt, bits [55:6] and S1CDMax; D1 keeps S1DSS, S1CIR, S1COR, S1CSH, S1STALLD and EATS.
# The kernel then refuses (EIO) anything outside its own, narrower D0 mask.
STE0_MASK = 0xF8FFFFFFFFFFFFFF
STE1_MASK = 0x380000FF
_STE_WORDS = struct.Struct("<QQ")
# vEVENTQ reads (iommufd uAPI): an 8-byte header, then 32 bytes for a real ARM event.
_VEVENT_HEADER = 8
_VEVENT_ARM = 32
_EVENT_READ = 4096


class StreamConfig(enum.Enum):
    """What a vSTE asks the hardware to do with the device's traffic (SMMUv3 §5.2)."""

    ABORT = "abort"
    BYPASS = "bypass"
    TRANSLATE = "translate"  # stage-1 translation through guest CD tables


@dataclass(frozen=True, slots=True)
class VsteKey:
    """The part of a vSTE that determines the nested HWPT (its identity for sharing)."""

    config: StreamConfig
    d0: int
    d1: int


ABORT_KEY = VsteKey(StreamConfig.ABORT, 0x1, 0)  # V=1, Config=0b000
BYPASS_KEY = VsteKey(StreamConfig.BYPASS, 0x9, 0)  # V=1, Config=0b100


def derive_vste(ste: bytes) -> VsteKey:
    """The stage-1 configuration a guest STE asks for, as QEMU's accelerated vSMMU derives it.

    V=0 and the abort configs give the shared abort HWPT, Config 0b100 the bypass HWPT,
    Config 0b101 a translate HWPT from the masked D0/D1; stage-2 and nested configs are
    refused (CERROR_ILL) because this vSMMU is stage-1 only. Bits the kernel would refuse
    (iommufd.md §3.1) are left for the backend to refuse, as on real hardware.
    """
    fields = decode_ste(ste)
    if not fields.v or fields.config < 0b100:
        return ABORT_KEY
    if fields.config == 0b100:
        return BYPASS_KEY
    if fields.config == 0b101:
        return VsteKey(StreamConfig.TRANSLATE, fields.d0 & STE0_MASK, fields.d1 & STE1_MASK)
    raise TopologyError(
        f"STE Config 0b{fields.config:03b} needs stage 2, which this vSMMU does not have",
        CERROR_ILL,
    )


@dataclass(slots=True)
class SharedHwpt:
    hwpt_id: int
    users: int = 0


@dataclass(slots=True)
class PiommuSlot:
    """The backend objects one vIOMMU holds on one physical SMMU."""

    iommu: str
    s2_hwpt_id: int
    viommu_id: int
    devices: set[int] = field(default_factory=set)  # vSIDs
    hwpts: dict[VsteKey, SharedHwpt] = field(default_factory=dict)
    # Whether any device here has had a stage-1 (translate) vSTE since the vIOMMU object was
    # made: only then can this physical SMMU hold stage-1 TLB entries of the guest.
    s1_seen: bool = False
    # The vEVENTQ (type ARM_SMMUV3) on the vIOMMU object, when the session asked for events.
    veventq_id: int = 0
    veventq_fd: int = -1


@dataclass(slots=True)
class VDevice:
    vid: int
    bound: BoundDevice
    vdevice_id: int
    ats: bool
    vste: VsteKey | None = None  # None: still on the nesting parent (no STE installed yet)

    @property
    def iommu(self) -> str:
        return self.bound.iommu


@dataclass(slots=True)
class SmmuTopology:
    """One SMMUv3 vIOMMU: its physical SMMUs, vdevices and shared nested HWPTs."""

    name: str
    iommus: tuple[str, ...]
    host: HostConfig
    iommufd: Iommufd
    ioas_id: int | None = None
    # Guest RAM the VMM passed, mapped into the IOAS at its allocation (empty: none).
    ram_regions: InitVar[tuple[RamRegion, ...]] = ()
    ram: ParentRam = field(init=False)
    slots: dict[str, PiommuSlot] = field(default_factory=dict)
    vdevices: dict[int, VDevice] = field(default_factory=dict)
    # Depth of the vEVENTQ allocated on each vIOMMU object; 0: no vEVENTQ (events off).
    event_depth: int = 0

    # -- lookups ------------------------------------------------------------------------
    def vdevice(self, vsid: int) -> VDevice | None:
        return self.vdevices.get(vsid)

    # -- device_attach / device_detach --------------------------------------------------
    def attach(self, vid: int, device: str) -> VDevice:
        if vid in self.vdevices:
            raise TopologyError(f"vSID {vid} is already attached")
        try:
            pdev = self.host.device(device)
        except KeyError:
            raise TopologyError(f"host device {device!r} does not exist") from None
        if pdev.iommu not in self.iommus:
            raise TopologyError(
                f"host device {device} sits behind {pdev.iommu}, "
                f"which vIOMMU {self.name} does not span"
            )
        if self.host.iommu(pdev.iommu).model != HostIommu.ARM_SMMUV3:
            raise TopologyError(f"{pdev.iommu} is not an Arm SMMUv3")
        if not 0 <= vid < 2**32:
            raise TopologyError(f"vSID {vid} is out of range")
        fd = self.iommufd
        bound = fd.bind(device, pdev.iommu)
        made: list[int] = []
        try:
            slot = self.slots.get(pdev.iommu)
            if slot is None:
                if self.ioas_id is None:
                    self.ioas_id = self._parent_ioas(pdev.iommu)
                s2 = fd.hwpt_alloc(
                    pdev.iommu,
                    bound.dev_id,
                    self.ioas_id,
                    flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT,
                )
                made.append(s2)
                viommu = fd.viommu_alloc(
                    pdev.iommu, bound.dev_id, s2, uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3
                )
                made.append(viommu)
                slot = PiommuSlot(pdev.iommu, s2, viommu)
                if self.event_depth:
                    slot.veventq_id, slot.veventq_fd = fd.veventq_alloc(
                        pdev.iommu, viommu, uapi.IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, self.event_depth
                    )
                    made.append(slot.veventq_id)
            vdevice_id = fd.vdevice_alloc(pdev.iommu, slot.viommu_id, bound.dev_id, vid)
            made.append(vdevice_id)
            # Until the guest installs an STE the device translates as the nesting parent
            # does (GPA -> HPA), as a VFIO device does before QEMU's first CFGI_STE.
            fd.attach(bound, slot.s2_hwpt_id)
        except BackendCallError as exc:
            if slot is not None and slot.veventq_fd >= 0 and pdev.iommu not in self.slots:
                fd.close_event_fd(slot.veventq_fd)  # the fd holds the vEVENTQ
            for obj in reversed(made):
                self._try_destroy(pdev.iommu, obj)
            fd.unbind(bound)
            raise TopologyError(f"attaching {device}: {exc}") from None
        self.slots[pdev.iommu] = slot
        slot.devices.add(vid)
        vdev = VDevice(vid, bound, vdevice_id, pdev.ats)
        self.vdevices[vid] = vdev
        return vdev

    def detach(self, vid: int) -> None:
        vdev = self.vdevices.get(vid)
        if vdev is None:
            raise TopologyError(f"vSID {vid} is not attached")
        fd = self.iommufd
        slot = self.slots[vdev.iommu]
        fd.detach(vdev.bound)
        if vdev.vste is not None:
            self._release(slot, vdev.vste)
        fd.destroy(vdev.iommu, vdev.vdevice_id)
        fd.unbind(vdev.bound)
        del self.vdevices[vid]
        slot.devices.discard(vid)
        if not slot.devices:
            if slot.veventq_id:
                fd.close_event_fd(slot.veventq_fd)  # the open fd holds the vEVENTQ
                fd.destroy(slot.iommu, slot.veventq_id)
            fd.destroy(slot.iommu, slot.viommu_id)
            fd.destroy(slot.iommu, slot.s2_hwpt_id)
            del self.slots[slot.iommu]

    def describe(self) -> TopologyStatus:
        """The backend objects this vIOMMU holds, for ``viommud status``."""
        hwpt_of = {
            (slot.iommu, key): shared.hwpt_id
            for slot in self.slots.values()
            for key, shared in slot.hwpts.items()
        }
        return TopologyStatus(
            piommus=tuple(
                PiommuStatus(
                    slot.iommu,
                    slot.viommu_id,
                    slot.s2_hwpt_id,
                    tuple(sorted(s.hwpt_id for s in slot.hwpts.values())),
                )
                for _, slot in sorted(self.slots.items())
            ),
            vdevices=tuple(
                VdeviceStatus(
                    vid,
                    v.bound.name,
                    v.iommu,
                    v.vdevice_id,
                    hwpt_of.get((v.iommu, v.vste)) if v.vste is not None else None,
                )
                for vid, v in sorted(self.vdevices.items())
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

    # -- events (docs/smmuv3.md, "Events") ---------------------------------------------
    def read_events(self) -> list[tuple[str, int, bool, bytes]]:
        """Drain the vEVENTQ of every vIOMMU object as the VMM's read(2) would:
        ``(physical SMMU, sequence, lost, record)`` in queue order, per SMMU in name order.
        A record is the 32-byte ``iommu_vevent_arm_smmuv3`` (vSID already in place); a
        lost-events header has none."""
        out: list[tuple[str, int, bool, bytes]] = []
        for iommu, slot in sorted(self.slots.items()):
            if slot.veventq_fd < 0:
                continue
            while data := self.iommufd.read_events(slot.veventq_fd, _EVENT_READ):
                at = 0
                while at + _VEVENT_HEADER <= len(data):
                    head = uapi.decode(uapi.VeventHeader, data[at : at + _VEVENT_HEADER])
                    at += _VEVENT_HEADER
                    lost = bool(head.flags & uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS)
                    record = b"" if lost else data[at : at + _VEVENT_ARM]
                    at += len(record)
                    out.append((iommu, head.sequence, lost, record))
        return out

    # -- STE install (CFGI_STE and friends) ---------------------------------------------
    def install_ste(self, vid: int, ste: bytes) -> bool:
        """Point device ``vid`` at the nested HWPT its vSTE asks for.

        Returns False when nothing changed. Raises TopologyError (guest code CERROR_ILL)
        when the vSTE is refused, by this vSMMU or by the kernel."""
        vdev = self.vdevices[vid]
        key = derive_vste(ste)
        if key == vdev.vste:
            return False  # same configuration: the attached HWPT already is the right one
        slot = self.slots[vdev.iommu]
        shared = slot.hwpts.get(key)
        fd = self.iommufd
        if shared is None:
            try:
                hwpt_id = fd.hwpt_alloc(
                    slot.iommu,
                    vdev.bound.dev_id,
                    slot.viommu_id,
                    data_type=uapi.IOMMU_HWPT_DATA_ARM_SMMUV3,
                    data=_STE_WORDS.pack(key.d0, key.d1),
                )
            except BackendCallError as exc:
                raise TopologyError(
                    f"vSTE of vSID {vid} refused by the host: {exc.errno_name}", CERROR_ILL
                ) from None
            shared = SharedHwpt(hwpt_id)
            slot.hwpts[key] = shared
        try:
            fd.attach(vdev.bound, shared.hwpt_id)
        except BackendCallError as exc:
            if shared.users == 0:
                del slot.hwpts[key]
                self._try_destroy(slot.iommu, shared.hwpt_id)
            raise TopologyError(
                f"attaching vSID {vid} to its nested HWPT failed: {exc.errno_name}", CERROR_ILL
            ) from None
        shared.users += 1
        if key.config is StreamConfig.TRANSLATE:
            slot.s1_seen = True
        old, vdev.vste = vdev.vste, key
        if old is not None:
            self._release(slot, old)
        return True

    def _release(self, slot: PiommuSlot, key: VsteKey) -> None:
        shared = slot.hwpts[key]
        shared.users -= 1
        if shared.users == 0:
            del slot.hwpts[key]
            self.iommufd.destroy(slot.iommu, shared.hwpt_id)

    def _try_destroy(self, iommu: str, obj_id: int) -> None:
        # Rollback of a half-made object: the error that caused it is what gets reported.
        with contextlib.suppress(BackendCallError):
            self.iommufd.destroy(iommu, obj_id)
