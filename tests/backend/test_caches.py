"""The emulated caches: what each host invalidation removes (viommud.backend.emulator.caches).

First the model alone (SMMUv3 commands and VT-d descriptors on hand-placed entries), then
through the emulator: entries filled "as DMA would" with ``testing.dma()``, invalidations
issued by HWPT_INVALIDATE or made by the kernel itself (attach, IOAS_UNMAP, domain free),
and the per-call record ``testing.last_removed()``.
"""

from __future__ import annotations

import errno
import struct

import pytest

from protocols import iommufd as uapi
from tests.backend.test_emulated import ARM_INV, STE_S1, U64_MAX, VTD_INV, Rig, cmd, vtd_inv
from viommud.backend.emulator import testing
from viommud.backend.emulator.caches import (
    AtcEntry,
    CacheModel,
    ConfigEntry,
    TlbEntry,
    granule_level_size,
    tlbi_range,
    vtd_psi_mask,
)
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig

K4, M2, G1 = 4096, 2 << 20, 1 << 30
U = "smmu0"
EATS = 1 << 28
SIDS = {0x100: "a0", 0x101: "a1"}


def leaf(
    iova: int, size: int = K4, *, tag: int = 1, asid: int | None = 5, **kw: object
) -> TlbEntry:
    level = {K4: 3, M2: 2, G1: 1}[size]
    return TlbEntry(tag, asid, iova, size, True, level, K4, **kw)  # type: ignore[arg-type]


def walk(iova: int, level: int, *, tag: int = 1, asid: int | None = 5) -> TlbEntry:
    size = granule_level_size(K4, level)
    return TlbEntry(tag, asid, iova & ~(size - 1), size, False, level, K4)


def model(*entries: TlbEntry) -> CacheModel:
    m = CacheModel()
    for entry in entries:
        m.add_iotlb(U, entry)
    return m


def after(m: CacheModel) -> set[TlbEntry]:
    return set(m.iotlb.get(U, []))


def tlbi(
    op: int, *, vmid: int = 1, asid: int = 0, w1: int = 0, num: int = 0, scale: int = 0
) -> tuple[int, int]:
    return op | (num << 12) | (scale << 20) | (vmid << 32) | (asid << 48), w1


def va(addr: int, *, leaf_only: bool = False, tg: int = 0, ttl: int = 0) -> int:
    return addr | int(leaf_only) | (ttl << 8) | (tg << 10)


# ======================================================================================
# The model: SMMUv3 commands
# ======================================================================================


def test_granule_level_sizes() -> None:
    assert [granule_level_size(K4, lvl) for lvl in (3, 2, 1)] == [K4, M2, G1]
    assert granule_level_size(16384, 2) == 32 << 20
    assert granule_level_size(65536, 2) == 512 << 20


def test_tlbi_range_decoding() -> None:
    assert tlbi_range(0x12, 0x1000_0000) == (0x1000_0000, 0x1000_0000, 0, 0)
    # TG=4K, NUM=1, SCALE=1: (1+1) << 1 = 4 granules; TTL 3
    first, last, ttl, gran = tlbi_range(0x12 | (1 << 12) | (1 << 20), va(0x1_0000, tg=1, ttl=3))
    assert (first, last, ttl, gran) == (0x1_0000, 0x1_3FFF, 3, K4)
    # 64K granule: the address is aligned down to it
    assert tlbi_range(0x12, va(0x1_3000, tg=3))[:2] == (0x1_0000, 0x1_FFFF)


def test_nh_va_single_address_leaf_only_keeps_walk_caches() -> None:
    entries = [leaf(0x10000), walk(0x10000, 2), walk(0x10000, 1), leaf(0x11000)]
    m = model(*entries)
    m.smmu_command(U, *tlbi(0x12, asid=5, w1=va(0x10000, leaf_only=True)), SIDS)
    assert after(m) == {walk(0x10000, 2), walk(0x10000, 1), leaf(0x11000)}
    assert [r.cause for r in m.journal] == ["TLBI_NH_VA"]


