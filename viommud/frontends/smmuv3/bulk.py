"""Screening many SMMUv3 doorbells at once, for group commit (docs/coalescing.md §group).

``screen(doorbells, features)`` decodes the commands of a list of doorbells with a few numpy
operations over all of them, and marks each doorbell *plain* when:

* every command is a TLB invalidation the vSMMU forwards unchanged (TLBI_NH_ALL,
  TLBI_NH_ASID, TLBI_NH_VA, TLBI_NH_VAA, TLBI_NSNH_ALL) or a CMD_SYNC, and
* none of them breaks a rule the frontend checks (SMMUv3 §4.1.3): reserved bits (the same
  ``DEFINED`` masks), the range encodings of §4.4.1.1 (``SmmuV3Frontend._check_range``) and
  CMD_SYNC CS=0b11. None of these opcodes has an SSec bit.

A plain doorbell cannot raise a CERROR by itself and changes no configuration: its only
effects are TLB work and completed syncs, so the work of consecutive plain doorbells can
share host calls. Everything else — and any doorbell the frontend would refuse or answer
with an error — goes through ``SmmuV3Frontend`` one doorbell at a time; this module only
decides, it never words an error. A test holds it to the frontend on random doorbells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocols.smmuv3 import Opcode
from viommud.frontends.smmuv3.decode import DEFINED
from viommud.frontends.smmuv3.frontend import CMD_SIZE, SmmuFeatures

U64 = npt.NDArray[np.uint64]

PLAIN_TLB_OPS = (
    Opcode.TLBI_NH_ALL,
    Opcode.TLBI_NH_ASID,
    Opcode.TLBI_NH_VA,
    Opcode.TLBI_NH_VAA,
    Opcode.TLBI_NSNH_ALL,
)
_SYNC = int(Opcode.CMD_SYNC)
_VA, _VAA = int(Opcode.TLBI_NH_VA), int(Opcode.TLBI_NH_VAA)


def _tables() -> tuple[npt.NDArray[np.bool_], U64, U64]:
    plain = np.zeros(256, dtype=np.bool_)
    reserved0 = np.full(256, 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    reserved1 = np.full(256, 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    for op in (*PLAIN_TLB_OPS, Opcode.CMD_SYNC):
        m0, m1 = DEFINED[op]
        plain[op] = True
        reserved0[op] = ~m0 & 0xFFFFFFFFFFFFFFFF
        reserved1[op] = ~m1 & 0xFFFFFFFFFFFFFFFF
    return plain, reserved0, reserved1


_PLAIN, _RESERVED0, _RESERVED1 = _tables()


@dataclass(frozen=True, slots=True)
class Screen:
    """The decoded commands of a list of doorbells and which of them are plain.

    Doorbell ``k`` owns rows ``starts[k]:starts[k + 1]`` of ``words`` (W0, W1 per row);
    a doorbell that is empty or not a whole number of commands owns no rows and is never
    plain (the frontend refuses or answers it)."""

    words: U64  # shape (commands, 2)
    opcodes: npt.NDArray[np.intp]
    starts: list[int]
    plain: list[bool]
    syncs: list[int]  # CMD_SYNCs per doorbell (meaningful for plain ones)

    def rows(self, first: int, stop: int) -> tuple[int, int]:
        """The row span of doorbells ``first`` to ``stop - 1``."""
        return self.starts[first], self.starts[stop]


def screen(doorbells: list[bytes], features: SmmuFeatures) -> Screen:
    whole = [bool(d) and len(d) % CMD_SIZE == 0 for d in doorbells]
    starts = [0]
    for data, ok in zip(doorbells, whole, strict=True):
        starts.append(starts[-1] + (len(data) // CMD_SIZE if ok else 0))
    blob = b"".join(d for d, ok in zip(doorbells, whole, strict=True) if ok)
    words = np.frombuffer(blob, dtype="<u8").reshape(-1, 2)
    w0, w1 = words[:, 0], words[:, 1]
    ops = (w0 & np.uint64(0xFF)).astype(np.intp)
    good = _PLAIN[ops]
    good &= ((w0 & _RESERVED0[ops]) | (w1 & _RESERVED1[ops])) == 0
    is_sync = ops == _SYNC
    good &= ~(is_sync & (((w0 >> np.uint64(12)) & np.uint64(3)) == 3))
    good &= ~_bad_range(ops, w0, w1, features)
    bad_before = np.concatenate(([0], np.cumsum(~good))).tolist()
    syncs_before = np.concatenate(([0], np.cumsum(is_sync))).tolist()
    plain, syncs = [], []
    for k, ok in enumerate(whole):
        lo, hi = starts[k], starts[k + 1]
        plain.append(ok and bad_before[hi] == bad_before[lo])
        syncs.append(syncs_before[hi] - syncs_before[lo])
    return Screen(words, ops, starts, plain, syncs)


def _bad_range(
    ops: npt.NDArray[np.intp], w0: U64, w1: U64, features: SmmuFeatures
) -> npt.NDArray[np.bool_]:
    """TLBI_NH_VA/VAA range encodings the frontend refuses (§4.4.1.1, IDR3.RIL)."""
    num = (w0 >> np.uint64(12)) & np.uint64(0x1F)
    scale = (w0 >> np.uint64(20)) & np.uint64(0x1F)
    ttl = (w1 >> np.uint64(8)) & np.uint64(3)
    tg = (w1 >> np.uint64(10)) & np.uint64(3)
    ranged = tg != 0
    bad = ~ranged & ((num | scale | ttl) != 0)
    if not features.ril:
        bad |= ranged
    bad |= ranged & ((num | scale | ttl) == 0)
    bad |= (tg == 2) & (ttl == 1)
    refused: npt.NDArray[np.bool_] = ((ops == _VA) | (ops == _VAA)) & bad
    return refused
