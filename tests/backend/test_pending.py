"""``kernel="pending"``: the queued for-next invalidation series (iommufd.md §2.7, §3.6).

Each test sets the pending behaviour next to mainline's, so the switch is visibly the only
difference: ARM zero-length arrays probe the type, chunks of 63 are all-or-nothing and the
written-back count holds only commands actually issued, and every command is checked field
by field (EIO for any bit its opcode does not define).
"""

from __future__ import annotations

import errno

import pytest

from tests.backend.test_emulated import ARM_INV, SYNC, Rig, cmd
from viommud.backend.emulator import testing
from viommud.backend.emulator.kernel import EmulatedIommufd

VMID = 1  # the first nesting parent on smmu0
PSID = 0x100  # a0's physical StreamID


def scene(kernel: str) -> tuple[Rig, int]:
    rig = Rig(kernel=kernel)
    topo = rig.arm_topology("a0", vsid=8)
    return rig, topo.viommu


def test_unknown_kernel_is_refused() -> None:
    from tests.backend.test_emulated import HOST

    with pytest.raises(ValueError, match="kernel"):
        EmulatedIommufd(HOST, kernel="6.8")


@pytest.mark.parametrize(("kernel", "expected"), [("mainline", errno.EINVAL), ("pending", 0)])
def test_empty_array(kernel: str, expected: int) -> None:
    rig, viommu = scene(kernel)
    assert rig.invalidate(viommu, b"", ARM_INV, 16, 0) == (expected, 0)
    assert rig.invalidate(viommu, b"", ARM_INV + 7, 16, 0) == (errno.EINVAL, 0)


@pytest.mark.parametrize(
    ("kernel", "expected", "issued"),
    [
        ("mainline", (errno.EIO, 70), 63),  # 63..69 counted, never issued
        ("pending", (errno.EIO, 63), 63),
    ],
)
def test_bad_command_in_the_second_chunk(
    kernel: str, expected: tuple[int, int], issued: int
) -> None:
    rig, viommu = scene(kernel)
    cmds = [cmd(0x11 | (i << 48)) for i in range(70)] + [cmd(0x03)] + [cmd(0x11)] * 9
    assert rig.invalidate(viommu, b"".join(cmds), ARM_INV, 16) == expected
    queue = testing.issued(rig.be, "smmu0")
    assert len(queue) == issued + 1
    assert queue[-1] == SYNC


def test_pending_chunks_of_63() -> None:
    rig, viommu = scene("pending")
    cmds = [cmd(0x11 | (i << 48)) for i in range(130)]
    assert rig.invalidate(viommu, b"".join(cmds), ARM_INV, 16) == (0, 130)
    queue = testing.issued(rig.be, "smmu0")
    assert [i for i, raw in enumerate(queue) if raw == SYNC] == [63, 127, 132]


def test_pending_copy_fault_in_a_later_chunk_keeps_the_earlier_ones() -> None:
    rig, viommu = scene("pending")
    blob = b"".join(cmd(0x11) for _ in range(70))
    uptr = rig.buf(blob)
    # 100 entries of which only 70 are mapped: chunk 1 copies, chunk 2 faults
    assert rig.invalidate(viommu, b"", ARM_INV, 16, 100, uptr=uptr) == (errno.EFAULT, 63)


STRICT = {
    # (cmd0, cmd1): pending answer; mainline forwards them all
    "nsnh-all-extra-bit": (0x30 | (1 << 40), 0),
    "nh-all-asid": (0x10 | (5 << 48), 0),
    "nh-all-word1": (0x10, 1),
    "nh-asid-num": (0x11 | (1 << 12), 0),
    "nh-va-tg0-with-num": (0x12 | (1 << 12), 0x1000),
    "nh-va-tg0-with-ttl": (0x12, 0x1000 | (3 << 8)),
    "nh-va-16k-ttl1": (0x12 | (1 << 12), 0x1000 | (1 << 8) | (2 << 10)),
    "nh-va-range-no-hint": (0x12, 0x1000 | (1 << 10)),
    "nh-va-reserved-w0": (0x12 | (1 << 8), 0x1000),
    "nh-vaa-asid": (0x13 | (5 << 48), 0x1000),
    "atc-size-53": (0x40 | (8 << 32), 53),
    "atc-ssec": (0x40 | (8 << 32) | (1 << 10), 0),
    "cfgi-cd-word1": (0x05 | (8 << 32), 2),
    "cfgi-cd-all-ssid": (0x06 | (8 << 32) | (1 << 12), 0),
}


@pytest.mark.parametrize(("w0", "w1"), STRICT.values(), ids=STRICT.keys())
def test_strict_field_validation(w0: int, w1: int) -> None:
    rig, viommu = scene("pending")
    assert rig.invalidate(viommu, cmd(w0, w1), ARM_INV, 16) == (errno.EIO, 0)
    assert testing.issued(rig.be, "smmu0") == []
    rig, viommu = scene("mainline")
    assert rig.invalidate(viommu, cmd(w0, w1), ARM_INV, 16) == (0, 1)


ACCEPTED = {
    "nsnh-all": (0x30, 0, cmd(0x10 | (VMID << 32))),
    "nh-asid": (0x11 | (5 << 48), 0, cmd(0x11 | (VMID << 32) | (5 << 48))),
    "nh-va-single": (
        0x12 | (5 << 48),
        0x1000_0001,
        cmd(0x12 | (VMID << 32) | (5 << 48), 0x1000_0001),
    ),
    "nh-va-range-ttl": (
        0x12 | (3 << 12),
        0x1000 | (3 << 8) | (1 << 10),
        cmd(0x12 | (VMID << 32) | (3 << 12), 0x1000 | (3 << 8) | (1 << 10)),
    ),
    "atc-all": (
        0x40 | (8 << 32) | (1 << 11) | (3 << 12),
        52,
        cmd(0x40 | (PSID << 32) | (1 << 11) | (3 << 12), 52),
    ),
    "cfgi-cd-leaf": (0x05 | (8 << 32) | (2 << 12), 1, cmd(0x05 | (PSID << 32) | (2 << 12), 1)),
}


@pytest.mark.parametrize(("w0", "w1", "host"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_strict_validation_accepts_defined_fields(w0: int, w1: int, host: bytes) -> None:
    rig, viommu = scene("pending")
    assert rig.invalidate(viommu, cmd(w0, w1), ARM_INV, 16) == (0, 1)
    assert testing.issued(rig.be, "smmu0") == [host, SYNC]


def test_pending_hardware_failure_counts_only_completed_chunks() -> None:
    rig, viommu = scene("pending")
    testing.inject_cmdq_error(rig.be, "smmu0")
    assert rig.invalidate(viommu, b"".join(cmd(0x11) for _ in range(5)), ARM_INV, 16) == (
        errno.ETIMEDOUT,
        0,
    )
