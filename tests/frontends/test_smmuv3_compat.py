"""The ``qemu`` compatibility policy of the SMMUv3 frontend (docs/smmuv3.md, "Compatibility
policy"), case by case: every command the architecture's reading refuses but QEMU's
smmuv3_cmdq_consume accepts, with the guest-visible result under each policy — CERROR_ILL
(architecture, the default) or what QEMU does (nothing, or the invalidation forwarded as a
valid command) — and the commands both refuse."""

from __future__ import annotations

import struct

import pytest

from protocols.smmuv3 import Opcode, build_command
from tests.oracle.workload import SYNC, build, host
from tests.replies import as_json
from viommud.events import Barrier, GuestError, Invalidation
from viommud.frontends.smmuv3.frontend import SmmuFeatures, SmmuV3Frontend

_QQ = struct.Struct("<QQ")
VA = build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x40000)


def _bit(command: bytes, word: int, bit: int) -> bytes:
    w = list(_QQ.unpack(command))
    w[word] |= 1 << bit
    return _QQ.pack(*w)


def _with(command: bytes, w0_or: int = 0, w1_or: int = 0) -> bytes:
    w0, w1 = _QQ.unpack(command)
    return _QQ.pack(w0 | w0_or, w1 | w1_or)


# name, command, features, architecture's reason, what QEMU mode gives:
#   None (accepted, nothing), "barrier", or the raw command forwarded
_ACCEPTED_BY_QEMU = [
    *(
        (op.name, build_command(op), SmmuFeatures(), reason, None)
        for op, reason in (
            (Opcode.TLBI_EL3_ALL, "Secure command"),
            (Opcode.TLBI_EL3_VA, "Secure command"),
            (Opcode.TLBI_EL2_ALL, "IDR0.HYP"),
            (Opcode.TLBI_EL2_ASID, "IDR0.HYP"),
            (Opcode.TLBI_EL2_VA, "IDR0.HYP"),
            (Opcode.TLBI_EL2_VAA, "IDR0.HYP"),
            (Opcode.PRI_RESP, "IDR0.PRI"),
            (Opcode.RESUME, "stall support"),
            (Opcode.STALL_TERM, "stall support"),
        )
    ),
    (
        "EL2_VA with reserved bits",
        _bit(build_command(Opcode.TLBI_EL2_VA), 0, 9),
        SmmuFeatures(),
        "IDR0.HYP",
        None,
    ),
    ("NH_VA reserved W0 bit", _bit(VA, 0, 8), SmmuFeatures(), "reserved bits", VA),
    ("NH_VA reserved W1 bit", _bit(VA, 1, 6), SmmuFeatures(), "reserved bits", VA),
    (
        "NH_ALL reserved W1 bit",
        _bit(build_command(Opcode.TLBI_NH_ALL), 1, 3),
        SmmuFeatures(),
        "reserved bits",
        build_command(Opcode.TLBI_NH_ALL),
    ),
    (
        "CFGI_CD_ALL reserved W0 bit",
        _bit(build_command(Opcode.CFGI_CD_ALL, sid=8), 0, 20),
        SmmuFeatures(),
        "reserved bits",
        build_command(Opcode.CFGI_CD_ALL, sid=8),
    ),
    (
        "NH_VA TG=0 with NUM/SCALE/TTL",
        build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x40000, num=3, scale=1, ttl=2),
        SmmuFeatures(),
        "NUM/SCALE/TTL set with TG=0",
        VA,
    ),
    (
        "NH_VA range without IDR3.RIL",
        build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x40000, tg=1, num=3, ttl=3),
        SmmuFeatures(ril=False),
        "without IDR3.RIL",
        build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x40000, tg=1, num=3, ttl=3),
    ),
    (
        "NH_VA TTL=0 NUM=0 SCALE=0",
        build_command(Opcode.TLBI_NH_VA, asid=1, addr=0x40000, tg=1),
        SmmuFeatures(),
        "reserved range encoding",
        VA,
    ),
    (
        "NH_VAA TTL=1 with a 16KB granule",
        build_command(Opcode.TLBI_NH_VAA, addr=0x40000, tg=2, ttl=1, num=1),
        SmmuFeatures(),
        "TTL=1 with a 16KB granule",
        build_command(Opcode.TLBI_NH_VAA, addr=0x40000, tg=2, num=1),
    ),
    (
        "CMD_SYNC CS=0b11",
        build_command(Opcode.CMD_SYNC, cs=3),
        SmmuFeatures(),
        "CS=0b11",
        "barrier",
    ),
    (
        "ATC_INV without IDR0.ATS",
        build_command(Opcode.ATC_INV, sid=8, size=2),
        SmmuFeatures(ats=False),
        "without IDR0.ATS",
        None,
    ),
    (
        "ATC_INV Size 60",
        build_command(Opcode.ATC_INV, sid=8, size=60),
        SmmuFeatures(),
        "Size 60 > 52",
        build_command(Opcode.ATC_INV, sid=8, size=52),
    ),
]

