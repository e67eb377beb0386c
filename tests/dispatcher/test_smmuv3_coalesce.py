"""Each coalescing rule on its own, and the pipeline never invalidates less than its input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.smmuv3 import Opcode, build_command, parse_command
from viommud.dispatcher.smmuv3_coalesce import (
    Entry,
    coalesce,
    drop_covered_by_device_wide,
    drop_covered_by_vm_wide,
    drop_duplicates,
    encode_range,
    merge_atc,
    merge_ranges,
    order_by_class,
    promote_floods,
)


def va(asid: int, page: int, pages: int = 1, *, leaf: int = 1, ttl: int = 3) -> bytes:
    """A 4 KiB-granule range TLBI of ``pages`` pages (must be encodable in one command)."""
    scale = (pages & -pages).bit_length() - 1
    num = (pages >> scale) - 1
    return build_command(
        Opcode.TLBI_NH_VA, asid=asid, num=num, scale=scale, leaf=leaf, ttl=ttl, tg=1, addr=page
    )


def entries(*raws: bytes) -> list[Entry]:
    return [Entry(raw, i) for i, raw in enumerate(raws)]


def raws(items: list[Entry]) -> list[bytes]:
    return [e.raw for e in items]


def test_drop_duplicates_keeps_the_first() -> None:
    a, b = va(1, 5), va(1, 9)
    out = drop_duplicates(entries(a, b, a))
    assert raws(out) == [a, b]
    assert [e.origin for e in out] == [0, 1]


def test_vm_wide_covers_every_tlbi_but_not_device_work() -> None:
    atc = build_command(Opcode.ATC_INV, sid=3, size=52)
    nsnh = build_command(Opcode.TLBI_NSNH_ALL)
    out = drop_covered_by_vm_wide(
        entries(va(1, 5), atc, nsnh, build_command(Opcode.TLBI_NH_ASID, asid=2))
    )
    assert raws(out) == [atc, nsnh]


def test_asid_never_covers_a_va_invalidation() -> None:
    """TLBI_NH_ASID spares global (nG=0) entries; TLBI_NH_VA removes them whatever their
    ASID. So an NH_VA beside an NH_ASID of its ASID must still be sent."""
    asid1 = build_command(Opcode.TLBI_NH_ASID, asid=1)
    out = coalesce(entries(asid1, va(1, 5)))
    assert va(1, 5) in raws(out)
    assert asid1 in raws(out)


def test_device_wide_config_and_atc() -> None:
    cd = build_command(Opcode.CFGI_CD, sid=4, ssid=1, leaf=1)
    cd_other = build_command(Opcode.CFGI_CD, sid=5, ssid=1, leaf=1)
    cd_all = build_command(Opcode.CFGI_CD_ALL, sid=4)
    atc_page = build_command(Opcode.ATC_INV, sid=4, ssv=1, ssid=2, size=0, addr=8)
    atc_all = build_command(Opcode.ATC_INV, sid=4, size=52)
    atc_other = build_command(Opcode.ATC_INV, sid=6, size=0, addr=8)
    out = drop_covered_by_device_wide(
        entries(cd, cd_other, cd_all, atc_page, atc_all, atc_all, atc_other)
    )
    assert raws(out) == [cd_other, cd_all, atc_all, atc_other]


def test_merge_adjacent_and_overlapping_ranges() -> None:
    out = merge_ranges(entries(va(1, 10), va(1, 11), va(1, 12, 2), va(1, 40), va(2, 13)))
    decoded = sorted(
        (f["asid"], f["addr"], (f["num"] + 1) << f["scale"])
        for f in (parse_command(e.raw) for e in out)
    )
    # pages 10..13 of ASID 1 -> 10 (2 pages: 10,11) + 12 (2 pages): Linux-style split of 4
    assert sum(n for a, addr, n in decoded if a == 1 and addr < 40) == 4
    assert (1, 40, 1) in decoded
    assert (2, 13, 1) in decoded
    assert len(out) < 5


def test_merge_keeps_leaf_and_ttl_apart() -> None:
    out = merge_ranges(entries(va(1, 10), va(1, 11, leaf=0, ttl=0), va(1, 12, ttl=2)))
    assert len(out) == 3


def test_encode_range_covers_exactly_and_avoids_the_reserved_encoding() -> None:
    for pages in (1, 2, 3, 31, 32, 33, 100, 511, 4096):
        words = encode_range(Opcode.TLBI_NH_VA | 1 << 48, 1 | 3 << 8 | 1 << 10, 7, pages, 1)
        covered: list[int] = []
        for w0, w1 in words:
            n = (((w0 >> 12) & 31) + 1) << ((w0 >> 20) & 31)
            first = w1 >> 12
            covered += range(first, first + n)
        assert covered == list(range(7, 7 + pages))
    # TTL=0 single page would be TTL=NUM=SCALE=0 (reserved): widened to two pages
    [(w0, _w1)] = encode_range(Opcode.TLBI_NH_VA, 1 << 10, 7, 1, 1)
    assert (w0 >> 12) & 31 == 1


def test_flood_of_pages_becomes_one_vm_wide_invalidation() -> None:
    """A flood is widened to the VM's TLBI_NH_ALL (global entries included), never narrowed
    to TLBI_NH_ASID; device work is untouched."""
    many = [va(3, 2 * i) for i in range(600)]
    atc = build_command(Opcode.ATC_INV, sid=2, size=52)
    out = promote_floods(entries(*many, va(4, 1), atc), threshold=512)
    assert raws(out) == [build_command(Opcode.TLBI_NH_ALL), atc]
    assert out[0].origin == 0
    assert promote_floods(entries(*many[:100]), threshold=512) == entries(*many[:100])


def atc_inv(sid: int, page: int, log2: int, *, ssid: int | None = None) -> bytes:
    pasid = {"ssv": 1, "ssid": ssid} if ssid is not None else {}
    return build_command(Opcode.ATC_INV, sid=sid, size=log2, addr=page, **pasid)


def atc_pages(items: list[Entry]) -> set[tuple[int, int, int]]:
    """(sid, ssid or -1, page) triples the ATC_INVs of ``items`` cover (§4.5.1)."""
    out: set[tuple[int, int, int]] = set()
    for e in items:
        f = parse_command(e.raw)
        n = 1 << f["size"]
        first = f["addr"] & ~(n - 1)
        ssid = f["ssid"] if f["ssv"] else -1
        out |= {(f["sid"], ssid, p) for p in range(first, first + n)}
    return out


def test_adjacent_atc_invalidations_of_one_device_and_pasid_merge() -> None:
    items = entries(*(atc_inv(7, p, 0, ssid=1) for p in range(8, 16)), atc_inv(7, 8, 0))
    out = merge_atc(items)
    assert atc_pages(out) == atc_pages(items)  # exactly the same pages, no more
    # pages 8..15 of (7, PASID 1) are one aligned 8-page block; the no-PASID one stays apart
    assert sorted(raws(out)) == sorted([atc_inv(7, 8, 3, ssid=1), atc_inv(7, 8, 0)])


def test_atc_merge_keeps_devices_pasids_and_gaps_apart() -> None:
    items = entries(atc_inv(7, 8, 0, ssid=1), atc_inv(7, 10, 0, ssid=1), atc_inv(8, 9, 0))
    assert merge_atc(items) == items


def test_order_by_class_config_tlb_device() -> None:
    atc = build_command(Opcode.ATC_INV, sid=2, size=52)
    atc0 = build_command(Opcode.ATC_INV, sid=1, size=52)
    cd = build_command(Opcode.CFGI_CD_ALL, sid=9)
    out = order_by_class(entries(atc, va(1, 1), cd, atc0))
    assert raws(out) == [cd, va(1, 1), atc0, atc]


PAGE_SETS = st.lists(
    st.tuples(st.integers(1, 3), st.integers(0, 200), st.sampled_from([1, 2, 4])), max_size=40
)


def pages_of(items: list[Entry]) -> set[tuple[str, int, int]]:
    """What a list of TLBIs invalidates: ("ng", asid, page) for non-global entries and
    ("g", 0, page) for global ones. NH_VA(a, p) removes ("ng", a, p) and ("g", 0, p);
    NH_ASID(a) removes ("ng", a, *) only; NH_ALL removes everything (pages 0..1023)."""
    out: set[tuple[str, int, int]] = set()
    for e in items:
        f = parse_command(e.raw)
        if f["opcode"] == Opcode.TLBI_NH_ALL:
            out |= {(k, a, p) for k in ("ng", "g") for a in range(4) for p in range(1024)}
            out |= {("g", 0, p) for p in range(1024)}
        elif f["opcode"] == Opcode.TLBI_NH_ASID:
            out |= {("ng", f["asid"], p) for p in range(1024)}
        else:
            n = (f["num"] + 1) << f["scale"]
            out |= {("ng", f["asid"], p) for p in range(f["addr"], f["addr"] + n)}
            out |= {("g", 0, p) for p in range(f["addr"], f["addr"] + n)}
    return out


@settings(max_examples=200)
@given(PAGE_SETS, st.integers(1, 600))
def test_coalesce_never_covers_less(spec: list[tuple[int, int, int]], threshold: int) -> None:
    asids = {asid for asid, _page, _n in spec}
    items = entries(
        *(va(asid, page, n) for asid, page, n in spec),
        *(build_command(Opcode.TLBI_NH_ASID, asid=a) for a in sorted(asids) if a % 2),
    )
    out = coalesce(items, flood_pages=threshold)
    assert pages_of(out) >= pages_of(items)
    assert len(out) <= max(len(items), 1) or not items
    assert {e.origin for e in out} <= {e.origin for e in items}
