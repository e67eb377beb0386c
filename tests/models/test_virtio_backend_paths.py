"""What virtio-iommu requests become on the (emulated) iommufd, through the daemon's socket
and, where the emulator's internal state is the point, through a session in process.

* every MAP/UNMAP domain is an IOAS with a paging HWPT per physical IOMMU; MAP and UNMAP are
  IOAS_MAP / IOAS_UNMAP (one UNMAP is one call, whatever it removes); the emulator's IOAS
  areas always equal the guest's forwardable mappings;
* unattached devices are in bypass (the identity IOAS of guest RAM) or blocked (detached);
* ATTACH_TABLE is a nested HWPT (Arm: on the iommufd vIOMMU with a vDEVICE; VT-d: on the
  identity nesting parent); INVALIDATE is one IOMMU_HWPT_INVALIDATE array per object;
* DETACH and teardown free everything: ``backend.live_objects() == []``.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from protocols import iommufd as uapi
from protocols.smmuv3 import Opcode, parse_command
from protocols.virtio_iommu import RequestType, build_request
from tests.conftest import FIXTURES, Daemon
from tests.models.virtio_replaying import GEN, replay_file, replay_records
from tests.replies import as_json
from viommud.backend.emulator import testing
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.backend.emulator.objects import IoasObject
from viommud.backend.emulator.usermem import EmulatedMemory
from viommud.host import HostConfig
from viommud.models.virtio import VirtioViommu
from viommud.session import Session
from viommud.trace import DeviceAttach, DeviceDetach, Request, ViommuCreate, ViommuDestroy

A, D, M, U = RequestType.ATTACH, RequestType.DETACH, RequestType.MAP, RequestType.UNMAP
VTD_DEV, VTD_ATS_DEV, ARM_DEV, ARM_DEV2 = (d["id"] for d in GEN.HOST["devices"])
RAM: dict[str, Any] = {"guest_memory": [{"gpa": 0, "size": "0x40000000"}]}  # 1 GiB


def req(viommu: str, request_type: int, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = GEN.request(viommu, build_request(request_type, **fields), "")
    return record


def attach_dev(vid: int, device: str, viommu: str = "v") -> dict[str, Any]:
    return {"op": "device_attach", "viommu": viommu, "vid": vid, "device": device}


def mapping(domain: int, start: int, size: int, phys: int, flags: int = 3) -> dict[str, Any]:
    return {
        "domain": domain,
        "virt_start": start,
        "virt_end": start + size - 1,
        "phys_start": phys,
        "flags": flags,
    }


# -- through the socket: the call log ------------------------------------------------------------


async def test_map_domain_calls(daemon: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", {"bypass": 0, **RAM}),
        attach_dev(0x100, VTD_DEV),
        req("v", A, domain=1, endpoint=0x100),
        req("v", M, **mapping(1, 0x10000, 0x10000, 0x200000)),
        req("v", M, **mapping(1, 0x20000, 0x1000, 0x300000, flags=1)),
        req("v", M, **mapping(1, 0x30000, 0x1000, 0xFEE00000, flags=7)),  # MMIO: kept here
        req("v", M, **mapping(1, 0x40000, 0x1000, 0x1000, flags=0)),  # no access: kept here
        req("v", U, domain=1, virt_start=0x10000, virt_end=0x2FFFF),
        req("v", U, domain=1, virt_start=0, virt_end=0xFFFFFFFF),
        req("v", D, domain=1, endpoint=0x100),
        {"op": "device_detach", "viommu": "v", "vid": 0x100},
        {"op": "viommu_destroy", "viommu": "v"},
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    assert all(a["status"] == "OK" for a in replayed.requests())
    [ioas] = [c["out"]["out_ioas_id"] for c in replayed.ioctls("IOMMU_IOAS_ALLOC")]
    [hwpt] = replayed.ioctls("IOMMU_HWPT_ALLOC")
    assert hwpt["args"] == {"flags": 0, "dev_id": 1, "pt_id": ioas, "data_type": 0}
    maps = [c["args"] for c in replayed.ioctls("IOMMU_IOAS_MAP")]
    assert [(m["ioas_id"], m["iova"], m["length"], m["flags"]) for m in maps] == [
        (ioas, 0x10000, 0x10000, 7),  # FIXED_IOVA | WRITEABLE | READABLE
        (ioas, 0x20000, 0x1000, 5),  # FIXED_IOVA | READABLE
    ]
    assert maps[0]["user_va"] - 0x200000 == maps[1]["user_va"] - 0x300000  # one RAM block
    [unmap] = replayed.ioctls("IOMMU_IOAS_UNMAP")  # the second UNMAP removed nothing forwarded
    assert unmap["args"] == {"ioas_id": ioas, "iova": 0x10000, "length": 0x11000}
    assert unmap["out"]["length"] == 0x11000
    destroys = [c["args"]["id"] for c in replayed.ioctls("IOMMU_DESTROY")]
    assert destroys == [hwpt["out"]["out_hwpt_id"], ioas]  # DETACH freed the domain
    [backend] = daemon.backends
    assert backend.live_objects() == []


async def test_bypass_identity_and_blocking(daemon: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", RAM),  # bypass = 1: unattached devices translate GPA = IOVA
        attach_dev(0x100, VTD_DEV),
        req("v", A, domain=1, endpoint=0x100),
        req("v", D, domain=1, endpoint=0x100),
        req("v", A, domain=2, endpoint=0x100, flags=1),
        req("v", D, domain=2, endpoint=0x100),
        {"op": "device_detach", "viommu": "v", "vid": 0x100},
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    assert all(a["status"] == "OK" for a in replayed.requests())
    seq = [(c["ioctl"], c.get("args", {}).get("flags")) for c in replayed.calls]
    identity = [
        ("IOMMU_IOAS_ALLOC", None),
        ("IOMMU_IOAS_MAP", 7),  # the guest's RAM at IOVA = GPA
        ("IOMMU_HWPT_ALLOC", uapi.IOMMU_HWPT_ALLOC_NEST_PARENT),
        ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", None),
    ]
    assert seq[1:5] == identity
    ram = replayed.ioctls("IOMMU_IOAS_MAP")[0]["args"]
    assert (ram["iova"], ram["length"]) == (0, 0x40000000)
    [backend] = daemon.backends
    assert backend.live_objects() == []


async def test_blocked_when_bypass_is_off(daemon: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", {"bypass": 0, **RAM}),
        attach_dev(0x100, VTD_DEV),
        req("v", A, domain=1, endpoint=0x100),
        req("v", D, domain=1, endpoint=0x100),
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    assert [c["ioctl"] for c in replayed.calls][-3:] == [
        "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        "IOMMU_DESTROY",
        "IOMMU_DESTROY",
    ]


async def test_moving_an_endpoint_frees_the_old_domain(daemon: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", {"bypass": 0, **RAM}),
        attach_dev(0x100, VTD_DEV),
        req("v", A, domain=1, endpoint=0x100),
        req("v", M, **mapping(1, 0x10000, 0x1000, 0x1000)),
        req("v", A, domain=2, endpoint=0x100),
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    calls = [c["ioctl"] for c in replayed.calls]
    move = calls[calls.index("IOMMU_IOAS_MAP") + 1 :]
    assert move == [
        "IOMMU_IOAS_ALLOC",
        "IOMMU_HWPT_ALLOC",
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",  # replace: never detached in between
        "IOMMU_DESTROY",  # d1's paging HWPT
        "IOMMU_DESTROY",  # d1's IOAS, mappings and all
    ]


async def test_one_domain_two_iommu_models(daemon: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", {"bypass": 0, **RAM}),
        attach_dev(0x100, VTD_DEV),
        attach_dev(0x300, ARM_DEV),
        req("v", A, domain=1, endpoint=0x100),
        req("v", A, domain=1, endpoint=0x300),
        req("v", M, **mapping(1, 0x10000, 0x1000, 0x1000)),
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    assert len(replayed.ioctls("IOMMU_IOAS_ALLOC")) == 1
    allocs = replayed.ioctls("IOMMU_HWPT_ALLOC")
    assert [c["iommu"] for c in allocs] == ["dmar0", "smmu0"]
    assert len(replayed.ioctls("IOMMU_IOAS_MAP")) == 1


async def test_mappings_made_before_the_first_host_device_are_replayed(
    daemon: Daemon, tmp_path: Path
) -> None:
    records = [
        GEN.create("v", {"bypass": 0, "emulated_endpoints": [0], **RAM}),
        attach_dev(0x100, VTD_DEV),
        req("v", A, domain=1, endpoint=0),
        req("v", M, **mapping(1, 0x10000, 0x1000, 0x1000)),
        req("v", M, **mapping(1, 0x20000, 0x2000, 0x4000)),
        req("v", A, domain=1, endpoint=0x100),
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    maps = [(c["barrier"], c["args"]["iova"]) for c in replayed.ioctls("IOMMU_IOAS_MAP")]
    assert maps == [(4, 0x10000), (4, 0x20000)]  # both at the ATTACH (the 4th request)


async def test_host_refusals_become_statuses(daemon: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", {"bypass": 0, "page_size_mask": "0xffffffffffffffff", **RAM}),
        attach_dev(0x100, VTD_DEV),
        req("v", A, domain=1, endpoint=0x100),
        req("v", M, **mapping(1, 0x10000, 0x1000, 0x7FFFF000)),  # past 1 GiB of RAM
        req("v", M, **mapping(1, 0x10000, 0x1000, 0x1000)),  # the range is free again
        req("v", M, **mapping(1, 0x20000, 10, 0x2000)),  # the host maps whole pages only
        req("v", U, domain=1, virt_start=0x20000, virt_end=0x20009),  # nothing to remove
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    statuses = [a["status"] for a in replayed.requests()]
    assert statuses == ["OK", "FAULT", "OK", "RANGE", "OK"]
    assert replayed.report["backend"]["errnos"] == {"EINVAL": 1}
    assert len(replayed.ioctls("IOMMU_IOAS_UNMAP")) == 0


async def test_attach_replay_failure_is_unsupp_and_rolled_back(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A byte-granular mapping made with only an emulated endpoint cannot be replayed into a
    host IOAS: the host device's ATTACH is UNSUPP and the host side is put back."""
    records = [
        GEN.create(
            "v",
            {"bypass": 0, "page_size_mask": "0xffffffffffffffff", "emulated_endpoints": [0], **RAM},
        ),
        attach_dev(0x100, VTD_DEV),
        req("v", A, domain=1, endpoint=0),
        req("v", M, **mapping(1, 0, 10, 0x1000)),
        req("v", A, domain=1, endpoint=0x100),
        req("v", A, domain=2, endpoint=0x100),
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    assert [a["status"] for a in replayed.requests()] == ["OK", "OK", "UNSUPP", "OK"]
    calls = [(c["ioctl"], c["errno"]) for c in replayed.calls]
    assert calls[1:5] == [
        ("IOMMU_IOAS_ALLOC", 0),
        ("IOMMU_IOAS_MAP", 0),  # an IOAS without a domain takes any alignment
        ("IOMMU_HWPT_ALLOC", errno.EADDRINUSE),  # a 4 KiB-page domain cannot hold it
        ("IOMMU_DESTROY", 0),  # the half-made IOAS goes again
    ]
    [backend] = daemon.backends
    assert [kind for _, kind in backend.live_objects()] == ["DEVICE", "IOAS", "HWPT_PAGING"]


# -- through the socket: vSVA --------------------------------------------------------------------


async def test_vsva_bundled_trace(daemon: Daemon) -> None:
    replayed = await replay_file(daemon, FIXTURES / "virtio-vsva.jsonl")
    expected = [step.expect for draft in ("B", "A", "C") for step in GEN.vsva_steps(draft)]
    assert [a["status"] for a in replayed.requests()] == expected
    report = replayed.report
    assert report["config_errors"] == 0
    assert report["backend"]["errnos"] == {}
    invalidates = replayed.ioctls("IOMMU_HWPT_INVALIDATE")
    # 15 INVALIDATE requests: nothing to coalesce within one, and ordered steps cannot share
    # a call, so the calls are exactly the baseline (one per step per backend object)
    assert report["baseline"]["invalidate_calls"] == len(invalidates) == 26
    # The kernel adds no sync between the entries of one call, so each ARM call holds one
    # step of the vSVA order and, per request (barrier), configuration comes before TLB
    # before ATC (VT-d nested HWPT calls flush IOTLB and device TLB together: one step).
    steps: dict[int, list[int]] = {}
    for call in invalidates:
        if call["iommu"] != "smmu0" and call["iommu"] != "smmu1":
            continue
        kinds = {_arm_step(bytes.fromhex(e)[0]) for e in call["entries"]}
        assert len(kinds) == 1, call
        steps.setdefault(call["barrier"], []).append(kinds.pop())
    assert steps
    assert all(order == sorted(order) for order in steps.values()), steps
    assert any(len(set(order)) > 1 for order in steps.values())  # the trace mixes steps
    [backend] = daemon.backends
    assert backend.live_objects() == []


def _arm_step(opcode: int) -> int:
    """0 configuration (CFGI_CD*), 1 TLB, 2 ATC: the order a vSVA invalidation needs."""
    if opcode in (Opcode.CFGI_CD, Opcode.CFGI_CD_ALL):
        return 0
    return 2 if opcode == Opcode.ATC_INV else 1


async def test_vsva_arm_and_vtd_objects_and_entries(daemon: Daemon, tmp_path: Path) -> None:
    records = [GEN.create("v", {"vsva": True, "bypass": 0, **RAM})]
    records += [
        attach_dev(vid, dev)
        for vid, dev in ((0x18, ARM_DEV), (0x20, ARM_DEV2), (0x10, VTD_ATS_DEV))
    ]
    records += [
        GEN.request("v", step.readable("B"), step.describe()) for step in GEN.vsva_steps("B")[:3]
    ]
    records += [
        GEN.request("v", GEN.build_request(RequestType.INVALIDATE, "B", **f), n)
        for f, n in GEN._invalidations("B")
    ]
    replayed = await replay_records(daemon, tmp_path, records)
    assert all(a["status"] == "OK" for a in replayed.requests())
    [viommu] = replayed.ioctls("IOMMU_VIOMMU_ALLOC")
    assert viommu["args"]["type"] == uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3
    assert [c["args"]["virt_id"] for c in replayed.ioctls("IOMMU_VDEVICE_ALLOC")] == [0x18, 0x20]
    nested = [c["args"] for c in replayed.ioctls("IOMMU_HWPT_ALLOC") if c["args"]["data_type"]]
    ste = [
        bytes.fromhex(n["data"])
        for n in nested
        if n["data_type"] == uapi.IOMMU_HWPT_DATA_ARM_SMMUV3
    ]
    s1 = 0x1 | 0b101 << 1 | GEN.CD_TABLE | 4 << 59
    assert [int.from_bytes(x[:8], "little") for x in ste] == [s1, s1]
    assert [int.from_bytes(x[8:], "little") for x in ste] == [
        0xD6 | 1 << 28,
        0xD6,
    ]  # EATS: ATS device only
    [vtd] = [n for n in nested if n["data_type"] == uapi.IOMMU_HWPT_DATA_VTD_S1]
    assert uapi.decode(uapi.HwptVtdS1, bytes.fromhex(vtd["data"])) == uapi.HwptVtdS1(
        0, GEN.PGTBL, 48, 0
    )
    arm_calls = [
        c for c in replayed.ioctls("IOMMU_HWPT_INVALIDATE") if c["object"]["kind"] == "viommu"
    ]
    commands = [[parse_command(bytes.fromhex(e)) for e in c["entries"]] for c in arm_calls]
    ops = [[Opcode(cmd["opcode"]).name for cmd in call] for call in commands]
    # One call per ordering step (no sync between the entries of a call): config, TLB, ATC.
    assert ops == [
        ["CFGI_CD", "CFGI_CD"],  # PASID-table entry 1, for both devices on the table
        ["TLBI_NH_ASID"],  # ASID 5 ...
        ["ATC_INV"],  # ... then PASID 1 of the ATS device, once the IOTLB is clean
        ["TLBI_NH_VA"],  # one range command for 4 pages
        ["ATC_INV"],
        ["CFGI_CD_ALL", "CFGI_CD_ALL"],  # config + TLB + ATC flags: config first
        ["TLBI_NH_ALL"],
        ["ATC_INV"],
    ]
    assert [c["sid"] for c in commands[0]] == [0x18, 0x20]  # the guest's IDs: the kernel maps them
    va = commands[3][0]
    assert (va["asid"], va["addr"] << 12, va["tg"], va["num"], va["scale"], va["leaf"]) == (
        5,
        0x7F0000400000,
        1,
        0,
        2,
        1,
    )
    [backend] = daemon.backends
    issued = testing.issued(backend, "smmu0")
    cfgi = {parse_command(c)["sid"] for c in issued if c[0] == Opcode.CFGI_CD}
    atc = {parse_command(c)["sid"] for c in issued if c[0] == Opcode.ATC_INV}
    assert (cfgi, atc) == ({0x300, 0x400}, {0x300})  # the kernel wrote the physical SIDs
    flushes = testing.vtd_flushes(backend)
    assert [(f.addr, f.npages, f.leaf) for f in flushes] == [(0x7F0000400000, 512, True)]


# -- in process: the emulator's state follows the guest's ------------------------------------------


def _session() -> tuple[Session, EmulatedIommufd]:
    backend = EmulatedIommufd(HostConfig.from_json(GEN.HOST))
    return Session(backend), backend


def _ioas_areas(backend: EmulatedIommufd, ioas_id: int) -> list[tuple[int, int]]:
    ioas = backend.lookup(ioas_id)
    assert isinstance(ioas, IoasObject)
    return [(a.iova, a.last) for a in ioas.areas]


def test_ioas_follows_the_linux_session() -> None:
    """Replaying the bundled session in process, the domain IOAS's areas equal the guest's
    mappings after every request, and the end leaves nothing behind."""
    from viommud.trace import TraceReader

    session, backend = _session()
    with TraceReader(FIXTURES / "virtio-linux-session.jsonl.xz") as reader:
        records = list(reader)
    checked = 0
    for record in records:
        response = as_json(session.handle(record))
        if isinstance(record, Request):
            assert response["status"] == "OK", response
            viommu = session.viommus["viommu0"]
            assert isinstance(viommu, VirtioViommu)
            for domain_id, domain in viommu.frontend.domains.items():
                obj = viommu.topology.objects.get(("ioas", domain_id))
                if obj is None:
                    continue
                mine = [(m.start, m.end) for m in domain.mappings]
                if checked % 97 == 0 or len(mine) < 3:
                    assert _ioas_areas(backend, obj.id) == mine
                checked += 1
        elif isinstance(record, DeviceAttach | DeviceDetach | ViommuCreate | ViommuDestroy):
            assert response == {"ok": True}, response
    assert checked > 8000
    assert backend.live_objects() == []
    session.close()


def test_viommu_destroy_frees_everything_in_any_state() -> None:
    session, backend = _session()
    as_json(session.handle(ViommuCreate(2, "v", "virtio-iommu", (), {"vsva": True, **RAM})))
    for vid, dev in ((0x18, ARM_DEV), (0x20, ARM_DEV2), (0x10, VTD_DEV), (0x11, VTD_ATS_DEV)):
        assert as_json(session.handle(DeviceAttach(0, "v", vid, dev))) == {"ok": True}
    for step in GEN.vsva_steps("B")[:3]:
        assert as_json(session.handle(Request(0, "v", step.readable("B"))))["status"] == "OK"
    assert (
        as_json(session.handle(Request(0, "v", build_request(A, domain=5, endpoint=0x11))))[
            "status"
        ]
        == "OK"
    )
    m = as_json(
        session.handle(Request(0, "v", build_request(M, **mapping(5, 0x1000, 0x1000, 0x1000))))
    )
    assert m["status"] == "OK"
    assert len(backend.live_objects()) > 10
    assert as_json(session.handle(ViommuDestroy(0, "v"))) == {"ok": True}
    assert backend.live_objects() == []
    memory = backend.memory
    assert isinstance(memory, EmulatedMemory)
    assert all(size != 0x40000000 for _, size in memory.allocations())  # guest RAM freed
    session.close()


@pytest.mark.parametrize("model_options", [{}, {"bypass": 0}])
def test_device_detach_while_attached(model_options: dict[str, Any]) -> None:
    session, backend = _session()
    as_json(session.handle(ViommuCreate(2, "v", "virtio-iommu", (), {**model_options, **RAM})))
    as_json(session.handle(DeviceAttach(0, "v", 0x100, VTD_DEV)))
    as_json(session.handle(Request(0, "v", build_request(A, domain=1, endpoint=0x100))))
    as_json(session.handle(Request(0, "v", build_request(M, **mapping(1, 0x1000, 0x1000, 0x1000)))))
    assert as_json(session.handle(DeviceDetach(0, "v", 0x100))) == {"ok": True}
    gone = as_json(
        session.handle(Request(0, "v", build_request(M, **mapping(1, 0x2000, 0x1000, 0x1000))))
    )
    assert gone["status"] == "NOENT"  # the domain left with its last endpoint
    assert backend.live_objects() == []
    assert as_json(session.handle(DeviceDetach(0, "v", 0x100)))["ok"] is False
    session.close()


def test_bypass_writes_and_resets_move_unattached_devices() -> None:
    session, backend = _session()
    as_json(session.handle(ViommuCreate(2, "v", "virtio-iommu", (), RAM)))
    as_json(session.handle(DeviceAttach(0, "v", 0x100, VTD_DEV)))
    viommu = session.viommus["v"]
    assert isinstance(viommu, VirtioViommu)

    def kinds() -> list[str]:
        return [kind for _, kind in backend.live_objects()]

    assert kinds() == ["DEVICE", "IOAS", "HWPT_PAGING"]  # bypass: on the identity HWPT
    viommu.write_config(36, b"\x00")
    assert kinds() == ["DEVICE"]  # blocked: detached, identity objects freed
    as_json(session.handle(Request(0, "v", build_request(A, domain=1, endpoint=0x100))))
    viommu.reset()  # device reset: detached, domain gone, bypass still 0
    assert kinds() == ["DEVICE"]
    viommu.reset(system=True)  # bypass back to 1
    assert kinds() == ["DEVICE", "IOAS", "HWPT_PAGING"]
    with pytest.raises(ValueError, match="read-only"):
        viommu.write_config(0, b"\x00")
    session.close()
