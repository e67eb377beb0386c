"""The vectorised mainline SMMUv3 vIOMMU invalidation against the per-entry reference walk.

``ArmSmmuV3Driver(fast_invalidate=False)`` takes the reference walk (iommufd.md §3.4) for
every array. Two emulators are built identically, one per path, and given the same calls:
errno, reported entry_num, the host command queues, the caches, the removal journal and
any injected queue error still pending must come out the same.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.models import HostIommu
from tests.backend.test_emulated import ARM_INV, STE_BYPASS, STE_S1, SYNC, Rig, cmd
from viommud.backend.emulator import testing
from viommud.backend.emulator.arm_smmuv3 import ArmSmmuV3Driver
from viommud.backend.emulator.caches import ConfigEntry, TlbEntry
from viommud.backend.emulator.objects import ViommuObject

EATS = 1 << 28
VSID_A0, VSID_A1, VSID_UNKNOWN = 8, 9, 10
PAGES = [0x1000_0000 + k * 0x1000 for k in range(8)]
ASIDS = [5, 6, 7]
NH_OPS = [0x10, 0x11, 0x12, 0x13, 0x30]
SID_OPS = [0x40, 0x05, 0x06]
ACCEPTED = {*NH_OPS, *SID_OPS}
U16 = st.integers(0, 0xFFFF)
U64 = st.integers(0, (1 << 64) - 1)


# ======================================================================================
# Scenes: the same host state built twice
# ======================================================================================


@dataclass(frozen=True)
class Fill:
    """One cache fill: a DMA of a0 or a hand-placed IOTLB / config entry."""

    kind: str  # "dma", "iotlb", "config"
    iova: int
    asid: int | None
    tag_delta: int = 0  # IOTLB tag = the vIOMMU's VMID + tag_delta
    walk: bool = True
    global_: bool = False


@dataclass(frozen=True)
class Call:
    """One IOMMU_HWPT_INVALIDATE on the vIOMMU (``entry_len`` 16 unless told)."""

    blob: bytes
    entry_len: int = 16
    entry_num: int | None = None
    short_buffer: bool = False  # the buffer stops one byte short: EFAULT
    data_type: int = ARM_INV
    inject: int = 0  # queue error injected on smmu0 before the call


@dataclass
class Scene:
    rig: Rig
    viommu: int
    vmid: int


def build(*, fast: bool, fills: list[Fill]) -> Scene:
    """a0 (ATS) on a stage-1 vSTE with vSID 8, a1 on a bypass vSTE with vSID 9."""
    rig = Rig()
    if not fast:
        rig.be._drivers[HostIommu.ARM_SMMUV3] = ArmSmmuV3Driver(fast_invalidate=False)
    topo = rig.arm_topology("a0", vsid=VSID_A0)
    a1 = rig.bind("a1")
    assert rig.vdevice(topo.viommu, a1, VSID_A1)[0] == 0
    rc, s1 = rig.arm_nested(topo.dev, topo.viommu, STE_S1, EATS)
    assert rc == 0
    assert rig.attach("a0", s1)[0] == 0
    rc, bypass = rig.arm_nested(a1, topo.viommu, STE_BYPASS)
    assert rc == 0
    assert rig.attach("a1", bypass)[0] == 0
    viommu = rig.be.lookup(topo.viommu)
    assert isinstance(viommu, ViommuObject)
    for fill in fills:
        apply_fill(rig, viommu.vmid, fill)
    testing.clear_issued(rig.be)
    return Scene(rig, topo.viommu, viommu.vmid)


def apply_fill(rig: Rig, vmid: int, fill: Fill) -> None:
    if fill.kind == "dma":
        testing.dma(
            rig.be, "a0", fill.iova, asid=fill.asid or 0, walk=fill.walk, global_=fill.global_
        )
    elif fill.kind == "iotlb":
        entry = TlbEntry(vmid + fill.tag_delta, fill.asid, fill.iova, 0x1000, global_=fill.global_)
        testing.populate_iotlb(rig.be, "smmu0", entry)
    else:
        testing.populate_config(rig.be, "smmu0", ConfigEntry("cd", 0x101, fill.asid or 0))


def invalidate(scene: Scene, call: Call) -> tuple[int, int]:
    rig = scene.rig
    if call.inject:
        testing.inject_cmdq_error(rig.be, "smmu0", call.inject)
    uptr = None
    if call.short_buffer:
        uptr = rig.buf(call.blob[:-1]) if len(call.blob) > 1 else 0
    entry_num = call.entry_num
    if entry_num is None:
        entry_num = len(call.blob) // call.entry_len
    return rig.invalidate(
        scene.viommu, call.blob, call.data_type, call.entry_len, entry_num, uptr=uptr
    )


def observe(scene: Scene) -> dict[str, Any]:
    """Everything an invalidation can change, as plain comparable values."""
    be = scene.rig.be
    model = be.cache_model
    return {
        "issued": {unit: testing.issued(be, unit) for unit in ("smmu0", "smmu1")},
        "iotlb": {unit: list(entries) for unit, entries in model.iotlb.items()},
        "config": {unit: list(entries) for unit, entries in model.config.items()},
        "atc": {dev: list(entries) for dev, entries in model.atc.items()},
        "journal": list(model.journal),
        "pending": {unit: be.unit(unit).pending_error for unit in ("smmu0", "smmu1")},
    }


def run_both(fills: list[Fill], calls: list[Call]) -> tuple[list[Any], list[Any]]:
    outcomes = []
    for fast in (True, False):
        scene = build(fast=fast, fills=fills)
        results = [(invalidate(scene, c), observe(scene)) for c in calls]
        outcomes.append(results)
    return outcomes[0], outcomes[1]


# ======================================================================================
# Strategies
# ======================================================================================


@st.composite
def nh_command(draw: st.DrawFn) -> bytes:
    """A TLBI_NH_* / NSNH_ALL with a guest VMID to be overwritten and random other bits."""
    op = draw(st.sampled_from(NH_OPS))
    asid = draw(st.one_of(st.sampled_from(ASIDS), U16))
    low = draw(st.integers(0, 0xFF_FFFF)) << 8  # NUM, SCALE and reserved bits 31:8
    w0 = op | low | draw(U16) << 32 | asid << 48
    addr = draw(st.sampled_from(PAGES))
    tg, ttl, leaf = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.booleans())
    w1 = draw(st.one_of(st.just(addr | tg << 10 | ttl << 8 | int(leaf)), U64))
    return cmd(w0, w1)


@st.composite
def other_command(draw: st.DrawFn) -> bytes:
    """A SID command (known or unknown vSID) or an opcode the kernel rejects."""
    if draw(st.booleans()):
        op = draw(st.sampled_from(SID_OPS))
        vsid = draw(st.sampled_from([VSID_A0, VSID_A1, VSID_UNKNOWN]))
        w0 = op | draw(st.integers(0, 0xFF_FFFF)) << 8 | vsid << 32
        return cmd(w0, draw(st.one_of(st.sampled_from(PAGES), U64)))
    op = draw(st.integers(0, 0xFF).filter(lambda o: o not in ACCEPTED))
    return cmd(op | draw(U64) & ~0xFF, draw(U64))


@st.composite
def command_array(draw: st.DrawFn) -> bytes:
    """Mostly TLBI_NH_*, several 63-groups long, with a few other commands spliced in."""
    n = draw(st.integers(1, 260))
    seed = draw(nh_command())
    variants = draw(st.lists(nh_command(), min_size=1, max_size=8))
    entries = [variants[i % len(variants)] if i % 5 else seed for i in range(n)]
    for index, other in draw(st.lists(st.tuples(st.integers(0, n - 1), other_command()))):
        entries[index] = other
    return b"".join(entries)


FILL = st.one_of(
    st.builds(
        Fill,
        kind=st.just("dma"),
        iova=st.sampled_from(PAGES),
        asid=st.sampled_from(ASIDS),
        walk=st.booleans(),
        global_=st.booleans(),
    ),
    st.builds(
        Fill,
        kind=st.just("iotlb"),
        iova=st.sampled_from(PAGES),
        asid=st.one_of(st.none(), st.sampled_from(ASIDS)),
        tag_delta=st.integers(0, 2),
        global_=st.booleans(),
    ),
    st.builds(Fill, kind=st.just("config"), iova=st.just(0), asid=st.sampled_from(ASIDS)),
)

INJECT = st.sampled_from([0, 0, 0, errno.ETIMEDOUT, errno.EIO])


@st.composite
def invalidate_call(draw: st.DrawFn) -> Call:
    blob = draw(command_array())
    shape = draw(st.sampled_from(["plain"] * 6 + ["len8", "len24", "short", "type", "num0"]))
    inject = draw(INJECT)
    if shape == "len8":
        return Call(blob, entry_len=8, inject=inject)
    if shape == "len24":
        return Call(blob + bytes(-len(blob) % 24), entry_len=24, inject=inject)
    if shape == "short":
        return Call(blob, short_buffer=True, inject=inject)
    if shape == "type":
        return Call(blob, data_type=ARM_INV + 1, inject=inject)
    if shape == "num0":
        return Call(blob, entry_num=0, inject=inject)
    return Call(blob, inject=inject)


# ======================================================================================
# Property: the two paths cannot be told apart
# ======================================================================================


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    fills=st.lists(FILL, max_size=12),
    calls=st.lists(invalidate_call(), min_size=1, max_size=3),
)
def test_fast_path_matches_reference(fills: list[Fill], calls: list[Call]) -> None:
    fast, reference = run_both(fills, calls)
    assert fast == reference


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    fills=st.lists(FILL, min_size=1, max_size=12),
    blob=command_array(),
    inject=INJECT,
)
def test_fast_path_matches_reference_with_populated_caches(
    fills: list[Fill], blob: bytes, inject: int
) -> None:
    """Only NH commands, so the vectorised walk takes the whole array whenever it can."""
    n = len(blob) // 16
    clean = b"".join(
        raw if raw[0] in NH_OPS else cmd(0x12, PAGES[0])
        for raw in (blob[i * 16 : i * 16 + 16] for i in range(n))
    )
    fast, reference = run_both(fills, [Call(clean, inject=inject)])
    assert fast == reference


# ======================================================================================
# The vectorised walk is really taken
# ======================================================================================


def tlbi_va(i: int) -> bytes:
    return cmd(0x12 | (i % 97) << 48 | 0xABCD << 32, (i + 1) << 12)


def forbid_reference_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> tuple[int, int]:
        raise AssertionError("the per-entry walk was taken")

    monkeypatch.setattr(ArmSmmuV3Driver, "_invalidate_entries", fail)


def test_clean_tlbi_array_takes_the_vectorised_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    scene = build(fast=True, fills=[])
    forbid_reference_walk(monkeypatch)
    blob = b"".join(tlbi_va(i) for i in range(1000))
    assert invalidate(scene, Call(blob)) == (0, 1000)
    issued = testing.issued(scene.rig.be, "smmu0")
    assert len(issued) == 1000 + 16  # 16 groups (15 x 63 + 55), each with a CMD_SYNC
    assert issued[:2] == [
        cmd(0x12 | scene.vmid << 32, 1 << 12),
        cmd(0x12 | 1 << 48 | 1 << 32, 2 << 12),
    ]
    assert issued[63] == SYNC


def test_cache_walk_is_skipped_only_when_nothing_can_be_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other_vmid = Fill("iotlb", PAGES[0], 5, tag_delta=1)
    stage2 = Fill("iotlb", PAGES[0], None)
    scene = build(fast=True, fills=[other_vmid, stage2])
    applied: list[int] = []
    monkeypatch.setattr(
        scene.rig.be, "apply_host_commands", lambda unit, group: applied.append(len(group))
    )
    blob = b"".join(tlbi_va(i) for i in range(100))
    assert invalidate(scene, Call(blob)) == (0, 100)
    assert applied == []  # neither entry is a stage-1 entry of the vIOMMU's VMID
    apply_fill(scene.rig, scene.vmid, Fill("dma", PAGES[1], 5))
    assert invalidate(scene, Call(blob)) == (0, 100)
    assert applied == [63, 37]


def test_other_command_hands_over_at_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """CFGI_STE at 130: groups 0..125 go vectorised, the reference walk starts at 126."""
    scene = build(fast=True, fills=[])
    bases: list[int] = []
    reference = ArmSmmuV3Driver._invalidate_entries

    def spy(
        self: ArmSmmuV3Driver, core: Any, viommu: Any, cmds: list[Any], base: int = 0
    ) -> tuple[int, int]:
        bases.append(base)
        assert len(cmds) == 200 - base
        return reference(self, core, viommu, cmds, base)

    monkeypatch.setattr(ArmSmmuV3Driver, "_invalidate_entries", spy)
    blob = b"".join(cmd(0x03) if i == 130 else tlbi_va(i) for i in range(200))
    assert invalidate(scene, Call(blob)) == (errno.EIO, 130)
    assert bases == [126]
    assert testing.issued(scene.rig.be, "smmu0").count(SYNC) == 2


def test_injected_queue_error_in_the_vectorised_walk() -> None:
    scene = build(fast=True, fills=[])
    blob = b"".join(tlbi_va(i) for i in range(200))
    assert invalidate(scene, Call(blob, inject=errno.ETIMEDOUT)) == (errno.ETIMEDOUT, 62)
    assert len(testing.issued(scene.rig.be, "smmu0")) == 64  # the failing group reached the queue


def test_nsnh_all_rewrite_clears_every_other_bit() -> None:
    scene = build(fast=True, fills=[])
    dirty = cmd(0x30 | 0xFFFF_FFFF_FFFF_FF00, (1 << 64) - 1)
    assert invalidate(scene, Call(dirty * 2)) == (0, 2)
    want = cmd(0x10 | scene.vmid << 32)
    assert testing.issued(scene.rig.be, "smmu0") == [want, want, SYNC]
