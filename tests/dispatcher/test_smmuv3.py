"""The dispatcher: one array call per vIOMMU object per doorbell, host order = guest order,
and a failed entry maps back to the guest command that produced it."""

from __future__ import annotations

import struct
from typing import Any

from protocols import iommufd as uapi
from protocols.smmuv3 import Opcode, build_command, parse_command
from tests.replies import as_json
from viommud.backend.emulator import testing
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.dispatcher import NOTHING
from viommud.dispatcher.smmuv3 import SmmuDispatcher
from viommud.events import GuestError, StreamTableInvalidated
from viommud.host import HostConfig
from viommud.models.smmuv3 import SmmuV3Viommu
from viommud.session import Session
from viommud.trace import DeviceAttach, Ste, ViommuCreate

HOST = HostConfig.from_json(
    {
        "iommus": [{"id": "smmu0", "model": "arm-smmuv3"}],
        "devices": [{"id": "0000:01:00.0", "iommu": "smmu0", "sid": 256}],
    }
)
SYNC = build_command(Opcode.CMD_SYNC, cs=2)


def vste(cd_table: int) -> bytes:
    return struct.pack("<8Q", 0xB | cd_table, 0xD6, 0, 0, 0, 0, 0, 0)


class CorruptingBackend(EmulatedIommufd):
    """Overwrites entry ``bad`` of the next invalidation array with a command the kernel
    refuses (EIO), as if the guest's bytes had been something the frontend let through."""

    bad: int | None = None

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        if request == uapi.IOMMU_HWPT_INVALIDATE and self.bad is not None:
            call = uapi.decode(uapi.HwptInvalidate, arg)
            self.memory.write(call.data_uptr + 16 * self.bad, struct.pack("<QQ", 0x46, 0))
            self.bad = None
        return super().ioctl(fd, request, arg)


def session_with_device(backend: EmulatedIommufd) -> Session:
    session = Session(backend, keep_calls=True)
    for record in (
        ViommuCreate(2, "v", "smmuv3", ("smmu0",)),
        DeviceAttach(3, "v", 8, "0000:01:00.0"),
        Ste(4, "v", 8, vste(0x40000000)),
    ):
        assert as_json(session.handle(record)) == {"ok": True}
    assert (
        as_json(session.doorbell("v", build_command(Opcode.CFGI_STE, sid=8, leaf=1) + SYNC))[
            "errors"
        ]
        == []
    )
    session.drain_calls()
    return session


def tlbis(n: int) -> list[bytes]:
    """Single-page TLBIs with gaps between them, so no coalescing rule applies."""
    return [
        build_command(Opcode.TLBI_NH_VA, asid=1, leaf=1, ttl=3, tg=1, addr=0x1000 + 2 * i)
        for i in range(n)
    ]


def test_one_call_per_doorbell_and_syncs_share_it() -> None:
    backend = EmulatedIommufd(HOST)
    session = session_with_device(backend)
    commands = tlbis(3)
    answer = as_json(session.doorbell("v", commands[0] + SYNC + commands[1] + commands[2] + SYNC))
    assert answer == {"consumed": 5, "errors": [], "syncs": 2}
    [call] = session.drain_calls()
    assert call["ioctl"] == "IOMMU_HWPT_INVALIDATE"
    assert call["entries"] == [c.hex() for c in commands]
    assert call["barrier"] == 2  # the first sync of the doorbell waits for it
    assert session.report()["baseline"]["invalidate_calls"] == 3


def test_failed_entry_becomes_cerror_on_its_command_and_the_group_is_resent() -> None:
    backend = CorruptingBackend(HOST)
    session = session_with_device(backend)
    testing.clear_issued(backend)
    commands = tlbis(70)
    backend.bad = 65
    answer = as_json(session.doorbell("v", b"".join(commands) + SYNC))
    assert answer["consumed"] == 71
    assert [(e["index"], e["code"]) for e in answer["errors"]] == [(65, "CERROR_ILL")]
    first, second = session.drain_calls()
    assert (first["errno"], first["entry_num"], len(first["entries"])) == (5, 65, 70)  # EIO
    # Entries 63..64 were counted by the kernel but sit in the group it never issued.
    assert second["entries"] == [c.hex() for c in commands[63:65] + commands[66:]]
    assert (second["errno"], second["entry_num"]) == (0, 6)
    reached = [
        parse_command(c)["addr"]
        for c in testing.issued(backend, "smmu0")
        if c[0] != Opcode.CMD_SYNC
    ]
    assert sorted(reached) == [0x1000 + 2 * i for i in range(70) if i != 65]
    assert session.report()["errors"] == {"total": 1, "by_code": {"CERROR_ILL": 1}}


