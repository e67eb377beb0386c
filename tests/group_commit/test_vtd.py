"""VT-d group commit (docs/coalescing.md, "Group commit"): the numpy screen agrees with the
frontend, descriptor by descriptor (and the small groups' frontend-screened path with it);
the coalescer keeps every invalidation and flushes nothing more; and a session that runs
doorbells in groups answers, counts and elides exactly as one that runs them one by one,
with nothing missed and fewer calls — whichever path plans each run."""

from __future__ import annotations

import errno
import random
import struct
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from protocols import iommufd as uapi
from protocols.vtd import build_descriptor
from tests.models.vtd_harness import HOST, A, B, N, R, T, Vm, entry, first_stage, legacy, scalable
from tests.replies import as_json, as_json_list
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.events import DomainInvalidation, GuestError, Invalidation, StatusWrite
from viommud.frontends.vtd.frontend import FrameError, VtdFeatures, VtdFrontend
from viommud.group_commit.vtd_coalesce import aligned_blocks, coalesce, pack
from viommud.group_commit.vtd_screen import (
    FULL_PAGES,
    NO_ID,
    PLAIN_TYPES,
    PlainWork,
    plain_work,
    screen,
    status_writes,
)
from viommud.guest.vtd import FIELDS, Field
from viommud.replies import DoorbellReply
from viommud.session import Session
from viommud.trace import ContextEntry, DeviceAttach, PasidEntry, ViommuCreate

_PLAIN = {int(kind) for kind in PLAIN_TYPES}
_Q = struct.Struct("<Q")


# -- the screen agrees with the frontend ----------------------------------------------------
def _value(f: Field) -> st.SearchStrategy[int]:
    top = (1 << f.width) - 1
    values = st.one_of(st.integers(0, min(top, 3)), st.integers(0, top))
    if f.name == "addr":  # PCIe ATS sizes: k trailing one bits, all ones included
        values |= st.tuples(st.integers(0, 1 << 20), st.integers(0, 52)).map(
            lambda t: ((t[0] << t[1]) | ((1 << t[1]) - 1)) & top
        )
    if f.name == "am":
        values |= st.integers(16, 20) | st.integers(50, 53)
    return values


