"""The VT-d dispatcher and topology on the emulated backend: forwarding, HWPT sharing, the
device-TLB elision rule both ways, context/PASID re-reads, errors, teardown."""

from __future__ import annotations

import errno
import struct

import pytest

from protocols import iommufd as uapi
from tests.models.vtd_harness import (
    HOST,
    PAGE,
    A,
    B,
    N,
    R,
    T,
    Vm,
    entry,
    first_stage,
    invalidations,
    ioctls,
    legacy,
    scalable,
)
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.dispatcher.vtd import device_tlb_is_redundant
from viommud.session import Session
from viommud.topology.vtd import FULL_END, HISTORY, FlushHistory, S1Config
from viommud.trace import DeviceAttach, ViommuCreate, ViommuDestroy

IOVA = PAGE << 12


def nested_vm(*binds: tuple[int, int, int]) -> Vm:
    """A 256-bit-queue (scalable-mode) vIOMMU with devices bound through first-stage
    RID_PASID entries: each ``(sid, did, table)`` a nested HWPT."""
    vm = Vm(dw=256)
    vm.attach(*(sid for sid, _, _ in binds))
    for sid, did, table in binds:
        vm.bind_first_stage(sid, did, table)
    return vm


# ---------------------------------------------------------------------------------------------
# Forwarding


def test_each_granularity_becomes_its_entry() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    hwpt = vm.hwpt_of(A)
    assert invalidations(vm.run(vm.d(T.IOTLB_INV, g=1), vm.wait())) == [(hwpt, [entry()])]
    assert invalidations(vm.run(vm.d(T.IOTLB_INV, g=2, did=1), vm.wait())) == [(hwpt, [entry()])]
    calls = vm.run(vm.d(T.IOTLB_INV, g=3, did=1, addr=0x12345, am=2, ih=1), vm.wait())
    assert invalidations(calls) == [(hwpt, [entry(0x12344000, 4, leaf=True)])]
    calls = vm.run(vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE, am=0), vm.wait())
    assert invalidations(calls) == [(hwpt, [entry(IOVA, 1)])]
    # Other domains, and no domain at all, reach nothing.
    assert vm.run(vm.d(T.IOTLB_INV, g=2, did=2), vm.wait()) == []
    assert vm.report()["baseline"]["invalidate_calls"] == 4


def test_pasid_based_iotlb_reaches_the_pasid_bound_hwpt() -> None:
    vm = Vm(dw=256)
    vm.attach(A)
    vm.context(A, scalable())
    vm.pasid(A, first_stage(2, 0x40000000))
    vm.run(vm.d(T.CC_INV, g=3, sid=A), vm.wait())
    hwpt = vm.hwpt_of(A)
    calls = vm.run(
        vm.d(T.P_IOTLB_INV, g=3, did=2, pasid=0, addr=PAGE, am=0, ih=1),
        vm.d(T.P_IOTLB_INV, g=3, did=2, pasid=0, addr=PAGE + 0x10, am=3),
        vm.wait(),
    )
    assert invalidations(calls) == [(hwpt, [entry(IOVA, 1, True), entry(IOVA + 0x10000, 8)])]
    assert invalidations(vm.run(vm.d(T.P_IOTLB_INV, g=2, did=2, pasid=0), vm.wait())) == [
        (hwpt, [entry()])
    ]
    # AM >= 52 is the whole space; another PASID or DID has no nested binding.
    assert invalidations(
        vm.run(vm.d(T.P_IOTLB_INV, g=3, did=2, pasid=0, addr=PAGE, am=60), vm.wait())
    ) == [(hwpt, [entry()])]
    assert vm.run(vm.d(T.P_IOTLB_INV, g=2, did=2, pasid=1), vm.wait()) == []
    assert vm.run(vm.d(T.P_IOTLB_INV, g=2, did=3, pasid=0), vm.wait()) == []
    # The type 2 IOTLB of the domain reaches it too (any PASID of the DID).
    assert invalidations(vm.run(vm.d(T.IOTLB_INV, g=2, did=2), vm.wait())) == [(hwpt, [entry()])]


