"""The 17-command RIL doorbell's fast paths (issue 17, round 2) held to the reference paths.

* ``coalesce_tlb_array`` (the dispatcher's plain-doorbell coalescer on the words, no
  ``Entry`` per command) gives byte for byte the commands ``coalesce`` gives: duplicates,
  VM-wide TLBIs, range merges of every granule / TTL / leaf / ASID / VMID field / VAA,
  groups that encode no shorter, floods before and after a merge;
* a model taking the fast path (``plain_syncs`` + ``run_tlb``) answers, calls and counts
  exactly as the event path on doorbells of such ranges, with one or two physical SMMUs,
  RIL on or off, every flood policy and host failures injected;
* ``_plain_syncs_wide``'s RIL screen (reserved bits as one AND, TG/TTL by table) agrees
  with the one-by-one loop and with the frontend.
"""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.smmuv3 import TLBI_OPS, Opcode, build_command
from tests.models.test_smmuv3_fast_path import (
    _POLICIES,
    LAYOUTS,
    _answers,
    _any_range,
    _small_range,
    _tlb_command,
)
from tests.oracle.workload import SYNC
from viommud.dispatcher.smmuv3 import DispatchPolicy
from viommud.dispatcher.smmuv3_coalesce import Entry, coalesce, coalesce_tlb_array
from viommud.events import Barrier, Invalidation
from viommud.frontends.smmuv3.frontend import SmmuFeatures, SmmuV3Frontend
from viommud.group_commit import smmuv3_screen
from viommud.group_commit.smmuv3_screen import plain_syncs

# big ranges: one ASID's pages go over a flood threshold, or a union needs several commands
_wide_range = st.tuples(
    st.integers(1, 2), st.integers(0, 31), st.integers(0, 9), st.integers(1, 3), st.integers(0, 64)
).map(
    lambda t: build_command(
        Opcode.TLBI_NH_VA, asid=t[0], num=t[1], scale=t[2], ttl=t[3], tg=1, addr=t[4] << 4
    )
)
_command = st.one_of(_any_range, _any_range, _small_range, _wide_range, _tlb_command)


@st.composite
def _cluster(draw: st.DrawFn) -> list[bytes]:
    """Ranges of one group key (opcode, ASID, VMID field, TG, TTL, leaf) in a window of a
    few dozen granules, so that they overlap, touch, stay apart, and their union encodes
    in one command, several, or no fewer than were written."""
    op = draw(st.sampled_from([Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA]))
    key = draw(
        st.fixed_dictionaries(
            {
                "vmid": st.integers(0, 1),
                "ttl": st.integers(0, 3),
                "tg": st.integers(1, 3),
                "leaf": st.integers(0, 1),
            }
        )
    )
    if op == Opcode.TLBI_NH_VA:
        key["asid"] = draw(st.integers(1, 2))
    base = draw(st.integers(0, 1 << 12))
    out = []
    for num, scale, page in draw(
        st.lists(
            st.tuples(st.integers(0, 31), st.integers(0, 3), st.integers(0, 80)),
            min_size=2,
            max_size=20,
        )
    ):
        first = base + page
        out.append(
            build_command(op, num=num, scale=scale, addr=first << (key["tg"] * 2 - 2), **key)
        )
    return out


_mix = st.tuples(st.lists(_cluster(), min_size=1, max_size=3), st.lists(_command, max_size=6)).map(
    lambda t: [c for cluster in t[0] for c in cluster] + t[1]
)


def _reference(commands: list[bytes], flood: int) -> bytes:
    entries = [Entry(raw, k) for k, raw in enumerate(commands)]
    return b"".join(e.raw for e in coalesce(entries, flood_pages=flood))


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.lists(_command, min_size=0, max_size=40), _mix),
    st.integers(0, 3),
    st.randoms(use_true_random=False),
    st.sampled_from([4, 64, 512, 4096]),
)
def test_array_coalescer_is_coalesce(
    commands: list[bytes], dups: int, order: Random, flood: int
) -> None:
    commands = commands + commands[: dups * 2]  # duplicates, first occurrence kept
    order.shuffle(commands)
    assert coalesce_tlb_array(b"".join(commands), flood) == _reference(commands, flood)


