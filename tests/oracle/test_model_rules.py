"""The oracle's cache rules, case by case (docs/oracle.md): which host TLBI covers which guest
TLBI (global entries, granule and level hints), and the ordering of needs across host calls."""

from __future__ import annotations

import pytest

from protocols.smmuv3 import Opcode, build_command
from viommud.oracle import CONFIG, IOTLB, Ledger, Need, Removal, covered
from viommud.oracle.smmuv3 import as_removal, command, tlb_effect

PLACE = ("v", "smmu0")


def tlbi(op: Opcode, **fields: int) -> list[Need]:
    return tlb_effect(command(build_command(op, **fields)), PLACE)


VA = {"asid": 1, "addr": 0x300, "leaf": 1}
RANGE = {"asid": 1, "addr": 0x300, "tg": 1, "num": 3, "ttl": 3, "leaf": 1}  # 4 pages, 4 KiB


@pytest.mark.parametrize(
    ("guest", "host", "covers"),
    [
        # TLBI_NH_ASID spares global entries, which TLBI_NH_VA also removes (SMMUv3 §4.4)
        ((Opcode.TLBI_NH_VA, VA), (Opcode.TLBI_NH_ASID, {"asid": 1}), False),
        ((Opcode.TLBI_NH_VA, VA), (Opcode.TLBI_NH_VA, VA), True),
        ((Opcode.TLBI_NH_VA, VA), (Opcode.TLBI_NH_VA, {**VA, "asid": 2}), False),
        ((Opcode.TLBI_NH_VA, VA), (Opcode.TLBI_NH_VAA, {"addr": 0x300}), True),
        ((Opcode.TLBI_NH_VA, VA), (Opcode.TLBI_NH_ALL, {}), True),
        ((Opcode.TLBI_NH_VA, VA), (Opcode.TLBI_NSNH_ALL, {}), True),
        ((Opcode.TLBI_NH_ASID, {"asid": 1}), (Opcode.TLBI_NH_ASID, {"asid": 1}), True),
        ((Opcode.TLBI_NH_ASID, {"asid": 1}), (Opcode.TLBI_NH_ALL, {}), True),
        ((Opcode.TLBI_NH_VAA, {"addr": 0x300}), (Opcode.TLBI_NH_VA, VA), False),
        # a range TLBI covers only entries of its granule and, with TTL, of its level
        ((Opcode.TLBI_NH_VA, RANGE), (Opcode.TLBI_NH_VA, RANGE), True),
        ((Opcode.TLBI_NH_VA, RANGE), (Opcode.TLBI_NH_VA, {**RANGE, "tg": 2}), False),
        ((Opcode.TLBI_NH_VA, RANGE), (Opcode.TLBI_NH_VA, {**RANGE, "ttl": 2}), False),
        ((Opcode.TLBI_NH_VA, RANGE), (Opcode.TLBI_NH_VA, {**RANGE, "ttl": 0}), True),
        ((Opcode.TLBI_NH_VA, RANGE), (Opcode.TLBI_NH_VA, {**RANGE, "num": 1}), False),
        ((Opcode.TLBI_NH_VA, VA), (Opcode.TLBI_NH_VA, RANGE), False),  # TG 1 vs unknown
        ((Opcode.TLBI_NH_VA, {**VA, "leaf": 0}), (Opcode.TLBI_NH_VA, VA), False),  # leaf only
    ],
)
def test_which_host_tlbi_covers_which_guest_tlbi(
    guest: tuple[Opcode, dict[str, int]], host: tuple[Opcode, dict[str, int]], covers: bool
) -> None:
    removals = [as_removal(n) for n in tlbi(host[0], **host[1])]
    needs = tlbi(guest[0], **guest[1])
    assert needs
    assert all(covered(need, removals) for need in needs) is covers


def test_nh_va_needs_its_asid_and_the_global_entries() -> None:
    tags = sorted(str(n.tag) for n in tlbi(Opcode.TLBI_NH_VA, **VA))
    assert tags == ["-1", "1"]  # GLOBAL and the ASID


@pytest.mark.parametrize("same_call", [True, False])
def test_an_ordered_need_counts_only_later_calls(same_call: bool) -> None:
    """A TLB need ordered after a configuration need is covered only by a host call later
    than the one that covered the configuration need."""
    ledger = Ledger()
    since = ledger.begin()
    config = ledger.need(Need(CONFIG, ("dev",), None, 0, 1 << 64), since, due=True)
    tlb = Need(IOTLB, PLACE, None, 0, 1 << 64)
    ledger.need(tlb, since, due=True, after=(config,))
    ledger.call()
    ledger.remove(Removal(CONFIG, ("dev",), None, 0, 1 << 64))
    if not same_call:
        ledger.call()
    ledger.remove(Removal(IOTLB, PLACE, None, 0, 1 << 64))
    ledger.settle()
    assert ledger.missed == (1 if same_call else 0)
    assert ledger.missed_needs == ([tlb] if same_call else [])


def test_a_barrier_judges_only_its_own_viommus_needs() -> None:
    """A need of vIOMMU "a" without a sync yet waits for a's next barrier, whatever other
    vIOMMUs sync meanwhile (a dispatcher may send it with that barrier's work)."""
    ledger = Ledger()
    need = Need(IOTLB, PLACE, None, 0, 1 << 64)
    ledger.need(need, ledger.begin(), due=False, owner="a")
    ledger.settle()  # a's doorbell ends: no barrier yet
    ledger.barrier_reached("b")  # b syncs: a's need is not b's
    ledger.settle()
    assert ledger.missed == 0
    ledger.call()
    ledger.remove(Removal(IOTLB, PLACE, None, 0, 1 << 64))  # a's work, with a's next sync
    ledger.barrier_reached("a")
    ledger.settle()
    assert (ledger.missed, ledger.over) == (0, 0)
