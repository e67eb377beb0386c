"""Mutation proof of the oracle (docs/oracle.md): break one dispatch rule at a time, run a
Linux-shaped guest workload with ``--verify`` on, and require ``missed > 0``.

Every case is checked three ways:

* ``test_workload_is_sound``: the same workload through the real dispatcher verifies with
  ``missed == 0`` (so a miss under the mutation is the mutation's doing);
* ``test_mutation_changes_the_host_calls_or_the_replies``: the mutation really fires (the
  invalidation calls per doorbell or request, or the replies, differ from the real
  dispatcher's);
* ``test_the_oracle_catches_the_mutation``: the oracle reports ``missed > 0``. A break that
  a correct oracle could only see by modelling something it does not model yet is marked
  ``xfail(strict=True)`` with what is missing, so the test flips when the oracle learns it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from bench.workloads import tlbi_range
from protocols import iommufd as uapi
from protocols.smmuv3 import Opcode, build_command
from protocols.virtio_iommu import (
    INV_B_F_ARCHID,
    INV_B_F_LEAF,
    INV_B_F_PASID,
    INV_B_GRAN_PASID,
    INV_B_GRAN_VA,
    INV_B_TYPE_DEV_IOTLB,
    INV_B_TYPE_IOTLB,
    INV_B_TYPE_PASID,
    RequestType,
    build_request,
)
from protocols.vtd import VTD_S1_SIZE, DescType
from tests.models.vtd_harness import HOST, PAGE, A, B, N, R, Vm, first_stage, scalable
from tests.oracle.test_oracle_catches_mistakes import (
    CompletesEarly,
    ElidesAtc,
    MergesTooNarrow,
    SkipsAPhysicalSmmu,
    with_dispatcher,
)
from tests.oracle.workload import SYNC, Rig, build, host
from viommud.backend.calls import InvalidateResult
from viommud.backend.emulator import EmulatedIommufd
from viommud.backend.emulator.testing import caches, dma, inject_cmdq_error
from viommud.dispatcher import NOTHING, Outcome
from viommud.dispatcher.smmuv3 import ARM_ENTRY_LEN, SmmuDispatcher
from viommud.dispatcher.smmuv3_coalesce import Entry, class_rank
from viommud.dispatcher.virtio import STEP_ATC, STEP_CONFIG, STEP_TLB, VirtioDispatcher
from viommud.dispatcher.vtd import Batch, VtdDispatcher
from viommud.events import GuestError, Invalidation, VtdEvent
from viommud.host import HostConfig
from viommud.models.virtio import VirtioViommu
from viommud.replies import CONFIG_OK
from viommud.session import Session
from viommud.topology.smmuv3 import PiommuSlot
from viommud.topology.vtd import FULL_END, SharedHwpt
from viommud.trace import DeviceAttach, ViommuCreate
from viommud.virtio_state import Unmapped, VirtioEvent

T = DescType
Mutate = Callable[[Any, pytest.MonkeyPatch], None]  # (Rig, Vm or Session, monkeypatch) -> None


@dataclass(frozen=True)
class Run:
    """What one workload run showed: the oracle's verdict, and per doorbell the command
    indices the guest was told failed and the invalidation calls made."""

    missed: int
    over: int
    errors: tuple[tuple[int, ...], ...]
    calls: tuple[tuple[tuple[Any, ...], ...], ...]


def _invalidations(calls: list[dict[str, Any]]) -> tuple[tuple[Any, ...], ...]:
    return tuple(
        (c["iommu"], c["object"]["kind"], tuple(c["entries"]), c["errno"])
        for c in calls
        if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"
    )


# -- SMMUv3 mutations (each breaks one rule of viommud/dispatcher/smmuv3.py) -------------------


class DropsAnEntry(SmmuDispatcher):
    """Issues every call of more than one entry without its last entry."""

    def _invalidate(self, slot: PiommuSlot, array: bytes) -> InvalidateResult:
        if len(array) > ARM_ENTRY_LEN:
            array = array[:-ARM_ENTRY_LEN]
        return super()._invalidate(slot, array)


class RewritesVaAsAsid(SmmuDispatcher):
    """Sends TLBI_NH_ASID(asid) for each TLBI_NH_VA(asid, range): an ASID invalidation
    spares global (nG=0) entries, which a VA invalidation removes whatever their ASID
    (SMMUv3 §4.4; the note in viommud/dispatcher/smmuv3_coalesce.py)."""

    def _send(self, slot: PiommuSlot, entries: list[Entry], errors: list[GuestError]) -> None:
        out = [
            Entry(build_command(Opcode.TLBI_NH_ASID, asid=e.words[0] >> 48), e.origin)
            if e.opcode == Opcode.TLBI_NH_VA
            else e
            for e in entries
        ]
        super()._send(slot, out, errors)


class MergesConfigWithTlb(SmmuDispatcher):
    """Lets TLB work join config work that a guest CMD_SYNC ordered before it: one host
    call, whose entries the kernel issues without a sync between them."""

    def _collect(self, inv: Invalidation, errors: list[GuestError]) -> None:
        if class_rank(inv.raw[0]) == 1:
            self._sealed.discard(0)
        super()._collect(inv, errors)


class MergesTlbWithAtc(SmmuDispatcher):
    """Lets ATC work join TLB work that a guest CMD_SYNC ordered before it (§4.5: an
    ATC_INV overtaking the TLBI lets the device refill its ATC from the stale IOTLB)."""

    def _collect(self, inv: Invalidation, errors: list[GuestError]) -> None:
        if class_rank(inv.raw[0]) == 2:
            self._sealed.discard(1)
        super()._collect(inv, errors)


class SwallowsFailures(SmmuDispatcher):
    """Issues each call once and tells the guest nothing when the host refuses it."""

    def _send(self, slot: PiommuSlot, entries: list[Entry], errors: list[GuestError]) -> None:
        if entries:
            self._invalidate(slot, b"".join(e.raw for e in entries))


def smmu_dispatcher(cls: type[SmmuDispatcher]) -> Mutate:
    def mutate(rig: Rig, _: pytest.MonkeyPatch) -> None:
        with_dispatcher(rig, cls)

    return mutate


GLOBAL_PAGE = 0x300  # where the guest has a global (nG=0) mapping of ASID 1


def atc_inv(sids: list[int], page: int, size: int) -> list[bytes]:
    return [build_command(Opcode.ATC_INV, sid=sid, addr=page, size=size) for sid in sids]


def smmu_run(mutate: Mutate | None, *, host_fails: bool = False) -> tuple[Run, Rig]:
    """A vSMMU over two physical SMMUs, two ATS devices behind each, every device on a
    stage-1 vSTE; Linux arm-smmu-v3 shapes: a range unmap (TLBIs; SYNC; the domain's
    ATC_INVs; SYNC), a bigger one, an ASID retired (CFGI_CD; SYNC; TLBI_NH_ASID; SYNC), a
    page unmapped where a global mapping lives, and an idle SYNC. ``host_fails``: smmu0's
    next command-queue issue fails (ETIMEDOUT) when the first doorbell is rung."""
    rig = build(host(2, 2, ats=True), {"v": ["smmu0", "smmu1"]})
    sids = rig.vids["v"]
    doorbells = [
        [
            *tlbi_range(1, 0x100, 8),
            *tlbi_range(1, 0x200, 3),
            SYNC,
            *atc_inv(sids, 0x100, 3),
            *atc_inv(sids, 0x200, 2),
            SYNC,
        ],
        [*tlbi_range(2, 0x40, 64), SYNC, *atc_inv(sids[:1], 0, 52), SYNC],
        [
            build_command(Opcode.CFGI_CD, sid=sids[0], ssid=0, leaf=1),
            SYNC,
            build_command(Opcode.TLBI_NH_ASID, asid=3),
            SYNC,
        ],
        [*tlbi_range(1, GLOBAL_PAGE, 1), SYNC, *atc_inv(sids, GLOBAL_PAGE, 0), SYNC],
        [SYNC],  # a late dispatcher's leftovers go out here
    ]
    errors: list[tuple[int, ...]] = []
    calls: list[tuple[tuple[Any, ...], ...]] = []
    with pytest.MonkeyPatch.context() as mp:
        if mutate is not None:
            mutate(rig, mp)
        for number, commands in enumerate(doorbells):
            if number == 0 and host_fails:
                inject_cmdq_error(rig.backend, "smmu0")
            if number == 3:  # the device walks the global mapping: the IOTLB caches it
                dma(rig.backend, "0000:00:00.0", GLOBAL_PAGE << 12, asid=1, global_=True)
            reply = rig.session.doorbell("v", b"".join(commands))
            errors.append(tuple(e.index for e in reply.errors))
            calls.append(_invalidations(rig.session.drain_calls()))
    report = rig.session.report()["verify"]
    assert report["enabled"] is True
    return Run(report["missed"], report["over"], tuple(errors), tuple(calls)), rig


# -- VT-d mutations (each breaks one rule of viommud/dispatcher/vtd.py) -----------------------


class VtdDropsAnEntry(VtdDispatcher):
    """Issues every call of more than one entry without its last entry. (Dropping it from
    the batch instead is no break: the device-TLB invalidations elided on its strength are
    re-checked and sent as entries covering the same range, and the oracle agrees.)"""

    def _invalidate(self, hwpt: SharedHwpt, array: bytes) -> InvalidateResult:
        if len(array) > VTD_S1_SIZE:
            array = array[:-VTD_S1_SIZE]
        return super()._invalidate(hwpt, array)


class VtdNarrowsRanges(VtdDispatcher):
    """Sends half the pages of every multi-page range entry."""

    def _send(self, batch: Batch) -> None:
        for entry in batch.entries:
            pages = (entry.end - entry.start) >> 12
            if entry.end < FULL_END and pages > 1:
                entry.end = entry.start + (pages // 2 << 12)
        super()._send(batch)


class VtdSkipsDmar1(VtdDispatcher):
    """Sends nothing to the second physical IOMMU of the vIOMMU."""

    def _send(self, batch: Batch) -> None:
        if batch.hwpt.iommu != "dmar1":
            super()._send(batch)


class VtdCompletesEarly(VtdDispatcher):
    """Answers the doorbell first and issues its work with the next one."""

    def _flush(self) -> None:
        if getattr(self, "_late", False):
            super()._flush()

    def run(self, events: Iterable[VtdEvent]) -> Outcome:
        self._late = True
        self._flush()  # the last doorbell's work, now
        self._late = False
        return super().run(events)


class VtdSwallowsFailures(VtdDispatcher):
    """Issues each call once and tells the guest nothing when the host refuses it."""

    def _send(self, batch: Batch) -> None:
        if batch.entries:
            self._invalidate(batch.hwpt, batch.pack())


def vtd_dispatcher(cls: type[VtdDispatcher]) -> Mutate:
    def mutate(vm: Vm, _: pytest.MonkeyPatch) -> None:
        old = vm.viommu.dispatcher
        vm.viommu.dispatcher = cls(old.topology, old.iommufd, old.stats)

    return mutate


def elides_every_device_tlb(_: Vm, mp: pytest.MonkeyPatch) -> None:
    """The elision rule (docs/vtd.md, "Device-TLB elision") answers "redundant" always."""
    mp.setattr("viommud.dispatcher.vtd.device_tlb_is_redundant", lambda *_a, **_k: True)


class FlakyIommufd(EmulatedIommufd):
    """The emulated kernel, but the next ``fail_request`` call (``IOMMU_HWPT_INVALIDATE``
    unless told otherwise) after ``fail_next`` is set fails having done nothing (an
    invalidation at its first entry)."""

    fail_next = 0
    fail_request = uapi.IOMMU_HWPT_INVALIDATE

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        if request == self.fail_request and self.fail_next:
            err, self.fail_next = self.fail_next, 0
            if request == uapi.IOMMU_HWPT_INVALIDATE:
                invalidate = uapi.decode(uapi.HwptInvalidate, arg)
                arg[:] = uapi.encode(replace(invalidate, entry_num=0))
            return err
        return super().ioctl(fd, request, arg)


def vtd_run(mutate: Mutate | None, *, host_fails: bool = False) -> Run:
    """A scalable-mode vIOMMU over dmar0 (A, B with ATS, N without) and dmar1 (R), all in
    first-stage domain 2: a strict unmap of two pages in Linux 6.12's batch (P_IOTLBs, the
    device TLBs, wait), a 16-page one, B moved to a new first-stage table (PC_INV), then
    device-TLB work no IOTLB flush covered (B moved since; a range of A never flushed), a
    lazy (PASID-wide) flush, and an idle wait. ``host_fails``: the first host call of the
    16-page unmap fails."""
    backend = FlakyIommufd(HOST)
    vm = Vm(dw=256, verify=True, backend=backend)
    vm.attach(A, B, N, R)
    for sid in (A, B, N, R):
        vm.context(sid, scalable())
        vm.pasid(sid, first_stage(2, 0x4000_0000))
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())
    all_pages = 0x7_FFFF_FFFF_FFFF  # ADDR[63:12] all ones with S=1: the whole device TLB
    pages = (PAGE, PAGE + 0x40)
    span16 = PAGE + 0x10
    doorbells: list[Callable[[], list[bytes]]] = [
        lambda: [
            *(vm.d(T.P_IOTLB_INV, g=3, did=2, pasid=0, addr=p, am=0, ih=1) for p in pages),
            *(vm.d(T.DEV_TLB_INV, sid=s, addr=p) for p in pages for s in (A, B, R)),
            vm.wait(),
        ],
        lambda: [
            vm.d(T.P_IOTLB_INV, g=3, did=2, pasid=0, addr=span16, am=4),
            *(vm.d(T.DEV_TLB_INV, sid=s, addr=span16 | 0x7, s=1) for s in (A, B, R)),
            vm.wait(),
        ],
        lambda: [vm.d(T.PC_INV, g=1, did=2, pasid=0), vm.wait()],
        lambda: [
            vm.d(T.DEV_TLB_INV, sid=B, addr=all_pages, s=1),
            vm.d(T.DEV_TLB_INV, sid=A, addr=0x10001, s=1),
            vm.d(T.DEV_TLB_INV, sid=N, addr=PAGE),
            vm.wait(),
        ],
        lambda: [
            vm.d(T.P_IOTLB_INV, g=2, did=2, pasid=0),
            *(vm.d(T.DEV_TLB_INV, sid=s, addr=all_pages, s=1) for s in (A, B, R)),
            vm.wait(),
        ],
        lambda: [vm.wait()],  # a late dispatcher's leftovers go out here
    ]
    vm.session.drain_calls()
    errors: list[tuple[int, ...]] = []
    calls: list[tuple[tuple[Any, ...], ...]] = []
    with pytest.MonkeyPatch.context() as mp:
        if mutate is not None:
            mutate(vm, mp)
        for number, descriptors in enumerate(doorbells):
            if number == 1 and host_fails:
                backend.fail_next = errno.ETIMEDOUT
            if number == 2:
                vm.pasid(B, first_stage(2, 0x4020_0000))  # B's new table
            reply = vm.session.doorbell("v", b"".join(descriptors()))
            errors.append(tuple(e.index for e in reply.errors))
            calls.append(_invalidations(vm.session.drain_calls()))
    report = vm.report()["verify"]
    assert report["enabled"] is True
    return Run(report["missed"], report["over"], tuple(errors), tuple(calls))


# -- virtio-iommu mutations (each breaks one rule of viommud/dispatcher/virtio.py) ------------


class VirtioSkipsUnmap(VirtioDispatcher):
    """Answers UNMAP without unmapping anything on the host."""

    def apply(self, event: VirtioEvent) -> None:
        if not isinstance(event, Unmapped):
            super().apply(event)


class VirtioNarrowsUnmap(VirtioDispatcher):
    """Unmaps every mapping of an UNMAP but its last one."""

    def apply(self, event: VirtioEvent) -> None:
        if isinstance(event, Unmapped) and len(event.mappings) > 1:
            event = replace(event, mappings=tuple(event.mappings)[:-1])
        super().apply(event)


class VirtioDropsAnEntry(VirtioDispatcher):
    """Issues every call of more than one entry without its last entry."""

    def _flush(self) -> None:
        for bucket in self._buckets.values():
            for entries in bucket.steps:
                if len(entries) > 1:
                    entries.pop()
        super()._flush()


class VirtioSkipsSmmu1(VirtioDispatcher):
    """Sends nothing to the second physical SMMU of a table domain."""

    def _flush(self) -> None:
        for key in [k for k, b in self._buckets.items() if b.iommu == "smmu1"]:
            del self._buckets[key]
        super()._flush()


class VirtioRewritesVaAsAsid(VirtioDispatcher):
    """Sends TLBI_NH_ASID(asid) for each TLBI_NH_VA(asid, range) of a vSVA INVALIDATE."""

    def _flush(self) -> None:
        for bucket in self._buckets.values():
            tlb = bucket.steps[STEP_TLB]
            tlb[:] = [
                build_command(Opcode.TLBI_NH_ASID, asid=int.from_bytes(e[6:8], "little"))
                if e[0] == Opcode.TLBI_NH_VA
                else e
                for e in tlb
            ]
        super()._flush()


class VirtioCompletesEarly(VirtioDispatcher):
    """Answers a request first and sends its invalidations with the next request."""

    def _flush(self) -> None:
        if getattr(self, "_late", False):
            super()._flush()

    def run(self, request_type: int, events: list[VirtioEvent]) -> Outcome:
        held = getattr(self, "_held", {})
        if held:
            self._buckets.update(held)
            self._late = True
            self._flush()  # the last request's work, now
            self._late = False
        outcome = super().run(request_type, events)
        self._held = dict(self._buckets)
        return outcome


class VirtioDropsAtc(VirtioDispatcher):
    """Sends an INVALIDATE's configuration and TLB work, not its ATC invalidations."""

    def _flush(self) -> None:
        for bucket in self._buckets.values():
            bucket.steps[STEP_ATC].clear()
        super()._flush()


