"""Trace files (docs/trace-format.md §2): every reader error names its line; .xz by name."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import pytest

from viommud.trace import Cmds, DeviceAttach, Ste, TraceError, TraceReader, ViommuCreate

HEADER = {
    "format": "viommud-trace",
    "version": 1,
    "name": "t",
    "host": {
        "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
        "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": 256, "ats": True}],
    },
}


def write(tmp_path: Path, lines: list[str], suffix: str = ".jsonl") -> Path:
    path = tmp_path / f"t{suffix}"
    text = "\n".join(lines) + "\n"
    if suffix == ".jsonl.gz":
        path.write_bytes(gzip.compress(text.encode()))
    elif suffix == ".jsonl.xz":
        path.write_bytes(lzma.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz"])
def test_reads_records_in_every_container(tmp_path: Path, suffix: str) -> None:
    path = write(
        tmp_path,
        [
            json.dumps(HEADER),
            '{"op":"viommu_create","viommu":"v","model":"smmuv3","iommus":["smmu0"]}',
            "",
            '{"op":"device_attach","viommu":"v","vid":8,"device":"0000:01:00.0","t":0.5}',
            '{"op":"ste","viommu":"v","vsid":8,"data":"' + "00" * 64 + '"}',
            '{"op":"cmds","viommu":"v","data":"4620C00F000000000000000000000000"}',
        ],
        suffix,
    )
    reader = TraceReader(path)
    assert reader.header.name == "t"
    assert reader.header.host.device("0000:01:00.0").sid == 256
    records = list(reader)
    assert [type(r) for r in records] == [ViommuCreate, DeviceAttach, Ste, Cmds]
    assert [r.line for r in records] == [2, 4, 5, 6]
    cmds = records[3]
    assert isinstance(cmds, Cmds)
    assert cmds.data == bytes.fromhex("4620c00f") + bytes(12)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "invalid JSON"),
        ('{"op":"frobnicate","viommu":"v"}', "unknown op 'frobnicate'"),
        ('{"viommu":"v"}', "missing required key 'op'"),
        ('{"op":"cmds","data":"00"}', "missing required key 'viommu'"),
        ('{"op":"cmds","viommu":"v","data":"0g"}', "not a valid hex string"),
        ('{"op":"ste","viommu":"v","vsid":1,"data":"00"}', "must be 64 bytes"),
        ('{"op":"device_attach","viommu":"v","vid":-1,"device":"x"}', "'vid' must be an integer"),
        ('{"op":"viommu_create","viommu":"v","model":"amd","iommus":[]}', "'model' must be one"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_malformed_line_names_its_number_and_stops(tmp_path: Path, line: str, message: str) -> None:
    path = write(
        tmp_path,
        [
            json.dumps(HEADER),
            '{"op":"viommu_create","viommu":"v","model":"smmuv3","iommus":["smmu0"]}',
            line,
            '{"op":"viommu_destroy","viommu":"v"}',
        ],
    )
    seen: list[object] = []
    with pytest.raises(TraceError) as info:
        seen.extend(TraceReader(path))
    assert info.value.line == 3
    assert message in str(info.value)
    assert len(seen) == 1  # nothing after the bad line


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({**HEADER, "format": "other"}, "'format' must be 'viommud-trace'"),
        ({**HEADER, "version": 2}, "unsupported trace version"),
        ({**HEADER, "host": {"iommus": [{"id": "a", "model": "x"}]}}, "model must be one of"),
        (
            {**HEADER, "host": {"iommus": [], "devices": [{"id": "d", "iommu": "z", "sid": 1}]}},
            "is not a host iommu",
        ),
        (  # found by tests/fuzz: an unhashable iommu raised TypeError (an internal error)
            {**HEADER, "host": {"iommus": [], "devices": [{"id": "d", "iommu": [1], "sid": 1}]}},
            "is not a host iommu",
        ),
        (
            {**HEADER, "host": {"iommus": [{"id": "a", "model": ["arm-smmuv3"]}]}},
            "model must be one of",
        ),
    ],
)
def test_bad_header_is_line_1(tmp_path: Path, header: dict[str, object], message: str) -> None:
    path = write(tmp_path, [json.dumps(header)])
    with pytest.raises(TraceError) as info:
        TraceReader(path)
    assert info.value.line == 1
    assert message in str(info.value)


def test_empty_and_corrupt_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(TraceError, match="empty trace"):
        TraceReader(empty)
    corrupt = tmp_path / "c.jsonl.xz"
    corrupt.write_bytes(b"not xz at all")
    with pytest.raises(TraceError, match="cannot read"):
        TraceReader(corrupt)