def test_legacy_translating_entries_are_never_nested() -> None:
    # A legacy TT=0/1 entry names a second-level table, which the host cannot nest (its
    # nested format is first-stage only): the device is blocked, nothing is allocated, and
    # no IOTLB-class or device-TLB invalidation of its domain has anything to reach.
    for tt in (0, 1):
        vm = Vm(dw=256)
        vm.attach(A)
        vm.context(A, legacy(1, 0x1000000, tt=tt))
        calls = vm.run(vm.d(T.CC_INV, g=3, sid=A), vm.wait())
        assert ioctls(calls) == ["VFIO_DEVICE_DETACH_IOMMUFD_PT"]
        assert not vm.viommu.topology.vdevices[A].attached
        assert vm.hwpt_of(A) is None
        for desc in (
            vm.d(T.IOTLB_INV, g=2, did=1),
            vm.d(T.IOTLB_INV, g=1),
            vm.d(T.P_IOTLB_INV, g=2, did=1, pasid=0),
            vm.d(T.DEV_TLB_INV, sid=A, addr=PAGE),
        ):
            assert vm.run(desc, vm.wait()) == []
        assert vm.report()["baseline"]["invalidate_calls"] == 0


def test_one_call_per_hwpt_per_doorbell() -> None:
    vm = nested_vm((A, 1, 0x1000000), (B, 2, 0x2000000))
    calls = vm.run(
        vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE),
        vm.d(T.IOTLB_INV, g=3, did=2, addr=PAGE),
        vm.wait(),
        vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE + 2),
        vm.wait(),
        vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE + 4),
        vm.wait(),
    )
    assert invalidations(calls) == [
        (vm.hwpt_of(A), [entry(IOVA, 1), entry(IOVA + 0x2000, 1), entry(IOVA + 0x4000, 1)]),
        (vm.hwpt_of(B), [entry(IOVA, 1)]),
    ]
    assert vm.report()["barriers"] == 2 + 3  # two binds, three waits here


def test_entries_fold_into_covering_ones() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    hwpt = vm.hwpt_of(A)
    psi = vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE)
    psi_leaf = vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE, ih=1)
    assert invalidations(vm.run(psi, psi, vm.wait())) == [(hwpt, [entry(IOVA, 1)])]
    assert invalidations(vm.run(psi_leaf, psi, vm.wait())) == [(hwpt, [entry(IOVA, 1)])]
    # A leaf entry does not cover a non-leaf one of the same range.
    assert invalidations(vm.run(psi, psi_leaf, vm.wait())) == [(hwpt, [entry(IOVA, 1)])]
    assert invalidations(
        vm.run(psi_leaf, vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE, am=4, ih=1), vm.wait())
    ) == [(hwpt, [entry(IOVA, 16, leaf=True)])]
    assert invalidations(vm.run(psi, vm.d(T.IOTLB_INV, g=2, did=1), psi, vm.wait())) == [
        (hwpt, [entry()])
    ]


# ---------------------------------------------------------------------------------------------
# HWPT sharing


def test_equal_domain_and_stage_1_share_one_hwpt() -> None:
    vm = nested_vm((A, 7, 0x1000000), (B, 7, 0x1000000))
    assert vm.hwpt_of(A) == vm.hwpt_of(B) is not None
    calls = vm.run(vm.d(T.IOTLB_INV, g=2, did=7), vm.wait())
    assert invalidations(calls) == [(vm.hwpt_of(A), [entry()])]
    assert vm.report()["baseline"]["invalidate_calls"] == 2  # one per device
    assert vm.session.calls.calls["IOMMU_HWPT_ALLOC"] == 2  # nest parent + one nested


def test_different_stage_1_or_unit_means_another_hwpt() -> None:
    vm = nested_vm((A, 7, 0x1000000), (B, 7, 0x2000000), (R, 7, 0x1000000))
    assert len({vm.hwpt_of(A), vm.hwpt_of(B), vm.hwpt_of(R)}) == 3
    calls = vm.run(vm.d(T.IOTLB_INV, g=2, did=7), vm.wait())
    assert [c["iommu"] for c in calls] == ["dmar0", "dmar0", "dmar1"]