def _virtio_merges(into: int, step: int) -> type[VirtioDispatcher]:
    class Merges(VirtioDispatcher):
        def _flush(self) -> None:
            for bucket in self._buckets.values():
                bucket.steps[into].extend(bucket.steps[step])
                bucket.steps[step].clear()
            super()._flush()

    return Merges


class VirtioSwallowsFailures(VirtioDispatcher):
    """Tells the guest nothing when the host refuses a call."""

    def run(self, request_type: int, events: list[VirtioEvent]) -> Outcome:
        super().run(request_type, events)
        return NOTHING


def virtio_dispatcher(cls: type[VirtioDispatcher]) -> Mutate:
    def mutate(session: Session, _: pytest.MonkeyPatch) -> None:
        instance = session.viommus["v"]
        assert isinstance(instance, VirtioViommu)
        old = instance.dispatcher
        instance.dispatcher = cls(old.topology, old.iommufd, old.stats)

    return mutate


VIRTIO_HOST = HostConfig.from_json(
    {
        "iommus": [
            {"id": "smmu0", "model": "arm-smmuv3"},
            {"id": "smmu1", "model": "arm-smmuv3"},
            {"id": "dmar0", "model": "intel-vtd"},
        ],
        "devices": [
            {"id": "0000:01:00.0", "iommu": "smmu0", "sid": 0x100, "ats": True},
            {"id": "0000:02:00.0", "iommu": "smmu0", "sid": 0x200, "ats": True},
            {"id": "0000:03:00.0", "iommu": "dmar0", "sid": 0x300, "ats": False},
            {"id": "0000:04:00.0", "iommu": "smmu1", "sid": 0x400, "ats": True},
        ],
    }
)