@st.composite
def _descriptor(draw: st.DrawFn, width: int) -> bytes:
    shape = draw(st.sampled_from(["fields"] * 5 + ["reserved", "upper", "unknown", "raw"]))
    if shape == "raw":
        return draw(st.binary(min_size=width, max_size=width))
    kind = draw(st.sampled_from([*sorted(_PLAIN) * 3, 1, 4, 7, 9]))
    words = [0] * (width // 8)
    words[0] = (kind & 0xF) | (kind >> 4) << 9
    for f in FIELDS[kind]:
        if f.name not in ("type_lo", "type_hi"):
            words[f.word] |= draw(_value(f)) << f.lo
    if shape == "reserved":  # one more bit, reserved or not
        bit = draw(st.integers(0, 127))
        words[bit // 64] |= 1 << bit % 64
    elif shape == "upper" and width == 32:
        words[draw(st.integers(2, 3))] = draw(st.integers(1, (1 << 64) - 1))
    elif shape == "unknown":
        other = draw(st.sampled_from([0, 0xA, 0xB, 0xC, 0xF, 0x12, 0x25, 0x7F]))
        words[0] = words[0] & ~0xE0F | (other & 0xF) | (other >> 4) << 9
    return b"".join(_Q.pack(w) for w in words)


def _doorbells(width: int) -> st.SearchStrategy[list[bytes]]:
    doorbell = st.one_of(
        st.lists(_descriptor(width), min_size=0, max_size=6).map(b"".join),
        st.binary(min_size=1, max_size=40),  # not whole descriptors, most of the time
    )
    return st.lists(doorbell, min_size=1, max_size=6)


def _pages(addr: int, size: int) -> tuple[int, int]:
    return (0, FULL_PAGES) if size == 0 else (addr >> 12, (addr + size) >> 12)


def _check_plain(screened: Any, k: int, events: list[Any], syncs: int) -> None:
    """What the screen decoded for plain doorbell ``k`` is what the frontend's events say."""
    assert screened.syncs[k] == syncs
    lo = screened.starts[k]
    assert plain_work(screened, k, k + 1, small=1 << 30) == [events]  # a short run's events
    work = plain_work(screened, k, k + 1, small=0)
    assert isinstance(work, PlainWork)
    assert set(work.doorbell[work.tlb.row].tolist()) <= {k}
    assert set(work.doorbell[work.device_tlb.row].tolist()) <= {k}
    tlb = work.tlb
    got = list(
        zip(
            (tlb.row - lo).tolist(),
            tlb.domain.tolist(),
            tlb.pasid.tolist(),
            tlb.start.tolist(),
            tlb.end.tolist(),
            tlb.leaf.tolist(),
            strict=True,
        )
    )
    want = [
        (
            e.index,
            NO_ID if e.domain is None else e.domain,
            NO_ID if e.pasid is None else e.pasid,
            *_pages(e.addr, e.size),
            e.leaf,
        )
        for e in events
        if isinstance(e, DomainInvalidation)
    ]
    assert got == want
    dev = work.device_tlb
    got_dev = list(
        zip(
            (dev.row - lo).tolist(),
            dev.device.tolist(),
            dev.pasid.tolist(),
            dev.start.tolist(),
            dev.end.tolist(),
            strict=True,
        )
    )
    want_dev = [
        (e.index, e.device, NO_ID if e.asid is None else e.asid, *_pages(e.addr, e.size))
        for e in events
        if isinstance(e, Invalidation)
    ]
    assert got_dev == want_dev
    writes = [(e.index, e.addr, e.data) for e in events if isinstance(e, StatusWrite)]
    assert status_writes(screened, k, k + 1) == [writes]


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([(128, False), (256, False), (256, True)]))
def test_screen_marks_plain_exactly_what_the_frontend_accepts_as_plain_work(
    data: st.DataObject, options: tuple[int, bool]
) -> None:
    dw, pds = options
    features = VtdFeatures(dw=dw, pds=pds)
    doorbells = data.draw(_doorbells(dw // 8))
    screened = screen(doorbells, features, small=0)  # numpy, however few
    by_frontend = screen(doorbells, features, small=1 << 30)
    assert by_frontend.plain == screened.plain
    plain = [k for k, ok in enumerate(screened.plain) if ok]
    assert [by_frontend.syncs[k] for k in plain] == [screened.syncs[k] for k in plain]
    every = range(len(doorbells))
    assert [by_frontend.kinds(k) for k in every] == [screened.kinds(k) for k in every]
    assert by_frontend.kind_counts(0, len(doorbells)) == screened.kind_counts(0, len(doorbells))
    for k, raw in enumerate(doorbells):
        frontend = VtdFrontend(features)
        try:
            frontend.receive_data(raw)
        except FrameError:
            assert not screened.plain[k]
            continue
        events = frontend.events()
        clean = bool(raw) and not any(isinstance(e, GuestError) for e in events)
        size = dw // 8
        kinds = {(raw[i] & 0xF) | (raw[i + 1] & 0xE) << 3 for i in range(0, len(raw), size)}
        assert screened.plain[k] == (clean and kinds <= _PLAIN), (k, raw.hex())
        if screened.plain[k]:
            _check_plain(screened, k, events, frontend.last.syncs)
            assert plain_work(by_frontend, k, k + 1) == [events]
            assert status_writes(by_frontend, k, k + 1) == status_writes(screened, k, k + 1)


# -- the coalescer keeps every invalidation and flushes nothing more ------------------------
def _block(start: int, size_log: int) -> tuple[int, int]:
    """A naturally aligned block of 2^size_log pages around ``start`` (as the guest sends)."""
    size = 1 << size_log
    first = start & ~(size - 1)
    return first, first + size


_span = st.one_of(
    st.tuples(st.integers(0, 600), st.integers(0, 5)).map(lambda t: _block(*t)),
    st.just((0, FULL_PAGES)),
    st.tuples(st.integers(0, (1 << 52) - 1), st.integers(0, 51)).map(lambda t: _block(*t)),
)


def _host_pages(start: int, end: int) -> tuple[int, int]:
    """The naturally aligned block the kernel flushes for an entry (vtd.md §1.4)."""
    mask = 0
    while (start >> mask) != ((end - 1) >> mask):
        mask += 1
    return _block(start, mask)


def _inside(span: tuple[int, int], union: list[tuple[int, int]]) -> bool:
    reach = span[0]
    for lo, hi in sorted(union):
        if lo <= reach < hi:
            reach = hi
    return reach >= span[1]


@settings(max_examples=300)
@given(st.lists(st.tuples(_span, st.booleans()), min_size=1, max_size=40))
def test_coalesce_covers_every_span_and_flushes_nothing_more(
    spans: list[tuple[tuple[int, int], bool]],
) -> None:
    start = np.array([s for (s, _), _ in spans], dtype=np.int64)
    end = np.array([e for (_, e), _ in spans], dtype=np.int64)
    leaf = np.array([flag for _, flag in spans], dtype=np.bool_)
    out_start, out_end, out_leaf = coalesce(start, end, leaf)
    out = list(zip(out_start.tolist(), out_end.tolist(), out_leaf.tolist(), strict=True))
    assert len(out) <= len(spans)
    for (lo, hi), flag in spans:  # covered by outputs that may cover it (LEAF covers LEAF)
        assert _inside((lo, hi), [(a, b) for a, b, f in out if flag or not f]), (lo, hi, flag)
    full = [(a, b) for (a, b), flag in spans if not flag]
    for a, b, flag in out:  # and each output flushes only pages its own class asked for
        mine = [(lo, hi) for (lo, hi), f in spans if f == flag] + full
        assert _inside(_host_pages(a, b), mine), (a, b, flag)
    entries = pack(out_start, out_end, out_leaf)
    assert len(entries) == 24 * len(out)


def test_coalesce_merges_touching_blocks_only_when_shorter() -> None:
    def run(*spans: tuple[int, int]) -> list[tuple[int, int]]:
        s = np.array([a for a, _ in spans], dtype=np.int64)
        e = np.array([b for _, b in spans], dtype=np.int64)
        out = coalesce(s, e, np.ones(len(spans), dtype=np.bool_))
        return sorted(zip(out[0].tolist(), out[1].tolist(), strict=True))

    assert run((0x100, 0x110), (0x110, 0x120)) == [(0x100, 0x120)]  # buddies: one block
    assert run((0xF0, 0x100), (0x100, 0x110)) == [(0xF0, 0x100), (0x100, 0x110)]  # no gain
    assert run((0x40, 0x48), (0x48, 0x50), (0x50, 0x60)) == [(0x40, 0x60)]
    assert run((0x100, 0x101), (0x100, 0x101), (0x100, 0x102)) == [(0x100, 0x102)]
    assert aligned_blocks(0xF0, 0x110) == [(0xF0, 0x100), (0x100, 0x110)]
    assert aligned_blocks(0, FULL_PAGES) == [(0, FULL_PAGES)]
    whole = coalesce(
        np.array([5, 0], dtype=np.int64),
        np.array([6, FULL_PAGES], dtype=np.int64),
        np.array([False, False]),
    )
    assert pack(*whole) == struct.pack("<QQII", 0, (1 << 64) - 1, 0, 0)


# -- sessions: grouped answers equal one-by-one answers -------------------------------------
@pytest.fixture(params=["numpy", "frontend", "default"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Group commit screening and planning every run with numpy, or every one from a scratch
    frontend's events, or as the number of descriptors decides (bulk.SMALL: a large group's
    short runs are planned from events)."""
    if request.param != "default":
        small = 0 if request.param == "numpy" else 1 << 30
        monkeypatch.setattr("viommud.models.vtd.screen_doorbells", partial(screen, small=small))
        monkeypatch.setattr("viommud.models.vtd.plain_work", partial(plain_work, small=small))
    return str(request.param)


@dataclass
class Stream:
    """Linux-shaped VT-d doorbells (and the occasional context entry) over a few domains."""

    vm: Vm
    seed: int
    domains: dict[int, list[int]]  # DID -> ATS source IDs bound nested in it
    pasid_form: bool = False
    items: list[bytes | ContextEntry | PasidEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def wait(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.9:
            return self.vm.wait()
        return self.vm.d(T.INV_WAIT, if_=1, fn=rng.randint(0, 1))  # no status write

    def iotlb(self, did: int, page: int, am: int, ih: int = 1) -> bytes:
        d = self.vm.d
        if self.pasid_form and self.rng.random() < 0.8:
            return d(T.P_IOTLB_INV, g=3, did=did, pasid=0, addr=page, am=am, ih=ih)
        return d(T.IOTLB_INV, g=3, did=did, addr=page, am=am, ih=ih)

    def devtlb(self, sid: int, page: int, am: int, *, any_pasid: bool = True) -> bytes:
        addr = page | ((1 << am - 1) - 1 if am else 0)  # PCIe ATS size encoding
        if self.pasid_form and self.rng.random() < 0.5:
            g = self.rng.randint(0, 1)
            pasid = self.rng.choice((0, 0, 5)) if any_pasid else 0
            return self.vm.d(T.P_DEV_TLB_INV, sid=sid, g=g, pasid=pasid, addr=addr, s=int(am > 0))
        return self.vm.d(T.DEV_TLB_INV, sid=sid, addr=addr, s=int(am > 0))

    def build(self, count: int, *, moves: bool) -> list[bytes | ContextEntry | PasidEntry]:
        """``count`` guest submissions of a correct driver: every device-TLB invalidation
        follows IOTLB-class ones of its range, the latest of them covering it (the guest
        model of docs/oracle.md)."""
        rng, d = self.rng, self.vm.d
        for n in range(count):
            did = rng.choice(sorted(self.domains))
            am = rng.choice((0, 0, 1, 2, 4, 9))
            page = rng.randrange(0x40000, 0x50000) & ~((1 << am) - 1)
            ats = self.domains[did]
            shape = rng.random()
            if shape < 0.4:  # a strict unmap, Linux 6.12: one batch
                descs = [self.iotlb(did, page, am), *(self.devtlb(s, page, am) for s in ats)]
            elif shape < 0.5:  # several unmaps in one batch (qi_batch)
                page &= ~0x3F
                descs = [self.iotlb(did, page + 16 * i, 2, ih=i % 2) for i in range(3)]
                descs += [self.devtlb(s, page + 16 * i, 2) for s in ats for i in range(3)]
            elif shape < 0.62 and ats:  # Linux 6.1: [IOTLB, wait], then [device TLB, wait]
                self.items.append(b"".join((self.iotlb(did, page, am), self.wait())))
                descs = [self.devtlb(s, page, am) for s in ats]
            elif shape < 0.7 and ats:  # two buddies, one device TLB: no one entry covers it
                page &= ~((2 << am) - 1)
                descs = [self.iotlb(did, page, am), self.iotlb(did, page + (1 << am), am)]
                descs += [self.devtlb(s, page, am + 1, any_pasid=False) for s in ats]
            elif shape < 0.71 and n > count // 2:  # domain-selective and global: from then
                descs = [d(T.IOTLB_INV, g=rng.choice((1, 2)), did=did)]  # on, all is covered
            elif shape < 0.76:  # device TLBs of devices with nothing to flush or unknown
                descs = [self.devtlb(rng.choice((N, 0x77, 0x3000)), page, am)]
            elif shape < 0.81:  # guest errors among good work
                bad = rng.choice(
                    (d(T.IOTLB_INV, g=0, did=did), d(T.IOTLB_INV, g=3, did=did, am=19))
                )
                descs = [self.iotlb(did, page, am), bad]
            elif shape < 0.86:  # doorbells the screen leaves to the frontend
                descs = [rng.choice((d(T.IEC_INV), d(T.CC_INV, g=1), d(T.CC_INV, g=3, sid=A)))]
            elif shape < 0.88 and moves:  # a device moves to another table (and back)
                table = rng.choice((0x1000000, 0x5000000))
                if self.vm.dw == 256:
                    self.items.append(PasidEntry(5, "v", B, 0, first_stage(1, table)))
                else:
                    self.items.append(ContextEntry(4, "v", B, legacy(1, table)))
                descs = [d(T.CC_INV, g=3, sid=B)]
            else:
                descs = [self.iotlb(did, page, am)]
            if rng.random() < 0.97:
                descs.append(self.wait())
            self.items.append(b"".join(descs))
        return self.items


def _nested_vm(verify: bool = True, backend: EmulatedIommufd | None = None) -> Vm:
    """A, B on one HWPT of domain 1; N (no ATS) on another of domain 1; R on dmar1: each a
    first-stage RID_PASID entry in scalable mode (a 256-bit queue, which also takes the
    128-bit-era type 2 and 3 descriptors)."""
    vm = Vm(dw=256, verify=verify, backend=backend or EmulatedIommufd(HOST))
    vm.attach(A, B, N, R)
    for sid, did, table in ((A, 1, 0x1000000), (B, 1, 0x1000000), (N, 1, 0x2000000)):
        vm.bind_first_stage(sid, did, table)
    vm.bind_first_stage(R, 2, 0x3000000)
    return vm


def _legacy_vm(verify: bool = False) -> Vm:
    """The same devices and domains through legacy context entries in a 128-bit queue: the
    second-level tables are never nested, so A, B, N and R are blocked and nothing is
    forwarded (docs/vtd.md, "Legacy mode"). The oracle still models legacy entries as
    nested, so it is off here."""
    vm = Vm(dw=128, verify=verify)
    vm.attach(A, B, N, R)
    for sid, did, table in ((A, 1, 0x1000000), (B, 1, 0x1000000), (N, 1, 0x2000000)):
        vm.bind_legacy(sid, did, table)
    vm.bind_legacy(R, 2, 0x3000000)
    return vm


def _scalable_vm(verify: bool = True) -> Vm:
    """A, B share domain 7's first stage; R has domain 9 on dmar1; N is pass-through."""
    vm = Vm(dw=256, verify=verify)
    vm.attach(A, B, N, R)
    for sid, did, table in ((A, 7, 0x40000000), (B, 7, 0x40000000), (R, 9, 0x41000000)):
        vm.context(sid, scalable())
        vm.pasid(sid, first_stage(did, table))
    vm.context(N, scalable())
    vm.pasid(N, first_stage(7, 0, pgtt=4))
    vm.run(vm.d(T.CC_INV, g=1), vm.wait())
    return vm


def _replay(vm: Vm, items: list[bytes | ContextEntry | PasidEntry], group: int) -> list[Any]:
    """Each record at its place; the doorbells between two records in groups of ``group``
    (as the server groups the frames waiting together)."""
    session = vm.session
    answers: list[Any] = []
    run: list[bytes] = []

    def flush() -> None:
        for at in range(0, len(run), group):
            if group == 1:
                answers.append(as_json(session.doorbell("v", run[at])))
            else:
                answers.extend(as_json_list(session.doorbells("v", run[at : at + group])))
        run.clear()

    for item in items:
        if isinstance(item, (ContextEntry, PasidEntry)):
            flush()
            assert as_json(session.handle(item)) == {"ok": True}
        else:
            run.append(item)
    flush()
    return answers


def _state(vm: Vm) -> dict[str, Any]:
    """What the two ways must agree on: the report's guest-visible totals, the dispatcher's
    counters, and what each HWPT's flush history covers (for later elisions)."""
    report = vm.report()
    viommu = vm.viommu
    stats = vm.session.stats
    histories = {}
    for slot in viommu.topology.slots.values():
        for (did, s1), hwpt in slot.hwpts.items():
            history = hwpt.flushes
            users = sorted(hwpt.users)
            joined = [viommu.topology.vdevices[u].joined for u in users]
            histories[(did, s1.pgtbl_addr)] = (
                [(lo, hi) for _, lo, hi in history.recent],
                [history.full > j for j in joined],
                [[c > j for c, _, _ in history.recent] for j in joined],
            )
    return {
        **{key: report[key] for key in ("commands", "errors", "barriers", "baseline")},
        "forwarded": stats.forwarded,
        "dropped": stats.dropped,
        "elided": viommu.dispatcher.elided,
        "histories": histories,
    }


def _dicts(answers: list[DoorbellReply | Exception]) -> list[dict[str, Any]]:
    out = [as_json(a) for a in answers if isinstance(a, DoorbellReply)]
    assert len(out) == len(answers)
    return out


def _calls(vm: Vm) -> int:
    return int(vm.report()["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0))


@pytest.mark.parametrize("group", [2, 7, 64])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mode", ["legacy", "type2", "scalable"])
@pytest.mark.usefixtures("path")
def test_grouped_session_answers_counts_and_elides_like_one_by_one(
    mode: str, seed: int, group: int
) -> None:
    # legacy: 128-bit queue, every device blocked; type2: first-stage tables invalidated
    # with type 2/3 descriptors, devices moving; scalable: P_IOTLB / P_DEVTLB forms.
    make = {"legacy": _legacy_vm, "type2": _nested_vm, "scalable": _scalable_vm}[mode]
    domains = {1: [A, B], 2: [R], 3: []} if mode != "scalable" else {7: [A, B], 9: [R], 4: []}
    alone, grouped = make(), make()
    before = _calls(alone)
    items = Stream(alone, seed, domains, pasid_form=mode == "scalable").build(
        400, moves=mode != "scalable"
    )
    assert _calls(grouped) == before
    answers = _replay(alone, items, 1)
    assert _replay(grouped, items, group) == answers
    assert _state(grouped) == _state(alone)
    if mode == "legacy":
        assert _calls(alone) == _calls(grouped) == 0  # nothing nested, nothing forwarded
        return
    assert alone.report()["verify"]["missed"] == 0
    assert grouped.report()["verify"]["missed"] == 0
    assert _calls(grouped) - before < _calls(alone) - before
    assert alone.viommu.dispatcher.elided > 0


@pytest.mark.usefixtures("path")
def test_history_beyond_its_last_64_flushes_is_forgotten_alike() -> None:
    """Device-TLB invalidations of ranges flushed 1 to 100 doorbells ago: the per-doorbell
    path elides those still among the HWPT's last 64 flushes; grouped, the same ones."""
    alone, grouped = _nested_vm(), _nested_vm()
    d = alone.d
    items: list[bytes | ContextEntry | PasidEntry] = [
        b"".join((d(T.IOTLB_INV, g=3, did=1, addr=0x40000 + i), alone.wait())) for i in range(100)
    ]
    items += [
        b"".join((d(T.DEV_TLB_INV, sid=A, addr=0x40000 + i), alone.wait()))
        for i in (99, 60, 36, 35, 10, 0)
    ]
    answers = _replay(alone, items, 1)
    assert _replay(grouped, items, 128) == answers
    assert _state(grouped) == _state(alone)
    # Pages 36 to 99 are the last 64 flushes: 99, 60 and 36 are elided; 35, 10 and 0 are
    # sent (and each evicts the oldest flush).
    assert alone.viommu.dispatcher.elided == 3


def test_grouped_shared_domain_is_one_call_per_hwpt_with_every_status_write() -> None:
    vm = _scalable_vm()
    vm.session.drain_calls()
    doorbells = [
        b"".join(
            (
                vm.d(T.P_IOTLB_INV, g=3, did=7, pasid=0, addr=0x40000 + 8 * i, am=3, ih=1),
                vm.d(T.DEV_TLB_INV, sid=A, addr=0x40000 + 8 * i + 3, s=1),
                vm.d(T.DEV_TLB_INV, sid=B, addr=0x40000 + 8 * i + 3, s=1),
                vm.wait(),
            )
        )
        for i in range(64)
    ]
    answers = _dicts(vm.session.doorbells("v", doorbells))
    assert [a["errors"] for a in answers] == [[]] * 64
    assert [a["syncs"] for a in answers] == [1] * 64
    assert [len(a["status_writes"]) for a in answers] == [1] * 64
    assert answers[0]["status_writes"][0]["index"] == 3
    calls = [c for c in vm.session.drain_calls() if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"]
    # One HWPT for A and B; 64 touching 8-page blocks = 512 aligned pages = one entry.
    assert [(c["object"]["id"], len(c["entries"])) for c in calls] == [(vm.hwpt_of(A), 1)]
    assert vm.viommu.dispatcher.elided == 128
    report = vm.report()
    assert report["baseline"]["invalidate_calls"] == 2 * 64  # A and B, per P_IOTLB
    assert report["verify"]["missed"] == 0


@pytest.mark.usefixtures("path")
def test_device_tlb_no_single_flush_covers_is_sent_in_the_group_call() -> None:
    """[IOTLB page p, IOTLB page p+1, device TLB of both] on R (alone on domain 2): no one
    entry covers the device TLB, so it is sent, in the group's one call; a later group of
    device TLBs alone is elided on the flushes the first group recorded."""
    alone, grouped = _nested_vm(), _nested_vm()
    d = alone.d
    pages = [0x40000 + 16 * i for i in range(4)]
    first: list[bytes | ContextEntry | PasidEntry] = [
        b"".join(
            (
                d(T.IOTLB_INV, g=3, did=2, addr=p, ih=1),
                d(T.IOTLB_INV, g=3, did=2, addr=p + 1, ih=1),
                d(T.DEV_TLB_INV, sid=R, addr=p, s=1),
                alone.wait(),
            )
        )
        for p in pages
    ]
    again: list[bytes | ContextEntry | PasidEntry] = [
        b"".join((d(T.DEV_TLB_INV, sid=R, addr=p, s=1), alone.wait())) for p in pages
    ]
    grouped.session.drain_calls()
    answers = _replay(alone, first, 1)
    assert _replay(grouped, first, 64) == answers
    calls = [c for c in grouped.session.drain_calls() if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"]
    assert [c["entries"] for c in calls] == [[entry(p << 12, 2, leaf=True) for p in pages]]
    assert grouped.viommu.dispatcher.elided == alone.viommu.dispatcher.elided == 0
    assert _state(grouped) == _state(alone)
    assert _replay(grouped, again, 64) == _replay(alone, again, 1)
    assert grouped.viommu.dispatcher.elided == alone.viommu.dispatcher.elided == 4
    assert _state(grouped) == _state(alone)
    assert grouped.report()["verify"]["missed"] == 0


@pytest.mark.usefixtures("path")
def test_refused_and_empty_doorbells_in_a_group_keep_their_place() -> None:
    vm = _nested_vm()
    good = b"".join((vm.d(T.IOTLB_INV, g=3, did=1, addr=0x40000), vm.wait()))
    answers = as_json_list(vm.session.doorbells("v", [good, b"\x01" * 7, good, b"", good]))
    assert answers[0] == answers[2] == answers[4]
    assert isinstance(answers[0], dict)
    assert answers[0]["consumed"] == 2
    assert isinstance(answers[1], Exception)
    assert answers[3] == {"consumed": 0, "errors": [], "syncs": 0, "status_writes": []}
    assert vm.report()["commands"]["by_kind"]["vtd:iotlb_inv"] == 3


@pytest.mark.usefixtures("path")
def test_group_logs_one_line_and_the_descriptors_of_the_per_doorbell_path() -> None:
    lines: dict[bool, list[MutableMapping[str, Any]]] = {}
    for group in (False, True):
        with capture_logs() as events:
            session = Session(EmulatedIommufd(HOST), log=structlog.get_logger().bind(client=3))
            as_json(session.handle(ViommuCreate(2, "v", "vtd", ("dmar0",), {"dw": 256})))
            as_json(session.handle(DeviceAttach(3, "v", A, "0000:01:00.0")))
            as_json(session.handle(ContextEntry(4, "v", A, scalable())))
            as_json(session.handle(PasidEntry(5, "v", A, 0, first_stage(1, 0x1000000))))
            as_json(session.doorbell("v", build_descriptor(T.CC_INV, width=32, g=3, sid=A)))
            run = [
                build_descriptor(T.IOTLB_INV, width=32, g=3, did=1, addr=0x40000 + i)
                + build_descriptor(T.INV_WAIT, width=32, sw=1, status_data=2, status_addr=i)
                for i in range(3)
            ]
            if group:
                as_json_list(session.doorbells("v", run))
            else:
                for data in run:
                    as_json(session.doorbell("v", data))
            session.close()
        lines[group] = events
    decoded = [[e for e in lines[g] if e["event"] == "descriptor_decoded"] for g in (False, True)]
    assert decoded[0] == decoded[1]
    assert len(decoded[1]) == 1 + 6
    [line] = [e for e in lines[True] if e["event"] == "group_forwarded"]
    assert line.pop("duration_ms") >= 0
    assert line == {
        "event": "group_forwarded",
        "log_level": "info",
        "client": 3,
        "viommu": "v",
        "doorbells": 3,
        "commands": 6,
        "syncs": 3,
        "backend_calls": 1,
    }


# -- host failures ----------------------------------------------------------------------------
class FailingBackend(EmulatedIommufd):
    """Fails chosen IOMMU_HWPT_INVALIDATE calls (counted from 1) with EIO, nothing done."""

    def __init__(self, *fail: int) -> None:
        super().__init__(HOST)
        self.fail = set(fail)
        self.count = 0

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        if request == uapi.IOMMU_HWPT_INVALIDATE:
            self.count += 1
            if self.count in self.fail:
                arg[24:28] = bytes(4)  # entry_num: nothing handled
                return errno.EIO
        return super().ioctl(fd, request, arg)


def _unmaps(vm: Vm, count: int) -> list[bytes]:
    return [
        b"".join(
            (
                vm.d(T.IOTLB_INV, g=3, did=1, addr=0x40000 + 4 * i, am=2, ih=1),
                vm.d(T.DEV_TLB_INV, sid=A, addr=0x40000 + 4 * i + 1, s=1),
                vm.wait(),
            )
        )
        for i in range(count)
    ]


@pytest.mark.usefixtures("path")
def test_failed_group_call_is_the_iqe_per_doorbell_dispatch_reports() -> None:
    """The run's first call fails (EIO, nothing handled), as the first call of the
    per-doorbell path does: the same IQE at doorbell 0's first descriptor, every wait
    reported complete only once what it waits for was sent again, nothing missed."""
    alone_backend = FailingBackend()
    alone = _nested_vm(backend=alone_backend)
    alone_backend.fail = {alone_backend.count + 1}
    answers = [alone.session.doorbell("v", d) for d in _unmaps(alone, 10)]
    backend = FailingBackend()
    vm = _nested_vm(backend=backend)
    backend.fail = {backend.count + 1}  # the group's call
    assert vm.session.doorbells("v", _unmaps(vm, 10)) == answers
    [error] = answers[0].errors
    assert (error.index, error.code) == (0, "IQE")
    assert vm.report()["errors"] == alone.report()["errors"] == {"total": 1, "by_code": {"IQE": 1}}
    assert vm.report()["backend"]["errnos"] == {"EIO": 1}
    assert vm.report()["verify"]["missed"] == 0
    assert alone.report()["verify"]["missed"] == 0