def test_hwpt_alloc_carries_the_stage_1_configuration() -> None:
    vm = Vm(dw=256)
    vm.attach(A)
    vm.context(A, scalable(rid_pasid=3))
    vm.pasid(A, first_stage(4, 0x7654000, wpe=1), pasid=3)
    vm.session.drain_calls()
    calls = vm.run(vm.d(T.CC_INV, g=1), vm.wait())
    [alloc] = [c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC"]
    assert alloc["args"]["data_type"] == uapi.IOMMU_HWPT_DATA_VTD_S1
    assert alloc["args"]["data"] == S1Config(0b100, 0x7654000, 48).pack().hex()
    # SRE and EAFE pass through as QEMU derives them; this host unit has neither ECAP.SRS
    # nor ECAP.EAFS, so the kernel refuses the attach (intel_pasid_setup_nested: EINVAL).
    for flag, bit in (("sre", 0b001), ("eafe", 0b010)):
        vm.pasid(A, first_stage(4, 0x7654000, **{flag: 1}), pasid=3)
        vm.session.drain_calls()
        response = vm.doorbell(vm.d(T.PC_INV, g=1, did=4, pasid=3), vm.wait())
        [error] = response["errors"]
        assert "VFIO_DEVICE_ATTACH_IOMMUFD_PT failed (EINVAL)" in error["reason"]
        calls = vm.session.drain_calls()
        [alloc] = [c for c in calls if c["ioctl"] == "IOMMU_HWPT_ALLOC"]
        assert alloc["args"]["data"] == S1Config(bit, 0x7654000, 48).pack().hex()
    # A legacy entry allocates nothing: its second-level table is never handed over.
    legacy_vm = Vm(dw=128)
    legacy_vm.attach(A)
    legacy_vm.context(A, legacy(1, 0x1234000, aw=1))
    calls = legacy_vm.run(legacy_vm.d(T.CC_INV, g=1), legacy_vm.wait())
    assert "IOMMU_HWPT_ALLOC" not in ioctls(calls)


# ---------------------------------------------------------------------------------------------
# Device-TLB elision: elided when covered ...


def devtlb(vm: Vm, sid: int, addr: int = PAGE, s: int = 0) -> bytes:
    return vm.d(T.DEV_TLB_INV, sid=sid, addr=addr, s=s)


def test_elided_when_covered_in_the_same_doorbell() -> None:
    vm = nested_vm((A, 1, 0x1000000), (B, 1, 0x1000000))
    calls = vm.run(
        vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE, ih=1), devtlb(vm, A), devtlb(vm, B), vm.wait()
    )
    assert invalidations(calls) == [(vm.hwpt_of(A), [entry(IOVA, 1, True)])]
    assert vm.viommu.dispatcher.elided == 2


def test_elided_when_covered_in_an_earlier_doorbell() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    vm.run(vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE, am=3), vm.wait())
    assert vm.run(devtlb(vm, A, PAGE + 1, s=1), vm.wait()) == []  # 4 pages inside the 8
    vm.run(vm.d(T.IOTLB_INV, g=2, did=1), vm.wait())
    assert vm.run(devtlb(vm, A, 0x7FFFFFFFFFFFF, s=1), vm.wait()) == []  # whole, after a DSI


def test_elided_after_a_device_tlb_of_its_own_was_forwarded() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    assert vm.run(devtlb(vm, A), vm.wait()) != []
    assert vm.run(devtlb(vm, A), vm.wait()) == []


def test_devices_without_host_atc_or_nested_hwpt_cost_nothing() -> None:
    vm = nested_vm((N, 1, 0x1000000))
    vm.attach(A)  # never bound: on the nesting parent
    assert vm.run(devtlb(vm, N), devtlb(vm, A), devtlb(vm, 0x99), vm.wait()) == []
    assert vm.session.stats.dropped == 1  # 0x99: no such device


# ... and forwarded when not.


def test_forwarded_without_a_covering_iotlb_invalidation() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    calls = vm.run(devtlb(vm, A), vm.wait())
    assert invalidations(calls) == [(vm.hwpt_of(A), [entry(IOVA, 1, True)])]


def test_forwarded_when_wider_than_the_iotlb_invalidation() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    calls = vm.run(vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE), devtlb(vm, A, PAGE, s=1), vm.wait())
    assert invalidations(calls) == [(vm.hwpt_of(A), [entry(IOVA, 1), entry(IOVA, 2, True)])]


def test_forwarded_when_the_flush_was_in_another_domain() -> None:
    vm = nested_vm((A, 1, 0x1000000), (B, 2, 0x2000000))
    calls = vm.run(vm.d(T.IOTLB_INV, g=3, did=2, addr=PAGE), devtlb(vm, A), vm.wait())
    assert invalidations(calls) == [
        (vm.hwpt_of(B), [entry(IOVA, 1)]),
        (vm.hwpt_of(A), [entry(IOVA, 1, True)]),
    ]