def test_nh_va_non_leaf_also_removes_walk_caches_covering_the_address() -> None:
    m = model(leaf(0x10000), walk(0x10000, 2), walk(0x10000, 1), walk(0x4000_0000, 2))
    m.smmu_command(U, *tlbi(0x12, asid=5, w1=va(0x10000)), SIDS)
    assert after(m) == {walk(0x4000_0000, 2)}


def test_nh_va_block_entry_containing_the_address() -> None:
    m = model(leaf(0x20_0000, M2))
    m.smmu_command(U, *tlbi(0x12, asid=5, w1=va(0x21_3000, leaf_only=True)), SIDS)
    assert after(m) == set()


def test_nh_va_scope_asid_vmid_and_global() -> None:
    mine, other_asid = leaf(0x10000), leaf(0x10000, asid=6)
    other_vmid, glob = leaf(0x10000, tag=2), leaf(0x10000, asid=7, global_=True)
    s2 = leaf(0x10000, asid=None)
    m = model(mine, other_asid, other_vmid, glob, s2)
    m.smmu_command(U, *tlbi(0x12, asid=5, w1=va(0x10000)), SIDS)
    assert after(m) == {other_asid, other_vmid, s2}  # global entries match any ASID


def test_nh_va_range_and_ttl() -> None:
    inside = [leaf(0x10000), leaf(0x13000)]
    outside = leaf(0x14000)
    block = leaf(0x0, M2)  # level 2, meets the range
    w = walk(0x10000, 2)
    cmd0, _ = tlbi(0x12, asid=5, num=1, scale=1)  # 4 granules of 4K from 0x10000
    m = model(*inside, outside, block, w)
    m.smmu_command(U, cmd0, va(0x10000, leaf_only=True, tg=1, ttl=3), SIDS)
    assert after(m) == {outside, block, w}  # TTL 3: level-3 leaves only
    m = model(*inside, outside, block, w)
    m.smmu_command(U, cmd0, va(0x10000, tg=1, ttl=2), SIDS)
    assert after(m) == {*inside, outside}  # TTL 2: the block; Leaf=0: the walk cache too
    m = model(*inside, outside, block, w)
    m.smmu_command(U, cmd0, va(0x10000, tg=1), SIDS)
    assert after(m) == {outside}


def test_ttl_with_another_granule_does_not_match() -> None:
    m = model(leaf(0x10000))
    cmd0, _ = tlbi(0x12, asid=5, num=3)
    m.smmu_command(U, cmd0, va(0x10000, leaf_only=True, tg=2, ttl=3), SIDS)  # 16K granule
    assert after(m) == {leaf(0x10000)}


def test_nh_vaa_any_asid() -> None:
    m = model(leaf(0x10000), leaf(0x10000, asid=9), leaf(0x10000, tag=2), leaf(0x10000, asid=None))
    m.smmu_command(U, *tlbi(0x13, w1=va(0x10000)), SIDS)
    assert after(m) == {leaf(0x10000, tag=2), leaf(0x10000, asid=None)}


def test_nh_asid_spares_global_entries() -> None:
    glob = leaf(0x20000, global_=True)
    m = model(leaf(0x10000), walk(0x10000, 2), glob, leaf(0x10000, asid=6))
    m.smmu_command(U, *tlbi(0x11, asid=5), SIDS)
    assert after(m) == {glob, leaf(0x10000, asid=6)}


def test_nh_all_keeps_stage2_and_other_vmids() -> None:
    s2, other = leaf(0x10000, asid=None), leaf(0x10000, tag=2)
    m = model(leaf(0x10000), leaf(0x10000, asid=6, global_=True), s2, other)
    m.smmu_command(U, *tlbi(0x10), SIDS)
    assert after(m) == {s2, other}