def virtio_run(mutate: Mutate | None, *, host_fails: bool = False) -> Run:
    """A draft-B vSVA virtio-iommu: the VT-d device in a MAP domain (three mappings; an UNMAP
    of two, then of the third), the ATS devices of smmu0 and smmu1 on one Arm PASID table (a
    PASID's CD changed with its four pages: configuration, TLB and device TLB in one
    INVALIDATE; then a PASID-wide TLB and device-TLB one), and an UNMAP that removes nothing
    (a late dispatcher's leftovers go out there). ``host_fails``: the first IOAS_UNMAP
    fails."""
    backend = FlakyIommufd(VIRTIO_HOST)
    backend.fail_request = uapi.IOMMU_IOAS_UNMAP
    session = Session(backend, verify=True, keep_calls=True)
    options = {"vsva": True, "bypass": 0, "guest_memory": [{"gpa": 0, "size": 1 << 30}]}
    assert session.handle(ViommuCreate(1, "v", "virtio-iommu", (), options)) == CONFIG_OK
    devices = ((0x10, "0000:01:00.0"), (0x20, "0000:02:00.0"), (0x30, "0000:03:00.0"))
    for vid, device in (*devices, (0x40, "0000:04:00.0")):
        assert session.handle(DeviceAttach(1, "v", vid, device)) == CONFIG_OK

    def req(kind: int, **fields: int) -> bytes:
        return build_request(kind, "B", **fields)

    def mapping(start: int) -> bytes:
        end = start + 0xFFFF
        return req(
            RequestType.MAP, domain=1, virt_start=start, virt_end=end, phys_start=start, flags=3
        )

    table = {"format": 2, "s1dss": 2, "s1contextptr": 0x4000_1000, "s1cdmax": 4}
    va = 0x7F00_0040_0000
    setup = [
        req(RequestType.ATTACH, domain=1, endpoint=0x30),
        *(mapping(start) for start in (0x10000, 0x20000, 0x30000)),
        req(RequestType.ATTACH_TABLE, domain=2, endpoint=0x10, **table),
        req(RequestType.ATTACH_TABLE, domain=2, endpoint=0x20, **table),
        req(RequestType.ATTACH_TABLE, domain=2, endpoint=0x40, **table),
    ]
    work = [
        req(RequestType.UNMAP, domain=1, virt_start=0x10000, virt_end=0x2FFFF),
        req(RequestType.UNMAP, domain=1, virt_start=0x30000, virt_end=0x3FFFF),
        req(
            RequestType.INVALIDATE,
            inv_gran=INV_B_GRAN_VA,
            inv_type=INV_B_TYPE_PASID | INV_B_TYPE_IOTLB | INV_B_TYPE_DEV_IOTLB,
            flags=INV_B_F_PASID | INV_B_F_ARCHID | INV_B_F_LEAF,
            domain=2,
            pasid=1,
            archid=5,
            virt_start=va,
            nr_pages=4,
            granule=12,
        ),
        req(
            RequestType.INVALIDATE,
            inv_gran=INV_B_GRAN_PASID,
            inv_type=INV_B_TYPE_IOTLB | INV_B_TYPE_DEV_IOTLB,
            flags=INV_B_F_PASID | INV_B_F_ARCHID,
            domain=2,
            pasid=1,
            archid=5,
        ),
        req(RequestType.UNMAP, domain=1, virt_start=0x100000, virt_end=0x1FFFFF),
    ]
    for data in setup:
        assert session.request("v", data).status == "OK"
    session.drain_calls()
    errors: list[tuple[int, ...]] = []
    calls: list[tuple[tuple[Any, ...], ...]] = []
    with pytest.MonkeyPatch.context() as mp:
        if mutate is not None:
            mutate(session, mp)
        for number, data in enumerate(work):
            if number == 0 and host_fails:
                backend.fail_next = errno.ENOMEM
            reply = session.request("v", data)
            errors.append(() if reply.status == "OK" else (0,))
            log = session.drain_calls()
            unmaps = tuple(
                (c["args"]["iova"], c["args"]["length"], c["errno"])
                for c in log
                if c["ioctl"] == "IOMMU_IOAS_UNMAP"
            )
            calls.append(_invalidations(log) + unmaps)
    report = session.report()["verify"]
    assert report["enabled"] is True
    return Run(report["missed"], report["over"], tuple(errors), tuple(calls))


