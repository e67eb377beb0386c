"""Group commit (docs/coalescing.md): the bulk screen agrees with the frontend, the
vectorised coalescer keeps every invalidation, and a session that runs doorbells in groups
answers exactly as one that runs them one by one, with nothing missed and fewer calls."""

from __future__ import annotations

import random
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import workloads
from protocols.smmuv3 import TLBI_OPS, Opcode, build_command
from tests.oracle.workload import SYNC, build, host
from tests.replies import as_json, as_json_list
from viommud.backend.emulator import testing
from viommud.events import Barrier, GuestError, Invalidation
from viommud.frontends.smmuv3.frontend import SmmuFeatures, SmmuV3Frontend
from viommud.group_commit.smmuv3_coalesce import coalesce_tlb
from viommud.group_commit.smmuv3_screen import screen

_QQ = struct.Struct("<QQ")
_PLAIN_OPS = TLBI_OPS | {int(Opcode.CMD_SYNC)}


# -- the screen agrees with the frontend ----------------------------------------------------
def _va(*fields: int) -> bytes:
    asid, num, scale, ttl, tg, leaf, addr = fields
    return build_command(
        Opcode.TLBI_NH_VA, asid=asid, num=num, scale=scale, ttl=ttl, tg=tg, leaf=leaf, addr=addr
    )


_field_values = st.tuples(
    st.integers(0, 3),  # asid
    st.integers(0, 31),  # num
    st.integers(0, 31),  # scale
    st.integers(0, 3),  # ttl
    st.integers(0, 3),  # tg
    st.integers(0, 1),  # leaf
    st.integers(0, 1 << 20),  # addr (pages)
)
_command = st.one_of(
    _field_values.map(lambda f: _va(*f)),
    st.integers(0, 3).map(lambda a: build_command(Opcode.TLBI_NH_ASID, asid=a)),
    st.just(build_command(Opcode.TLBI_NH_ALL)),
    st.just(build_command(Opcode.TLBI_NSNH_ALL)),
    st.integers(0, 1 << 20).map(lambda a: build_command(Opcode.TLBI_NH_VAA, addr=a)),
    st.integers(0, 3).map(lambda cs: build_command(Opcode.CMD_SYNC, cs=cs)),
    st.just(build_command(Opcode.CFGI_STE, sid=8, leaf=1)),
    st.just(build_command(Opcode.ATC_INV, sid=8, size=52)),
    st.just(build_command(Opcode.CFGI_CD, sid=8, ssid=1)),
    st.integers(0, 255).map(lambda op: _QQ.pack(op, 0)),
    # a valid command with one reserved bit set
    st.tuples(st.sampled_from(sorted(_PLAIN_OPS)), st.integers(0, 127)).map(
        lambda t: _QQ.pack(
            t[0] | (1 << t[1] if t[1] < 64 else 0), 1 << (t[1] - 64) if t[1] >= 64 else 0
        )
    ),
)
_doorbell = st.one_of(
    st.lists(_command, min_size=0, max_size=6).map(b"".join),
    st.binary(min_size=1, max_size=40),  # not a whole number of commands, most of the time
)


@pytest.mark.parametrize("small", [0, 1 << 30], ids=["numpy", "loop"])
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_doorbell, min_size=1, max_size=6), st.booleans())
def test_screen_marks_plain_exactly_what_the_frontend_accepts_as_tlb_work(
    small: int, doorbells: list[bytes], ril: bool
) -> None:
    features = SmmuFeatures(ril=ril)
    screened = screen(doorbells, features, small=small)
    for k, data in enumerate(doorbells):
        frontend = SmmuV3Frontend(features)
        try:
            frontend.receive_data(data)
        except ValueError:
            assert not screened.plain[k]
            continue
        events = frontend.events()
        clean = bool(data) and not any(isinstance(e, GuestError) for e in events)
        only_tlb = all(data[i] in _PLAIN_OPS for i in range(0, len(data), 16))
        assert screened.plain[k] == (clean and only_tlb), (k, data.hex())
        if screened.plain[k]:
            assert all(isinstance(e, (Invalidation, Barrier)) for e in events)
            assert screened.syncs[k] == frontend.last.syncs
            assert screened.commands(k, k + 1) == data


# -- the vectorised coalescer keeps every invalidation --------------------------------------
def _span(w0: int, w1: int) -> tuple[int, int]:
    tg = (w1 >> 10) & 3
    first = (w1 & ~0xFFF & (1 << 64) - 1) >> (tg * 2 + 10)
    return first, first + ((((w0 >> 12) & 31) + 1) << ((w0 >> 20) & 31))


