"""The kit's post-processing: event counts, the CLI, and the no-option import of a capture."""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path

import pytest

from capture import kit
from capture.kit import event_counts, main

BASE = 0x5B70_0000
CMD_SYNC = struct.pack("<QQ", 0x46, 0)


def _tlbi(asid: int, va: int) -> bytes:
    return struct.pack("<QQ", 0x12 | asid << 48, va)


def _capture(
    tmp_path: Path, prods: list[int], log2size: int = 2
) -> tuple[Path, Path, dict[str, str]]:
    """A queue of 2^log2size entries holding TLBI/SYNC pairs, and PROD writes to ``prods``."""
    entries = 1 << log2size
    memory = bytearray(16 * entries)
    for slot in range(0, entries, 2):
        memory[16 * slot : 16 * slot + 16] = _tlbi(1, 0x1000 * slot)
        memory[16 * slot + 16 : 16 * slot + 32] = CMD_SYNC
    dump = tmp_path / "queue.bin"
    dump.write_bytes(bytes(memory))
    base = 0x4000_0000_0000_0000 | BASE | log2size
    lines = [f"7@100.000001:smmuv3_write_mmio addr: 0x90 val:0x{base:x} size: 0x8(0)"]
    lines += [
        f"7@100.{i + 2:06d}:smmuv3_write_mmio addr: 0x98 val:0x{p:x} size: 0x4(0)"
        for i, p in enumerate(prods)
    ]
    lines.append("7@100.999999:smmuv3_cmdq_opcode <--- SMMU_CMD_SYNC")
    trace = tmp_path / "trace.log"
    trace.write_text("\n".join(lines) + "\n")
    return trace, dump, {"address": f"0x{BASE:x}"}


def test_event_counts(tmp_path: Path) -> None:
    trace, _, _ = _capture(tmp_path, [2])
    assert event_counts(trace) == {"smmuv3_cmdq_opcode": 1, "smmuv3_write_mmio": 2}


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-config"])
    assert exc.value.code == 2
    assert "unknown configuration no-such-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--disk-kib", "100", "smmuv3-strict"])
    assert "multiple of 64" in capsys.readouterr().err


def test_cli_lists_the_configurations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["smmuv3-strict", "smmuv3-lazy", "vtd-legacy", "vtd-scalable", "virtio-iommu"]


FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "captures" / "smmuv3-strict"


def test_import_takes_no_option_and_finds_the_dump_beside_the_log() -> None:
    """The kit imports as a user would: ``viommud import qemu-log trace.log.xz -o OUT`` with
    ``queue.bin.xz`` beside it, then replays the trace with the oracle on."""
    result = kit.import_and_replay(FIXTURE)
    assert result["import"]["argv"] == [
        "viommud", "import", "qemu-log", "trace.log.xz", "-o", "smmuv3-strict.jsonl"
    ]  # fmt: skip
    assert "queue.bin.xz" in result["import"]["stderr"]  # the importer says where it read it
    assert result["replay"]["exit"] == 0
    assert result["replay"]["missed"] == 0


def test_a_dump_shorter_than_the_queue_is_refused(tmp_path: Path) -> None:
    capture_dir = tmp_path / "smmuv3-strict"
    capture_dir.mkdir()
    manifest = json.loads((FIXTURE / "MANIFEST.json").read_text())
    manifest["queue"]["size"] = 16 * 64  # pretend the queue had 64 entries
    (capture_dir / "MANIFEST.json").write_text(json.dumps(manifest))
    (capture_dir / "trace.log.xz").write_bytes((FIXTURE / "trace.log.xz").read_bytes())
    dump = lzma.decompress((FIXTURE / "queue.bin.xz").read_bytes())[: 16 * 64]
    (capture_dir / "queue.bin.xz").write_bytes(lzma.compress(dump))
    result = kit.import_and_replay(capture_dir)
    assert not result["import"]["ok"]
    assert result["import"]["exit"] == 2
    assert "queue.bin.xz" in result["import"]["stderr"]
    assert "Traceback" not in result["import"]["stderr"]
    assert result["replay"] is None
