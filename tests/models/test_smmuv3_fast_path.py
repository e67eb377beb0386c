"""The per-doorbell fast path of the SMMUv3 model (plain doorbells: valid TLB invalidations
and CMD_SYNCs, no events) against the reference path (frontend events → ``SmmuDispatcher
.run``): on random doorbells, small and large (up to a few hundred commands: pages,
duplicates, ranges that merge, floods, VM-wide TLBIs, SYNCs anywhere, the odd refused
command), with one or two physical SMMUs, devices in bypass, every coalescing policy and
injected host failures, both sessions give the same replies, host calls (entries, barrier,
errno), report, frontend counters and dispatch statistics."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.smmuv3 import Opcode, build_command
from tests.group_commit.test_smmuv3 import _doorbell, _field_values, _va
from tests.oracle.workload import SYNC, Rig, build, host
from viommud.backend.emulator import testing
from viommud.dispatcher.smmuv3 import DispatchPolicy
from viommud.dispatcher.smmuv3_coalesce import (
    Entry,
    coalesce,
    coalesce_tlb_only,
    tlb_only_unchanged,
)
from viommud.frontends.smmuv3.frontend import SmmuFeatures, SmmuV3Frontend
from viommud.group_commit import smmuv3_screen
from viommud.group_commit.smmuv3_screen import plain_syncs, screen
from viommud.models.smmuv3 import SmmuV3Viommu
from viommud.replies import DoorbellReply
from viommud.shell.replies import doorbell_json

LAYOUTS = {
    "one": (1, {"v": ["smmu0"]}, frozenset[str]()),
    "two": (2, {"v": ["smmu0", "smmu1"]}, frozenset[str]()),
    "bypass": (1, {"v": ["smmu0"]}, frozenset({"smmu0"})),  # no stage-1 vSTE: no target
    "half-bypass": (2, {"v": ["smmu0", "smmu1"]}, frozenset({"smmu1"})),
}


def _rig(
    layout: str, fast: bool, ril: bool, policy: DispatchPolicy | None = None
) -> tuple[Rig, SmmuV3Viommu]:
    n, viommus, bypass = LAYOUTS[layout]
    rig = build(host(n, 2, False), viommus, ats=False, bypass=bypass)
    model = rig.session.viommus["v"]
    assert isinstance(model, SmmuV3Viommu)
    model.fast = fast
    if policy is not None:
        model.dispatcher.policy = policy
    model.frontend.features = dataclasses.replace(model.frontend.features, ril=ril)
    rig.session.drain_calls()
    return rig, model


def _answers(
    layout: str,
    fast: bool,
    ril: bool,
    doorbells: list[bytes],
    *,
    fail: bytes | None,
    times: int,
    policy: DispatchPolicy | None = None,
) -> dict[str, Any]:
    rig, model = _rig(layout, fast, ril, policy)
    if fail is not None:
        iommu = "smmu1" if layout in ("two", "half-bypass") and fail[1] & 1 else "smmu0"
        testing.inject_invalidate_error(rig.backend, iommu, fail, times=times)
    replies: list[Any] = []
    for data in doorbells:
        try:
            reply = rig.session.doorbell("v", data)
        except Exception as exc:  # the refusal must be the same too
            replies.append(repr(exc))
            continue
        assert isinstance(reply, DoorbellReply)
        replies.append(doorbell_json(reply))
    frontend = model.frontend
    return {
        "replies": replies,
        "calls": rig.session.drain_calls(),
        "report": rig.session.report(),
        "frontend": (list(frontend.opcode_counts), dict(frontend.error_counts), frontend.barriers),
        "last": dataclasses.astuple(frontend.last),
        "stats": dataclasses.asdict(model.dispatcher.stats),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_doorbell, min_size=1, max_size=8),
    st.sampled_from(sorted(LAYOUTS)),
    st.booleans(),
    st.one_of(st.none(), st.tuples(st.integers(0, 7), st.integers(0, 5), st.integers(1, 3))),
)
def test_fast_path_is_the_reference_path(
    doorbells: list[bytes], layout: str, ril: bool, fail: tuple[int, int, int] | None
) -> None:
    target = None
    times = 1
    if fail is not None:  # one of the doorbells' own commands, refused once or more
        k, c, times = fail
        data = doorbells[k % len(doorbells)]
        if len(data) >= 16 and not len(data) % 16:
            at = 16 * (c % (len(data) // 16))
            target = data[at : at + 16]
    reference = _answers(layout, False, ril, doorbells, fail=target, times=times)
    fast = _answers(layout, True, ril, doorbells, fail=target, times=times)
    assert fast == reference


# -- large doorbells ------------------------------------------------------------------------
_page = st.tuples(st.integers(1, 2), st.integers(0, 95)).map(  # few pages: duplicates
    lambda t: build_command(Opcode.TLBI_NH_VA, asid=t[0], leaf=1, addr=t[1] << 12)
)
_big_command = st.one_of(
    _page,
    _page,
    _page,
    st.tuples(st.integers(1, 2), st.integers(0, 7), st.integers(0, 3), st.integers(0, 40)).map(
        lambda t: build_command(
            Opcode.TLBI_NH_VA, asid=t[0], num=t[1], scale=t[2], ttl=t[2] % 4, tg=1, addr=t[3] << 12
        )
    ),
    st.integers(0, 95).map(lambda p: build_command(Opcode.TLBI_NH_VAA, leaf=1, addr=p << 12)),
    st.integers(1, 2).map(lambda a: build_command(Opcode.TLBI_NH_ASID, asid=a)),
    st.just(build_command(Opcode.TLBI_NH_ALL)),
    st.just(build_command(Opcode.TLBI_NSNH_ALL)),
    st.integers(0, 3).map(lambda cs: build_command(Opcode.CMD_SYNC, cs=cs)),  # CS=3 refused
    st.just(SYNC),
)


@st.composite
def _big_doorbell(draw: st.DrawFn) -> bytes:
    """Many TLB commands: most of the time an unmap's distinct consecutive pages (sometimes
    with a few other commands among them), else a mix; a SYNC at the end or not, SYNCs
    before the first TLBI sometimes, and now and then one bit set anywhere (reserved, a
    range field or a valid field)."""
    if draw(st.integers(0, 3)):
        asid = draw(st.integers(1, 2))
        base = draw(st.integers(0, 1 << 20))
        count = draw(st.integers(4, 300))
        commands = [
            build_command(Opcode.TLBI_NH_VA, asid=asid, leaf=1, addr=(base + i) << 12)
            for i in range(count)
        ]
        if not draw(st.integers(0, 2)):
            mixed = draw(st.lists(st.tuples(st.integers(0, 1 << 16), _big_command), max_size=4))
            for at, command in mixed:
                commands.insert(at % (len(commands) + 1), command)
    else:
        commands = draw(st.lists(_big_command, min_size=4, max_size=120))
    if draw(st.booleans()):
        commands.append(SYNC)
    if not draw(st.integers(0, 5)):
        commands[:0] = [SYNC] * draw(st.integers(1, 2))
    data = bytearray(b"".join(commands))
    if not draw(st.integers(0, 5)):
        row, bit = draw(st.tuples(st.integers(0, 1 << 16), st.integers(0, 127)))
        at = (row % (len(data) // 16)) * 16 + bit // 8
        data[at] |= 1 << (bit % 8)
    return bytes(data)


_POLICIES = {
    "default": None,
    "flood-64": DispatchPolicy(flood_pages=64),
    "flood-4": DispatchPolicy(flood_pages=4),
    "no-coalesce": DispatchPolicy(coalesce=False),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(_big_doorbell(), _big_doorbell(), _doorbell), min_size=1, max_size=4),
    st.sampled_from(sorted(LAYOUTS)),
    st.booleans(),
    st.sampled_from(sorted(_POLICIES)),
    st.one_of(
        st.none(),
        st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(1, 3), st.booleans()),
    ),
)
def test_large_doorbells_fast_path_is_the_reference_path(
    doorbells: list[bytes],
    layout: str,
    ril: bool,
    policy: str,
    fail: tuple[int, int, int, bool] | None,
) -> None:
    """Large plain doorbells (the wide screen, the array sent without entries, or
    coalesced) answer and call exactly as the event path, failures included."""
    target = None
    times = 1
    if fail is not None:  # one of the doorbells' own commands, refused once or more
        k, c, times, last = fail
        data = doorbells[k % len(doorbells)]
        if len(data) >= 16 and not len(data) % 16:
            rows = len(data) // 16
            at = 16 * (rows - 1 if last else c % rows)
            target = data[at : at + 16]
    chosen = _POLICIES[policy]
    reference = _answers(layout, False, ril, doorbells, fail=target, times=times, policy=chosen)
    fast = _answers(layout, True, ril, doorbells, fail=target, times=times, policy=chosen)
    assert fast == reference


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_big_doorbell(), st.booleans())
def test_wide_screen_agrees_with_the_loop_and_the_frontend(data: bytes, ril: bool) -> None:
    syncs = plain_syncs(data, ril)
    assert syncs == plain_syncs(data, ril, smmuv3_screen._ONE_BY_ONE)
    assert syncs == smmuv3_screen._plain_syncs_wide(data, ril)
    if syncs >= 0:
        frontend = SmmuV3Frontend(SmmuFeatures(ril=ril))
        frontend.receive_data(data)
        assert syncs == frontend.last.syncs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_big_doorbell(), st.sampled_from([4, 64, 512]))
def test_unchanged_means_coalescing_changes_nothing(data: bytes, flood: int) -> None:
    """``tlb_only_unchanged`` says True only where ``coalesce_tlb_only`` keeps the entries."""
    if plain_syncs(data, True) < 0:
        return
    entries = [
        Entry(data[at : at + 16], at // 16)
        for at in range(0, len(data), 16)
        if data[at] != Opcode.CMD_SYNC
    ]
    array = b"".join(e.raw for e in entries)
    if array and tlb_only_unchanged(array, flood):
        got = coalesce_tlb_only(entries, flood_pages=flood)
        assert [(e.raw, e.origin) for e in got] == [(e.raw, e.origin) for e in entries]


def test_plain_doorbells_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain doorbell never reaches the frontend's decoder; any other one does."""
    rig, _ = _rig("one", True, True)
    decoded: list[bytes] = []
    receive = SmmuV3Frontend.receive_data

    def spy(self: SmmuV3Frontend, data: bytes) -> None:
        decoded.append(data)
        receive(self, data)

    monkeypatch.setattr(SmmuV3Frontend, "receive_data", spy)
    plain = build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x1000) + SYNC
    other = build_command(Opcode.CFGI_CD, sid=8, ssid=0, leaf=1) + SYNC
    assert rig.session.doorbell("v", plain) == DoorbellReply(2, 1)
    assert rig.session.doorbell("v", other) == DoorbellReply(2, 1)
    assert decoded == [other]
    calls = rig.session.drain_calls()
    assert calls[0]["ioctl"] == "IOMMU_HWPT_INVALIDATE"
    assert calls[0]["entries"] == [plain[:16].hex()]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_doorbell, st.booleans())
