"""The ARM SMMUv3 driver behind the emulated iommufd (reference §3).

Mirrors ``drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3-iommufd.c``: GET_HW_INFO, the vIOMMU
on a stage-2 nesting parent, vSTE validation for nested domains, and
``arm_vsmmu_cache_invalidate`` (VMID insertion, vSID -> SID rewrite, commands issued in
groups of 63 with a CMD_SYNC each; the pending for-next variant with strict field checks).
The hooks for the cache model play the invalidations ``arm-smmu-v3.c`` makes on its own
(STE rewrite at attach, range flush at unmap, VMID / ASID release).

Long arrays of TLBI_NH_* / TLBI_NSNH_ALL commands take a vectorised path (numpy VMID
rewrite, groups issued in bulk) that gives the same results as the per-entry walk.
"""

from __future__ import annotations

import errno
import struct
from typing import ClassVar, cast

import numpy as np
import numpy.typing as npt

from protocols import iommufd as uapi
from protocols.models import HostIommu
from protocols.smmuv3 import SID_OPS, TLBI_NH_OPS, TLBI_OPS, TLBI_RANGE_OPS, Opcode
from viommud.backend.base import UserFault
from viommud.backend.emulator.driver import (
    KERNEL_PENDING,
    IommuDriver,
    IommufdCore,
    PhysicalIommuState,
)
from viommud.backend.emulator.objects import (
    ArmNestedData,
    DeviceObject,
    HwptNestedObject,
    HwptPagingObject,
    IommufdObject,
    ViommuObject,
)
from viommud.backend.emulator.usercopy import (
    ENOERR,
    KMALLOC_MAX_SIZE,
    U64_MAX,
    IoctlError,
    UserArray,
    UserData,
    copy_data_from_user,
    copy_full_array,
    decode_entries,
)

__all__ = ["ARM_CMD_BATCH", "ARM_CMD_SIZE", "ARM_HW_INFO", "VECTOR_MIN", "ArmSmmuV3Driver"]

ARM_CMD_BATCH = 63  # CMDQ_BATCH_ENTRIES - 1 commands per host CMD_SYNC (§3.4)
_QQ = struct.Struct("<QQ")

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


# Opcodes the per-command walk tests, bound once as plain ints: looking an enum member up
# inside that loop would cost more than the comparison it feeds. The sets are the
# architecture's, from protocols/smmuv3.py.
_TLBI_NH_ALL = int(Opcode.TLBI_NH_ALL)
_TLBI_NSNH_ALL = int(Opcode.TLBI_NSNH_ALL)
_ATC_INV = int(Opcode.ATC_INV)


# The vectorised mainline walk (§3.3, §3.4): opcodes it converts (those whose rewrite is the
# VMID alone and can never fail), indexed by the opcode byte.
ARM_CMD_SIZE = 16  # struct iommu_viommu_arm_smmuv3_invalidate: two le64 words (§3.3)
_VMID_OPS = np.zeros(256, dtype=np.bool_)
_VMID_OPS[sorted(TLBI_OPS)] = True
_LE64 = np.dtype("<u8")
_CMD_BYTES = np.dtype((np.void, ARM_CMD_SIZE))  # one whole command, for .tolist() -> bytes
_KEEP_ALL_BUT_VMID = np.uint64(~CMDQ_TLBI_0_VMID & U64_MAX)
_KEEP_ALL_BUT_VMID_INT = ~CMDQ_TLBI_0_VMID & U64_MAX
# The opcodes ``convert_words`` converts by the VMID rewrite alone (TLBI_NH_* but NSNH_ALL)
_VMID_ONLY_OPS = frozenset(int(op) for op in TLBI_NH_OPS) - {_TLBI_NSNH_ALL}
_VMID_ONLY_BYTES = bytes(sorted(_VMID_ONLY_OPS))  # for bytes.translate over the opcodes

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
    int(op): fields
    for op, fields in (
        (Opcode.TLBI_NSNH_ALL, (0xFF, 0)),
        (Opcode.TLBI_NH_ALL, (0xFF | _W0_VMID, 0)),
        (Opcode.TLBI_NH_ASID, (0xFF | _W0_VMID | _W0_ASID, 0)),
        (
            Opcode.TLBI_NH_VA,
            (
                0xFF | _W0_VMID | _W0_ASID | _W0_NUM_SCALE,
                _W1_ADDR | _W1_LEAF | _W1_TTL | _W1_TG,
            ),
        ),
        (
            Opcode.TLBI_NH_VAA,
            (0xFF | _W0_VMID | _W0_NUM_SCALE, _W1_ADDR | _W1_LEAF | _W1_TTL | _W1_TG),
        ),
        (Opcode.ATC_INV, (0xFF | _W0_SID | _W0_SSID | _W0_SSV | _W0_GLOBAL, _W1_ADDR | 0x3F)),
        (Opcode.CFGI_CD, (0xFF | _W0_SID | _W0_SSID, _W1_LEAF)),
        (Opcode.CFGI_CD_ALL, (0xFF | _W0_SID, 0)),
    )
}


