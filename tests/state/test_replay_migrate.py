"""``viommud replay TRACE --migrate-at N`` (docs/state-format.md §5): the replay saves the
session after N records, loads it into a fresh daemon process and replays the rest there;
its responses are byte-identical to a straight replay's and the oracle misses nothing. With
``--socket`` the state moves to a new session of that daemon."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.shell.conftest import running
from tests.state.traces import write_two_smmu
from viommud.shell.cli import main
from viommud.shell.replay import replay, replay_embedded

# One point each: mid-way (the in-process tests cover many more, test_migrate.py).
CASES = [
    ("smmuv3-linux61-strict.jsonl.xz", 3122),
    ("vtd-linux61-strict-ats-scalable-derived.jsonl.xz", 20),
    ("virtio-linux-session.jsonl.xz", 4351),
    ("virtio-vsva.jsonl", 33),
    ("smmuv3-ste-configs.jsonl", 10),
    ("two-smmu", 43),
]


def _trace(name: str, tmp_path: Path) -> Path:
    return write_two_smmu(tmp_path / "two.jsonl") if name == "two-smmu" else FIXTURES / name


@pytest.mark.parametrize(("name", "n"), CASES)
def test_cli_migrate_at_answers_byte_for_byte(
    name: str, n: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _trace(name, tmp_path)
    straight, moved = tmp_path / "straight.jsonl", tmp_path / "moved.jsonl"
    assert main(["replay", str(trace), "--json", "--responses", str(straight)]) == 0
    want = json.loads(capsys.readouterr().out.splitlines()[-1])
    argv = ["replay", str(trace), "--json", "--responses", str(moved), "--migrate-at", str(n)]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert moved.read_bytes() == straight.read_bytes()
    assert got["verify"] == want["verify"]
    assert got["verify"]["missed"] == 0
    for key in ("records", "commands", "errors", "barriers", "baseline", "config_errors"):
        assert got[key] == want[key], key


def test_the_call_log_goes_on_across_the_migration(tmp_path: Path) -> None:
    """The rebuild's calls are in the call log, numbered after the saved session's."""
    calls = io.StringIO()
    trace = write_two_smmu(tmp_path / "two.jsonl")
    result = asyncio.run(replay_embedded(trace, calls=calls, verify=True, migrate_at=43))
    assert result.exit_code == 0
    seqs = [json.loads(line)["seq"] for line in calls.getvalue().splitlines()]
    assert seqs == list(range(1, len(seqs) + 1))
    ioctls = [json.loads(line)["ioctl"] for line in calls.getvalue().splitlines()]
    assert ioctls.count("IOMMU_VIOMMU_ALLOC") == 4  # two physical SMMUs, made twice


def test_migrate_at_with_socket_moves_to_a_new_session(tmp_path: Path) -> None:
    trace = FIXTURES / "virtio-vsva.jsonl"

    async def both() -> tuple[str, str, int]:
        async with running(tmp_path) as server:
            straight, moved = io.StringIO(), io.StringIO()
            await replay(trace, server.socket_path, responses=straight, verify=True)
            result = await replay(
                trace, server.socket_path, responses=moved, verify=True, migrate_at=21
            )
            return straight.getvalue(), moved.getvalue(), result.exit_code

    straight, moved, code = asyncio.run(both())
    assert code == 0
    assert moved == straight


def test_migrate_at_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(FIXTURES / "virtio-vsva.jsonl"), "--migrate-at", "0"])
    assert exc.value.code == 2
    assert "expected a positive number of records" in capsys.readouterr().err
