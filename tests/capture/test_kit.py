"""The kit's post-processing: the SMMUv3 log for the importer, device attachments, counts."""

from __future__ import annotations

import json
import lzma
import struct
import subprocess
from pathlib import Path

import pytest

from capture import kit
from capture.assets import CaptureError
from capture.kit import _attachments, event_counts, main, smmuv3_import_log
from viommud.importers.options import ImportOptions
from viommud.importers.qemu_log import convert

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


def test_smmuv3_log_gives_the_importer_every_published_entry(tmp_path: Path) -> None:
    trace, dump, info = _capture(tmp_path, [2, 4])
    out = tmp_path / "log"
    assert smmuv3_import_log(trace, dump, info, out) == {
        "entries": 4,
        "published": 4,
        "wrapped": False,
    }
    header, records = convert(
        out.read_text().splitlines(), ImportOptions(extra_attach=[(8, "blk0")])
    )
    cmds = [bytes.fromhex(r["data"]) for r in records if r["op"] == "cmds"]
    assert cmds == [_tlbi(1, 0) + CMD_SYNC, _tlbi(1, 0x2000) + CMD_SYNC]
    assert header["format"] == "viommud-trace"


def test_smmuv3_log_refuses_a_wrapped_queue(tmp_path: Path) -> None:
    # 4 entries, published 2 + 4: the first two were overwritten before the dump.
    trace, dump, info = _capture(tmp_path, [2, 4, 6])
    with pytest.raises(CaptureError, match="published 6 commands into a 4-entry queue"):
        smmuv3_import_log(trace, dump, info, tmp_path / "log")


def test_attachments_come_from_the_device_markers() -> None:
    markers = [
        "init 6.1.0",
        "device blk 0000:01:00.0",
        "device net 0000:02:00.0",
        "device net",  # eth0 never appeared: nothing to attach
        "iommu-group 4 0000:01:00.0",
    ]
    assert _attachments(markers) == ["01:00.0=blk0", "02:00.0=net0"]


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


def test_import_falls_back_to_dump_lines_when_cmdq_dump_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An importer offering --cmdq-dump gets the raw dump first; if it refuses it, the kit
    still imports through the dump lines, and records both attempts."""
    real = kit._viommud
    seen: list[list[str]] = []

    def fake(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        seen.append(args)
        if "--help" in args:
            return subprocess.CompletedProcess(args, 0, "  --cmdq-dump DUMP\n", "")
        if "--cmdq-dump" in args:
            return subprocess.CompletedProcess(args, 2, "", "viommud: import: not today")
        return real(args, timeout)

    monkeypatch.setattr(kit, "_viommud", fake)
    result = kit.import_and_replay(FIXTURE)
    attempts = result["import"]["attempts"]
    assert [(a["via"], a["ok"]) for a in attempts] == [("cmdq-dump", False), ("dump-lines", True)]
    assert attempts[0]["stderr"] == "viommud: import: not today"
    assert "--cmdq-dump" in attempts[0]["argv"]
    assert "queue.bin" in attempts[0]["argv"]  # temporary paths are left out
    assert result["import"]["via"] == "dump-lines"
    assert result["replay"]["exit"] == 0
    assert [args[0] for args in seen] == ["import", "import", "import", "replay"]


def test_a_wrapped_capture_is_not_imported(tmp_path: Path) -> None:
    capture_dir = tmp_path / "smmuv3-strict"
    capture_dir.mkdir()
    manifest = json.loads((FIXTURE / "MANIFEST.json").read_text())
    manifest["queue"]["size"] = 16 * 64  # pretend the queue had 64 entries
    (capture_dir / "MANIFEST.json").write_text(json.dumps(manifest))
    (capture_dir / "trace.log.xz").write_bytes((FIXTURE / "trace.log.xz").read_bytes())
    dump = lzma.decompress((FIXTURE / "queue.bin.xz").read_bytes())[: 16 * 64]
    (capture_dir / "queue.bin.xz").write_bytes(lzma.compress(dump))
    result = kit.import_and_replay(capture_dir)
    assert result["import"] == {
        "ok": False,
        "error": "the guest published 2105 commands into a 64-entry queue: it wrapped, and "
        "one dump at the end cannot give the overwritten ones",
    }
    assert result["replay"] is None
