"""``IOMMU_HWPT_INVALIDATE`` with an argument of exactly the kernel's struct size takes
``HwptIoctls._hwpt_invalidate_exact`` (fields unpacked straight from the argument) instead
of the general dispatch (``copy_cmd_from_user``, the decoded struct, ``Call``). Two
emulators built identically, one with that path switched off, get the same raw arguments:
errno, the argument as written back, the host queues, caches and journal must match.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import iommufd as uapi
from tests.backend.test_arm_invalidate_fastpath import (
    FILL,
    INJECT,
    Fill,
    Scene,
    build,
    command_array,
    observe,
)
from tests.backend.test_emulated import ARM_INV
from viommud.backend.emulator import kernel, testing

FORMAT = uapi.HwptInvalidate.FORMAT
U32 = st.integers(0, (1 << 32) - 1)


def _ids(scene: Scene) -> list[int]:
    """Every live object's id, then one that names nothing."""
    ids = [obj_id for obj_id, _kind in scene.rig.be.live_objects()]
    return [*ids, max(ids) + 1]


@dataclass(frozen=True)
class RawCall:
    """One raw IOMMU_HWPT_INVALIDATE argument: ``which`` object (-1: the vIOMMU, else an
    index into ``_ids``), where ``data_uptr`` points, the other fields as written, the
    argument's length past the struct (``delta``) and a queue error injected first."""

    which: int
    uptr: str
    data_type: int
    entry_len: int
    entry_num: int
    reserved: int
    size: int
    delta: int
    inject: int


@st.composite
def raw_call(draw: st.DrawFn) -> RawCall:
    """Each field mostly what ``Iommufd.invalidate_array`` passes, at times not."""

    def mostly(valid: Any, *others: Any) -> Any:
        return draw(st.sampled_from([valid] * (3 * len(others)) + list(others)))

    return RawCall(
        which=mostly(-1, *range(12)),
        uptr=mostly("buffer", "null", "unmapped", "short"),
        data_type=mostly(ARM_INV, ARM_INV + 1, 0),
        entry_len=mostly(16, 0, 8, 24, 32),
        entry_num=draw(st.one_of(st.integers(0, 140), st.integers(0, 140), U32)),
        reserved=mostly(0, 1, 1 << 31),
        size=mostly(32, 24, 40, 4),
        delta=mostly(0, 8, -1),
        inject=draw(INJECT),
    )


def invalidate_raw(scene: Scene, call: RawCall, blob: bytes) -> tuple[int, bytes]:
    rig = scene.rig
    ids = _ids(scene)
    hwpt_id = scene.viommu if call.which < 0 else ids[call.which % len(ids)]
    if call.inject:
        testing.inject_cmdq_error(rig.be, "smmu0", call.inject)
    if call.uptr == "null" or not blob:
        uptr = 0
    elif call.uptr == "unmapped":
        uptr = 0x7000_0000_0000
    elif call.uptr == "short":
        uptr = rig.buf(blob[:-1]) if len(blob) > 1 else 0
    else:
        uptr = rig.buf(blob)
    entry_num = call.entry_num
    if call.entry_len == 16 and len(blob) // 16 < entry_num <= 140:
        entry_num = len(blob) // 16  # else as drawn: a huge count, whatever its errno
    arg = bytearray(
        FORMAT.pack(
            call.size, hwpt_id, uptr, call.data_type, call.entry_len, entry_num, call.reserved
        )
    )
    if call.delta > 0:
        arg += bytes(call.delta)
    elif call.delta < 0:
        del arg[call.delta :]
    rc = rig.be.ioctl(rig.be.iommufd, uapi.IOMMU_HWPT_INVALIDATE, arg)
    return rc, bytes(arg)


def run(fills: list[Fill], calls: list[tuple[RawCall, bytes]], *, exact: bool) -> list[object]:
    scene = build(fast=True, fills=fills)
    out: list[object] = []
    with pytest.MonkeyPatch.context() as patch:
        if not exact:
            patch.setattr(kernel, "INVALIDATE_SIZE", -1)  # every argument: the general path
        for call, blob in calls:
            out.append((invalidate_raw(scene, call, blob), observe(scene)))
    return out


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    fills=st.lists(FILL, max_size=8),
    calls=st.lists(st.tuples(raw_call(), command_array()), min_size=1, max_size=3),
)
def test_exact_size_path_matches_the_general_dispatch(
    fills: list[Fill], calls: list[tuple[RawCall, bytes]]
) -> None:
    assert run(fills, calls, exact=True) == run(fills, calls, exact=False)


def test_exact_size_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argument ``Iommufd.invalidate_array`` passes skips ``copy_cmd_from_user``."""
    scene = build(fast=True, fills=[])

    def fail(*args: object) -> object:
        raise AssertionError("the general dispatch was taken")

    monkeypatch.setattr(kernel, "copy_cmd_from_user", fail)
    blob = struct.pack("<QQ", 0x12, 0x1000)
    call = RawCall(-1, "buffer", ARM_INV, 16, 1, 0, 32, 0, 0)
    rc, arg = invalidate_raw(scene, call, blob)
    assert (rc, struct.unpack_from("<I", arg, 24)[0]) == (0, 1)
    assert testing.issued(scene.rig.be, "smmu0")[0] == struct.pack(
        "<QQ", 0x12 | scene.vmid << 32, 0x1000
    )
