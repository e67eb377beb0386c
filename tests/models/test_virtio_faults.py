"""Fault reporting (virtio-iommu.md §4): a fault the backend reports for a device behind a
virtio-iommu reaches the client as a 24-byte ``virtio_iommu_fault`` in the next response.

A backend offers faults through ``drain_device_faults(devices) -> list[DeviceFault]`` (the
faults of those host devices, removed from its queue). The emulated iommufd has no source of
device faults, so this test backend queues injected ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protocols.virtio_iommu import FaultFlag, FaultReason, RequestType, build_request, parse_fault
from tests.conftest import Daemon, running
from tests.models.virtio_replaying import GEN, replay_records
from tests.replies import as_json
from viommud.backend.base import Backend
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.events import DeviceFault
from viommud.host import HostConfig

DEVICE = "0000:01:00.0"


class FaultingIommufd(EmulatedIommufd):
    """The emulated iommufd plus a queue of device faults, filled by ``inject``."""

    def __init__(self, host: HostConfig) -> None:
        super().__init__(host)
        self.faults: list[DeviceFault] = []
        self.inject_on: dict[int, list[DeviceFault]] = {}  # nth IOAS_MAP -> faults to queue
        self.maps = 0

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        err = super().ioctl(fd, request, arg)
        if request == 0x3B85:  # IOMMU_IOAS_MAP: the device starts DMA right after
            self.maps += 1
            self.faults.extend(self.inject_on.pop(self.maps, []))
        return err

    def drain_device_faults(self, devices: frozenset[str]) -> list[DeviceFault]:
        mine = [f for f in self.faults if f.device in devices]
        self.faults = [f for f in self.faults if f.device not in devices]
        return mine


@pytest.fixture
async def faulting(tmp_path: Path) -> AsyncIterator[Daemon]:
    made: list[EmulatedIommufd] = []
    plan: dict[int, list[DeviceFault]] = {
        1: [
            DeviceFault(DEVICE, 0x5000, write=True),  # nothing mapped there
            DeviceFault(DEVICE, 0x10000, write=True),  # read-only mapping: permission
            DeviceFault(DEVICE, None, translation=False),  # an internal error, no address
            DeviceFault("0000:04:00.0", 0x1000, read=True),  # not this vIOMMU's device
        ]
    }

    def factory(host: HostConfig) -> Backend:
        backend = FaultingIommufd(host)
        backend.inject_on = {k: list(v) for k, v in plan.items()}
        made.append(backend)
        return backend

    async with running(tmp_path, factory=factory) as server:
        yield Daemon(server.socket_path, server, made)


def _req(request_type: int, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = GEN.request("v", build_request(request_type, **fields), "")
    return record


async def test_faults_reach_the_client(faulting: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", {"bypass": 0, "guest_memory": [{"gpa": 0, "size": "0x10000000"}]}),
        {"op": "device_attach", "viommu": "v", "vid": 0x100, "device": DEVICE},
        _req(RequestType.ATTACH, domain=1, endpoint=0x100),
        _req(
            RequestType.MAP,
            domain=1,
            virt_start=0x10000,
            virt_end=0x10FFF,
            phys_start=0x8000,
            flags=1,
        ),
        _req(RequestType.PROBE, endpoint=0x100),
        _req(RequestType.PROBE, endpoint=0x100),
    ]
    replayed = await replay_records(faulting, tmp_path, records)
    attach, mapped, probe, again = replayed.requests()
    assert "faults" not in attach
    assert "faults" not in probe
    assert "faults" not in again
    faults = [parse_fault(bytes.fromhex(f)) for f in mapped["faults"]]
    assert faults == [
        {
            "reason": FaultReason.MAPPING,
            "flags": FaultFlag.ADDRESS | FaultFlag.WRITE,
            "endpoint": 0x100,
            "pasid": 0,
            "address": 0x5000,
        },
        {
            "reason": FaultReason.MAPPING,
            "flags": FaultFlag.ADDRESS | FaultFlag.WRITE,
            "endpoint": 0x100,
            "pasid": 0,
            "address": 0x10000,
        },
        {"reason": FaultReason.UNKNOWN, "flags": 0, "endpoint": 0x100, "pasid": 0, "address": 0},
    ]
    # the other device's fault stays queued for whoever owns that device
    [backend] = faulting.backends
    assert isinstance(backend, FaultingIommufd)
    assert [f.device for f in backend.faults] == ["0000:04:00.0"]


async def test_unattached_device_fault_is_a_domain_fault(faulting: Daemon, tmp_path: Path) -> None:
    records = [
        GEN.create("v", {"bypass": 0, "guest_memory": [{"gpa": 0, "size": "0x10000000"}]}),
        {"op": "device_attach", "viommu": "v", "vid": 0x100, "device": DEVICE},
        {"op": "device_attach", "viommu": "v", "vid": 0x300, "device": "0000:03:00.0"},
        _req(RequestType.ATTACH, domain=1, endpoint=0x300),
        _req(
            RequestType.MAP,
            domain=1,
            virt_start=0x10000,
            virt_end=0x10FFF,
            phys_start=0x8000,
            flags=3,
        ),
    ]
    replayed = await replay_records(faulting, tmp_path, records)
    mapped = replayed.requests()[-1]
    reasons = [parse_fault(bytes.fromhex(f))["reason"] for f in mapped["faults"]]
    assert reasons == [FaultReason.DOMAIN, FaultReason.DOMAIN, FaultReason.UNKNOWN]


def test_eventq_depth_drops_the_excess() -> None:
    from viommud.models.virtio import VirtioViommu
    from viommud.session import Session
    from viommud.trace import DeviceAttach, ViommuCreate

    host = HostConfig.from_json(GEN.HOST)
    session = Session(EmulatedIommufd(host))
    as_json(session.handle(ViommuCreate(2, "v", "virtio-iommu", (), {"eventq_depth": 2})))
    as_json(session.handle(DeviceAttach(3, "v", 0x100, DEVICE)))
    viommu = session.viommus["v"]
    assert isinstance(viommu, VirtioViommu)
    for address in (0x1000, 0x2000, 0x3000):
        assert viommu.report_fault(DeviceFault(DEVICE, address, read=True))
    assert not viommu.report_fault(DeviceFault("0000:04:00.0", 0x1000))
    assert [parse_fault(f)["address"] for f in viommu.take_faults()] == [0x1000, 0x2000]
    assert viommu.faults_lost == 1
    session.close()
