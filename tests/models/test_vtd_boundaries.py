"""What crosses the VT-d layers: the guest entries a cache invalidation carries (snapshots),
the dispatcher's ``Outcome`` and the frontend's two calls (``host_failed``, ``took_in_bulk``),
and the one declaration of the ``iommu_hwpt_vtd_s1`` layouts."""

from __future__ import annotations

import dataclasses

from protocols import vtd as spec
from tests.dispatcher.test_vtd import failing_vm
from tests.models.vtd_harness import PAGE, A, T, Vm, first_stage, legacy, scalable
from viommud.dispatcher import NOTHING, Outcome
from viommud.dispatcher.vtd import VtdDispatcher
from viommud.events import (
    ContextCacheInvalidated,
    GuestError,
    PasidCacheInvalidated,
    StatusWrite,
)
from viommud.frontends.vtd.frontend import DoorbellSummary, VtdFeatures, VtdFrontend
from viommud.guest.vtd import decode_context_entry, decode_pasid_entry
from viommud.topology.vtd import S1Config, pasid_binding


def _cache_events(fe: VtdFrontend) -> tuple[ContextCacheInvalidated, PasidCacheInvalidated]:
    fe.receive_data(
        spec.build_descriptor(T.CC_INV, width=32, g=1)
        + spec.build_descriptor(T.PC_INV, width=32, g=3)
    )
    cc, pc = fe.events()
    assert isinstance(cc, ContextCacheInvalidated)
    assert isinstance(pc, PasidCacheInvalidated)
    return cc, pc


def test_cache_invalidations_carry_the_entries_as_written_then() -> None:
    fe = VtdFrontend(VtdFeatures(dw=256))
    fe.write_context_entry(A, scalable(3))
    fe.write_pasid_entry(A, 3, first_stage(7, 0x5000))
    cc, pc = _cache_events(fe)
    assert dict(cc.contexts) == {A: decode_context_entry(scalable(3))}
    assert (
        dict(cc.pasids) == dict(pc.pasids) == {(A, 3): decode_pasid_entry(first_stage(7, 0x5000))}
    )

    # Later writes do not reach the events already out (copy on write) ...
    fe.write_context_entry(A, legacy(1, 0x1000))
    fe.write_context_entry(A + 1, legacy(2, 0x2000))
    fe.write_pasid_entry(A, 3, first_stage(8, 0x6000))
    assert dict(cc.contexts) == {A: decode_context_entry(scalable(3))}
    assert pc.pasids[(A, 3)].did == 7
    # ... and the next ones see them.
    cc2, pc2 = _cache_events(fe)
    assert dict(cc2.contexts) == {
        A: decode_context_entry(legacy(1, 0x1000)),
        A + 1: decode_context_entry(legacy(2, 0x2000)),
    }
    assert pc2.pasids[(A, 3)].did == 8
    # Events of one doorbell share one snapshot: no copy per event.
    assert cc2.pasids is pc2.pasids


def test_entries_never_written_are_absent() -> None:
    cc, pc = _cache_events(VtdFrontend(VtdFeatures(dw=256)))
    assert (dict(cc.contexts), dict(cc.pasids), dict(pc.pasids)) == ({}, {}, {})
    assert cc == ContextCacheInvalidated(0, 0, 0, None, cc.raw)


def test_the_dispatcher_holds_no_frontend_and_returns_an_outcome() -> None:
    vm = Vm(dw=128)
    vm.attach(A)
    dispatcher = vm.viommu.dispatcher
    names = {f.name for f in dataclasses.fields(VtdDispatcher)}
    assert not any(isinstance(getattr(dispatcher, n), VtdFrontend) for n in names)
    fe = VtdFrontend(VtdFeatures(dw=128))
    fe.write_context_entry(A, legacy(1, 0x1000))
    fe.receive_data(
        spec.build_descriptor(T.CC_INV, g=3, sid=A)
        + spec.build_descriptor(T.IOTLB_INV, g=0)
        + spec.build_descriptor(T.INV_WAIT, sw=1, status_data=5, status_addr=0x40)
    )
    outcome = dispatcher.run(fe.events())
    assert isinstance(outcome, Outcome)
    [error] = outcome.errors
    assert (error.index, error.code, outcome.host_errors) == (1, "IQE", ())
    assert outcome.status_writes == (StatusWrite(2, 0x100, 5),)
    vdev = vm.viommu.topology.vdevices[A]
    assert vdev.binding is not None  # read from the entry the event carried: a legacy
    assert not vdev.attached  # second-level table, so A is blocked
    assert dispatcher.run([]) is NOTHING