def test_stage2_commands() -> None:
    s2_in, s2_out, s1 = leaf(0x10000, asid=None), leaf(0x50000, asid=None), leaf(0x10000)
    m = model(s2_in, s2_out, s1)
    m.smmu_command(U, *tlbi(0x2A, w1=va(0x10000)), SIDS)
    assert after(m) == {s2_out, s1}  # S2_IPA: stage-2-only entries
    m.smmu_command(U, *tlbi(0x28), SIDS)
    assert after(m) == set()  # S12_VMALL: everything of the VMID
    m = model(s2_in, leaf(0x1000, tag=7))
    m.smmu_command(U, 0x30, 0, SIDS)
    assert after(m) == set()  # NSNH_ALL


def atc_model() -> CacheModel:
    m = CacheModel()
    for entry in (
        AtcEntry(0x10000, K4),
        AtcEntry(0x10000, K4, pasid=3),
        AtcEntry(0x10000, K4, pasid=4, global_=True),
        AtcEntry(0x90000, K4),
    ):
        m.add_atc("a0", entry)
    m.add_atc("a1", AtcEntry(0x10000, K4))
    return m


def atc_cmd(
    sid: int, addr: int, size: int, *, ssv: bool = False, ssid: int = 0, glob: bool = False
) -> tuple[int, int]:
    w0 = 0x40 | (sid << 32) | (ssid << 12) | (int(ssv) << 11) | (int(glob) << 9)
    return w0, addr | size


@pytest.mark.parametrize(
    ("kw", "left"),
    [
        ({"addr": 0x10000, "size": 0}, {AtcEntry(0x90000, K4)}),  # no PASID: all PASIDs
        (
            {"addr": 0x10000, "size": 0, "ssv": True, "ssid": 3},
            {AtcEntry(0x10000, K4), AtcEntry(0x10000, K4, 4, True), AtcEntry(0x90000, K4)},
        ),
        (
            {"addr": 0x10000, "size": 0, "ssv": True, "ssid": 3, "glob": True},
            {AtcEntry(0x10000, K4), AtcEntry(0x90000, K4)},
        ),
        ({"addr": 0x13000, "size": 2}, {AtcEntry(0x90000, K4)}),  # 16K span aligned down
        (
            {"addr": 0x20000, "size": 4},
            {
                AtcEntry(0x10000, K4),
                AtcEntry(0x10000, K4, 3),
                AtcEntry(0x10000, K4, 4, True),
                AtcEntry(0x90000, K4),
            },
        ),
        ({"addr": 0, "size": 52}, set()),
        ({"addr": 0, "size": 63}, set()),
    ],
)
def test_atc_inv(kw: dict[str, int], left: set[AtcEntry]) -> None:
    m = atc_model()
    m.smmu_command(U, *atc_cmd(0x100, **kw), SIDS)  # type: ignore[arg-type]
    assert set(m.atc["a0"]) == left
    assert m.atc["a1"] == [AtcEntry(0x10000, K4)]  # another SID


def test_atc_inv_of_an_unknown_sid_touches_nothing() -> None:
    m = atc_model()
    m.smmu_command(U, *atc_cmd(0x999, 0, 52), SIDS)
    assert m.journal == []


def cfg_model() -> CacheModel:
    m = CacheModel()
    for entry in (
        ConfigEntry("ste", 0x100),
        ConfigEntry("cd", 0x100, 0),
        ConfigEntry("cd", 0x100, 1025),
        ConfigEntry("l1cd", 0x100, 1),
        ConfigEntry("l1cd", 0x100, 0),
        ConfigEntry("ste", 0x101),
        ConfigEntry("cd", 0x101, 0),
    ):
        m.add_config(U, entry)
    return m