def test_plain_syncs_agrees_with_the_screen_and_the_frontend(data: bytes, ril: bool) -> None:
    features = SmmuFeatures(ril=ril)
    screened = screen([data], features, small=1 << 30)
    syncs = plain_syncs(data, ril)
    assert (syncs >= 0) == screened.plain[0]
    if syncs >= 0:
        frontend = SmmuV3Frontend(features)
        frontend.receive_data(data)
        assert syncs == frontend.last.syncs == screened.syncs[0]


# ranges of one ASID close together, so that they overlap, touch and flood
_small_range = st.tuples(
    st.integers(1, 2), st.integers(0, 7), st.integers(0, 3), st.integers(0, 40)
).map(
    lambda t: build_command(
        Opcode.TLBI_NH_VA, asid=t[0], num=t[1], scale=t[2], ttl=t[2] % 4, tg=1, addr=t[3]
    )  # addr is the ADDR[63:12] field: page t[3]
)
_tlb_command = st.one_of(
    _field_values.map(lambda f: _va(*f)),
    st.tuples(st.integers(0, 31), st.integers(0, 31), st.integers(0, 3), st.integers(0, 64)).map(
        lambda t: build_command(
            Opcode.TLBI_NH_VAA, num=t[0], scale=t[1] % 8, ttl=t[2], tg=1, addr=t[3] << 12
        )
    ),
    st.integers(1, 2).map(lambda a: build_command(Opcode.TLBI_NH_ASID, asid=a)),
    st.just(build_command(Opcode.TLBI_NH_ALL)),
    st.just(build_command(Opcode.TLBI_NSNH_ALL)),
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(_tlb_command, _small_range), min_size=0, max_size=40),
    st.sampled_from([4, 64, 512]),
)
def test_coalesce_tlb_only_is_coalesce(commands: list[bytes], flood: int) -> None:
    """The TLB-only coalescer skips rules only where they would change nothing."""
    entries = [Entry(raw, k) for k, raw in enumerate(commands)]
    expected = [(e.raw, e.origin) for e in coalesce(entries, flood_pages=flood)]
    got = [(e.raw, e.origin) for e in coalesce_tlb_only(entries, flood_pages=flood)]
    assert got == expected


