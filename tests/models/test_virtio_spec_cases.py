"""The spec-derived conformance cases (virtio-iommu.md §7.4: D1-D11, D13) and crosvm's
memory_mapper cases (§7.2) sent as requests through the daemon's socket.

D12 (a writable area smaller than probe_size), D14 (PROBE without F_PROBE on a device that
never offered it is also replayed here through the ``probe`` option) and D15 (config writes
and resets) need what a trace cannot carry and are in test_frontend.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from protocols.virtio_iommu import RequestType, build_request, parse_properties
from tests.conftest import FIXTURES, Daemon
from tests.models.virtio_replaying import GEN, replay_file, replay_records, tail

CASES = [
    pytest.param(number, step, id=f"{group.name.split()[0]}-{step:02d}")
    for number, group in enumerate(GEN.SPEC_CASES)
    for step in range(1, len(group.steps) + 1)
]


def _records(number: int, upto: int) -> list[dict[str, Any]]:
    group = GEN.SPEC_CASES[number]
    viommu = f"case{number}"
    out: list[dict[str, Any]] = [GEN.create(viommu, {**GEN.SPEC_OPTIONS, **group.options})]
    for step in group.steps[:upto]:
        out.append(GEN.request(viommu, step.readable(), step.describe()))
    return out


@pytest.mark.parametrize(("number", "upto"), CASES)
async def test_spec_case(daemon: Daemon, tmp_path: Path, number: int, upto: int) -> None:
    steps = GEN.SPEC_CASES[number].steps[:upto]
    replayed = await replay_records(daemon, tmp_path, _records(number, upto))
    answers = replayed.requests()
    assert [a["status"] for a in answers] == [s.expect for s in steps], steps[-1].describe()
    last = answers[-1]
    if steps[-1].expect == "IOERR":
        assert (last["reply"], last["used"]) == ("", 0)  # nothing written, used length 0
    elif steps[-1].type == RequestType.PROBE:
        # the whole writable part (probe_size + 4) comes back, whatever the status
        assert last["used"] == 512 + 4
        assert last["reply"].endswith(tail(steps[-1].expect))
    else:
        assert (last["reply"], last["used"]) == (tail(steps[-1].expect), 4)


async def test_spec_cases_bundled_trace(daemon: Daemon) -> None:
    replayed = await replay_file(daemon, FIXTURES / "virtio-spec-cases.jsonl")
    expected = [step.expect for group in GEN.SPEC_CASES for step in group.steps]
    assert [a["status"] for a in replayed.requests()] == expected
    kinds = replayed.report["commands"]["by_kind"]
    assert kinds["virtio:type_0x42"] == 1
    assert kinds["virtio:type_0x09"] == 1
    assert replayed.report["errors"]["by_code"]["IOERR"] == 4


async def test_probe_reply_bytes(daemon: Daemon, tmp_path: Path) -> None:
    """PROBE: one RESV_MEM per region, 24 bytes each, zero padding to probe_size, then the
    tail. A host endpoint on an SMMUv3 also gets the host's software MSI window as RESERVED;
    a ``resv_mem`` option adds host reserved ranges for chosen endpoints."""
    options = {
        "probe_size": 128,
        "resv_mem": [{"start": "0x10000", "end": "0x1ffff", "endpoints": [0x300]}],
    }
    records = [
        GEN.create("v", options),
        {"op": "device_attach", "viommu": "v", "vid": 0x300, "device": "0000:03:00.0"},
        {"op": "device_attach", "viommu": "v", "vid": 0x200, "device": "0000:02:00.0"},
        GEN.request("v", build_request(RequestType.PROBE, endpoint=0x300), ""),
        GEN.request("v", build_request(RequestType.PROBE, endpoint=0x200), ""),
        {"op": "viommu_destroy", "viommu": "v"},
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    arm, vtd = replayed.requests()
    data = bytes.fromhex(arm["reply"])
    assert arm["used"] == len(data) == 132
    expected = (
        "01001400"
        "00000000"
        "0000010000000000"
        "ffff010000000000"  # host range (option)
        "01001400"
        "00000000"
        "0000000800000000"
        "ffff0f0800000000"  # SMMUv3 SW_MSI
        "01001400"
        "01000000"
        "0000e0fe00000000"
        "ffffeffe00000000"  # the MSI window
    )
    assert data[:72].hex() == expected
    assert data[72:128] == bytes(56)
    assert data[128:] == bytes(4)
    # a VT-d host's MSI range is the guest's MSI window: one MSI property only
    props = parse_properties(bytes.fromhex(vtd["reply"])[:128])
    assert [(p["subtype"], p["start"], p["end"]) for p in props] == [(1, 0xFEE00000, 0xFEEFFFFF)]
    [backend] = daemon.backends
    assert backend.live_objects() == []


async def test_probe_without_f_probe_writes_nothing(daemon: Daemon, tmp_path: Path) -> None:
    """D14 through the socket: a device created without F_PROBE."""
    records = [
        GEN.create("v", {"probe": False, "emulated_endpoints": [0]}),
        GEN.request("v", build_request(RequestType.PROBE, endpoint=0), ""),
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    [answer] = replayed.requests()
    assert (answer["status"], answer["reply"], answer["used"]) == ("IOERR", "", 0)