@pytest.mark.parametrize(
    ("w0", "w1", "removed"),
    [
        (
            0x03 | (0x100 << 32),
            1,
            {
                ("ste", 0x100, 0),
                ("cd", 0x100, 0),
                ("cd", 0x100, 1025),
                ("l1cd", 0x100, 1),
                ("l1cd", 0x100, 0),
            },
        ),
        (0x05 | (0x100 << 32) | (1025 << 12), 1, {("cd", 0x100, 1025)}),
        (0x05 | (0x100 << 32) | (1025 << 12), 0, {("cd", 0x100, 1025), ("l1cd", 0x100, 1)}),
        (
            0x06 | (0x100 << 32),
            0,
            {("cd", 0x100, 0), ("cd", 0x100, 1025), ("l1cd", 0x100, 1), ("l1cd", 0x100, 0)},
        ),
        (
            0x04 | (0x100 << 32),
            0,
            {
                ("ste", 0x100, 0),
                ("cd", 0x100, 0),
                ("cd", 0x100, 1025),
                ("l1cd", 0x100, 1),
                ("l1cd", 0x100, 0),
                ("ste", 0x101, 0),
                ("cd", 0x101, 0),
            },
        ),
        (
            0x04,
            31,
            {
                ("ste", 0x100, 0),
                ("cd", 0x100, 0),
                ("cd", 0x100, 1025),
                ("l1cd", 0x100, 1),
                ("l1cd", 0x100, 0),
                ("ste", 0x101, 0),
                ("cd", 0x101, 0),
            },
        ),
        (0x46, 0, set()),
    ],
    ids=[
        "CFGI_STE",
        "CFGI_CD-leaf",
        "CFGI_CD-nonleaf",
        "CFGI_CD_ALL",
        "CFGI_STE_RANGE-2",
        "CFGI_ALL",
        "CMD_SYNC",
    ],
)
def test_config_invalidation(w0: int, w1: int, removed: set[tuple[str, int, int]]) -> None:
    m = cfg_model()
    m.smmu_command(U, w0, w1, SIDS)
    assert {(r.entry.kind, r.entry.sid, r.entry.ssid) for r in m.journal} == removed  # type: ignore[union-attr]


# ======================================================================================
# The model: VT-d
# ======================================================================================


@pytest.mark.parametrize(
    ("start", "last", "expected"),
    [
        (0x1000, 0x1FFF, (0x1000, 0)),
        (0x2000, 0x3FFF, (0x2000, 1)),
        (0x3000, 0x4FFF, (0x0, 3)),  # straddles an 8-page boundary: widened
        (0x0, 0xFFFF_FFFF_FFFF_EFFF, (0, None)),  # addr 0, npages U64_MAX
        (0x0, U64_MAX, (0, None)),
        (0x1000, 0x0FFF, (0x1000, 0)),  # npages 0: the x86 result of the degenerate range
    ],
)
def test_vtd_psi_mask(start: int, last: int, expected: tuple[int, int | None]) -> None:
    assert vtd_psi_mask(start, last) == expected


def test_vtd_p_iotlb() -> None:
    did = 3
    page, blk, wk = (
        leaf(0x5000, tag=did, asid=0),
        leaf(0x20_0000, M2, tag=did, asid=0),
        walk(0x5000, 2, tag=did, asid=0),
    )
    glob = leaf(0x9000, tag=did, asid=0, global_=True)
    other = leaf(0x5000, tag=did, asid=1)
    m = model(page, blk, wk, glob, other)
    m.vtd_p_iotlb(U, did, 0, addr=0x4000, am=2, ih=True, cause="P_IOTLB")  # 16K at 0x4000
    assert after(m) == {blk, wk, glob, other}
    m.vtd_p_iotlb(U, did, 0, addr=0, am=None, ih=False, cause="P_IOTLB")
    assert after(m) == {glob, other}  # PASID-selective: non-global entries only


def test_vtd_iotlb_psi_and_dsi() -> None:
    did = 4
    ss_in, ss_out = leaf(0x5000, tag=did, asid=None), leaf(0x9_0000, tag=did, asid=None)
    fs = leaf(0x7_7000, tag=did, asid=0)
    m = model(ss_in, ss_out, fs, leaf(0x5000, tag=5, asid=None))
    m.vtd_iotlb_psi(U, did, addr=0x4000, am=2, ih=False, cause="IOTLB")
    assert after(m) == {ss_out, leaf(0x5000, tag=5, asid=None)}  # stage-1 entries: any address
    m.vtd_iotlb_dsi(U, did, "IOTLB-DSI")
    assert after(m) == {leaf(0x5000, tag=5, asid=None)}