# GET_HW_INFO register values of the emulated units (see NOTES in kernel.py)
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


class ArmSmmuV3Driver(IommuDriver):
    """arm-smmu-v3 with its iommufd vIOMMU (§3): nesting only through a vIOMMU."""

    model: ClassVar[str] = HostIommu.ARM_SMMUV3

    def __init__(self, *, fast_invalidate: bool = True) -> None:
        # False: every mainline vIOMMU invalidation takes the per-entry reference walk
        self.fast_invalidate = fast_invalidate

    def hw_info(self, core: IommufdCore, dev: DeviceObject, in_type: int) -> tuple[int, bytes]:
        if in_type not in (uapi.IOMMU_HW_INFO_TYPE_NONE, uapi.IOMMU_HW_INFO_TYPE_ARM_SMMUV3):
            raise IoctlError(errno.EOPNOTSUPP)
        return uapi.IOMMU_HW_INFO_TYPE_ARM_SMMUV3, bytes(uapi.encode(ARM_HW_INFO))

    def viommu_supported(self, viommu_type: int) -> bool:
        return viommu_type == uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3

    def viommu_init(
        self,
        core: IommufdCore,
        dev: DeviceObject,
        parent: HwptPagingObject,
        data: UserData | None,
    ) -> None:
        # arm_vsmmu_init: the stage-2 parent must live on the device's SMMU
        if parent.model != HostIommu.ARM_SMMUV3 or parent.iommu != dev.pdev.iommu:
            raise IoctlError(errno.EINVAL)

    def viommu_alloc_domain_nested(
        self, core: IommufdCore, viommu: ViommuObject, flags: int, data: UserData
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

    def attach_nested(self, core: IommufdCore, dev: DeviceObject, hwpt: HwptNestedObject) -> int:
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
        self, core: IommufdCore, viommu: ViommuObject, array: UserArray
    ) -> tuple[int, int]:
        """``arm_vsmmu_cache_invalidate``: mainline (§3.4, quirks included) or pending."""
        if core.kernel == KERNEL_PENDING:
            return self._cache_invalidate_pending(core, viommu, array)
        entry_num = array.entry_num
        if entry_num * ARM_CMD_SIZE > KMALLOC_MAX_SIZE:
            return errno.ENOMEM, 0
        if (
            self.fast_invalidate
            and array.type == uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3
            and entry_num > 0
            and array.entry_len == ARM_CMD_SIZE  # read in one piece (§2.3)
        ):
            unit = core.unit(viommu.iommu)
            if not unit.faults:  # injected faults take the reference walk
                if entry_num >= VECTOR_MIN:
                    return self._cache_invalidate_packed(core, viommu, array)
                return self._cache_invalidate_short(core, viommu, array, unit)
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
        core: IommufdCore,
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
        faults = bool(unit.faults)
        converted: list[bytes] = []
        cur = last = 0
        end = len(cmds)
        while cur != end:
            raw = self.convert(core, viommu, cmds[cur])
            if faults and raw is not None:
                err = unit.entry_fault(_user_entry(cmds[cur]), "entry")
                if err:
                    return err, base + cur  # as a convert failure: last..cur-1 not issued
            if raw is None:
                return errno.EIO, base + cur  # commands last..cur-1 never reach the queue
            converted.append(raw)
            cur += 1
            if cur != end and cur - last != ARM_CMD_BATCH:
                continue
            group = converted[last:cur]
            err = unit.issue(group)
            if faults and not err:
                err = _issue_fault(unit, cmds[last:cur])
            core.apply_host_commands(viommu.iommu, group)
            if err:
                return err, base + cur - 1
            last = cur
        return ENOERR, base + cur

    def _cache_invalidate_short(
        self, core: IommufdCore, viommu: ViommuObject, array: UserArray, unit: PhysicalIommuState
    ) -> tuple[int, int]:
        """The mainline walk over fewer than ``VECTOR_MIN`` (< 63) plain 16-byte entries, on
        the words: the same copy as ``copy_full_array`` (one read, EFAULT for a fault
        anywhere), one group, converted whole before it is issued, so a conversion failure
        at entry ``i`` issues nothing and reports ``i`` (``_invalidate_entries``)."""
        try:
            blob = core.memory.read(array.uptr, array.entry_num * ARM_CMD_SIZE)
        except UserFault:
            return errno.EFAULT, 0
        convert, pack = self.convert_words, _QQ.pack
        vmid_field = viommu.vmid << 32
        converted: list[bytes] = []
        for index, (w0, w1) in enumerate(_QQ.iter_unpack(blob)):
            if w0 & CMDQ_0_OP in _VMID_ONLY_OPS:  # convert_words' TLBI_NH_* rewrite, inline
                converted.append(pack((w0 & _KEEP_ALL_BUT_VMID_INT) | vmid_field, w1))
                continue
            raw = convert(core, viommu, w0, w1)
            if raw is None:
                return errno.EIO, index
            converted.append(raw)
        err = unit.issue(converted)
        core.apply_host_commands(viommu.iommu, converted)
        if err:
            return err, len(converted) - 1
        return ENOERR, len(converted)

    def _cache_invalidate_packed(
        self, core: IommufdCore, viommu: ViommuObject, array: UserArray
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
        if (
            not blob[::ARM_CMD_SIZE].translate(None, _VMID_ONLY_BYTES)
            and 0 <= viommu.vmid <= 0xFFFF
        ):
            # every command a TLBI_NH_* but NSNH_ALL: the rewrite is the VMID's two bytes
            return self._issue_converted(core, viommu, _with_vmid(blob, viommu.vmid))
        fast_end = _vmid_prefix(blob, viommu.vmid)
        if fast_end:
            words = np.frombuffer(blob, dtype=_LE64, count=2 * fast_end).reshape(fast_end, 2)
            rc, done = self._issue_vmid_groups(core, viommu, words)
            if rc or fast_end == array.entry_num:
                return rc, done
        rest = decode_entries(uapi.ViommuArmSmmuv3Invalidate, blob[fast_end * ARM_CMD_SIZE :])
        return self._invalidate_entries(core, viommu, rest, fast_end)

    @staticmethod
    def _issue_vmid_groups(
        core: IommufdCore, viommu: ViommuObject, words: npt.NDArray[np.uint64]
    ) -> tuple[int, int]:
        """§3.4 steps 3-4 for commands that all convert (``_vmid_prefix``): every 63-group
        and the last one issued in order; a failing issue reports its end - 1.

        Applying them to the caches is skipped when it provably changes nothing: converted,
        they are TLBI_NH_* of the vIOMMU's VMID, which only ever remove stage-1 entries of
        that VMID (``CacheModel.holds_stage1``), and nothing here adds cache entries.
        """
        rows = _convert_vmid_ops(words, viommu.vmid).view(_CMD_BYTES).reshape(-1)
        commands = cast("list[bytes]", rows.tolist())  # a field-less void item is bytes
        return ArmSmmuV3Driver._issue_converted(core, viommu, commands)

    @staticmethod
    def _issue_converted(
        core: IommufdCore, viommu: ViommuObject, commands: list[bytes]
    ) -> tuple[int, int]:
        """``_issue_vmid_groups`` once its commands are converted."""
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
        self, core: IommufdCore, viommu: ViommuObject, array: UserArray
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
                if raw is not None and unit.faults:
                    err = unit.entry_fault(_user_entry(cmd), "entry")
                    if err:
                        return err, done  # as a convert failure: nothing of this chunk issued
                if raw is None:
                    return errno.EIO, done  # nothing of this chunk was issued
                converted.append(raw)
            err = unit.issue(converted)
            if unit.faults and not err:
                err = _issue_fault(unit, cmds)
            core.apply_host_commands(viommu.iommu, converted)
            if err:
                return err, done
            done += count
        return ENOERR, done

    @staticmethod
    def convert(
        core: IommufdCore, viommu: ViommuObject, cmd: uapi.ViommuArmSmmuv3Invalidate
    ) -> bytes | None:
        """``arm_vsmmu_convert_user_cmd`` (§3.3); None for EIO."""
        return ArmSmmuV3Driver.convert_words(core, viommu, cmd.cmd0, cmd.cmd1)

    @staticmethod
    def convert_words(core: IommufdCore, viommu: ViommuObject, w0: int, w1: int) -> bytes | None:
        """``convert`` on the entry's two words."""
        op = w0 & CMDQ_0_OP
        if op == _TLBI_NSNH_ALL:
            w0 = _TLBI_NH_ALL | (viommu.vmid << 32)
            w1 = 0
        elif op in TLBI_NH_OPS:
            w0 = (w0 & ~CMDQ_TLBI_0_VMID) | (viommu.vmid << 32)
        elif op in SID_OPS:
            pdev = core.vsid_to_pdev(viommu, w0 >> 32)
            if pdev is None:
                return None
            w0 = (w0 & ~CMDQ_CFGI_0_SID) | (pdev.sid << 32)
        else:
            return None
        return _QQ.pack(w0, w1)

    @classmethod
    def convert_strict(
        cls, core: IommufdCore, viommu: ViommuObject, cmd: uapi.ViommuArmSmmuv3Invalidate
    ) -> bytes | None:
        """The pending series' validation (§3.6): only the listed fields; None for EIO."""
        w0, w1 = cmd.cmd0, cmd.cmd1
        op = w0 & CMDQ_0_OP
        allowed = _STRICT_FIELDS.get(op)
        if allowed is None or w0 & ~allowed[0] or w1 & ~allowed[1]:
            return None
        if op in TLBI_RANGE_OPS:
            tg = (w1 >> 10) & 0x3
            ttl = (w1 >> 8) & 0x3
            num_scale = w0 & _W0_NUM_SCALE
            if tg == 0 and (num_scale or ttl):
                return None  # a range or level hint needs a granule
            if tg == 2 and ttl == 1:
                return None  # 16K granule, level 1: only with DS (not implemented)
            if tg != 0 and not num_scale and not ttl:
                return None  # NUM = SCALE = 0 with TTL = 0 is reserved
        if op == _ATC_INV and (w1 & 0x3F) > 52:
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
        self, core: IommufdCore, dev: DeviceObject, hwpt: IommufdObject, asid: int
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
        self, core: IommufdCore, dev: DeviceObject, old: IommufdObject | None
    ) -> None:
        # arm_smmu_write_ste + CFGI_STE; arm_smmu_attach_commit flushes the whole ATC
        cause = "kernel:attach CFGI_STE"
        sid = dev.pdev.sid
        core.cache_model.drop_config(
            dev.pdev.iommu, lambda e: e.kind in ("ste", "cd", "l1cd") and e.sid == sid, cause
        )
        if dev.pdev.ats:
            core.cache_model.atc_flush_all(dev.pdev.id, "kernel:attach ATC_INV")

    def unmap_flush(self, core: IommufdCore, hwpt: HwptPagingObject, first: int, last: int) -> None:
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

    def domain_freed(self, core: IommufdCore, hwpt: HwptPagingObject) -> None:
        if hwpt.vmid:
            vmid = hwpt.vmid
            core.cache_model.drop_iotlb(
                hwpt.iommu, lambda e: e.tag == vmid, "kernel:VMID free TLBI_S12_VMALL"
            )
        elif hwpt.asid:
            asid = hwpt.asid
            for unit in core.units_of_model(HostIommu.ARM_SMMUV3):
                core.cache_model.drop_iotlb(
                    unit,
                    lambda e: e.tag == 0 and e.asid == asid and not e.global_,
                    "kernel:ASID free TLBI_NH_ASID",
                )


