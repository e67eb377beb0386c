"""The emulator's history of host commands is bounded: a session lives as long as its VM."""

from __future__ import annotations

from tests.conftest import FIXTURES
from viommud.backend.emulator import EmulatedIommufd, testing
from viommud.backend.emulator.driver import HOST_CMD_SYNC, ISSUED_HISTORY
from viommud.session import Session
from viommud.trace import TraceReader


def tlbi_nh_va(count: int, first: int) -> bytes:
    """``count`` leaf TLBI_NH_VA commands of ASID 1 (SMMUv3 §4.4.2), 1 GiB apart: nothing
    for the coalescer to merge."""
    w0 = 0x12 | 1 << 48
    return b"".join(
        w0.to_bytes(8, "little") + ((first + i) << 30 | 1).to_bytes(8, "little")
        for i in range(count)
    )


def test_the_host_command_queue_keeps_only_the_latest_commands() -> None:
    with TraceReader(FIXTURES / "smmuv3-every-opcode.jsonl") as reader:
        host = reader.header.host
        setup = list(reader)[:6]  # viommu_create, two device_attach, two ste, their CFGI_STE
    backend = EmulatedIommufd(host)
    session = Session(backend)
    for record in setup:
        session.handle(record)
    for n in range(2000):  # every doorbell is forwarded: 3 host commands each, 6000 in all
        reply = session.doorbell("v0", tlbi_nh_va(2, 2 * n))
        assert reply.consumed == 2
        assert not reply.errors
    issued = testing.issued(backend, "smmu0")
    assert len(issued) == ISSUED_HISTORY
    assert issued[-1] == HOST_CMD_SYNC  # the latest is kept, the oldest went
    assert session.report()["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] >= 2000
    session.close()
