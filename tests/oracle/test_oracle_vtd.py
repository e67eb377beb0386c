"""The oracle on VT-d: the bundled traces verify clean; its own model of the context and
PASID caches and of device-TLB staleness agrees with correct plans and catches wrong ones;
its own reading of the descriptors refuses exactly what the vIOMMU refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.vtd import DescType
from tests.conftest import FIXTURES
from tests.models.vtd_harness import HOST, PAGE, A, B, N, Vm, first_stage, scalable
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.oracle import FULL
from viommud.oracle.vtd import (
    NESTED,
    RESERVED,
    TYPE_BITS,
    UNTRANSLATED,
    Malformed,
    StaleSince,
    VtdGuest,
    Wait,
    read_descriptor,
)
from viommud.session import Session
from viommud.trace import Cmds, TraceReader, ViommuCreate

T = DescType
VTD_TRACES = sorted(FIXTURES.glob("vtd-*.json*"))


def verify(trace: Path) -> dict[str, int]:
    with TraceReader(trace) as reader:
        session = Session(EmulatedIommufd(reader.header.host), verify=True)
        for record in reader:
            if isinstance(record, Cmds):
                as_json(session.doorbell(record.viommu, record.data))
            else:
                as_json(session.handle(record))
    report = session.report()
    session.close()
    return {"missed": report["verify"]["missed"], "over": report["verify"]["over"]}


def verdict(vm: Vm) -> dict[str, int]:
    report = vm.report()["verify"]
    return {"missed": report["missed"], "over": report["over"]}


def oracle_of(vm: Vm) -> VtdGuest:
    verifier = vm.session.verifier
    assert verifier is not None
    guest = verifier.guests["v"]
    assert isinstance(guest, VtdGuest)
    return guest


@pytest.mark.parametrize("trace", VTD_TRACES, ids=lambda p: p.name)
def test_bundled_vtd_traces_verify_clean(trace: Path) -> None:
    assert verify(trace) == {"missed": 0, "over": 0}


def test_device_tlb_elided_without_cover_is_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("viommud.dispatcher.vtd.device_tlb_is_redundant", lambda *_a, **_k: True)
    missed = {t.name: verify(t)["missed"] for t in VTD_TRACES if "linux61" not in t.name}
    assert any(missed.values()), missed


# -- the context cache: a device-selective invalidation refreshes only what it covers -------


def _first_stage_pair(vm: Vm) -> None:
    """A and B get first-stage entries of domain 7; only A's source ID is invalidated (FM=3
    covers 0x10-0x17, and B is 0x18)."""
    vm.attach(A, B)
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())  # nothing written yet: nothing moves
    for sid in (A, B):
        vm.context(sid, scalable())
        vm.pasid(sid, first_stage(7, 0x2000_0000))
    vm.run(vm.d(T.CC_INV, g=3, sid=A, fm=3), vm.wait())


def test_device_selective_context_invalidation_moves_only_what_it_covers() -> None:
    vm = Vm(dw=256, verify=True)
    _first_stage_pair(vm)
    guest = oracle_of(vm)
    assert guest.devices[A].translation.mode == NESTED
    assert guest.devices[B].translation.mode == UNTRANSLATED  # its entry was never read
    vm.run(
        vm.d(T.IOTLB_INV, g=3, did=7, addr=PAGE),
        vm.d(T.DEV_TLB_INV, sid=A, addr=PAGE),
        vm.d(T.DEV_TLB_INV, sid=B, addr=PAGE),
        vm.wait(),
    )
    vm.run(vm.d(T.IOTLB_INV, g=2, did=7), vm.wait())
    assert verdict(vm) == {"missed": 0, "over": 0}


def test_a_context_invalidation_the_daemon_ignores_is_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "viommud.dispatcher.vtd.VtdDispatcher._context_invalidated", lambda *_a, **_k: None
    )
    vm = Vm(dw=256, verify=True)
    _first_stage_pair(vm)  # the daemon leaves A on the nesting parent: no HWPT to flush
    vm.run(vm.d(T.IOTLB_INV, g=3, did=7, addr=PAGE), vm.wait())
    assert verdict(vm)["missed"] == 1


# -- the PASID cache ---------------------------------------------------------------------


def _shared_domain(vm: Vm) -> None:
    """A and B (both with ATS) share domain 2's first stage; N has no ATS on the host."""
    vm.attach(A, B, N)
    for sid in (A, B, N):
        vm.context(sid, scalable())
        vm.pasid(sid, first_stage(2, 0x4000_0000))
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())


def test_pasid_selective_invalidation_of_another_domain_keeps_the_cached_entry() -> None:
    vm = Vm(dw=256, verify=True)
    _shared_domain(vm)
    vm.pasid(A, first_stage(3, 0x5000_0000))
    vm.run(vm.d(T.PC_INV, g=1, did=3, pasid=0), vm.wait())  # A's cached entry is DID 2
    assert oracle_of(vm).devices[A].translation.did == 2
    vm.run(vm.d(T.PC_INV, g=1, did=2, pasid=0), vm.wait())
    assert oracle_of(vm).devices[A].translation.did == 3
    vm.run(vm.d(T.P_IOTLB_INV, g=2, did=3, pasid=0), vm.wait())
    assert verdict(vm) == {"missed": 0, "over": 0}


# -- device-TLB staleness ----------------------------------------------------------------


