"""Fast decoders against the construct declarations, per model, on the same inputs.

    python bench/decode.py [--json] [--quick]

Per model, random but well-formed records (a defined opcode / type, random field values,
reserved bits and fields zero, flags within their masks) are made by parsing random bytes
with the construct declaration and building them back with it. Both decoders then turn the
same records into every field:

* SMMUv3 commands: ``protocols.smmuv3.parse_command`` on each 16-byte slice of the buffer,
  against ``struct.iter_unpack`` + ``decode_fields`` (viommud.guest.smmuv3);
* VT-d descriptors, 128-bit and 256-bit queues (the types each width allows):
  ``protocols.vtd.parse_descriptor`` against ``iter_unpack`` + ``decode_fields``;
* virtio-iommu requests (draft B, vSVA types included): ``parse_request`` against
  ``viommud.guest.virtio.decode``.

Before timing, every record must decode to the same fields both ways (the parity the unit
tests prove, checked again on these inputs). Rates are the best of three timed rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocols import smmuv3, virtio_iommu, vtd
from viommud.guest import smmuv3 as smmu_fast
from viommud.guest import virtio as virtio_fast
from viommud.guest import vtd as vtd_fast

DRAFT = "B"
VTD_128_TYPES = (0x1, 0x2, 0x3, 0x4, 0x5, 0x9)  # PASID-granular types need a 256-bit queue
TABLE_FORMATS = (1, 2, 4)  # draft B ATTACH_TABLE formats this device knows


def smmu_commands(rng: random.Random, n: int) -> list[bytes]:
    opcodes = [int(op) for op in smmuv3.Opcode]
    out = []
    for _ in range(n):
        raw = bytearray(rng.randbytes(smmuv3.COMMAND_SIZE))
        raw[0] = rng.choice(opcodes)
        fields = smmuv3.parse_command(bytes(raw))
        opcode = fields.pop("opcode")
        out.append(smmuv3.build_command(opcode, **fields))
    return out


def vtd_descriptors(rng: random.Random, n: int, width: int) -> list[bytes]:
    kinds = VTD_128_TYPES if width == 16 else tuple(int(k) for k in vtd.DescType)
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        raw = bytearray(rng.randbytes(width))
        qw0 = int.from_bytes(raw[:8], "little") & ~0xE0F | (kind & 0xF) | (kind >> 4) << 9
        raw[:8] = qw0.to_bytes(8, "little")
        fields = vtd.parse_descriptor(bytes(raw))
        out.append(vtd.build_descriptor(fields.pop("type"), width=width, **fields))
    return out


def virtio_requests(rng: random.Random, n: int) -> list[bytes]:
    kinds = [int(k) for k in virtio_iommu.RequestType]
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        size = virtio_iommu.readable_size(kind, DRAFT)
        assert size is not None
        raw = bytearray(rng.randbytes(size))
        raw[0] = kind
        if kind == virtio_iommu.RequestType.ATTACH_TABLE:
            raw[12:14] = rng.choice(TABLE_FORMATS).to_bytes(2, "little")
        fields: dict[str, Any] = virtio_iommu.parse_request(bytes(raw), DRAFT)
        fields.pop("type")
        for key, value in fields.items():
            if key.startswith("reserved"):
                fields[key] = bytes(len(value)) if isinstance(value, bytes) else 0
        if kind == virtio_iommu.RequestType.ATTACH:
            fields["flags"] &= int(virtio_iommu.AttachFlag.BYPASS)
        if kind == virtio_iommu.RequestType.MAP:
            fields["flags"] &= virtio_iommu.MAP_FLAGS_MASK
        out.append(virtio_iommu.build_request(kind, DRAFT, **fields))
    return out


# ---------------------------------------------------------------------------------------------
# Decoders: each takes the records (and their concatenation) and decodes every field.


def smmu_construct(records: list[bytes], buffer: bytes) -> None:
    parse = smmuv3.parse_command
    for i in range(0, len(buffer), 16):
        parse(buffer[i : i + 16])


def smmu_fast_decode(records: list[bytes], buffer: bytes) -> None:
    fields = smmu_fast.decode_fields
    for w0, w1 in smmu_fast.COMMAND.iter_unpack(buffer):
        fields(w0, w1)


def vtd_construct(records: list[bytes], buffer: bytes) -> None:
    parse, width = vtd.parse_descriptor, len(records[0])
    for i in range(0, len(buffer), width):
        parse(buffer[i : i + width])


def vtd_fast_decode(records: list[bytes], buffer: bytes) -> None:
    fields = vtd_fast.decode_fields
    layout = vtd_fast.QW2 if len(records[0]) == 16 else vtd_fast.QW4
    for words in layout.iter_unpack(buffer):
        fields(words[0], words[1])


def virtio_construct(records: list[bytes], buffer: bytes) -> None:
    parse = virtio_iommu.parse_request
    for raw in records:
        parse(raw, DRAFT)


def virtio_fast_decode(records: list[bytes], buffer: bytes) -> None:
    decode = virtio_fast.decode
    for raw in records:
        decode(raw, DRAFT)


def check_parity(model: str, records: list[bytes]) -> None:
    for raw in records:
        if model == "smmuv3":
            fast: dict[str, Any] = smmu_fast.decode_fields(*smmu_fast.COMMAND.unpack(raw))
            slow: dict[str, Any] = smmuv3.parse_command(raw)
        elif model == "virtio":
            fast = virtio_fast.as_fields(virtio_fast.decode(raw, DRAFT))
            slow = virtio_iommu.parse_request(raw, DRAFT)
        else:
            qw0, qw1 = vtd_fast.QW2.unpack_from(raw)
            fast, slow = vtd_fast.decode_fields(qw0, qw1), vtd.parse_descriptor(raw)
        if fast != slow:
            raise AssertionError(f"{model}: decoders disagree on {raw.hex()}: {fast} != {slow}")


Decoder = Callable[[list[bytes], bytes], None]


def rate(decoder: Decoder, records: list[bytes], min_seconds: float) -> float:
    """Records per second: the best of three rounds, each at least ``min_seconds`` long."""
    buffer = b"".join(records)
    decoder(records, buffer)  # warm up
    best = 0.0
    for _ in range(3):
        loops, started = 0, time.perf_counter()
        while True:
            decoder(records, buffer)
            loops += 1
            seconds = time.perf_counter() - started
            if seconds >= min_seconds:
                break
        best = max(best, loops * len(records) / seconds)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    args = parser.parse_args(argv)
    n, min_seconds = (1000, 0.02) if args.quick else (20_000, 0.5)
    rng = random.Random(7)
    cases: list[tuple[str, str, list[bytes], Decoder, Decoder]] = [
        (
            "SMMUv3 commands",
            "smmuv3",
            smmu_commands(rng, n),
            smmu_construct,
            smmu_fast_decode,
        ),
        (
            "VT-d descriptors, 128-bit queue",
            "vtd",
            vtd_descriptors(rng, n, 16),
            vtd_construct,
            vtd_fast_decode,
        ),
        (
            "VT-d descriptors, 256-bit queue",
            "vtd",
            vtd_descriptors(rng, n, 32),
            vtd_construct,
            vtd_fast_decode,
        ),
        (
            "virtio-iommu requests (draft B)",
            "virtio",
            virtio_requests(rng, n),
            virtio_construct,
            virtio_fast_decode,
        ),
    ]
    rows = []
    for label, model, records, construct, fast in cases:
        check_parity(model, records)
        slow_rate = rate(construct, records, min_seconds)
        fast_rate = rate(fast, records, min_seconds)
        rows.append(
            {
                "model": label,
                "records": len(records),
                "construct_per_s": round(slow_rate),
                "fast_per_s": round(fast_rate),
                "speedup": round(fast_rate / slow_rate, 1),
            }
        )
    if args.json:
        print(json.dumps({"models": rows}, indent=1))
        return 0
    print(f"{'records':<34} {'construct/s':>12} {'fast/s':>12} {'speed-up':>9}")
    for r in rows:
        print(
            f"{r['model']:<34} {r['construct_per_s']:>12,} {r['fast_per_s']:>12,} "
            f"{r['speedup']:>8}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