# ======================================================================================
# Through the emulator: SMMUv3
# ======================================================================================


def arm_ats_scene(rig: Rig) -> dict[str, int]:
    """a0 (ATS) on a stage-1 vSTE with EATS=1 of the vIOMMU, vSID 8."""
    topo = rig.arm_topology("a0", vsid=8)
    rc, nested = rig.arm_nested(topo.dev, topo.viommu, STE_S1, EATS)
    assert rc == 0
    assert rig.attach("a0", nested)[0] == 0
    return {
        "viommu": topo.viommu,
        "parent": topo.parent,
        "ioas": topo.ioas,
        "nested": nested,
        "dev": topo.dev,
    }


def test_dma_fills_iotlb_walk_caches_atc_and_config() -> None:
    rig = Rig()
    arm_ats_scene(rig)
    added = testing.dma(rig.be, "a0", 0x1000_1234, asid=5)
    view = testing.caches(rig.be, "smmu0")
    assert set(view.iotlb) == {leaf(0x1000_1000), walk(0x1000_1000, 2), walk(0x1000_1000, 1)}
    assert view.atc["a0"] == (AtcEntry(0x1000_1000, K4),)
    assert set(view.config) == {ConfigEntry("ste", 0x100), ConfigEntry("cd", 0x100, 0)}
    assert len(added) == 6
    assert testing.atc(rig.be, "a0") == (AtcEntry(0x1000_1000, K4),)


def test_guest_tlbi_removes_only_its_vmid_and_asid_and_is_journalled() -> None:
    rig = Rig()
    s = arm_ats_scene(rig)
    testing.dma(rig.be, "a0", 0x1000_0000, asid=5)
    testing.dma(rig.be, "a0", 0x1000_0000, asid=6)
    testing.populate_iotlb(rig.be, "smmu0", leaf(0x1000_0000, tag=2))  # another VMID on the SMMU
    blob = cmd(0x12 | (5 << 48), va(0x1000_0000, leaf_only=True))
    assert rig.invalidate(s["viommu"], blob, ARM_INV, 16) == (0, 1)
    removed = testing.last_removed(rig.be)
    assert [(r.cache, r.owner, r.entry, r.cause) for r in removed] == [
        ("iotlb", "smmu0", leaf(0x1000_0000), "TLBI_NH_VA")
    ]
    left = set(testing.caches(rig.be, "smmu0").iotlb)
    assert leaf(0x1000_0000, asid=6) in left
    assert leaf(0x1000_0000, tag=2) in left
    assert testing.atc(rig.be, "a0") == (AtcEntry(0x1000_0000, K4),)  # a TLBI never touches the ATC


def test_guest_atc_inv_and_cfgi_cd_go_through_the_vsid() -> None:
    rig = Rig()
    s = arm_ats_scene(rig)
    testing.dma(rig.be, "a0", 0x1000_0000, asid=5)
    blob = cmd(0x40 | (8 << 32), 0x1000_0000) + cmd(0x05 | (8 << 32), 1)
    assert rig.invalidate(s["viommu"], blob, ARM_INV, 16) == (0, 2)
    causes = sorted((r.cache, r.cause) for r in testing.last_removed(rig.be))
    assert causes == [("atc", "ATC_INV"), ("config", "CFGI_CD")]
    assert testing.atc(rig.be, "a0") == ()


def test_nsnh_all_becomes_nh_all_of_the_vsmmu_vmid() -> None:
    rig = Rig()
    s = arm_ats_scene(rig)
    testing.dma(rig.be, "a0", 0x1000_0000, asid=5)
    testing.populate_iotlb(rig.be, "smmu0", leaf(0x1000, tag=1, asid=None))  # stage-2 only
    testing.populate_iotlb(rig.be, "smmu0", leaf(0x1000, tag=2))
    assert rig.invalidate(s["viommu"], cmd(0x30), ARM_INV, 16) == (0, 1)
    assert set(testing.caches(rig.be, "smmu0").iotlb) == {
        leaf(0x1000, tag=1, asid=None),
        leaf(0x1000, tag=2),
    }


