"""The journal's compaction (docs/state-format.md §2) keeps everything the state needs: for
each rule that drops records, a trace where dropping one record too many would show after a
migration (a different reply, guest-visible state or total)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from protocols.smmuv3 import Opcode, build_command
from protocols.virtio_iommu import RequestType, build_request
from tests.state.test_migrate import guest_state
from viommud import state
from viommud.backend.emulator import EmulatedIommufd
from viommud.host import HostConfig
from viommud.replies import Reply
from viommud.session import Session
from viommud.trace import Record, parse_record

SMMU_HOST = HostConfig.from_json(
    {
        "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
        "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": 8, "ats": True}],
    }
)
VIRTIO_HOST = HostConfig.from_json({"iommus": [], "devices": []})
STE = struct.pack("<8Q", 0xB | (0x40000 + 8) << 6, 0xD6 | 1 << 28, 0, 0, 0, 0, 0, 0)
SYNC = build_command(Opcode.CMD_SYNC, cs=2)
TLBI = build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x10, leaf=1)
ATC = build_command(Opcode.ATC_INV, sid=8, size=52)


def _records(objs: list[dict[str, Any]]) -> list[Record]:
    return [parse_record(i + 2, obj) for i, obj in enumerate(objs)]


def _cmds(*commands: bytes) -> dict[str, Any]:
    return {"op": "cmds", "viommu": "v", "data": b"".join(commands).hex()}


def _req(request_type: int, **fields: int) -> dict[str, Any]:
    data = build_request(request_type, "B", **fields)
    return {"op": "request", "viommu": "v", "data": data.hex()}


def _map(domain: int, start: int, end: int) -> dict[str, Any]:
    return _req(RequestType.MAP, domain=domain, virt_start=start, virt_end=end, flags=3)


def _unmap(domain: int, start: int, end: int) -> dict[str, Any]:
    return _req(RequestType.UNMAP, domain=domain, virt_start=start, virt_end=end)


def _attach(domain: int, endpoint: int) -> dict[str, Any]:
    return _req(RequestType.ATTACH, domain=domain, endpoint=endpoint)


def migrated(host: HostConfig, objs: list[dict[str, Any]], at: int) -> int:
    """Replay ``objs`` straight and with a migration after ``at`` records; assert both
    answer alike and end alike. Returns the journal length at the migration."""
    records = _records(objs)
    straight = Session(EmulatedIommufd(host), verify=True)
    want: list[Reply] = [straight.handle(r) for r in records]
    source = Session(EmulatedIommufd(host), verify=True)
    got = [source.handle(r) for r in records[:at]]
    assert source.journal is not None
    kept = len(source.journal.entries)
    target = state.load(
        state.save(source), Session(EmulatedIommufd(host), verify=True), EmulatedIommufd(host)
    )
    assert guest_state(target) == guest_state(source)
    got += [target.handle(r) for r in records[at:]]
    assert got == want
    assert guest_state(target) == guest_state(straight)
    end, expect = target.report(), straight.report()
    for key in ("commands", "errors", "barriers", "baseline", "verify", "config_errors"):
        assert end[key] == expect[key], key
    return kept


SMMU_SETUP: list[dict[str, Any]] = [
    {"op": "viommu_create", "viommu": "v", "model": "smmuv3", "iommus": ["smmu0"]},
    {"op": "device_attach", "viommu": "v", "vid": 8, "device": "0000:01:00.0"},
    {"op": "ste", "viommu": "v", "vsid": 8, "data": STE.hex()},
    _cmds(build_command(Opcode.CFGI_STE, sid=8, leaf=1), SYNC),
]


def test_tlb_only_doorbells_with_their_barrier_leave_no_trace() -> None:
    objs = [*SMMU_SETUP, *[_cmds(TLBI, SYNC, ATC, SYNC)] * 20, _cmds(TLBI, SYNC)]
    assert migrated(SMMU_HOST, objs, len(objs) - 1) == 4


def test_a_barrier_for_an_earlier_doorbell_is_kept() -> None:
    """A TLBI whose CMD_SYNC came with the next doorbell: both doorbells stay, and after the
    migration the next ATC invalidation is ordered after a TLB invalidation the new host
    really made (the oracle's verdict is unchanged)."""
    objs = [*SMMU_SETUP, _cmds(TLBI), _cmds(SYNC), _cmds(ATC, SYNC), _cmds(TLBI, SYNC)]
    assert migrated(SMMU_HOST, objs, 6) == 6


VIRTIO_SETUP: list[dict[str, Any]] = [
    {
        "op": "viommu_create",
        "viommu": "v",
        "model": "virtio-iommu",
        "iommus": [],
        "options": {"emulated_endpoints": [1, 2]},
    },
    _attach(1, 1),
]


def test_an_unmap_over_mappings_the_journal_lost_track_of_is_kept() -> None:
    """Mappings made before an ATTACH are not followed one by one any more: an UNMAP over
    one of them and a later one must stay, or the older mapping would come back."""
    objs = [
        *VIRTIO_SETUP,
        _map(1, 0x0, 0xFFF),
        _attach(1, 2),  # a second endpoint joins: the journal stops following domain 1
        _map(1, 0x1000, 0x1FFF),
        _unmap(1, 0x0, 0x1FFF),
        _map(1, 0x0, 0xFFF),  # OK only if the first mapping is gone
    ]
    migrated(VIRTIO_HOST, objs, 6)


def test_a_mapping_of_a_destroyed_domain_does_not_pair_with_a_later_unmap() -> None:
    """Domain 1 dies with its mapping (its endpoint moves away) and comes back: an UNMAP of
    the old mapping's range removes the new, smaller one, which must not survive."""
    objs = [
        *VIRTIO_SETUP,
        _map(1, 0x0, 0x1FFF),
        _attach(2, 1),  # domain 1 loses its last endpoint: destroyed
        _attach(1, 1),  # and made again, empty
        _map(1, 0x1000, 0x1FFF),
        _unmap(1, 0x0, 0x1FFF),
        _map(1, 0x1000, 0x1FFF),  # OK only if the new mapping is gone
    ]
    migrated(VIRTIO_HOST, objs, 7)


@pytest.mark.parametrize("at", [3, 4, 5, 6])
def test_map_unmap_pairs_leave_the_journal(at: int) -> None:
    objs = [
        *VIRTIO_SETUP,
        _map(1, 0x0, 0xFFF),
        _map(1, 0x1000, 0x1FFF),
        _unmap(1, 0x0, 0xFFF),  # the exact mapping
        _unmap(1, 0x0, 0x3FFF),  # a range holding the other one
        _map(1, 0x0, 0x3FFF),
    ]
    kept = migrated(VIRTIO_HOST, objs, at)
    assert kept == {3: 3, 4: 4, 5: 3, 6: 2}[at]


def test_a_session_without_a_journal_keeps_no_state() -> None:
    """A session that did not ask for state (HELLO ``state``) keeps no journal, which would
    hold every live virtio-iommu mapping; STATE_SAVE then says how to ask for it."""
    session = Session(EmulatedIommufd(SMMU_HOST), journal=False)
    assert session.journal is None
    with pytest.raises(state.StateError, match=r"HELLO \(state: true\)"):
        state.save(session)