# -- the cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # "smmuv3" (smmu_run), "vtd" (vtd_run) or "virtio" (virtio_run)
    mutate: Mutate
    gap: str = ""  # what the oracle would have to model to see the break: xfail until then
    host_fails: bool = False  # the backend fails one call, in the sound run too

    def run(self, mutated: bool) -> Run:
        mutate = self.mutate if mutated else None
        if self.model == "smmuv3":
            return smmu_run(mutate, host_fails=self.host_fails)[0]
        if self.model == "virtio":
            return virtio_run(mutate, host_fails=self.host_fails)
        return vtd_run(mutate, host_fails=self.host_fails)


CASES = [
    Case("1-drop-entry-smmuv3", "smmuv3", smmu_dispatcher(DropsAnEntry)),
    Case("1-drop-entry-vtd", "vtd", vtd_dispatcher(VtdDropsAnEntry)),
    Case("2-narrow-range-smmuv3", "smmuv3", smmu_dispatcher(MergesTooNarrow)),
    Case("2-narrow-range-vtd", "vtd", vtd_dispatcher(VtdNarrowsRanges)),
    Case("3-skip-physical-iommu-smmuv3", "smmuv3", smmu_dispatcher(SkipsAPhysicalSmmu)),
    Case("3-skip-physical-iommu-vtd", "vtd", vtd_dispatcher(VtdSkipsDmar1)),
    Case("4-nh-va-as-nh-asid-smmuv3", "smmuv3", smmu_dispatcher(RewritesVaAsAsid)),
    Case(
        "5-config-and-tlb-in-one-call-smmuv3",
        "smmuv3",
        smmu_dispatcher(MergesConfigWithTlb),
    ),
    Case("6-tlb-and-atc-in-one-call-smmuv3", "smmuv3", smmu_dispatcher(MergesTlbWithAtc)),
    Case("7-elide-atc-without-cover-smmuv3", "smmuv3", smmu_dispatcher(ElidesAtc)),
    Case("7-elide-device-tlb-without-cover-vtd", "vtd", elides_every_device_tlb),
    Case("8-complete-before-the-call-smmuv3", "smmuv3", smmu_dispatcher(CompletesEarly)),
    Case("8-complete-before-the-call-vtd", "vtd", vtd_dispatcher(VtdCompletesEarly)),
    Case(
        "9-swallow-host-failure-smmuv3",
        "smmuv3",
        smmu_dispatcher(SwallowsFailures),
        host_fails=True,
    ),
    Case("9-swallow-host-failure-vtd", "vtd", vtd_dispatcher(VtdSwallowsFailures), host_fails=True),
    Case("1-drop-entry-virtio", "virtio", virtio_dispatcher(VirtioDropsAnEntry)),
    Case("3-skip-physical-iommu-virtio", "virtio", virtio_dispatcher(VirtioSkipsSmmu1)),
    Case("4-nh-va-as-nh-asid-virtio", "virtio", virtio_dispatcher(VirtioRewritesVaAsAsid)),
    Case("8-complete-before-the-call-virtio", "virtio", virtio_dispatcher(VirtioCompletesEarly)),
    Case("10-unmap-not-forwarded-virtio", "virtio", virtio_dispatcher(VirtioSkipsUnmap)),
    Case("2-narrow-unmap-virtio", "virtio", virtio_dispatcher(VirtioNarrowsUnmap)),
    Case("11-invalidate-drops-atc-virtio", "virtio", virtio_dispatcher(VirtioDropsAtc)),
    Case(
        "5-config-and-tlb-in-one-call-virtio",
        "virtio",
        virtio_dispatcher(_virtio_merges(STEP_CONFIG, STEP_TLB)),
    ),
    Case(
        "6-tlb-and-atc-in-one-call-virtio",
        "virtio",
        virtio_dispatcher(_virtio_merges(STEP_TLB, STEP_ATC)),
    ),
    Case(
        "9-swallow-host-failure-virtio",
        "virtio",
        virtio_dispatcher(VirtioSwallowsFailures),
        host_fails=True,
    ),
]