def test_a_device_tlb_range_flushed_since_it_went_stale_needs_nothing_more() -> None:
    """The second identical device-TLB invalidation may be elided: nothing in its range
    changed since the first one's host flush (the range never had an IOTLB invalidation
    since A joined its HWPT)."""
    vm = Vm(dw=256, verify=True)
    _shared_domain(vm)
    far = PAGE + 0x10000 | 1  # S=1: 4 pages
    first = vm.run(vm.d(T.DEV_TLB_INV, sid=A, addr=far, s=1), vm.wait())
    second = vm.run(vm.d(T.DEV_TLB_INV, sid=A, addr=far, s=1), vm.wait())
    assert [c["ioctl"] for c in first].count("IOMMU_HWPT_INVALIDATE") == 1
    assert [c["ioctl"] for c in second].count("IOMMU_HWPT_INVALIDATE") == 0
    assert verdict(vm) == {"missed": 0, "over": 0}


def test_a_device_tlb_invalidation_for_another_pasid_needs_nothing() -> None:
    vm = Vm(dw=256, verify=True)
    _shared_domain(vm)
    calls = vm.run(vm.d(T.P_DEV_TLB_INV, sid=A, pasid=5, addr=PAGE), vm.wait())
    assert "IOMMU_HWPT_INVALIDATE" not in [c["ioctl"] for c in calls]
    assert verdict(vm) == {"missed": 0, "over": 0}


def test_a_device_tlb_elided_on_a_flush_older_than_the_change_is_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second IOTLB invalidation of a page made its device-TLB entries stale again; a
    device-TLB invalidation elided because of the flush before it is missed."""
    vm = Vm(dw=256, verify=True)
    _shared_domain(vm)
    vm.run(vm.d(T.P_IOTLB_INV, g=3, did=2, pasid=0, addr=PAGE), vm.wait())  # flushed
    monkeypatch.setattr("viommud.dispatcher.vtd.VtdDispatcher._collect", lambda *_a: None)
    vm.run(vm.d(T.P_IOTLB_INV, g=3, did=2, pasid=0, addr=PAGE), vm.wait())  # lost
    assert verdict(vm)["missed"] == 3  # the IOTLBs of A, B and N
    monkeypatch.undo()
    # The daemon's elision rule sees the first flush, which the lost change came after.
    calls = vm.run(vm.d(T.DEV_TLB_INV, sid=A, addr=PAGE), vm.wait())
    assert "IOMMU_HWPT_INVALIDATE" not in [c["ioctl"] for c in calls]
    assert verdict(vm)["missed"] == 4


def test_stale_since_keeps_the_latest_time_per_range() -> None:
    stale = StaleSince(base=1)
    assert stale.pieces(0, 0x4000) == ((0, 0x4000, 1),)
    stale.mark(0x1000, 0x3000, 5)
    stale.mark(0x2000, 0x5000, 7)
    assert stale.pieces(0, 0x6000) == (
        (0, 0x1000, 1),
        (0x1000, 0x2000, 5),
        (0x2000, 0x5000, 7),
        (0x5000, 0x6000, 1),
    )
    stale.mark(0x1800, 0x1C00, 9)  # inside an older range: splits it
    assert stale.pieces(0x1000, 0x2000) == (
        (0x1000, 0x1800, 5),
        (0x1800, 0x1C00, 9),
        (0x1C00, 0x2000, 5),
    )
    stale.mark(*FULL, 11)
    assert stale.pieces(0x1000, 0x9000) == ((0x1000, 0x9000, 11),)
    stale.reset(12)
    assert stale.pieces(*FULL) == ((*FULL, 12),)


# -- the oracle's reading of the descriptors against the vIOMMU's refusals ---------------


@st.composite
def descriptors(draw: st.DrawFn) -> tuple[bytes, bool, int]:
    """A descriptor of either width: declared fields random, now and then a stray bit (a
    reserved one, a qw2/qw3 bit, a type bit) or an unknown type."""
    width = draw(st.sampled_from((16, 32)))
    kind = draw(st.sampled_from([*(int(k) for k in T), 0, 0xA, 0x12]))
    rsvd0, rsvd1 = RESERVED.get(kind, (0, 0))
    words = [
        draw(st.integers(0, (1 << 64) - 1)) & ~rsvd0 & ~TYPE_BITS | (kind & 0xF) | (kind >> 4) << 9,
        draw(st.integers(0, (1 << 64) - 1)) & ~rsvd1,
        0,
        0,
    ]
    if draw(st.integers(0, 3)) == 0:
        words[draw(st.integers(0, width // 8 - 1))] ^= 1 << draw(st.integers(0, 63))
    raw = b"".join(w.to_bytes(8, "little") for w in words)[:width]
    return raw, draw(st.booleans()), width


@settings(max_examples=400, deadline=None)
@given(case=descriptors())
def test_the_oracle_refuses_what_the_viommu_refuses(case: tuple[bytes, bool, int]) -> None:
    raw, pds, width = case
    session = Session(EmulatedIommufd(HOST))
    options: dict[str, Any] = {"dw": width * 8, "pds": pds}
    assert as_json(session.handle(ViommuCreate(2, "v", "vtd", ("dmar0",), options))) == {"ok": True}
    reply = as_json(session.doorbell("v", raw))  # no device: only decoding can refuse it
    effect = read_descriptor(raw, pds)
    assert isinstance(effect, Malformed) == bool(reply["errors"]), (effect, reply)
    assert isinstance(effect, Wait) == (reply["syncs"] == 1)