# refused under both policies (QEMU: CERROR_ILL too)
_REFUSED_BY_BOTH = [
    ("unknown opcode 0x5f", _QQ.pack(0x5F, 0), "unknown opcode"),
    ("TLBI_S12_VMALL", build_command(Opcode.TLBI_S12_VMALL), "stage-2"),
    ("TLBI_S2_IPA", build_command(Opcode.TLBI_S2_IPA), "stage-2"),
    ("CFGI_VMS_PIDM", build_command(Opcode.CFGI_VMS_PIDM), "MPAM"),
    ("TLBI_SNH_ALL", build_command(Opcode.TLBI_SNH_ALL), "Secure"),
    ("DPTI_ALL", build_command(Opcode.DPTI_ALL), "DPT"),
    ("CFGI_STE SSec=1", _with(build_command(Opcode.CFGI_STE, sid=8), 1 << 10), "SSec=1"),
    ("CFGI_CD SSec=1", _with(build_command(Opcode.CFGI_CD, sid=8), 1 << 10), "SSec=1"),
]


def _events(features: SmmuFeatures, command: bytes) -> list[object]:
    frontend = SmmuV3Frontend(features)
    frontend.receive_data(command)
    assert frontend.last.consumed == 1
    return list(frontend.events())


@pytest.mark.parametrize(
    ("command", "features", "reason", "qemu"),
    [pytest.param(*case[1:], id=case[0]) for case in _ACCEPTED_BY_QEMU],
)
@pytest.mark.parametrize("policy", ["architecture", "qemu"])
def test_policy_table(
    command: bytes, features: SmmuFeatures, reason: str, qemu: bytes | str | None, policy: str
) -> None:
    features = SmmuFeatures(features.ril, features.ats, policy)
    events = _events(features, command)
    if policy == "architecture":
        [error] = events
        assert isinstance(error, GuestError)
        assert error.code == "CERROR_ILL"
        assert reason in error.reason
    elif qemu is None:
        assert events == []
    elif qemu == "barrier":
        assert events == [Barrier(0)]
    else:
        [event] = events
        assert isinstance(event, Invalidation)
        assert event.raw == qemu


@pytest.mark.parametrize(
    ("command", "reason"), [pytest.param(*case[1:], id=case[0]) for case in _REFUSED_BY_BOTH]
)
@pytest.mark.parametrize("policy", ["architecture", "qemu"])
def test_commands_qemu_refuses_too(command: bytes, reason: str, policy: str) -> None:
    [error] = _events(SmmuFeatures(compat=policy), command)
    assert isinstance(error, GuestError)
    assert error.code == "CERROR_ILL"
    assert reason in error.reason


def test_the_default_is_the_architecture() -> None:
    assert SmmuFeatures().compat == "architecture"
    assert SmmuFeatures.from_options({}).compat == "architecture"
    assert SmmuFeatures.from_options({"compat": "qemu"}).compat == "qemu"
    with pytest.raises(ValueError, match="'compat' must be 'architecture' or 'qemu'"):
        SmmuFeatures.from_options({"compat": "linux"})


def test_a_qemu_vsmmu_forwards_only_valid_commands_to_the_host() -> None:
    """Through a session: the host gets the cleaned command, the kernel accepts it, and the
    oracle finds the guest's invalidation done."""
    rig = build(host(1, 2, False), {"v": ["smmu0"]}, ats=False)
    viommu = rig.session.viommus["v"]
    viommu.frontend.features = SmmuFeatures(compat="qemu")  # type: ignore[attr-defined]
    rig.session.drain_calls()
    answer = as_json(
        rig.session.doorbell("v", _bit(VA, 0, 8) + build_command(Opcode.TLBI_EL2_ALL) + SYNC)
    )
    assert answer == {"consumed": 3, "errors": [], "syncs": 1}
    [call] = [c for c in rig.session.drain_calls() if c["ioctl"] == "IOMMU_HWPT_INVALIDATE"]
    assert call["entries"] == [VA.hex()]
    assert call["errno"] == 0
    assert rig.session.report()["verify"]["missed"] == 0