def _params(*, xfail: bool) -> list[Any]:
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(strict=True, reason=case.gap)] if xfail and case.gap else [],
        )
        for case in CASES
    ]


@pytest.mark.parametrize("case", _params(xfail=False))
def test_workload_is_sound(case: Case) -> None:
    run = case.run(mutated=False)
    assert run.missed == 0
    if case.host_fails:  # the real dispatcher told the guest which command the host refused
        assert sum(len(e) for e in run.errors) == 1, run.errors
    else:
        assert not any(run.errors), run.errors


@pytest.mark.parametrize("case", _params(xfail=False))
def test_mutation_changes_the_host_calls_or_the_replies(case: Case) -> None:
    """A mutation that swallows a host failure may issue the very calls the real dispatcher
    issues: what differs is the reply (the guest is told its request succeeded)."""
    mutated, sound = case.run(mutated=True), case.run(mutated=False)
    assert (mutated.calls, mutated.errors) != (sound.calls, sound.errors)


@pytest.mark.parametrize("case", _params(xfail=True))
def test_the_oracle_catches_the_mutation(case: Case) -> None:
    assert case.run(mutated=True).missed > 0


def test_nh_asid_really_leaves_the_global_entry() -> None:
    """Case 4 is a real break: the emulator's IOTLB (which applies each host command as the
    hardware does) still holds the global entry after the rewritten doorbell, and not
    after the real one."""

    def global_entries(mutate: Mutate | None) -> int:
        _, rig = smmu_run(mutate)
        iotlb = caches(rig.backend, "smmu0").iotlb
        return sum(1 for e in iotlb if e.global_ and e.iova == GLOBAL_PAGE << 12)

    assert global_entries(None) == 0
    assert global_entries(smmu_dispatcher(RewritesVaAsAsid)) == 1