# Arrays shorter than this take the per-entry walk: numpy's fixed cost per call is larger
# than the loop's for a handful of commands (both give the same results; see the tests).
VECTOR_MIN = 16


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


def _with_vmid(blob: bytes, vmid: int) -> list[bytes]:
    """``arm_vsmmu_convert_user_cmd`` (§3.3) of TLBI_NH_ASID / _VA / _VAA / _ALL commands
    (no NSNH_ALL), at once: W0[47:32], the VMID field, is bytes 4-5 of each little-endian
    command; every other bit is kept. One command per item, as ``_convert_vmid_ops``."""
    rows = len(blob) // ARM_CMD_SIZE
    out = bytearray(blob)
    out[4::ARM_CMD_SIZE] = bytes((vmid & 0xFF,)) * rows
    out[5::ARM_CMD_SIZE] = bytes((vmid >> 8,)) * rows
    data = bytes(out)
    return [data[at : at + ARM_CMD_SIZE] for at in range(0, len(data), ARM_CMD_SIZE)]


def _convert_vmid_ops(words: npt.NDArray[np.uint64], vmid: int) -> npt.NDArray[np.uint64]:
    """``arm_vsmmu_convert_user_cmd`` (§3.3) of TLBI_NH_* / TLBI_NSNH_ALL rows, at once.

    NSNH_ALL becomes NH_ALL of ``vmid`` with cmd[1] = 0; the others keep every bit but
    the VMID field, which becomes ``vmid``. Little-endian, like the host queue's bytes.
    """
    w0, w1 = words[:, 0], words[:, 1]
    vmid_field = np.uint64(vmid << 32)
    nsnh = (w0 & np.uint64(CMDQ_0_OP)) == np.uint64(_TLBI_NSNH_ALL)
    out = np.empty((len(words), 2), dtype=_LE64)
    out[:, 0] = np.where(
        nsnh, np.uint64(_TLBI_NH_ALL) | vmid_field, (w0 & _KEEP_ALL_BUT_VMID) | vmid_field
    )
    out[:, 1] = np.where(nsnh, np.uint64(0), w1)
    return out


def _user_entry(cmd: uapi.ViommuArmSmmuv3Invalidate) -> bytes:
    """An entry's bytes as the VMM passed them (what an injected ``EntryFault`` matches)."""
    return _QQ.pack(cmd.cmd0, cmd.cmd1)


def _issue_fault(unit: PhysicalIommuState, cmds: list[uapi.ViommuArmSmmuv3Invalidate]) -> int:
    """The errno of an injected issue failure of a group holding ``cmds``, or 0."""
    for cmd in cmds:
        err = unit.entry_fault(_user_entry(cmd), "issue")
        if err:
            return err
    return 0