def _covered(cmd: tuple[int, int], out: list[tuple[int, int]]) -> bool:
    w0, w1 = cmd
    op = w0 & 0xFF
    if any(o & 0xFF in (Opcode.TLBI_NH_ALL, Opcode.TLBI_NSNH_ALL) for o, _ in out):
        return True
    if (w0, w1) in out:
        return True
    if op == Opcode.TLBI_NH_VA and any(
        o & 0xFF == Opcode.TLBI_NH_ASID and o >> 48 == w0 >> 48 for o, _ in out
    ):
        return True
    if op not in (Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA) or not (w1 >> 10) & 3:
        return False
    key = (w0 & ~(0x1F << 12 | 0x1F << 20), w1 & 0xFFF)
    lo, hi = _span(w0, w1)
    spans = sorted(
        _span(o0, o1) for o0, o1 in out if (o0 & ~(0x1F << 12 | 0x1F << 20), o1 & 0xFFF) == key
    )
    reach = lo
    for a, b in spans:
        if a <= reach:
            reach = max(reach, b)
    return reach >= hi


_tlb_command = st.one_of(
    st.tuples(
        st.integers(1, 3),
        st.integers(0, 31),
        st.integers(0, 3),
        st.integers(1, 3),
        st.sampled_from([1, 3]),
        st.integers(0, 1),
        st.integers(0, 300),
    ).map(lambda f: _va(f[0], f[1], f[2], f[3], f[4], f[5], f[6])),
    st.tuples(st.integers(1, 3), st.integers(0, 300)).map(
        lambda f: build_command(Opcode.TLBI_NH_VA, asid=f[0], leaf=1, addr=f[1])
    ),
    st.integers(1, 3).map(lambda a: build_command(Opcode.TLBI_NH_ASID, asid=a)),
    st.integers(0, 300).map(lambda a: build_command(Opcode.TLBI_NH_VAA, addr=a, tg=1, ttl=3)),
)