def test_forwarded_when_the_device_moved_since_the_flush() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    vm.run(vm.d(T.IOTLB_INV, g=2, did=1), vm.wait())
    vm.bind_first_stage(A, 1, 0x3000000)  # a new stage 1: a new HWPT
    calls = vm.run(devtlb(vm, A), vm.wait())
    assert invalidations(calls) == [(vm.hwpt_of(A), [entry(IOVA, 1, True)])]


def test_forwarded_for_a_device_that_joined_a_shared_hwpt_after_the_flush() -> None:
    vm = nested_vm((A, 1, 0x1000000))
    vm.run(vm.d(T.IOTLB_INV, g=2, did=1), vm.wait())
    vm.attach(B)
    vm.bind_first_stage(B, 1, 0x1000000)
    assert vm.hwpt_of(A) == vm.hwpt_of(B)
    assert vm.run(devtlb(vm, A), vm.wait()) == []
    assert invalidations(vm.run(devtlb(vm, B), vm.wait())) == [
        (vm.hwpt_of(B), [entry(IOVA, 1, True)])
    ]


def test_pasid_device_tlb_rules() -> None:
    vm = Vm(dw=256)
    vm.attach(A)
    vm.context(A, scalable())
    vm.pasid(A, first_stage(2, 0x40000000))
    vm.run(vm.d(T.CC_INV, g=3, sid=A), vm.wait())
    hwpt = vm.hwpt_of(A)
    pdev = vm.d(T.P_DEV_TLB_INV, sid=A, pasid=0, addr=PAGE)
    assert invalidations(vm.run(pdev, vm.wait())) == [(hwpt, [entry(IOVA, 1, True)])]
    other = vm.d(T.P_DEV_TLB_INV, sid=A, pasid=9, addr=PAGE)
    assert vm.run(other, vm.wait()) == []  # PASID 9 is not nested: nothing on the host
    every = vm.d(T.P_DEV_TLB_INV, sid=A, pasid=9, g=1, addr=PAGE + 1)
    assert invalidations(vm.run(every, vm.wait())) == [(hwpt, [entry(IOVA + 0x1000, 1, True)])]


def test_elision_rule_function() -> None:
    history = FlushHistory()
    assert not device_tlb_is_redundant(history, 0, 0, 0x1000)
    assert device_tlb_is_redundant(history, 0, 0, 0x1000, [(0, 0x2000)])
    assert not device_tlb_is_redundant(history, 0, 0, 0x3000, [(0, 0x2000)])
    history.record(5, 0x1000, 0x3000)
    assert device_tlb_is_redundant(history, 4, 0x1000, 0x2000)
    assert not device_tlb_is_redundant(history, 5, 0x1000, 0x2000)  # joined with the flush
    assert not device_tlb_is_redundant(history, 4, 0, 0x2000)
    history.record(6, 0, FULL_END)
    assert device_tlb_is_redundant(history, 5, 0, FULL_END)
    assert list(history.recent) == []
    for clock in range(7, 7 + HISTORY + 1):
        history.record(clock, clock << 12, (clock + 1) << 12)
    assert len(history.recent) == HISTORY
    assert not device_tlb_is_redundant(history, 6, 7 << 12, 8 << 12)  # forgotten: forwarded
    assert device_tlb_is_redundant(history, 6, 8 << 12, 9 << 12)
    assert device_tlb_is_redundant(history, 5, 0, 1)  # the whole-space flush at 6


# ---------------------------------------------------------------------------------------------
# Context-cache and PASID-cache invalidations re-read the entries


