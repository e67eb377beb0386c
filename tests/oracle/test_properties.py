"""Hypothesis: any topology, any Linux-shaped stream -> nothing missed, never more calls
than forwarding each command on its own."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.workloads import tlbi_range
from protocols.smmuv3 import Opcode, build_command
from tests.oracle.workload import SYNC, build, host, vste
from tests.replies import as_json
from viommud.trace import Ste

BAD = struct.pack("<QQ", 0x5F, 0)


@st.composite
def topologies(draw: st.DrawFn) -> tuple[int, dict[str, list[str]], bool, int]:
    n = draw(st.integers(1, 4))
    iommus = [f"smmu{i}" for i in range(n)]
    shared = draw(st.booleans())
    layout = {"v": iommus} if shared else {f"v{i}": [iommu] for i, iommu in enumerate(iommus)}
    return n, layout, draw(st.booleans()), draw(st.integers(1, 3))


def doorbell_shapes(vids: list[int]) -> st.SearchStrategy[list[bytes]]:
    asid = st.integers(1, 4)
    strict_unmap = st.builds(
        lambda a, page, pages, leaf: [*tlbi_range(a, page, pages, leaf=leaf), SYNC],
        asid,
        st.integers(0, 4096),
        st.integers(1, 600),
        st.booleans(),
    )
    lazy_flush = st.builds(
        lambda a, vid: [
            build_command(Opcode.TLBI_NH_ASID, asid=a),
            SYNC,
            build_command(Opcode.ATC_INV, sid=vid, size=52),
            SYNC,
        ],
        asid,
        st.sampled_from(vids),
    )
    strict_atc = st.builds(
        lambda a, page, vid: [
            *tlbi_range(a, page, 4),
            SYNC,
            build_command(Opcode.ATC_INV, sid=vid, size=2, addr=page),
            SYNC,
        ],
        asid,
        st.integers(0, 1024).map(lambda p: p & ~3),
        st.sampled_from(vids),
    )
    cd_update = st.builds(
        lambda vid, ssid: [build_command(Opcode.CFGI_CD, sid=vid, ssid=ssid, leaf=1), SYNC],
        st.sampled_from(vids),
        st.integers(0, 3),
    )
    vm_wide = st.just([build_command(Opcode.TLBI_NSNH_ALL), SYNC])
    batched = st.lists(
        st.builds(lambda a, p: tlbi_range(a, p, 1)[0], asid, st.integers(0, 300)),
        min_size=2,
        max_size=70,
    ).map(lambda cmds: [*cmds, SYNC])
    with_error = st.builds(
        lambda a, p: [*tlbi_range(a, p, 2), BAD, SYNC], asid, st.integers(0, 100)
    )
    no_sync = st.builds(lambda a, p: tlbi_range(a, p, 3), asid, st.integers(0, 100))
    return st.one_of(
        strict_unmap, lazy_flush, strict_atc, cd_update, vm_wide, batched, with_error, no_sync
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topo=topologies(), data=st.data())
def test_coalesced_plan_misses_nothing_and_never_costs_more(
    topo: tuple[int, dict[str, list[str]], bool, int], data: st.DataObject
) -> None:
    n, layout, ats, per_iommu = topo
    rig = build(host(n, per_iommu, ats=ats), layout, ats=ats)
    for name, vids in rig.vids.items():
        for shape in data.draw(st.lists(doorbell_shapes(vids), min_size=1, max_size=12)):
            as_json(rig.doorbell(name, *shape))
        # an STE update in the middle: the device moves to another CD table
        as_json(rig.session.handle(Ste(99, name, vids[0], vste(0x7000, ats=ats))))
        as_json(rig.doorbell(name, build_command(Opcode.CFGI_STE, sid=vids[0], leaf=1), SYNC))
        for shape in data.draw(st.lists(doorbell_shapes(vids), min_size=1, max_size=6)):
            as_json(rig.doorbell(name, *shape))
        as_json(rig.doorbell(name, SYNC))
    report = rig.session.report()
    assert report["verify"]["missed"] == 0
    calls = report["backend"]["calls"].get("IOMMU_HWPT_INVALIDATE", 0)
    assert calls <= report["baseline"]["invalidate_calls"]