@settings(max_examples=300)
@given(
    st.lists(_tlb_command, min_size=2, max_size=60),
    st.booleans(),
    st.sampled_from([8, 64, 512]),
)
def test_coalesce_tlb_covers_every_command_and_never_grows(
    commands: list[bytes], wide: bool, flood: int
) -> None:
    if wide:
        commands.insert(len(commands) // 2, build_command(Opcode.TLBI_NSNH_ALL))
    words = np.frombuffer(b"".join(commands), dtype="<u8").reshape(-1, 2)
    out = [(int(a), int(b)) for a, b in coalesce_tlb(words, flood_pages=flood)]
    assert len(out) <= len(commands)
    for cmd in commands:
        assert _covered(_QQ.unpack(cmd), out), cmd.hex()
    if wide:
        assert out == [_QQ.unpack(build_command(Opcode.TLBI_NSNH_ALL))]


def test_coalesce_tlb_merges_touching_ranges_and_widens_floods() -> None:
    touching = [*workloads.tlbi_range(5, 0x100, 8), *workloads.tlbi_range(5, 0x108, 8)]
    words = np.frombuffer(b"".join(touching), dtype="<u8").reshape(-1, 2)
    out = coalesce_tlb(words)
    assert [_span(int(a), int(b)) for a, b in out] == [(0x100, 0x110)]
    flood = [c for page in range(0, 1200, 4) for c in workloads.tlbi_range(7, page * 3, 4)]
    words = np.frombuffer(b"".join(flood), dtype="<u8").reshape(-1, 2)
    out = coalesce_tlb(words, flood_pages=512)
    # widened to the VM (global entries included), never narrowed to TLBI_NH_ASID(7)
    assert [int(a) & 0xFF for a, _ in out] == [Opcode.TLBI_NH_ALL]
    # an ASID invalidation never covers a VA one: both go out
    pair = [build_command(Opcode.TLBI_NH_ASID, asid=7), *workloads.tlbi_range(7, 0x40, 1)]
    words = np.frombuffer(b"".join(pair), dtype="<u8").reshape(-1, 2)
    assert len(coalesce_tlb(words)) == 2


# -- sessions: grouped answers equal one-by-one answers -------------------------------------
def _records_doorbells(records: list[dict[str, Any]]) -> list[bytes]:
    return [bytes.fromhex(r["data"]) for r in records[1:] if r["op"] == "cmds"]


def _streams(seed: int, vids: list[int]) -> list[bytes]:
    """Linux-shaped doorbells with ATS work, CD updates and guest errors mixed in."""
    rng = random.Random(seed)
    out = []
    for _ in range(300):
        asid = rng.randint(1, 3)
        page = rng.randint(0, 4000)
        shape = rng.random()
        if shape < 0.6:
            cmds = [*workloads.tlbi_range(asid, page, rng.choice((1, 2, 4, 8, 48))), SYNC]
        elif shape < 0.7:
            cmds = [build_command(Opcode.TLBI_NH_ASID, asid=asid), SYNC]
        elif shape < 0.8:
            vid = rng.choice(vids)
            cmds = [*workloads.tlbi_range(asid, page, 4), SYNC]
            cmds += [build_command(Opcode.ATC_INV, sid=vid, size=2, addr=page & ~3), SYNC]
        elif shape < 0.85:
            cmds = [build_command(Opcode.CFGI_CD, sid=rng.choice(vids), ssid=0, leaf=1), SYNC]
        elif shape < 0.9:
            cmds = [*workloads.tlbi_range(asid, page, 2), _QQ.pack(0x5F, 0), SYNC]
        elif shape < 0.95:
            cmds = [*workloads.tlbi_range(asid, page, 3, leaf=False), SYNC] * 2
        else:
            cmds = [build_command(Opcode.TLBI_NSNH_ALL), SYNC]
        out.append(b"".join(cmds))
    return out


def _run(
    layout: dict[str, list[str]], n_iommus: int, doorbells: list[bytes], group: int
) -> tuple[list[Any], dict[str, Any], int]:
    rig = build(host(n_iommus, 2, True), layout)
    session = rig.session
    answers: list[Any] = []
    viommu = next(iter(layout))
    if group == 1:
        answers = [as_json(session.doorbell(viommu, d)) for d in doorbells]
    else:
        for start in range(0, len(doorbells), group):
            answers += as_json_list(session.doorbells(viommu, doorbells[start : start + group]))
    report = session.report()
    return answers, report, report["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0)


@pytest.mark.parametrize(
    ("layout", "n_iommus"),
    [({"v": ["smmu0"]}, 1), ({"v": ["smmu0", "smmu1"]}, 2)],
    ids=["one-psmmu", "two-psmmus"],
)
@pytest.mark.parametrize("group", [2, 7, 64])
@pytest.mark.parametrize("seed", [1, 2])
def test_grouped_session_answers_like_one_by_one(
    layout: dict[str, list[str]], n_iommus: int, group: int, seed: int
) -> None:
    doorbells = _streams(seed, [8, 16])
    alone, alone_report, alone_calls = _run(layout, n_iommus, doorbells, 1)
    grouped, grouped_report, grouped_calls = _run(layout, n_iommus, doorbells, group)
    assert grouped == alone
    for key in ("commands", "errors", "barriers", "baseline"):
        assert grouped_report[key] == alone_report[key], key
    assert grouped_report["verify"]["missed"] == 0
    assert alone_report["verify"]["missed"] == 0
    assert grouped_calls < alone_calls


def test_group_of_strict_doorbells_is_one_call_per_psmmu() -> None:
    records = workloads.strict_ril(200, iommus=2, devices=2)
    doorbells = _records_doorbells(records)[4:]  # after the four STE installs
    rig = build(host(2, 2, False), {"v": ["smmu0", "smmu1"]}, ats=False)
    before = rig.session.report()["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0)
    answers = as_json_list(rig.session.doorbells("v", doorbells))
    report = rig.session.report()
    assert report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] - before == 2
    assert all(
        a == {"consumed": len(d) // 16, "errors": [], "syncs": 1}
        for a, d in zip(answers, doorbells, strict=True)
    )
    assert report["verify"]["missed"] == 0


def _is_nh_all(entry: bytes) -> bool:
    return entry[0] == Opcode.TLBI_NH_ALL


def test_failed_coalesced_group_call_reports_the_first_command_and_resends_the_rest() -> None:
    """300 strict unmaps of one ASID flood into one TLBI_NH_ALL: when the host refuses it,
    the first TLB command of the run (whose origin the promoted entry takes, as per
    doorbell) gets CERROR_ILL and every other command is re-sent as the guest wrote it."""
    doorbells = [b"".join([*workloads.tlbi_range(1, 4 * i, 2), SYNC]) for i in range(300)]
    rig = build(host(1, 2, False), {"v": ["smmu0"]}, ats=False)
    fault = testing.inject_invalidate_error(rig.backend, "smmu0", _is_nh_all)
    calls = rig.session.calls
    seq = calls.seq
    answers = as_json_list(rig.session.doorbells("v", doorbells))
    assert fault.hits == 1
    assert isinstance(answers[0], dict)
    assert answers[0]["errors"] == [
        {
            "index": 0,
            "code": "CERROR_ILL",
            "reason": "host IOMMU_HWPT_INVALIDATE failed on this command (errno 5)",
        }
    ]
    assert all(isinstance(a, dict) and a["errors"] == [] for a in answers[1:])
    assert calls.seq - seq == 2  # the failed call, then the rest as written in one call
    resent = rig.session.drain_calls()[-1]
    assert resent["entry_num"] == 300 - 1
    assert resent["errno"] == 0
    report = rig.session.report()
    assert report["errors"]["by_code"] == {"CERROR_ILL": 1}
    assert report["verify"]["missed"] == 0


def test_refused_doorbells_in_a_group_keep_their_place() -> None:
    rig = build(host(1, 1, False), {"v": ["smmu0"]}, ats=False)
    good = b"".join([*workloads.tlbi_range(1, 0x40, 2), SYNC])
    answers = as_json_list(rig.session.doorbells("v", [good, b"\x01" * 7, good, b"", good]))
    assert answers[0] == answers[2] == answers[4] == {"consumed": 2, "errors": [], "syncs": 1}
    assert isinstance(answers[1], Exception)
    assert answers[3] == {"consumed": 0, "errors": [], "syncs": 0}
    missing = as_json_list(rig.session.doorbells("nope", [good]))
    assert isinstance(missing[0], Exception)
    assert "nope" in str(missing[0])