def test_unissued_commands_of_a_failed_group_remove_nothing() -> None:
    """Mainline §3.4: a bad command at 70 counts 63..69 as handled but never issues them."""
    rig = Rig()
    s = arm_ats_scene(rig)
    for asid in (10, 65):
        testing.dma(rig.be, "a0", 0x1000_0000, asid=asid, walk=False)
    cmds = [cmd(0x11 | (i << 48)) for i in range(70)] + [cmd(0x03)]  # CFGI_STE: EIO
    assert rig.invalidate(s["viommu"], b"".join(cmds), ARM_INV, 16) == (errno.EIO, 70)
    left = {e.asid for e in testing.caches(rig.be, "smmu0").iotlb}
    assert left == {65}


def test_kernel_flushes_at_arm_replace() -> None:
    rig = Rig()
    s = arm_ats_scene(rig)
    testing.dma(rig.be, "a0", 0x1000_0000, asid=5)
    rc, other = rig.arm_nested(s["dev"], s["viommu"], STE_S1, EATS)
    assert rc == 0
    assert rig.attach("a0", other)[0] == 0
    causes = {(r.cache, r.cause) for r in testing.last_removed(rig.be)}
    assert causes == {("config", "kernel:attach CFGI_STE"), ("atc", "kernel:attach ATC_INV")}
    assert leaf(0x1000_0000) in testing.caches(rig.be, "smmu0").iotlb  # the guest flushes its ASIDs


def test_kernel_flushes_at_ioas_unmap_of_an_arm_nest_parent() -> None:
    rig = Rig()
    s = arm_ats_scene(rig)
    assert rig.map(s["ioas"], 0x4000_0000, M2)[0] == 0
    testing.dma(rig.be, "a0", 0x1000_0000, asid=5)
    s2_in = leaf(0x4000_0000, asid=None)
    s2_out = leaf(0x8000_0000, asid=None)
    for entry in (s2_in, s2_out, leaf(0x5000, tag=2)):
        testing.populate_iotlb(rig.be, "smmu0", entry)
    assert rig.unmap(s["ioas"], 0x4000_0000, M2) == (0, M2)
    assert set(testing.caches(rig.be, "smmu0").iotlb) == {s2_out, leaf(0x5000, tag=2)}
    assert testing.atc(rig.be, "a0") == ()  # a nested ATS master: the whole ATC
    causes = {r.cause for r in testing.last_removed(rig.be)}
    assert causes == {
        "kernel:IOAS_UNMAP TLBI_S2_IPA",
        "kernel:IOAS_UNMAP TLBI_NH_ALL",
        "kernel:IOAS_UNMAP ATC_INV",
    }


def test_kernel_flushes_at_ioas_unmap_of_an_arm_stage1_domain() -> None:
    rig = Rig()
    rig.bind("a0")
    ioas = rig.ioas()
    rc, hwpt = rig.attach("a0", ioas)  # an auto (stage-1) domain with a host ASID
    assert rc == 0
    assert rig.map(ioas, 0x10000, 4 * K4)[0] == 0
    testing.dma(rig.be, "a0", 0x10000)
    testing.dma(rig.be, "a0", 0x90000)
    assert rig.unmap(ioas, 0x10000, 4 * K4) == (0, 4 * K4)
    host_asid = rig.be.lookup(hwpt).asid  # type: ignore[union-attr]
    left = set(testing.caches(rig.be, "smmu0").iotlb)
    assert leaf(0x90000, tag=0, asid=host_asid) in left
    assert leaf(0x10000, tag=0, asid=host_asid) not in left
    assert testing.atc(rig.be, "a0") == (AtcEntry(0x90000, K4),)  # the ATC range only