# ranges of every granule, level hint, leaf bit, ASID and VMID field, close together, so that
# groups form, overlap, touch, stay apart, encode no shorter, and flood
_any_range = st.tuples(
    st.sampled_from([Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA]),
    st.integers(1, 3),  # ASID
    st.integers(0, 1),  # VMID field (the kernel rewrites it; the key keeps it)
    st.integers(0, 31),  # NUM
    st.integers(0, 5),  # SCALE
    st.integers(0, 3),  # TTL
    st.integers(1, 3),  # TG
    st.integers(0, 1),  # leaf
    st.integers(0, 96),  # first page
).map(
    lambda t: build_command(
        t[0],
        **({"asid": t[1]} if t[0] == Opcode.TLBI_NH_VA else {}),
        vmid=t[2],
        num=t[3],
        scale=t[4],
        ttl=t[5],
        tg=t[6],
        leaf=t[7],
        addr=t[8] << (t[6] * 2 - 2),  # granule t[8] (the field is ADDR[63:12])
    )
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(_any_range, _any_range, _small_range, _tlb_command), max_size=40),
    st.sampled_from([4, 64, 512, 4096]),
)
def test_range_merge_of_the_tlb_only_coalescer_is_coalesce(
    commands: list[bytes], flood: int
) -> None:
    """``coalesce_tlb_only``'s one-pass range merge gives what ``merge_ranges`` gives."""
    entries = [Entry(raw, k) for k, raw in enumerate(commands)]
    expected = [(e.raw, e.origin) for e in coalesce(entries, flood_pages=flood)]
    got = [(e.raw, e.origin) for e in coalesce_tlb_only(entries, flood_pages=flood)]
    assert got == expected


