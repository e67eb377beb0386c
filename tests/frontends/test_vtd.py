"""The VT-d frontend alone: every descriptor type and granularity becomes the right event,
every IQE rule fires at the right index, and the doorbell goes on after it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protocols.vtd import DescType, build_descriptor
from viommud.events import (
    Barrier,
    Cache,
    CompletionInterrupt,
    ContextCacheInvalidated,
    DomainInvalidation,
    GuestError,
    Invalidation,
    PasidCacheInvalidated,
    Scope,
    StatusWrite,
)
from viommud.frontends.vtd.frontend import (
    NEED_DATA,
    RESERVED,
    FrameError,
    VtdEvent,
    VtdFeatures,
    VtdFrontend,
    device_tlb_span,
    iotlb_span,
)

T = DescType
FULL = (0, 0)


def frontend(dw: int = 256, pds: bool = False) -> VtdFrontend:
    return VtdFrontend(VtdFeatures(dw=dw, pds=pds))


def run(fe: VtdFrontend, *descs: bytes) -> list[VtdEvent]:
    fe.receive_data(b"".join(descs))
    out = []
    while (event := fe.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def d(kind: int, width: int = 32, **fields: int) -> bytes:
    return build_descriptor(kind, width=width, **fields)


def raw(*words: int, width: int = 32) -> bytes:
    padded = (*words, 0, 0, 0, 0)[: width // 8]
    return b"".join(w.to_bytes(8, "little") for w in padded)


def strip(events: list[VtdEvent]) -> list[VtdEvent]:
    """Events without their raw bytes, for comparisons."""
    out: list[VtdEvent] = []
    for e in events:
        if isinstance(
            e, Invalidation | DomainInvalidation | ContextCacheInvalidated | PasidCacheInvalidated
        ):
            out.append(replace(e, raw=b""))
        else:
            out.append(e)
    return out


def iqe(events: list[VtdEvent]) -> list[tuple[int, str]]:
    return [(e.index, e.reason) for e in events if isinstance(e, GuestError)]


# ---------------------------------------------------------------------------------------------
# Spans


@pytest.mark.parametrize(
    ("addr", "am", "span"),
    [
        (0x12345, 0, (0x12345000, 0x1000)),
        (0x12345, 2, (0x12344000, 0x4000)),
        (0xFFFFF, 18, (0xC0000000, 1 << 30)),
        (0xFFFFF, 51, (0, 1 << 63)),
        (0xFFFFF, 52, FULL),
        (0xFFFFF, 63, FULL),
    ],
)
def test_iotlb_span(addr: int, am: int, span: tuple[int, int]) -> None:
    assert iotlb_span(addr, am) == span


@pytest.mark.parametrize(
    ("addr", "s", "span"),
    [
        (0x12345, 0, (0x12345000, 0x1000)),
        (0x12344, 1, (0x12344000, 0x2000)),  # lowest 0 bit at 0: 2 pages
        (0x12345, 1, (0x12344000, 0x4000)),  # one trailing 1: 4 pages
        (0x12347, 1, (0x12340000, 0x10000)),  # three trailing 1s: 16 pages
        (0x7FFFFFFFFFFFF, 1, FULL),  # Linux's whole-device-TLB encoding
        (0xFFFFFFFFFFFFF, 1, FULL),
        (0x3FFFFFFFFFFFF, 1, (0, 1 << 63)),
    ],
)
def test_device_tlb_span(addr: int, s: int, span: tuple[int, int]) -> None:
    assert device_tlb_span(addr, s) == span


# ---------------------------------------------------------------------------------------------
# Every type and granularity


def test_context_cache_granularities() -> None:
    events = run(
        frontend(),
        d(T.CC_INV, g=1),
        d(T.CC_INV, g=2, did=7),
        d(T.CC_INV, g=3, sid=0x123, fm=0),
        d(T.CC_INV, g=3, sid=0x123, fm=1),
        d(T.CC_INV, g=3, sid=0x123, fm=2),
        d(T.CC_INV, g=3, sid=0x123, fm=3),
    )
    assert strip(events) == [
        ContextCacheInvalidated(0, 0, 0, None),
        ContextCacheInvalidated(1, 0, 0, 7),
        ContextCacheInvalidated(2, 0x123, 0xFFFF),
        ContextCacheInvalidated(3, 0x123, 0xFFFB),
        ContextCacheInvalidated(4, 0x123, 0xFFF9),
        ContextCacheInvalidated(5, 0x123, 0xFFF8),
    ]


def test_iotlb_granularities() -> None:
    events = run(
        frontend(),
        d(T.IOTLB_INV, g=1),
        d(T.IOTLB_INV, g=2, did=3, dw=1, dr=1),
        d(T.IOTLB_INV, g=3, did=3, addr=0x12345, am=2, ih=1),
        d(T.IOTLB_INV, g=3, did=4, addr=0x12345, am=18),
    )
    assert strip(events) == [
        DomainInvalidation(0, None),
        DomainInvalidation(1, 3),
        DomainInvalidation(2, 3, None, 0x12344000, 0x4000, True),
        DomainInvalidation(3, 4, None, 0, 1 << 30, False),
    ]


def test_pasid_iotlb_granularities() -> None:
    events = run(
        frontend(),
        d(T.P_IOTLB_INV, g=2, did=3, pasid=5),
        d(T.P_IOTLB_INV, g=3, did=3, pasid=0, addr=0xFFFFF, am=0, ih=1),
        d(T.P_IOTLB_INV, g=3, did=3, pasid=0, addr=0xFFFFF, am=40),
        d(T.P_IOTLB_INV, g=3, did=3, pasid=0, addr=0xFFFFF, am=52),
    )
    assert strip(events) == [
        DomainInvalidation(0, 3, 5),
        DomainInvalidation(1, 3, 0, 0xFFFFF000, 0x1000, True),
        DomainInvalidation(2, 3, 0, 0, 1 << 52, False),  # no MAMV check (QEMU)
        DomainInvalidation(3, 3, 0, 0, 0, False),
    ]


def test_device_tlb_forms() -> None:
    events = run(
        frontend(),
        d(T.DEV_TLB_INV, sid=0x10, mip=4, addr=0x12345, s=0),
        d(T.DEV_TLB_INV, sid=0x10, addr=0x7FFFFFFFFFFFF, s=1),
        d(T.P_DEV_TLB_INV, sid=0x18, pasid=5, mip=3, addr=0x12345, s=1),
        d(T.P_DEV_TLB_INV, sid=0x18, pasid=5, g=1, addr=0x12345),
    )
    dtlb = Cache.DEVICE_TLB
    assert strip(events) == [
        Invalidation(0, dtlb, Scope.DEVICE, 0x10, None, 0x12345000, 0x1000),
        Invalidation(1, dtlb, Scope.DEVICE, 0x10, None, 0, 0),
        Invalidation(2, dtlb, Scope.DEVICE, 0x18, 5, 0x12344000, 0x4000),
        Invalidation(3, dtlb, Scope.DEVICE, 0x18, None, 0x12345000, 0x1000),
    ]


def test_pasid_cache_granularities() -> None:
    events = run(
        frontend(),
        d(T.PC_INV, g=0, did=3, pasid=9),
        d(T.PC_INV, g=1, did=3, pasid=9),
        d(T.PC_INV, g=3, did=3, pasid=9),
    )
    assert strip(events) == [
        PasidCacheInvalidated(0, 3, None),
        PasidCacheInvalidated(1, 3, 9),
        PasidCacheInvalidated(2, None, None),
    ]


def test_wait_forms() -> None:
    fe = frontend(pds=True)
    events = run(
        fe,
        d(T.INV_WAIT, sw=1, status_data=2, status_addr=0x4000 >> 2),
        d(T.INV_WAIT, if_=1),
        d(T.INV_WAIT, fn=1),
        d(T.INV_WAIT, pd=1),
        d(T.INV_WAIT, sw=1, if_=1, fn=1, status_data=0xDEADBEEF, status_addr=0x1234),
    )
    assert events == [
        Barrier(0),
        StatusWrite(0, 0x4000, 2),
        Barrier(1),
        CompletionInterrupt(1),
        Barrier(2),
        Barrier(3),
        Barrier(4),
        StatusWrite(4, 0x1234 << 2, 0xDEADBEEF),
        CompletionInterrupt(4),
    ]
    assert (fe.last.consumed, fe.last.syncs, fe.barriers) == (5, 5, 5)


def test_iec_and_page_group_response_are_accepted_silently() -> None:
    fe = frontend()
    assert run(fe, d(T.IEC_INV, g=0), d(T.IEC_INV, g=1, iidx=5, im=3)) == []
    assert run(fe, d(T.PGRP_RESP, pp=1, rid=0x10, pasid=1, rc=1, prgi=7, lpig=1)) == []
    assert fe.error_counts == {}


def test_kind_counts_count_good_and_bad() -> None:
    fe = frontend()
    run(fe, d(T.IOTLB_INV, g=1), d(T.IOTLB_INV, g=0), raw(0x0C), d(T.INV_WAIT, sw=1))
    assert fe.kind_counts() == {"vtd:iotlb_inv": 2, "vtd:type_0x0c": 1, "vtd:inv_wait": 1}
    assert fe.error_counts == {"IQE": 2}


# ---------------------------------------------------------------------------------------------
# IQE rules


GOOD = d(T.IOTLB_INV, g=2, did=1)
GOOD16 = d(T.IOTLB_INV, width=16, g=2, did=1)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (raw(0x0, width=16), "unknown descriptor type 0x00"),
        (raw(0xA, width=16), "unknown descriptor type 0x0a"),
        (raw(0xC, width=16), "unknown descriptor type 0x0c"),
        (raw(0x2 | 1 << 9, width=16), "unknown descriptor type 0x12"),
        (d(T.P_IOTLB_INV, width=16, g=2), "256-bit p_iotlb_inv descriptor in a 128-bit queue"),
        (d(T.PC_INV, width=16, g=3), "256-bit pc_inv descriptor in a 128-bit queue"),
        (d(T.P_DEV_TLB_INV, width=16), "256-bit p_dev_tlb_inv descriptor in a 128-bit queue"),
        (d(T.CC_INV, width=16, g=0), "context-cache invalidation with granularity 0"),
        (d(T.IOTLB_INV, width=16, g=0), "IOTLB invalidation with granularity 0"),
        (d(T.IOTLB_INV, width=16, g=3, am=19), "page-selective IOTLB AM 19 > MAMV 18"),
        (d(T.INV_WAIT, width=16), "wait descriptor with none of SW, IF, FN"),
        (d(T.INV_WAIT, width=16, pd=1), "reserved bits set: qw0 0x0000000000000080"),
        (d(T.DEV_TLB_INV, width=16, pfsid_hi=1), "reserved bits set: qw0 0x0010000000000000"),
        (d(T.PGRP_RESP, width=16, rid=1), "page group response without PASID (PP=0)"),
    ],
)
def test_iqe_in_a_128_bit_queue(bad: bytes, reason: str) -> None:
    fe = frontend(dw=128)
    events = run(fe, GOOD16, bad, GOOD16, d(T.INV_WAIT, width=16, sw=1))
    assert [(i, r[: len(reason)]) for i, r in iqe(events)] == [(1, reason)]
    # The bad descriptor is skipped; the ones after it still run.
    assert [type(e).__name__ for e in events] == [
        "DomainInvalidation",
        "GuestError",
        "DomainInvalidation",
        "Barrier",
        "StatusWrite",
    ]
    assert (fe.last.consumed, fe.last.syncs) == (4, 1)
    assert fe.error_counts == {"IQE": 1}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (raw(0x22, 0, 1), "reserved upper words qw2/qw3 are not zero"),
        (raw(0x22, 0, 0, 1 << 63), "reserved upper words qw2/qw3 are not zero"),
        (d(T.P_IOTLB_INV, g=0), "P_IOTLB invalidation with granularity 0"),
        (d(T.P_IOTLB_INV, g=1), "P_IOTLB invalidation with granularity 1"),
        (d(T.PC_INV, g=2), "PASID-cache invalidation with granularity 2"),
        (raw(0x7 | 3 << 4, 1), "reserved bits set: qw0 0x0000000000000000 qw1 0x000000000000"),
    ],
)
def test_iqe_in_a_256_bit_queue(bad: bytes, reason: str) -> None:
    events = run(frontend(), GOOD, bad, d(T.INV_WAIT, fn=1))
    assert [(i, r[: len(reason)]) for i, r in iqe(events)] == [(1, reason)]


def test_page_group_response_upper_words_are_not_checked() -> None:
    fe = frontend()
    assert run(fe, raw(0x19, 0, 0xFFFF, 0xFFFF)) == []
    assert fe.error_counts == {}


@pytest.mark.parametrize("kind", list(T), ids=lambda k: k.name)
@pytest.mark.parametrize("word", [0, 1])
def test_every_reserved_bit_is_an_iqe(kind: DescType, word: int) -> None:
    """Each reserved bit of QEMU's masks, one at a time, gives IQE (a sample of them)."""
    mask = RESERVED[kind][word]
    bits = [b for b in range(64) if mask >> b & 1]
    base = {
        T.CC_INV: raw(0x11),
        T.IOTLB_INV: raw(0x12),
        T.DEV_TLB_INV: raw(0x3),
        T.IEC_INV: raw(0x4),
        T.INV_WAIT: raw(0x25),
        T.P_IOTLB_INV: raw(0x26),
        T.PC_INV: raw(0x37),
        T.P_DEV_TLB_INV: raw(0x8),
        T.PGRP_RESP: raw(0x19),
    }[kind]
    fe = frontend()
    assert iqe(run(fe, base)) == []
    for bit in bits[:: max(1, len(bits) // 8)]:
        words = [int.from_bytes(base[i : i + 8], "little") for i in range(0, 32, 8)]
        words[word] |= 1 << bit
        events = run(fe, raw(*words))
        assert [i for i, _ in iqe(events)] == [0], (kind.name, word, bit)


def test_pd_is_valid_with_pds() -> None:
    assert iqe(run(frontend(pds=True), d(T.INV_WAIT, pd=1))) == []
    assert iqe(run(frontend(pds=False), d(T.INV_WAIT, pd=1))) != []


# ---------------------------------------------------------------------------------------------
# Doorbells, options, guest memory


def test_doorbell_must_be_whole_descriptors() -> None:
    with pytest.raises(FrameError, match="16-byte"):
        frontend(dw=128).receive_data(bytes(24))
    with pytest.raises(FrameError, match="32-byte"):
        frontend(dw=256).receive_data(bytes(16))
    fe = frontend()
    fe.receive_data(b"")
    assert fe.next_event() is NEED_DATA
    assert fe.last.consumed == 0


def test_events_drains() -> None:
    fe = frontend()
    fe.receive_data(d(T.INV_WAIT, if_=1))
    assert fe.events() == [Barrier(0), CompletionInterrupt(0)]
    assert fe.events() == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dw": 64}, "'dw' must be 128 or 256"),
        ({"dw": True}, "'dw' must be 128 or 256"),
        ({"pds": 1}, "'pds' must be a boolean"),
        ({"ril": True}, "unknown vtd options: ril"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VtdFeatures.from_options(options)


def test_options() -> None:
    assert VtdFeatures.from_options({}) == VtdFeatures(128, False)
    assert VtdFeatures.from_options({"dw": 256, "pds": True}) == VtdFeatures(256, True)
    assert VtdFeatures(256).desc_size == 32


def test_guest_memory_writes_are_checked() -> None:
    fe = frontend()
    fe.write_context_entry(0x10, bytes(16))
    fe.write_pasid_entry(0x10, 3, bytes(64))
    assert fe.context_table == {0x10: bytes(16)}
    assert fe.pasid_table == {(0x10, 3): bytes(64)}
    with pytest.raises(FrameError, match="context entry"):
        fe.write_context_entry(0x10, bytes(8))
    with pytest.raises(FrameError, match="PASID entry"):
        fe.write_pasid_entry(0x10, 3, bytes(32))