def test_freeing_a_vmid_flushes_it() -> None:
    rig = Rig()
    dev = rig.bind("a0")
    ioas = rig.ioas()
    parent = rig.nest_parent(dev, ioas)
    vmid = rig.be.lookup(parent).vmid  # type: ignore[union-attr]
    testing.populate_iotlb(rig.be, "smmu0", leaf(0x1000, tag=vmid))
    testing.populate_iotlb(rig.be, "smmu0", leaf(0x1000, tag=vmid + 1))
    assert rig.destroy(parent) == 0
    assert [r.cause for r in testing.last_removed(rig.be)] == ["kernel:VMID free TLBI_S12_VMALL"]
    assert testing.caches(rig.be, "smmu0").iotlb == (leaf(0x1000, tag=vmid + 1),)


# ======================================================================================
# Through the emulator: VT-d
# ======================================================================================


def vtd_scene(rig: Rig) -> dict[str, int]:
    v0 = rig.bind("v0")  # ATS
    rig.bind("v1")
    ioas = rig.ioas()
    parent = rig.nest_parent(v0, ioas)
    rc, nested = rig.vtd_nested(v0, parent)
    assert rc == 0
    for name in ("v0", "v1"):
        assert rig.attach(name, nested)[0] == 0
    return {"ioas": ioas, "parent": parent, "nested": nested, "v0": v0}


def test_vtd_dma_tags() -> None:
    rig = Rig()
    s = vtd_scene(rig)
    testing.dma(rig.be, "v0", 0x5000)
    did = rig.be.unit("vtd0").dids[s["nested"]]
    view = testing.caches(rig.be, "vtd0")
    assert leaf(0x5000, tag=did, asid=0) in view.iotlb
    assert view.atc["v0"] == (AtcEntry(0x5000, K4),)
    assert set(view.config) == {ConfigEntry("context", 0x10), ConfigEntry("pasid", 0x10)}
    with pytest.raises(ValueError, match="ATS"):
        testing.populate_atc(rig.be, "v1", AtcEntry(0, K4))


def test_vtd_invalidation_flushes_iotlb_and_device_tlbs() -> None:
    rig = Rig()
    s = vtd_scene(rig)
    testing.dma(rig.be, "v0", 0x5000)
    testing.dma(rig.be, "v0", 0x8000)
    did = rig.be.unit("vtd0").dids[s["nested"]]
    assert rig.invalidate(s["nested"], vtd_inv(0x5000, 1, flags=1), VTD_INV, 24) == (0, 1)
    removed = {
        (r.cache, r.cause, getattr(r.entry, "iova", None)) for r in testing.last_removed(rig.be)
    }
    assert removed == {("iotlb", "P_IOTLB", 0x5000), ("atc", "DEVTLB", 0x5000)}
    left = set(testing.caches(rig.be, "vtd0").iotlb)
    assert walk(0x5000, 2, tag=did, asid=0) in left  # LEAF (IH): walk caches stay
    assert leaf(0x8000, tag=did, asid=0) in left


def test_vtd_invalidate_everything_spares_global_entries() -> None:
    rig = Rig()
    s = vtd_scene(rig)
    testing.dma(rig.be, "v0", 0x5000)
    testing.dma(rig.be, "v0", 0x9000, global_=True, walk=False)
    did = rig.be.unit("vtd0").dids[s["nested"]]
    assert rig.invalidate(s["nested"], vtd_inv(0, U64_MAX), VTD_INV, 24) == (0, 1)
    assert testing.caches(rig.be, "vtd0").iotlb == (leaf(0x9000, tag=did, asid=0, global_=True),)
    assert testing.atc(rig.be, "v0") == ()


def test_vtd_replace_flushes_the_old_domain() -> None:
    rig = Rig()
    s = vtd_scene(rig)
    testing.dma(rig.be, "v0", 0x5000)
    old_did = rig.be.unit("vtd0").dids[s["nested"]]
    rc, other = rig.vtd_nested(s["v0"], s["parent"])
    assert rc == 0
    assert rig.attach("v0", other)[0] == 0
    causes = {r.cause for r in testing.last_removed(rig.be)}
    assert causes == {
        "kernel:attach PASID-cache",
        "kernel:attach IOTLB-DSI",
        "kernel:attach DEVTLB",
    }
    assert all(e.tag != old_did for e in testing.caches(rig.be, "vtd0").iotlb)
    assert rig.be.unit("vtd0").dids[s["nested"]] == old_did  # v1 still uses it


