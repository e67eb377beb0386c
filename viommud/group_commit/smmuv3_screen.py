"""Screening many SMMUv3 doorbells at once, for group commit (docs/coalescing.md §group).

``screen(doorbells, features)`` decodes the commands of a list of doorbells with a few numpy
operations over all of them, and marks each doorbell *plain* when:

* every command is a TLB invalidation the vSMMU forwards unchanged (``TLBI_OPS``:
  TLBI_NH_ALL, TLBI_NH_ASID, TLBI_NH_VA, TLBI_NH_VAA, TLBI_NSNH_ALL) or a CMD_SYNC, and
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
from itertools import accumulate, pairwise

import numpy as np
import numpy.typing as npt

from protocols.smmuv3 import COMMAND_SIZE, TLBI_OPS, TLBI_RANGE_OPS, Opcode
from viommud.frontends.smmuv3.frontend import SmmuFeatures
from viommud.guest.smmuv3 import COMMAND, DEFINED

U64 = npt.NDArray[np.uint64]

_SYNC = int(Opcode.CMD_SYNC)  # ops are intp: compare with plain ints, not IntEnum members


def _tables() -> tuple[npt.NDArray[np.bool_], U64, U64]:
    plain = np.zeros(256, dtype=np.bool_)
    reserved0 = np.full(256, 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    reserved1 = np.full(256, 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    for op in (*TLBI_OPS, _SYNC):
        m0, m1 = DEFINED[op]
        plain[op] = True
        reserved0[op] = ~m0 & 0xFFFFFFFFFFFFFFFF
        reserved1[op] = ~m1 & 0xFFFFFFFFFFFFFFFF
    return plain, reserved0, reserved1


_PLAIN, _RESERVED0, _RESERVED1 = _tables()
_RANGED = np.zeros(256, dtype=np.bool_)  # TLBI_RANGE_OPS, by opcode
_RANGED[sorted(TLBI_RANGE_OPS)] = True
_RESERVED = {int(op): (int(_RESERVED0[op]), int(_RESERVED1[op])) for op in np.flatnonzero(_PLAIN)}


@dataclass(frozen=True, slots=True)
class Screen:
    """The decoded commands of a list of doorbells and which of them are plain.

    Doorbell ``k`` owns commands ``starts[k]:starts[k + 1]`` of ``blob``; a doorbell that
    is empty or not a whole number of commands owns none and is never plain (the frontend
    refuses or answers it)."""

    blob: bytes  # the commands of every whole doorbell, back to back
    starts: list[int]
    plain: list[bool]
    syncs: list[int]  # CMD_SYNCs per doorbell (meaningful for plain ones)

    def commands(self, first: int, stop: int) -> bytes:
        """The commands of doorbells ``first`` to ``stop - 1``."""
        return self.blob[self.starts[first] * COMMAND_SIZE : self.starts[stop] * COMMAND_SIZE]


# Below this many commands a plain loop is faster than numpy's per-call overhead (a few
# dozen calls of ~1 µs each); both are held to the frontend by the same property test.
SMALL = 64


def screen(doorbells: list[bytes], features: SmmuFeatures, *, small: int = SMALL) -> Screen:
    counts = [len(d) // COMMAND_SIZE if d and not len(d) % COMMAND_SIZE else 0 for d in doorbells]
    starts = [0, *accumulate(counts)]
    blob = b"".join(d for d, n in zip(doorbells, counts, strict=True) if n)
    if starts[-1] < small:
        bad_before, syncs_before = _check_each(blob, features)
        bad = [bad_before[i] for i in starts]
        ahead = [syncs_before[i] for i in starts]
    else:
        bad, ahead = _check_all(blob, starts, features)
    plain = [n > 0 and a == b for n, (a, b) in zip(counts, pairwise(bad), strict=True)]
    syncs = [b - a for a, b in pairwise(ahead)]
    return Screen(blob, starts, plain, syncs)


def _check_all(
    blob: bytes, starts: list[int], features: SmmuFeatures
) -> tuple[list[int], list[int]]:
    """How many refused commands and CMD_SYNCs come before each of ``starts``."""
    words = np.frombuffer(blob, dtype="<u8").reshape(-1, 2)
    w0, w1 = words[:, 0], words[:, 1]
    ops = (w0 & np.uint64(0xFF)).astype(np.intp)
    good = _PLAIN[ops]
    good &= ((w0 & _RESERVED0[ops]) | (w1 & _RESERVED1[ops])) == 0
    is_sync = ops == _SYNC
    good &= ~(is_sync & (((w0 >> np.uint64(12)) & np.uint64(3)) == 3))
    good &= ~_bad_range(ops, w0, w1, features)
    at = np.asarray(starts)
    bad: list[int] = np.concatenate(([0], np.cumsum(~good)))[at].tolist()
    ahead: list[int] = np.concatenate(([0], np.cumsum(is_sync)))[at].tolist()
    return bad, ahead


def _check_each(blob: bytes, features: SmmuFeatures) -> tuple[list[int], list[int]]:
    """Running counts (from 0, one per command) of refused commands and of CMD_SYNCs, one
    command at a time, for a few commands."""
    reserved, refused = _RESERVED, _RANGE_REFUSED_LISTS[features.ril]
    bad_before, syncs_before = [0], [0]
    bad = syncs = 0
    for w0, w1 in COMMAND.iter_unpack(blob):
        op = w0 & 0xFF
        rule = reserved.get(op)
        if rule is None or w0 & rule[0] or w1 & rule[1]:
            bad += 1
        elif op == _SYNC:
            syncs += 1
            bad += (w0 >> 12) & 3 == 3
        elif op in TLBI_RANGE_OPS:
            bad += refused[((w1 >> 8) & 0xF) << 1 | ((w0 >> 12) & 0x1F1F != 0)]
        bad_before.append(bad)
        syncs_before.append(syncs)
    return bad_before, syncs_before


# From this many commands ``plain_syncs`` screens a doorbell with a few C-level operations
# over the whole of it (``_plain_syncs_wide``) instead of one command at a time.
WIDE = 4
_ONE_BY_ONE = 1 << 62  # ``wide`` for the command-by-command loop whatever the size


def plain_syncs(data: bytes, ril: bool, wide: int = WIDE * COMMAND_SIZE) -> int:
    """One doorbell screened as ``screen`` screens each (the per-doorbell fast path of
    ``SmmuV3Viommu.doorbell``): its number of CMD_SYNCs when it is plain, else -1. The same
    rules as ``_check_each``, stopping at the first command that is not plain; a doorbell
    of ``wide`` bytes (``WIDE`` commands) or more is checked all at once
    (``_plain_syncs_wide``)."""
    if not data or len(data) % COMMAND_SIZE:
        return -1
    if len(data) >= wide:
        return _plain_syncs_wide(data, ril)
    reserved, refused = _RESERVED, _RANGE_REFUSED_LISTS[ril]
    syncs = 0
    for w0, w1 in COMMAND.iter_unpack(data):
        op = w0 & 0xFF
        rule = reserved.get(op)
        if rule is None or w0 & rule[0] or w1 & rule[1]:
            return -1
        if op == _SYNC:
            if (w0 >> 12) & 3 == 3:
                return -1
            syncs += 1
        elif op in TLBI_RANGE_OPS and refused[((w1 >> 8) & 0xF) << 1 | ((w0 >> 12) & 0x1F1F != 0)]:
            return -1
    return syncs


def _mask_chunks() -> tuple[bytes, list[bytes], list[bytes]]:
    """Plain opcodes (as bytes, for ``bytes.translate``) and, per opcode, the 16 bytes of a
    command whose set bits ``_plain_syncs_wide`` wants clear: the reserved bits and, for
    TLBI_NH_VA/VAA, NUM, SCALE (W0[16:12], W0[24:20]), TTL and TG (W1[11:8]); then the
    reserved bits alone."""
    chunks = [bytes(COMMAND_SIZE)] * 256
    reserved = [bytes(COMMAND_SIZE)] * 256
    for op, (r0, r1) in _RESERVED.items():
        ranged = op in TLBI_RANGE_OPS
        fields0 = 0x1F << 12 | 0x1F << 20 if ranged else 0
        fields1 = 0xF << 8 if ranged else 0
        chunks[op] = COMMAND.pack(r0 | fields0, r1 | fields1)
        reserved[op] = COMMAND.pack(r0, r1)
    return bytes(sorted(_RESERVED)), chunks, reserved


_PLAIN_OPS, _MASK_CHUNKS, _RESERVED_CHUNKS = _mask_chunks()
# The masks of the opcode sequences seen (a guest's large doorbells come in a few shapes,
# and building one costs more than the check), up to a bound on their number and size.
_MASKS: dict[bytes, int] = {}
_RESERVED_MASKS: dict[bytes, int] = {}
_MASKS_KEPT = 256
_MASK_KEPT_COMMANDS = 1024
_SYNC_BYTE = bytes([_SYNC])
# TLBI_NH_VA/VAA opcodes -> 1, others -> 0 (a ``bytes.translate`` table)
_RANGE_OP_FLAGS = bytes(int(op in TLBI_RANGE_OPS) for op in range(256))


def _ril_unsure_flags() -> bytes:
    """W1 byte 1 (TG W1[11:10], TTL W1[9:8] in its low nibble) -> 0 when, with RIL, the
    range encoding is valid whatever NUM and SCALE are, else 1 (a ``bytes.translate``
    table): TG != 0 with TTL != 0, and not TG = 2 (16 KiB) with TTL = 1 (§4.4.1.1)."""
    refused = _RANGE_REFUSED_LISTS[True]
    return bytes(
        int(bool(refused[(b & 0xF) << 1] or refused[(b & 0xF) << 1 | 1])) for b in range(256)
    )


def _plain_syncs_wide(data: bytes, ril: bool) -> int:
    """``plain_syncs`` for a whole doorbell at once: its opcodes are every 16th byte;
    its reserved bits, and the range fields of its TLBI_NH_VA/VAA, are one AND of the
    doorbell as an integer with a mask laid out command by command. A range field set
    is refused without RIL (``_range_table``) and may be valid with it: then the reserved
    bits alone are one more AND, and a TLBI_NH_VA/VAA whose TG and TTL make any NUM and
    SCALE valid (``_RIL_UNSURE``: every command's W1 byte 1 translated, ANDed with its
    opcode's ``_RANGE_OP_FLAGS``) needs no more; any other range TLBI sends the commands
    through the one-by-one loop. CMD_SYNC CS (W0[13:12], byte 1 bits 5:4) is checked per
    sync."""
    ops = data[::COMMAND_SIZE]
    if ops.translate(None, _PLAIN_OPS):
        return -1  # an opcode that is not plain
    mask = _MASKS.get(ops)
    keep = len(_MASKS) < _MASKS_KEPT and len(ops) <= _MASK_KEPT_COMMANDS
    if mask is None:
        mask = int.from_bytes(b"".join(map(_MASK_CHUNKS.__getitem__, ops)), "little")
        if keep:
            _MASKS[ops] = mask
    value = int.from_bytes(data, "little")
    if value & mask:
        if not ril:
            return -1
        reserved = _RESERVED_MASKS.get(ops)
        if reserved is None:
            reserved = int.from_bytes(b"".join(map(_RESERVED_CHUNKS.__getitem__, ops)), "little")
            if keep:
                _RESERVED_MASKS[ops] = reserved
        if value & reserved:
            return -1  # a reserved bit set: refused whatever the range fields
        unsure = int.from_bytes(data[9::COMMAND_SIZE].translate(_RIL_UNSURE), "little")
        if unsure & int.from_bytes(ops.translate(_RANGE_OP_FLAGS), "little"):
            return plain_syncs(data, ril, _ONE_BY_ONE)
    syncs = ops.count(_SYNC_BYTE)
    at = ops.find(_SYNC_BYTE)
    while at >= 0:
        if data[at * COMMAND_SIZE + 1] & 0x30 == 0x30:
            return -1
        at = ops.find(_SYNC_BYTE, at + 1)
    return syncs


def _range_table(ril: bool) -> npt.NDArray[np.bool_]:
    """Refused TLBI_NH_VA/VAA range encodings (§4.4.1.1, IDR3.RIL), indexed by
    TG << 3 | TTL << 1 | (NUM or SCALE non-zero), as ``SmmuV3Frontend._check_range`` rules."""
    table = np.zeros(32, dtype=np.bool_)
    for tg in range(4):
        for ttl in range(4):
            for sized in (0, 1):
                if tg == 0:
                    bad = bool(sized or ttl)
                else:
                    bad = not ril or (ttl == 0 and not sized) or (tg == 2 and ttl == 1)
                table[tg << 3 | ttl << 1 | sized] = bad
    return table


_RANGE_REFUSED = {True: _range_table(True), False: _range_table(False)}
_RANGE_REFUSED_LISTS = {ril: table.tolist() for ril, table in _RANGE_REFUSED.items()}
_RIL_UNSURE = _ril_unsure_flags()


def _bad_range(
    ops: npt.NDArray[np.intp], w0: U64, w1: U64, features: SmmuFeatures
) -> npt.NDArray[np.bool_]:
    """TLBI_NH_VA/VAA commands whose range encoding the frontend refuses."""
    sized = ((w0 >> np.uint64(12)) & np.uint64(0x1F1F)) != 0  # NUM W0[16:12], SCALE W0[24:20]
    key = (((w1 >> np.uint64(8)) & np.uint64(0xF)) << np.uint64(1)).astype(np.intp) | sized
    refused: npt.NDArray[np.bool_] = _RANGE_REFUSED[features.ril][key] & _RANGED[ops]
    return refused
