"""The SMMUv3 frontend: events per command, CERROR_ILL at the right index, then onwards."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.smmuv3 import Opcode, build_command
from viommud.events import (
    Barrier,
    Cache,
    GuestError,
    Invalidation,
    Scope,
    StreamTableInvalidated,
)
from viommud.frontends.smmuv3.frontend import FrameError, SmmuFeatures, SmmuV3Frontend

SYNC = build_command(Opcode.CMD_SYNC, cs=2, msh=3, msi_attr=0xF)


def run(*commands: bytes, features: SmmuFeatures | None = None) -> list[object]:
    frontend = SmmuV3Frontend(features or SmmuFeatures())
    frontend.receive_data(b"".join(commands))
    events: list[object] = []
    while (event := frontend.next_event()) is not None:
        events.append(event)
    return events


def test_linux_strict_unmap_doorbell() -> None:
    # smmuv3.md §1.5: TLBI_NH_VA ASID 1, one 4 KiB page at 0xffff0000, leaf, RIL
    tlbi = struct.pack("<QQ", 0x0001000000000012, 0xFFFF0701)
    events = run(tlbi, SYNC)
    assert events == [
        Invalidation(
            0,
            Cache.TLB,
            Scope.RANGE,
            asid=1,
            addr=0xFFFF0000,
            size=4096,
            granule=4096,
            leaf=True,
            raw=tlbi,
        ),
        Barrier(1),
    ]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (build_command(Opcode.TLBI_NH_ALL), (Cache.TLB, Scope.ALL, None, None, 0, 0)),
        (build_command(Opcode.TLBI_NSNH_ALL), (Cache.TLB, Scope.ALL, None, None, 0, 0)),
        (build_command(Opcode.TLBI_NH_ASID, asid=7), (Cache.TLB, Scope.ASID, None, 7, 0, 0)),
        # 2 MiB block: SCALE=9, NUM=0, TG=4K -> 512 pages (smmuv3.md §1.5)
        (
            build_command(Opcode.TLBI_NH_VA, asid=1, scale=9, leaf=1, ttl=2, tg=1, addr=0x40000),
            (Cache.TLB, Scope.RANGE, None, 1, 0x40000000, 2 << 20),
        ),
        # (NUM+1) << SCALE granules of 64 KiB
        (
            build_command(Opcode.TLBI_NH_VAA, num=2, scale=1, leaf=1, ttl=3, tg=3, addr=0x100),
            (Cache.TLB, Scope.RANGE, None, None, 0x100000, 6 * 65536),
        ),
        (
            build_command(Opcode.TLBI_NH_VA, asid=3, addr=0x12345),
            (Cache.TLB, Scope.RANGE, None, 3, 0x12345000, 4096),
        ),
        (
            build_command(Opcode.CFGI_CD, sid=9, ssid=4, leaf=1),
            (Cache.CONFIG, Scope.DEVICE, 9, 4, 0, 0),
        ),
        (build_command(Opcode.CFGI_CD_ALL, sid=9), (Cache.CONFIG, Scope.DEVICE, 9, None, 0, 0)),
        (
            build_command(Opcode.ATC_INV, sid=9, size=52),
            (Cache.DEVICE_TLB, Scope.DEVICE, 9, None, 0, 0),
        ),
        # 2^3 pages aligned down to the 32 KiB span; SSV=1 carries the PASID
        (
            build_command(Opcode.ATC_INV, sid=9, ssv=1, ssid=5, size=3, addr=0x10009),
            (Cache.DEVICE_TLB, Scope.DEVICE, 9, 5, 0x10008000, 0x8000),
        ),
    ],
)
def test_forwarded_commands(command: bytes, expected: tuple[object, ...]) -> None:
    [event] = run(command)
    assert isinstance(event, Invalidation)
    assert (event.caches, event.scope, event.device, event.asid, event.addr, event.size) == (
        expected
    )
    assert event.raw == command


@pytest.mark.parametrize(
    ("command", "first", "last"),
    [
        (build_command(Opcode.CFGI_STE, sid=0x108, leaf=1), 0x108, 0x108),
        (build_command(Opcode.CFGI_STE_RANGE, sid=0x10B, range=1), 0x108, 0x10B),
        (build_command(Opcode.CFGI_STE_RANGE, sid=0x1234, range=31), 0, 0xFFFFFFFF),
        (build_command(Opcode.CFGI_STE_RANGE, sid=0x1234, range=30), 0, 0x7FFFFFFF),
    ],
)
def test_stream_table_invalidations(command: bytes, first: int, last: int) -> None:
    assert run(command) == [StreamTableInvalidated(0, first, last, command)]


def test_stream_table_invalidation_carries_the_written_stes_of_its_range() -> None:
    frontend = SmmuV3Frontend()
    stes = {sid: bytes([sid & 0xFF]) * 64 for sid in (0x10A, 0x108, 0x110, 7)}
    for sid, ste in stes.items():
        frontend.write_ste(sid, ste)
    one = build_command(Opcode.CFGI_STE, sid=0x108, leaf=1)
    unwritten = build_command(Opcode.CFGI_STE, sid=0x109, leaf=1)
    span = build_command(Opcode.CFGI_STE_RANGE, sid=0x10B, range=1)  # 0x108..0x10B
    every = build_command(Opcode.CFGI_STE_RANGE, range=31)
    frontend.receive_data(one + unwritten + span + every)
    assert [e.stes for e in frontend.events() if isinstance(e, StreamTableInvalidated)] == [
        ((0x108, stes[0x108]),),
        (),
        ((0x108, stes[0x108]), (0x10A, stes[0x10A])),
        tuple(sorted(stes.items())),
    ]


def test_host_failures_and_bulk_doorbells_reach_the_counters() -> None:
    frontend = SmmuV3Frontend()
    frontend.host_failed([GuestError(3, "CERROR_ILL", "host", b""), GuestError(5, "X", "", b"")])
    assert frontend.error_counts == {"CERROR_ILL": 1, "X": 1}
    tlbi = build_command(Opcode.TLBI_NH_ASID, asid=1)
    alone = SmmuV3Frontend()
    for doorbell in (tlbi + SYNC, tlbi + tlbi + SYNC):
        alone.receive_data(doorbell)
        alone.events()
    bulk = SmmuV3Frontend()
    bulk.took_plain(tlbi + SYNC + tlbi + tlbi + SYNC, 2, alone.last)
    assert (bulk.kind_counts(), bulk.barriers, bulk.last) == (
        alone.kind_counts(),
        alone.barriers,
        alone.last,
    )
    assert bulk.error_counts == {}


def raw(w0: int, w1: int = 0) -> bytes:
    return struct.pack("<QQ", w0, w1)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (raw(0x5F), "unknown opcode 0x5f"),
        (raw(0x00), "unknown opcode 0x00"),
        (raw(Opcode.CFGI_VMS_PIDM), "MPAM"),
        (raw(Opcode.TLBI_EL3_VA), "Secure command on the Non-secure queue"),
        (raw(Opcode.TLBI_EL2_ASID), "IDR0.HYP"),
        (raw(Opcode.TLBI_S2_IPA), "stage-1-only"),
        (raw(Opcode.PRI_RESP), "PRI"),
        (raw(Opcode.RESUME), "stall"),
        (raw(Opcode.TLBI_SNH_ALL), "Secure command"),
        (raw(Opcode.DPTI_PA), "DPT"),
        (raw(Opcode.TLBI_NSNH_ALL, 1), "reserved bits"),
        (raw(Opcode.CMD_SYNC | 1 << 30), "reserved bits"),
        (raw(Opcode.CFGI_CD | 1 << 10), "SSec=1"),
        (raw(Opcode.CMD_SYNC | 3 << 12), "CS=0b11"),
        (build_command(Opcode.ATC_INV, sid=1, size=60), "Size 60 > 52"),
        (build_command(Opcode.TLBI_NH_VA, ttl=2), "with TG=0"),
        (build_command(Opcode.TLBI_NH_VA, tg=1), "TTL=0 NUM=0 SCALE=0"),
        (build_command(Opcode.TLBI_NH_VAA, tg=2, ttl=1, leaf=1), "16KB granule"),
    ],
)
def test_illegal_command_is_cerror_ill_and_the_queue_goes_on(bad: bytes, reason: str) -> None:
    frontend = SmmuV3Frontend()
    good = build_command(Opcode.TLBI_NH_ASID, asid=1)
    frontend.receive_data(good + bad + good + SYNC)
    events = frontend.events()
    assert [type(e) for e in events] == [Invalidation, GuestError, Invalidation, Barrier]
    error = events[1]
    assert isinstance(error, GuestError)
    assert (error.index, error.code, error.raw) == (1, "CERROR_ILL", bad)
    assert reason in error.reason
    assert frontend.error_counts == {"CERROR_ILL": 1}
    assert frontend.last.consumed == 4
    assert frontend.last.syncs == 1


def test_features_gate_range_and_ats() -> None:
    frontend = SmmuV3Frontend(SmmuFeatures(ril=False, ats=False))
    frontend.receive_data(
        build_command(Opcode.TLBI_NH_VA, asid=1, leaf=1, ttl=3, tg=1)
        + build_command(Opcode.ATC_INV, sid=1, size=52)
        + build_command(Opcode.TLBI_NH_VA, asid=1, leaf=1, addr=5)
    )
    events = frontend.events()
    assert [type(e) for e in events] == [GuestError, GuestError, Invalidation]
    with pytest.raises(ValueError, match="unknown smmuv3 options"):
        SmmuFeatures.from_options({"pri": True})
    with pytest.raises(ValueError, match="must be a boolean"):
        SmmuFeatures.from_options({"ril": "yes"})


def test_counts_by_kind_include_bad_commands() -> None:
    frontend = SmmuV3Frontend()
    frontend.receive_data(SYNC + SYNC + raw(0x5F) + build_command(Opcode.PREFETCH_CONFIG, sid=1))
    assert frontend.kind_counts() == {
        "smmuv3:CMD_SYNC": 2,
        "smmuv3:CMD_0x5f": 1,
        "smmuv3:CMD_PREFETCH_CONFIG": 1,
    }
    assert frontend.barriers == 2


def test_partial_command_is_a_frame_error() -> None:
    frontend = SmmuV3Frontend()
    with pytest.raises(FrameError, match="whole number of 16-byte commands") as info:
        frontend.receive_data(SYNC + b"\x01\x02")
    assert info.value.data.endswith(b"\x01\x02")
    assert frontend.next_event() is None  # nothing of the bad doorbell was consumed


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=40))
def test_any_doorbell_decodes_without_exceptions(words: list[tuple[int, int]]) -> None:
    frontend = SmmuV3Frontend()
    frontend.receive_data(b"".join(struct.pack("<QQ", a, b) for a, b in words))
    events = frontend.events()
    assert frontend.last.consumed == len(words)
    indexes = [e.index for e in events]
    assert indexes == sorted(set(indexes))  # at most one event per command, in order
    assert sum(frontend.opcode_counts) == len(words)
    assert sum(isinstance(e, GuestError) for e in events) == frontend.error_counts.get(
        "CERROR_ILL", 0
    )