def test_vtd_dids_are_released_with_the_last_device() -> None:
    rig = Rig()
    s = vtd_scene(rig)
    assert rig.detach("v0") == 0
    assert s["nested"] in rig.be.unit("vtd0").dids
    assert rig.detach("v1") == 0
    assert rig.be.unit("vtd0").dids == {}


def test_vtd_ioas_unmap_flushes_parent_and_nested_domains() -> None:
    rig = Rig()
    s = vtd_scene(rig)
    assert rig.attach("v1", s["parent"])[0] == 0  # v1 now directly on the stage-2 parent
    assert rig.map(s["ioas"], 0x4000_0000, M2)[0] == 0
    testing.dma(rig.be, "v0", 0x5000)
    testing.dma(rig.be, "v1", 0x4000_0000, walk=False)
    testing.dma(rig.be, "v1", 0x9000_0000, walk=False)
    pdid = rig.be.unit("vtd0").dids[s["parent"]]
    assert rig.unmap(s["ioas"], 0x4000_0000, M2) == (0, M2)
    assert testing.caches(rig.be, "vtd0").iotlb == (leaf(0x9000_0000, tag=pdid, asid=None),)
    assert testing.atc(rig.be, "v0") == ()  # nesting devTLB: the whole device TLB


# ======================================================================================
# dma() refusals
# ======================================================================================


def test_dma_refusals() -> None:
    rig = Rig()
    topo = rig.arm_topology("a0")
    with pytest.raises(ValueError, match="not attached"):
        testing.dma(rig.be, "a0", 0)
    with pytest.raises(ValueError, match="not bound"):
        testing.dma(rig.be, "b0", 0)
    rc, abort = rig.arm_nested(topo.dev, topo.viommu, 0)
    assert rc == 0
    assert rig.attach("a0", abort)[0] == 0
    with pytest.raises(ValueError, match="aborts"):
        testing.dma(rig.be, "a0", 0)
    rc, s1 = rig.arm_nested(topo.dev, topo.viommu, STE_S1)
    assert rig.attach("a0", s1)[0] == 0
    with pytest.raises(ValueError, match="block size"):
        testing.dma(rig.be, "a0", 0, size=3 * K4)
    with pytest.raises(ValueError, match="ATS"):
        testing.populate_atc(rig.be, "a0", AtcEntry(0, K4))  # EATS=0


def test_mock_devices_have_no_modelled_iotlb() -> None:
    be = EmulatedIommufd(HostConfig((), ()), selftest=True)
    arg = uapi.encode(uapi.IoasAlloc())
    assert be.ioctl(be.iommufd, uapi.IOMMU_IOAS_ALLOC, arg) == 0
    ioas = uapi.decode(uapi.IoasAlloc, arg).out_ioas_id
    tc = uapi.TestCmd.with_payload(uapi.IOMMU_TEST_OP_MOCK_DOMAIN, ioas, uapi.TestMockDomain())
    arg = uapi.encode(tc)
    assert be.ioctl(be.iommufd, uapi.IOMMU_TEST_CMD, arg) == 0
    with pytest.raises(ValueError, match="no modelled IOTLB"):
        testing.dma(be, "mock0", 0x100_0000)
    assert struct.unpack_from("<I", arg, 16)[0] == 2  # out_stdev_id


def test_vtd_npages_0_flushes_one_page() -> None:
    rig = Rig()
    s = vtd_scene(rig)
    testing.dma(rig.be, "v0", 0x5000, walk=False)
    testing.dma(rig.be, "v0", 0x6000, walk=False)
    assert rig.invalidate(s["nested"], vtd_inv(0x5000, 0), VTD_INV, 24) == (0, 1)
    assert [getattr(r.entry, "iova", None) for r in testing.last_removed(rig.be)] == [
        0x5000,
        0x5000,
    ]
