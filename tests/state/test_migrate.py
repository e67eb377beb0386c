"""Migration (docs/state-format.md): a session saved after N records and loaded into a fresh
session on a fresh backend answers the rest of the trace exactly as the session that never
moved, holds the same guest-visible state, and keeps the totals and the oracle's verdict
(missed 0).

In process (fast, many points) on the bundled SMMUv3, VT-d and virtio-iommu traces and a
trace of one vSMMU over two physical SMMUs; ``viommud replay --migrate-at`` itself, through
a fresh daemon process, in test_replay_migrate.py."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES
from tests.state.traces import write_two_smmu
from viommud import state
from viommud.backend.emulator import EmulatedIommufd
from viommud.host import HostConfig
from viommud.models.smmuv3 import SmmuV3Viommu
from viommud.models.virtio import VirtioViommu
from viommud.models.vtd import VtdViommu
from viommud.replies import Reply
from viommud.session import RecordRefused, Session
from viommud.trace import (
    Cmds,
    ContextEntry,
    PasidEntry,
    Record,
    Request,
    Ste,
    TraceReader,
    ViommuCreate,
)

TRACES = [
    "smmuv3-linux61-strict.jsonl.xz",
    "vtd-linux61-strict-ats-scalable-derived.jsonl.xz",
    "virtio-linux-session.jsonl.xz",
    "virtio-vsva.jsonl",
    "smmuv3-ste-configs.jsonl",
    "two-smmu",
]


def trace_path(name: str) -> Path:
    if name == "two-smmu":
        return write_two_smmu(Path(_tmpdir()) / "smmuv3-two-smmu.jsonl")
    return FIXTURES / name


@cache
def _tmpdir() -> str:
    return tempfile.mkdtemp(prefix="viommud-state-")  # one directory for the whole module


@cache
def _records(name: str) -> tuple[HostConfig, tuple[Record, ...]]:
    with TraceReader(trace_path(name)) as reader:
        return reader.header.host, tuple(reader)


def _answer(session: Session, record: Record) -> Reply | str:
    try:
        return session.handle(record)
    except RecordRefused as exc:
        return f"refused: {exc}"


@cache
def _straight(name: str) -> tuple[tuple[Reply | str, ...], dict[str, Any]]:
    host, records = _records(name)
    session = Session(EmulatedIommufd(host), verify=True)
    replies = tuple(_answer(session, r) for r in records)
    return replies, session.report()


def _widths(records: tuple[Record, ...]) -> dict[str, tuple[str, int]]:
    return {
        r.viommu: (r.model, 32 if r.options.get("dw") == 256 else 16)
        for r in records
        if isinstance(r, ViommuCreate)
    }


def _ends_open(record: Record, widths: dict[str, tuple[str, int]]) -> bool:
    """A doorbell whose last command is no CMD_SYNC / wait descriptor."""
    if not isinstance(record, Cmds) or record.viommu not in widths:
        return False
    model, width = widths[record.viommu]
    last = record.data[-width]
    return last != 0x46 if model == "smmuv3" else last & 0xF != 0x5


def _points(name: str) -> Iterator[int]:
    """Where to migrate: after the first record, after the first doorbell (setup done),
    between a configuration write and the doorbell that invalidates it, between a doorbell
    that leaves a barrier for later and the next one, mid-way, and before the last record."""
    _host, records = _records(name)
    widths = _widths(records)
    yield 1
    yield next((i for i, r in enumerate(records, 1) if isinstance(r, Cmds | Request)), 2)
    for i, record in enumerate(records[:-1], 1):
        if isinstance(record, Ste | ContextEntry | PasidEntry) and isinstance(records[i], Cmds):
            yield i
            break
    for i, record in enumerate(records[:-1], 1):
        if _ends_open(record, widths):
            yield i
            break
    if name == "two-smmu":  # an STE written ten doorbells before its CFGI_STE, and after
        yield from (i for i, r in enumerate(records, 1) if isinstance(r, Ste) and i > 10)
    yield len(records) // 2
    yield len(records) - 1


CASES = sorted({(name, n) for name in TRACES for n in _points(name)})


def guest_state(session: Session) -> dict[str, Any]:
    """What the guest can observe of each vIOMMU, as plain data."""
    out: dict[str, Any] = {}
    for name, v in sorted(session.viommus.items()):
        if isinstance(v, SmmuV3Viommu):
            out[name] = (
                "smmuv3",
                v.frontend.features,
                dict(v.frontend.stream_table),
                {vid: (d.bound.name, d.vste) for vid, d in v.topology.vdevices.items()},
            )
        elif isinstance(v, VtdViommu):
            f = v.frontend
            out[name] = (
                "vtd",
                f.features,
                dict(f.context_table),
                dict(f.pasid_table),
                {sid: (d.bound.name, d.binding) for sid, d in v.topology.vdevices.items()},
            )
        elif isinstance(v, VirtioViommu):
            s = v.frontend.state
            out[name] = (
                "virtio-iommu",
                v.frontend.bypass,
                sorted(s.endpoints),
                dict(s.attached),
                {
                    d: (dom.kind, sorted(dom.endpoints), list(dom.mappings), dom.table)
                    for d, dom in s.domains.items()
                },
            )
        else:  # pragma: no cover - a new model needs its line here
            raise AssertionError(type(v))
    return out


@pytest.mark.parametrize(("name", "n"), CASES)
def test_migrated_session_answers_as_the_straight_one(name: str, n: int) -> None:
    host, records = _records(name)
    want, report = _straight(name)
    source = Session(EmulatedIommufd(host), verify=True)
    got = [_answer(source, r) for r in records[:n]]
    blob = state.save(source)
    like = Session(EmulatedIommufd(host), verify=True)
    target = state.load(blob, like, EmulatedIommufd(host))
    assert guest_state(target) == guest_state(source)
    assert target.report()["verify"] == source.report()["verify"]
    source.close()
    got += [_answer(target, r) for r in records[n:]]
    assert got == list(want)
    after = target.report()
    for key in ("commands", "errors", "barriers", "baseline", "config_errors"):
        assert after[key] == report[key], key
    assert after["verify"] == report["verify"]
    assert after["verify"]["missed"] == 0


def test_the_points_include_a_pending_configuration_and_an_open_barrier() -> None:
    """The parametrisation really covers the awkward moments it claims to."""
    _host, records = _records("two-smmu")
    points = set(_points("two-smmu"))
    assert any(isinstance(records[n - 1], Ste) and isinstance(records[n], Cmds) for n in points)
    assert any(_ends_open(records[n - 1], _widths(records)) for n in points)


def _grouped(session: Session, records: tuple[Record, ...]) -> list[Reply | str]:
    """Group commit (Session.doorbells): consecutive doorbells of one vIOMMU, up to 8 at a
    time, answered together as the server does for frames that arrive together."""
    out: list[Reply | str] = []
    at = 0
    while at < len(records):
        record = records[at]
        if not isinstance(record, Cmds):
            out.append(_answer(session, record))
            at += 1
            continue
        run = [record]
        while (
            at + len(run) < len(records)
            and len(run) < 8
            and isinstance(nxt := records[at + len(run)], Cmds)
            and nxt.viommu == record.viommu
        ):
            run.append(nxt)
        answers = session.doorbells(record.viommu, [r.data for r in run])
        out += [a if not isinstance(a, Exception) else f"refused: {a}" for a in answers]
        at += len(run)
    return out


@pytest.mark.parametrize("name", ["two-smmu", "vtd-linux61-strict-ats-scalable-derived.jsonl.xz"])
def test_migration_under_group_commit(name: str) -> None:
    """Doorbells a group commit carries in bulk are journaled like the others: the state
    saved mid-way rebuilds a session that answers the rest alike."""
    host, records = _records(name)
    want, _report = _straight(name)
    n = len(records) // 2
    source = Session(EmulatedIommufd(host), verify=True)
    got = _grouped(source, records[:n])
    alone = Session(EmulatedIommufd(host))
    for record in records[:n]:
        _answer(alone, record)
    assert source.journal is not None
    assert alone.journal is not None
    assert source.journal.records() == alone.journal.records()  # as if one by one
    target = state.load(
        state.save(source), Session(EmulatedIommufd(host), verify=True), EmulatedIommufd(host)
    )
    assert guest_state(target) == guest_state(source)
    got += _grouped(target, records[n:])
    assert got == list(want)
    assert target.report()["verify"]["missed"] == 0
