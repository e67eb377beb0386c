"""The oracle (DESIGN.md point 6) flags every kind of dispatcher mistake, and nothing else.

Each faulty dispatcher below breaks one guarantee on purpose; the same workload through the
real dispatcher must verify clean.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from bench.workloads import tlbi_range
from protocols.smmuv3 import Opcode, build_command
from tests.oracle.workload import SYNC, Rig, build, host
from tests.replies import as_json
from viommud.dispatcher import Outcome
from viommud.dispatcher.smmuv3 import DispatchPolicy, SmmuDispatcher
from viommud.dispatcher.smmuv3_coalesce import Entry
from viommud.events import Event, GuestError, Invalidation
from viommud.models.smmuv3 import SmmuV3Viommu
from viommud.topology.smmuv3 import PiommuSlot


class DropsACommand(SmmuDispatcher):
    def _send(self, slot: PiommuSlot, entries: list[Entry], errors: list[GuestError]) -> None:
        super()._send(slot, entries[:-1], errors)


class MergesTooNarrow(SmmuDispatcher):
    def _send(self, slot: PiommuSlot, entries: list[Entry], errors: list[GuestError]) -> None:
        narrowed = []
        for e in entries:
            w0, w1 = struct.unpack("<QQ", e.raw)
            if w0 & 0xFF == Opcode.TLBI_NH_VA and (w0 >> 20) & 0x1F:
                w0 -= 1 << 20  # half the pages
            narrowed.append(Entry(struct.pack("<QQ", w0, w1), e.origin))
        super()._send(slot, narrowed, errors)


class SkipsAPhysicalSmmu(SmmuDispatcher):
    def targets(self, inv: Invalidation) -> list[PiommuSlot]:
        return super().targets(inv)[:1]


class ElidesAtc(SmmuDispatcher):
    def _send(self, slot: PiommuSlot, entries: list[Entry], errors: list[GuestError]) -> None:
        super()._send(slot, [e for e in entries if e.opcode != Opcode.ATC_INV], errors)


class CompletesEarly(SmmuDispatcher):
    """Answers the doorbell first and issues its work with the next one."""

    def _flush(self, errors: list[GuestError]) -> None:
        if getattr(self, "_late", False):
            super()._flush(errors)

    def run(self, events: list[Event]) -> Outcome:
        self._late = True
        self._flush([])  # last doorbell's work, now
        self._late = False
        return super().run(events)


def with_dispatcher(rig: Rig, cls: type[SmmuDispatcher]) -> None:
    for instance in rig.session.viommus.values():
        assert isinstance(instance, SmmuV3Viommu)
        old = instance.dispatcher
        instance.dispatcher = cls(old.topology, old.iommufd, old.stats, old.policy)


def workload(rig: Rig) -> None:
    [vid, *_] = rig.vids["v"]
    as_json(rig.doorbell("v", *tlbi_range(1, 0x100, 8), *tlbi_range(1, 0x200, 3), SYNC))
    as_json(
        rig.doorbell(
            "v",
            *tlbi_range(2, 0x40, 64),
            SYNC,
            build_command(Opcode.ATC_INV, sid=vid, size=52),
            SYNC,
        )
    )
    as_json(
        rig.doorbell(
            "v",
            build_command(Opcode.CFGI_CD, sid=vid, ssid=0, leaf=1),
            SYNC,
            build_command(Opcode.TLBI_NH_ASID, asid=3),
            SYNC,
        )
    )
    as_json(rig.doorbell("v", SYNC))  # flushes the late dispatcher's leftovers


def verdict(cls: type[SmmuDispatcher] | None) -> dict[str, int]:
    rig = build(host(2, 2, ats=True), {"v": ["smmu0", "smmu1"]})
    if cls is not None:
        with_dispatcher(rig, cls)
    workload(rig)
    report = rig.session.report()["verify"]
    assert report["enabled"] is True
    return {"missed": report["missed"], "over": report["over"]}


def test_the_real_dispatcher_verifies_clean() -> None:
    assert verdict(None) == {"missed": 0, "over": 0}


@pytest.mark.parametrize(
    "cls",
    [DropsACommand, MergesTooNarrow, SkipsAPhysicalSmmu, ElidesAtc, CompletesEarly],
    ids=lambda c: c.__name__,
)
def test_each_mistake_is_missed(cls: type[SmmuDispatcher]) -> None:
    assert verdict(cls)["missed"] > 0


@pytest.mark.parametrize("broadcast_all", [False, True])
def test_broadcast_to_a_smmu_without_stage1_is_over(broadcast_all: bool) -> None:
    """smmu1's only device bypasses stage 1: its IOTLB holds no stage-1 entry of the VM."""
    rig = build(host(2, 1, ats=False), {"v": ["smmu0", "smmu1"]}, bypass=frozenset({"smmu1"}))
    instance = rig.session.viommus["v"]
    assert isinstance(instance, SmmuV3Viommu)
    instance.dispatcher.policy = DispatchPolicy(broadcast_all=broadcast_all)
    as_json(rig.doorbell("v", *tlbi_range(1, 0x10, 1), SYNC))
    calls = [c for c in rig.session.drain_calls() if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"]
    assert [c["iommu"] for c in calls] == (["smmu0", "smmu1"] if broadcast_all else ["smmu0"])
    assert rig.session.report()["verify"] == {
        "enabled": True,
        "missed": 0,
        "over": 1 if broadcast_all else 0,
    }


def test_failed_call_without_resend_is_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dispatcher that trusts entry_num after a failure misses the unissued group."""
    rig = build(host(1, 1, ats=False), {"v": ["smmu0"]})
    import viommud.dispatcher.smmuv3 as mod

    sends: list[int] = []
    original: Callable[..., None] = mod.SmmuDispatcher._send

    def trusting(
        self: SmmuDispatcher, slot: PiommuSlot, entries: list[Entry], errors: list[GuestError]
    ) -> None:
        sends.append(len(entries))
        result = self.iommufd.invalidate(
            slot.iommu,
            object_kind="viommu",
            object_id=slot.viommu_id,
            data_type=1,
            entry_len=16,
            entries=[e.raw for e in entries],
        )
        if result.errno:
            rest = entries[result.done + 1 :]
            if rest:
                original(self, slot, rest, errors)

    monkeypatch.setattr(mod.SmmuDispatcher, "_send", trusting)
    bad = struct.pack("<QQ", Opcode.CMD_SYNC, 0)  # the kernel refuses it: EIO at its index
    pages = [c for i in range(70) for c in tlbi_range(1, 2 * i, 1)]
    pages[65] = bad
    with monkeypatch.context() as m:
        m.setattr("viommud.dispatcher.smmuv3.coalesce", lambda entries, **_: entries)
        instance = rig.session.viommus["v"]
        assert isinstance(instance, SmmuV3Viommu)
        # feed the bad entry through the dispatcher as if the frontend had let it pass
        disp = instance.dispatcher
        from viommud.events import Cache, Scope

        events: list[Event] = [
            Invalidation(i, Cache.TLB, Scope.ALL, raw=raw) for i, raw in enumerate(pages)
        ]
        verifier = rig.session.verifier
        assert verifier is not None
        verifier.doorbell_begin(
            "v", b"".join(p for p in pages if p != bad) + struct.pack("<QQ", Opcode.CMD_SYNC, 0)
        )
        disp.run(events)
        verifier.doorbell_end("v", set())
    assert verifier.ledger.missed > 0