def test_legacy_context_entries() -> None:
    vm = Vm(dw=128)
    vm.attach(A, B)
    parent = vm.viommu.topology.slots["dmar0"].parent_hwpt_id
    assert vm.run(vm.d(T.CC_INV, g=1), vm.wait()) == []  # nothing written: left alone
    vm.context(A, legacy(1, 0x1000000, tt=2))
    assert ioctls(vm.run(vm.d(T.CC_INV, g=1), vm.wait())) == []  # pass-through: stays
    vm.context(A, legacy(1, 0x1000000))  # a second-level table: blocked, never nested
    calls = vm.run(vm.d(T.CC_INV, g=3, sid=A), vm.wait())
    assert ioctls(calls) == ["VFIO_DEVICE_DETACH_IOMMUFD_PT"]
    vm.context(A, legacy(1, 0x1000000, tt=2))
    calls = vm.run(vm.d(T.CC_INV, g=3, sid=A), vm.wait())
    assert ioctls(calls) == ["VFIO_DEVICE_ATTACH_IOMMUFD_PT"]
    assert calls[0]["args"]["pt_id"] == parent
    for bad in (
        legacy(1, 0x1000000, p=0),
        legacy(1, 0x1000000, tt=3),
        legacy(1, 0x1000000, aw=3),
        legacy(1, 0x1000000)[:8] + (0x80 | 1 << 8 | 2).to_bytes(8, "little"),  # qw1[7]
    ):
        vm.context(A, bad)
        calls = vm.run(vm.d(T.CC_INV, g=3, sid=A), vm.wait())
        assert ioctls(calls) in (["VFIO_DEVICE_DETACH_IOMMUFD_PT"], [])
        assert not vm.viommu.topology.vdevices[A].attached
    vm.context(A, legacy(1, 0x1000000))
    assert vm.run(vm.d(T.CC_INV, g=3, sid=A), vm.wait()) == []  # stays blocked
    assert not vm.viommu.topology.vdevices[A].attached


def test_function_mask_and_domain_selective_coverage() -> None:
    vm = Vm(dw=256)
    vm.attach(A, B)  # 00:02.0 and 00:03.0
    for sid in (A, B):
        vm.context(sid, scalable())
        vm.pasid(sid, first_stage(1, 0x1000000))
    vm.run(vm.d(T.CC_INV, g=3, sid=0x17, fm=3), vm.wait())  # 0x10-0x17: A only
    assert vm.hwpt_of(A) is not None
    assert vm.hwpt_of(B) is None
    vm.run(vm.d(T.CC_INV, g=3, sid=0x1C, fm=1), vm.wait())  # 0x18 and 0x1c
    assert vm.hwpt_of(B) == vm.hwpt_of(A)
    vm.context(A, scalable(p=0))
    vm.context(B, scalable(p=0))
    vm.run(vm.d(T.CC_INV, g=2, did=99), vm.wait())  # domain-selective = global (QEMU)
    assert vm.hwpt_of(A) is None
    assert vm.hwpt_of(B) is None


def scalable_vm(*sids: int) -> Vm:
    vm = Vm(dw=256)
    vm.attach(*sids)
    for sid in sids:
        vm.context(sid, scalable())
        vm.pasid(sid, first_stage(2, 0x40000000))
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())
    return vm


def test_scalable_mode_pasid_types() -> None:
    vm = scalable_vm(A)
    hwpt = vm.hwpt_of(A)
    assert hwpt is not None
    vm.pasid(A, first_stage(2, 0x40000000, pgtt=4))
    assert ioctls(vm.run(vm.d(T.PC_INV, g=1, did=2, pasid=0), vm.wait())) == [
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        "IOMMU_DESTROY",
    ]
    for pgtt in (2, 3):
        vm.pasid(A, first_stage(2, 0x40000000, pgtt=pgtt))
        vm.run(vm.d(T.PC_INV, g=3), vm.wait())
        assert not vm.viommu.topology.vdevices[A].attached
    vm.pasid(A, first_stage(2, 0x40000000, flpm=1))
    vm.run(vm.d(T.PC_INV, g=3), vm.wait())
    assert not vm.viommu.topology.vdevices[A].attached
    vm.pasid(A, first_stage(2, 0x40000000))
    vm.run(vm.d(T.PC_INV, g=3), vm.wait())
    assert vm.hwpt_of(A) is not None


def test_pasid_cache_filters_as_qemu() -> None:
    vm = scalable_vm(A, B)
    shared = vm.hwpt_of(A)
    assert shared == vm.hwpt_of(B)
    vm.pasid(A, first_stage(2, 0x50000000))
    # PASID-selective for another PASID, domain-selective for another DID: ignored.
    assert vm.run(vm.d(T.PC_INV, g=1, did=2, pasid=1), vm.wait()) == []
    assert vm.run(vm.d(T.PC_INV, g=0, did=3), vm.wait()) == []
    # The DID compared is the cached entry's: a change of DID is seen under the old one.
    vm.pasid(A, first_stage(3, 0x50000000))
    assert vm.run(vm.d(T.PC_INV, g=0, did=3), vm.wait()) == []
    calls = vm.run(vm.d(T.PC_INV, g=0, did=2), vm.wait())
    assert ioctls(calls) == ["IOMMU_HWPT_ALLOC", "VFIO_DEVICE_ATTACH_IOMMUFD_PT"]
    assert vm.hwpt_of(A) != shared
    assert vm.viommu.topology.vdevices[A].binding.did == 3  # type: ignore[union-attr]
    # Unchanged entries cost nothing; a removed entry detaches whatever the filter says.
    assert vm.run(vm.d(T.PC_INV, g=3), vm.wait()) == []
    vm.pasid(B, first_stage(2, 0x40000000, p=0))
    calls = vm.run(vm.d(T.PC_INV, g=0, did=77), vm.wait())
    assert ioctls(calls) == ["VFIO_DEVICE_DETACH_IOMMUFD_PT", "IOMMU_DESTROY"]