def _pages_range(first: int, pages: int, asid: int = 1) -> bytes:
    """TLBI_NH_VA of ``pages`` (< 32) 4 KiB pages from ``first``, SCALE 0."""
    return build_command(Opcode.TLBI_NH_VA, asid=asid, num=pages - 1, tg=1, addr=first)


@pytest.mark.parametrize(
    ("ranges", "flood", "promoted"),
    [
        ([(0, 3), (3, 2)], 4, True),  # touching: 5 pages merged, one over
        ([(0, 3), (3, 1)], 4, False),  # 4 merged: at the threshold, not over
        ([(0, 3), (1, 3)], 4, False),  # overlapping: 6 before merging, 4 after
        ([(0, 3), (1, 4)], 4, True),  # 7 before, 5 after
        ([(0, 3), (10, 2)], 4, True),  # apart: nothing merges, 5 pages
        ([(0, 2), (10, 2)], 4, False),
        ([(0, 31), (31, 31), (62, 3)], 64, True),  # 65 merged
        ([(0, 31), (31, 31), (62, 2)], 64, False),
    ],
)
def test_flood_after_a_range_merge_is_counted_on_the_merged_spans(
    ranges: list[tuple[int, int]], flood: int, promoted: bool
) -> None:
    entries = [Entry(_pages_range(first, n), k) for k, (first, n) in enumerate(ranges)]
    expected = [(e.raw, e.origin) for e in coalesce(entries, flood_pages=flood)]
    got = [(e.raw, e.origin) for e in coalesce_tlb_only(entries, flood_pages=flood)]
    assert got == expected
    assert (got[0][0][0] == Opcode.TLBI_NH_ALL) == promoted