def test_ste_change_in_the_middle_keeps_guest_order() -> None:
    backend = EmulatedIommufd(HOST)
    session = session_with_device(backend)
    assert as_json(session.handle(Ste(9, "v", 8, vste(0x50000000)))) == {"ok": True}
    asid = build_command(Opcode.TLBI_NH_ASID, asid=1)
    as_json(
        session.doorbell("v", asid + build_command(Opcode.CFGI_STE, sid=8, leaf=1) + asid + SYNC)
    )
    order: list[Any] = [c["ioctl"] for c in session.drain_calls()]
    assert order == [
        "IOMMU_HWPT_INVALIDATE",  # work before the CFGI_STE goes first
        "IOMMU_HWPT_ALLOC",
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        "IOMMU_DESTROY",  # the old nested HWPT, now unused
        "IOMMU_HWPT_INVALIDATE",
    ]


def test_commands_for_devices_without_a_vdevice_are_dropped() -> None:
    backend = EmulatedIommufd(HOST)
    session = session_with_device(backend)
    answer = as_json(
        session.doorbell(
            "v",
            build_command(Opcode.ATC_INV, sid=77, size=52)
            + build_command(Opcode.CFGI_CD_ALL, sid=77)
            + SYNC,
        )
    )
    assert answer["errors"] == []
    assert session.drain_calls() == []
    assert session.stats.dropped == 2


def test_session_close_frees_everything() -> None:
    backend = EmulatedIommufd(HOST)
    session = session_with_device(backend)
    assert backend.live_objects() != []
    session.close()
    assert backend.live_objects() == []


def _dispatcher(session: Session) -> SmmuDispatcher:
    instance = session.viommus["v"]
    assert isinstance(instance, SmmuV3Viommu)
    return instance.dispatcher


def test_outcome_separates_host_refusals_from_the_frontends() -> None:
    backend = CorruptingBackend(HOST)
    session = session_with_device(backend)
    instance = session.viommus["v"]
    assert isinstance(instance, SmmuV3Viommu)
    frontend = instance.frontend
    frontend.receive_data(b"".join(tlbis(4)) + SYNC)
    assert _dispatcher(session).run(frontend.events()) is NOTHING
    commands = tlbis(4)
    commands[1] = struct.pack("<QQ", 0x5F, 0)  # the frontend refuses it
    frontend.receive_data(b"".join(commands) + SYNC)
    backend.bad = 1  # the host refuses the entry of command 2 (the array skips command 1)
    outcome = _dispatcher(session).run(frontend.events())
    assert [(e.index, e.code) for e in outcome.errors] == [(1, "CERROR_ILL"), (2, "CERROR_ILL")]
    assert outcome.host_errors == outcome.errors[1:]
    assert frontend.error_counts == {"CERROR_ILL": 1}  # the dispatcher never told it


def test_stream_table_invalidation_installs_the_stes_it_carries() -> None:
    backend = EmulatedIommufd(HOST)
    session = session_with_device(backend)
    dispatcher = _dispatcher(session)
    stage2 = struct.pack("<8Q", 0xD, 0, 0, 0, 0, 0, 0, 0)  # Config 0b110: refused
    cfgi = build_command(Opcode.CFGI_STE_RANGE, range=31)
    outcome = dispatcher.run([StreamTableInvalidated(0, 0, 0xFFFFFFFF, cfgi, ((8, stage2),))])
    [error] = outcome.host_errors
    assert isinstance(error, GuestError)
    assert (error.index, error.code, error.raw) == (0, "CERROR_ILL", cfgi)
    assert "stage 2" in error.reason
    # vSIDs without a vDEVICE are skipped; an unchanged vSTE costs no call
    assert dispatcher.run([StreamTableInvalidated(0, 0, 9, cfgi, ((3, stage2),))]) is NOTHING
    assert dispatcher.run([StreamTableInvalidated(0, 8, 8, cfgi, ((8, vste(0x40000000)),))]) is (
        NOTHING
    )
    assert session.drain_calls() == []


def test_a_global_entry_never_survives_an_asid_and_a_va_invalidation() -> None:
    """[TLBI_NH_ASID(1), TLBI_NH_VA(1, va)]: the ASID one spares global entries, the VA one
    removes them, so coalescing must keep the VA one (the emulator's cache model decides)."""
    backend = EmulatedIommufd(HOST)
    session = session_with_device(backend)
    session.drain_calls()
    testing.dma(backend, "0000:01:00.0", 0x5000, asid=1, global_=True, walk=False)
    testing.dma(backend, "0000:01:00.0", 0x9000, asid=1, walk=False)
    doorbell = (
        build_command(Opcode.TLBI_NH_ASID, asid=1)
        + build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x5000 >> 12, leaf=1)
        + SYNC
    )
    assert as_json(session.doorbell("v", doorbell))["errors"] == []
    left = testing.caches(backend, "smmu0").iotlb
    assert not [e for e in left if e.iova == 0x5000], left  # the global entry is gone
    assert not [e for e in left if e.iova == 0x9000], left  # and the ASID's own entry