def test_pasid_cache_needs_a_scalable_context() -> None:
    vm = Vm(dw=256)
    vm.attach(A)
    vm.pasid(A, first_stage(2, 0x40000000))
    assert vm.run(vm.d(T.PC_INV, g=3), vm.wait()) == []  # no context read yet
    vm.context(A, scalable(p=0))
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())
    assert not vm.viommu.topology.vdevices[A].attached
    assert vm.run(vm.d(T.PC_INV, g=3), vm.wait()) == []
    vm.context(A, scalable(rid_pasid=5))  # requests without PASID use PASID 5's entry
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())
    assert not vm.viommu.topology.vdevices[A].attached  # PASID 5 never written
    vm.pasid(A, first_stage(2, 0x40000000), pasid=5)
    vm.run(vm.d(T.PC_INV, g=1, did=2, pasid=5), vm.wait())
    assert vm.hwpt_of(A) is not None
    assert vm.run(vm.d(T.P_IOTLB_INV, g=2, did=2, pasid=0), vm.wait()) == []
    assert vm.run(vm.d(T.P_IOTLB_INV, g=2, did=2, pasid=5), vm.wait()) != []


# ---------------------------------------------------------------------------------------------
# Host failures -> IQE at the descriptor; nothing else lost


class FailingBackend(EmulatedIommufd):
    """Makes entry ``bad`` of the next invalidation array carry a reserved bit (the kernel
    answers EOPNOTSUPP there), or the next nested HWPT_ALLOC fail with ``alloc_errno``."""

    bad: int | None = None
    alloc_errno: int = 0

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        if request == uapi.IOMMU_HWPT_INVALIDATE and self.bad is not None:
            call = uapi.decode(uapi.HwptInvalidate, arg)
            self.memory.write(call.data_uptr + 24 * self.bad + 20, struct.pack("<I", 1))
            self.bad = None
        if request == uapi.IOMMU_HWPT_ALLOC and self.alloc_errno:
            call_ = uapi.decode(uapi.HwptAlloc, arg)
            if call_.data_type == uapi.IOMMU_HWPT_DATA_VTD_S1:
                err, self.alloc_errno = self.alloc_errno, 0
                return err
        return super().ioctl(fd, request, arg)


def failing_vm() -> tuple[Vm, FailingBackend]:
    backend = FailingBackend(HOST)
    vm = Vm(dw=128, backend=backend)
    vm.attach(A)
    vm.bind_first_stage(A, 1, 0x1000000)
    return vm, backend


def test_failed_entry_is_iqe_at_its_descriptor_and_the_rest_is_resent() -> None:
    vm, backend = failing_vm()
    backend.bad = 1
    vm.session.drain_calls()
    response = as_json(
        vm.doorbell(
            vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE),
            vm.wait(),
            vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE + 2),
            vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE + 4),
            vm.wait(),
        )
    )
    [error] = response["errors"]
    assert (error["index"], error["code"]) == (2, "IQE")
    assert f"errno {errno.errorcode[errno.EOPNOTSUPP]}" in error["reason"]
    assert response["syncs"] == 2
    assert [w["index"] for w in response["status_writes"]] == [1, 4]
    calls = invalidations(vm.session.drain_calls())
    assert [entries for _, entries in calls] == [
        [entry(IOVA, 1), entry(IOVA + 0x2000, 1), entry(IOVA + 0x4000, 1)],
        [entry(IOVA + 0x4000, 1)],
    ]
    assert vm.report()["errors"] == {"total": 1, "by_code": {"IQE": 1}}