def test_host_errors_reach_the_frontend_through_host_failed_only() -> None:
    vm, backend = failing_vm()
    frontend = vm.viommu.frontend
    backend.bad = 0
    before = dict(frontend.error_counts)
    frontend.receive_data(vm.d(T.IOTLB_INV, g=3, did=1, addr=PAGE) + vm.wait())
    outcome = vm.viommu.dispatcher.run(frontend.events())
    [error] = outcome.host_errors
    assert outcome.errors == outcome.host_errors
    assert (error.index, error.code) == (0, "IQE")
    assert frontend.error_counts == before  # the dispatcher did not touch it
    frontend.host_failed(outcome.host_errors)
    assert frontend.error_counts == {**before, "IQE": before.get("IQE", 0) + 1}


def test_host_failed_counts_per_code() -> None:
    fe = VtdFrontend()
    fe.host_failed([GuestError(0, "IQE", "", b""), GuestError(3, "IQE", "", b"")])
    assert fe.error_counts == {"IQE": 2}


def test_took_in_bulk_counts_as_receive_data_would() -> None:
    wait = spec.build_descriptor(T.INV_WAIT, sw=1, status_addr=1)
    iotlb = spec.build_descriptor(T.IOTLB_INV, g=1)
    one = VtdFrontend()
    one.receive_data(iotlb + wait)
    one.receive_data(iotlb + iotlb + wait)
    one.events()
    bulk = VtdFrontend()
    bulk.took_in_bulk({T.IOTLB_INV: 3, T.INV_WAIT: 2}, 2, DoorbellSummary(3, 1))
    assert bulk.kind_counts() == one.kind_counts()
    assert (bulk.barriers, bulk.last) == (one.barriers, one.last)


def test_the_s1_layouts_are_declared_once() -> None:
    layout, inv = spec.IOMMU_HWPT_VTD_S1_LAYOUT, spec.IOMMU_HWPT_VTD_S1_INVALIDATE_LAYOUT
    fields = {"flags": 5, "pgtbl_addr": 0x1234000, "addr_width": 48, "reserved": 0}
    assert layout.build(fields) == spec.VTD_S1_STRUCT.pack(5, 0x1234000, 48, 0)
    assert S1Config(5, 0x1234000, 48).pack() == layout.build(fields)
    entry = {"addr": 0x4000, "npages": spec.VTD_INV_ALL_PAGES, "flags": 1, "reserved": 0}
    assert inv.build(entry) == spec.VTD_S1_STRUCT.pack(0x4000, spec.VTD_INV_ALL_PAGES, 1, 0)
    assert spec.VTD_S1_SIZE == layout.sizeof() == inv.sizeof() == 24
    assert spec.IOMMU_VTD_S1_FLAGS == 0b111


def test_a_first_stage_pasid_entry_becomes_its_s1() -> None:
    for sre, wpe, eafe in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (0, 0, 0)]:
        raw = first_stage(3, 0x7000, sre=sre, wpe=wpe, eafe=eafe)
        binding = pasid_binding(decode_pasid_entry(raw), 0)
        flags = (
            (spec.IOMMU_VTD_S1_SRE if sre else 0)
            | (spec.IOMMU_VTD_S1_WPE if wpe else 0)
            | (spec.IOMMU_VTD_S1_EAFE if eafe else 0)
        )
        assert binding.s1 == S1Config(flags, 0x7000, spec.VTD_S1_ADDR_WIDTH)