@pytest.mark.parametrize("flood", [4, 512])
def test_array_coalescer_of_one_command_is_the_command(flood: int) -> None:
    big = build_command(Opcode.TLBI_NH_VA, asid=1, num=31, scale=9, ttl=1, tg=1, addr=0)
    assert coalesce_tlb_array(big, flood) == _reference([big], flood) == big


def test_array_coalescer_merges_a_ril_doorbell() -> None:
    """16 touching 2-page ranges of one ASID: one 32-page command (NUM 31 ... no: 32 pages
    is NUM 0, SCALE 5), and the array is not the one sent."""
    commands = [
        build_command(Opcode.TLBI_NH_VA, asid=1, num=1, ttl=3, tg=1, addr=2 * k) for k in range(16)
    ]
    got = coalesce_tlb_array(b"".join(commands))
    assert got == _reference(commands, 512)
    assert len(got) == 16


# doorbells of ranges that merge, as a RIL guest batches its unmaps
_ril_doorbell = st.one_of(st.lists(_command, min_size=1, max_size=24), _mix).map(
    lambda cs: b"".join(cs) + SYNC
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_ril_doorbell, min_size=1, max_size=3),
    st.sampled_from(sorted(LAYOUTS)),
    st.booleans(),
    st.sampled_from(sorted(_POLICIES)),
    st.one_of(
        st.none(),
        st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(1, 3), st.booleans()),
    ),
)
def test_ril_doorbells_fast_path_is_the_reference_path(
    doorbells: list[bytes],
    layout: str,
    ril: bool,
    policy: str,
    fail: tuple[int, int, int, bool] | None,
) -> None:
    """Replies, host calls (arrays included), report, frontend counters and dispatcher
    counters of the fast path equal the event path's, with no host failure, or one
    injected on a guest command or on a command coalescing made (a merged range, a
    promoted flood: the entry that stood for several guest commands)."""
    target = None
    times = 1
    if fail is not None:
        k, c, times, made = fail
        data = doorbells[k % len(doorbells)]
        rows = [data[at : at + 16] for at in range(0, len(data) - 16, 16)]  # not the SYNC
        if made:
            flood = (_POLICIES[policy] or DispatchPolicy()).flood_pages
            sent = coalesce_tlb_array(b"".join(rows), flood)
            rows = [sent[at : at + 16] for at in range(0, len(sent), 16)]
        target = rows[c % len(rows)]
    chosen = _POLICIES[policy]
    reference = _answers(layout, False, ril, doorbells, fail=target, times=times, policy=chosen)
    fast = _answers(layout, True, ril, doorbells, fail=target, times=times, policy=chosen)
    assert fast == reference


@st.composite
def _screened(draw: st.DrawFn) -> bytes:
    """A RIL-like doorbell of 4 commands or more (the wide screen), maybe with one bit
    flipped (a reserved bit, a range field, an opcode, a sync's CS)."""
    commands = draw(st.one_of(st.lists(_command, min_size=3, max_size=40), _mix))
    data = bytearray(b"".join(commands) + draw(st.sampled_from([SYNC, b""])))
    if len(data) < 64:
        data += SYNC
    if draw(st.booleans()):
        row, bit = draw(st.tuples(st.integers(0, 1 << 16), st.integers(0, 127)))
        at = (row % (len(data) // 16)) * 16 + bit // 8
        data[at] ^= 1 << (bit % 8)
    return bytes(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_screened(), st.booleans())
def test_ril_wide_screen_agrees_with_the_loop_and_the_frontend(data: bytes, ril: bool) -> None:
    syncs = smmuv3_screen._plain_syncs_wide(data, ril)
    assert syncs == plain_syncs(data, ril, smmuv3_screen._ONE_BY_ONE)
    assert syncs == plain_syncs(data, ril)
    frontend = SmmuV3Frontend(SmmuFeatures(ril=ril))
    frontend.receive_data(data)
    events = frontend.events()
    plain = all(
        type(e) is Barrier or (type(e) is Invalidation and e.raw[0] in TLBI_OPS) for e in events
    )
    if syncs >= 0:  # plain: TLB work and syncs only, all accepted
        assert plain
        assert syncs == frontend.last.syncs