def test_folded_descriptors_are_each_accounted_for() -> None:
    vm, backend = failing_vm()
    backend.bad = 0
    response = as_json(
        vm.doorbell(
            vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE),
            vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE),
            vm.wait(),
        )
    )
    # The first descriptor failed; its twin was re-sent on its own and went through.
    assert [e["index"] for e in response["errors"]] == [0]


def test_device_tlb_relying_on_a_failed_entry_is_sent_after_all() -> None:
    vm, backend = failing_vm()
    backend.bad = 0
    vm.session.drain_calls()
    response = as_json(
        vm.doorbell(vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE), devtlb(vm, A), vm.wait())
    )
    assert [e["index"] for e in response["errors"]] == [0]
    calls = invalidations(vm.session.drain_calls())
    assert [entries for _, entries in calls] == [[entry(IOVA, 1)], [entry(IOVA, 1, True)]]


def test_a_failed_flush_forgets_earlier_cover() -> None:
    vm, backend = failing_vm()
    vm.run(vm.d(T.IOTLB_INV, g=2, did=1), vm.wait())  # the whole space, flushed
    backend.bad = 0
    response = as_json(vm.doorbell(vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE), vm.wait()))
    assert [e["index"] for e in response["errors"]] == [0]
    # The page's change reached no host flush: its device TLB is not taken as covered.
    assert invalidations(vm.run(devtlb(vm, A), vm.wait())) == [
        (vm.hwpt_of(A), [entry(IOVA, 1, True)])
    ]


def test_failed_hwpt_alloc_is_iqe_at_the_context_invalidation() -> None:
    backend = FailingBackend(HOST)
    vm = Vm(dw=256, backend=backend)
    vm.attach(A)
    vm.context(A, scalable())
    vm.pasid(A, first_stage(1, 0x1000000))
    backend.alloc_errno = errno.ENOMEM
    response = as_json(vm.doorbell(vm.d(T.IEC_INV), vm.d(T.CC_INV, g=3, sid=A), vm.wait()))
    [error] = response["errors"]
    assert (error["index"], error["code"]) == (1, "IQE")
    assert "IOMMU_HWPT_ALLOC failed (ENOMEM)" in error["reason"]
    assert vm.hwpt_of(A) is None  # still on the nesting parent
    assert vm.report()["backend"]["errnos"] == {"ENOMEM": 1}
    # The next context-cache invalidation reads the entry again and succeeds.
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())
    assert vm.hwpt_of(A) is not None


# ---------------------------------------------------------------------------------------------
# Teardown


def test_detach_and_destroy_free_everything() -> None:
    vm = nested_vm((A, 1, 0x1000000), (B, 1, 0x1000000), (R, 2, 0x2000000))
    shared = vm.hwpt_of(A)
    assert vm.detach(A) == {"ok": True}
    assert vm.backend.lookup(shared or 0) is not None  # B still uses it
    assert vm.detach(B) == {"ok": True}
    assert vm.backend.lookup(shared or 0) is None
    assert vm.detach(A) == {"ok": False, "error": "source ID 0x0010 is not attached"}
    vm.attach(A)
    vm.context(A, legacy(1, 0, p=0))
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())  # A blocked, R unchanged
    assert as_json(vm.session.handle(ViommuDestroy(9, "v"))) == {"ok": True}
    assert vm.backend.live_objects() == []


def test_refused_attaches() -> None:
    vm = Vm(dw=128)
    vm.attach(A)
    assert as_json(vm.session.handle(DeviceAttach(3, "v", A, "0000:02:00.0")))["ok"] is False
    assert as_json(vm.session.handle(DeviceAttach(3, "v", 1 << 16, "0000:02:00.0")))["ok"] is False
    assert as_json(vm.session.handle(DeviceAttach(3, "v", 0x50, "0000:99:00.0")))["ok"] is False


@pytest.mark.parametrize(
    ("options", "iommus", "error"),
    [
        ({"dw": 100}, ("dmar0",), "'dw' must be 128 or 256"),
        ({}, (), "needs at least one host iommu"),
        ({}, ("smmu9",), "does not exist"),
    ],
)
def test_refused_creates(options: dict[str, object], iommus: tuple[str, ...], error: str) -> None:
    session = Session(EmulatedIommufd(HOST))
    response = as_json(session.handle(ViommuCreate(2, "w", "vtd", iommus, options)))
    assert response["ok"] is False
    assert error in response["error"]
