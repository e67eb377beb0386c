"""The oracle on VT-d: the bundled traces verify clean, and a dispatcher that elides a
device-TLB invalidation without a covering host flush is caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.replies import as_json
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.session import Session
from viommud.trace import Cmds, TraceReader

VTD_TRACES = sorted(FIXTURES.glob("vtd-*.json*"))


def verify(trace: Path) -> dict[str, int]:
    with TraceReader(trace) as reader:
        session = Session(EmulatedIommufd(reader.header.host), verify=True)
        for record in reader:
            if isinstance(record, Cmds):
                as_json(session.doorbell(record.viommu, record.data))
            else:
                as_json(session.handle(record))
    report = session.report()
    session.close()
    return {"missed": report["verify"]["missed"], "over": report["verify"]["over"]}


@pytest.mark.parametrize("trace", VTD_TRACES, ids=lambda p: p.name)
def test_bundled_vtd_traces_verify_clean(trace: Path) -> None:
    assert verify(trace)["missed"] == 0


def test_device_tlb_elided_without_cover_is_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("viommud.dispatcher.vtd.device_tlb_is_redundant", lambda *_a, **_k: True)
    missed = {t.name: verify(t)["missed"] for t in VTD_TRACES if "linux61" not in t.name}
    assert any(missed.values()), missed
