"""The command line: the README's main job, exit codes, output files, and `serve` as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REAL_SMMUV3
from viommud.shell.cli import main

REPORT_KEYS = {
    "trace",
    "records",
    "commands",
    "errors",
    "barriers",
    "backend",
    "baseline",
    "verify",
    "group_commit",
    "elapsed_s",
    "commands_per_s",
}


def test_replay_json_report_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    responses, calls = tmp_path / "r.jsonl", tmp_path / "c.jsonl"
    code = main(
        ["replay", str(REAL_SMMUV3), "--json", "--responses", str(responses), "--calls", str(calls)]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= REPORT_KEYS
    assert (
        report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"]
        <= report["baseline"]["invalidate_calls"]
    )
    assert report["verify"] == {"enabled": True, "missed": 0, "over": 0}  # on by default
    assert len(responses.read_text().splitlines()) == report["records"]
    assert len(calls.read_text().splitlines()) == sum(report["backend"]["calls"].values())


def test_replay_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(FIXTURES / "smmuv3-guest-errors.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "guest errors" in out
    assert "CERROR_ILL 21" in out
    assert "missed 0, over 0" in out  # the oracle runs by default and says what it found


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_group_commit_needs_a_number_of_vcpus(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(FIXTURES / "smmuv3-every-opcode.jsonl"), "--group-commit", value])
    assert exc.value.code == 2
    assert "expected a number of racing vCPUs" in capsys.readouterr().err


def test_replay_table_states_the_group_commit_assumption(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trace = str(FIXTURES / "smmuv3-every-opcode.jsonl")
    assert main(["replay", trace, "--group-commit", "8"]) == 0
    assert "8 vCPUs racing per vIOMMU" in capsys.readouterr().out
    assert main(["replay", trace, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["group_commit"] == 0


def test_replay_no_verify(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["replay", str(FIXTURES / "smmuv3-every-opcode.jsonl"), "--no-verify", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["verify"]["enabled"] is False


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"op":"viommu_create","viommu":"v","model":"smmuv3","iommus":["smmu0"]}', "{oops"],
            "line 3: invalid JSON",
        ),
        (
            ['{"op":"cmds","viommu":"ghost","data":"4620c00f000000000000000000000000"}'],
            "line 2: the daemon refused the record: no vIOMMU named 'ghost'",
        ),
        (
            [
                '{"op":"viommu_create","viommu":"v","model":"smmuv3","iommus":["smmu0"]}',
                '{"op":"cmds","viommu":"v","data":"46"}',
            ],
            "line 3: the daemon refused the record",
        ),
    ],
)
def test_malformed_traces_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], message: str
) -> None:
    header = (FIXTURES / "smmuv3-every-opcode.jsonl").read_text().splitlines()[0]
    trace = tmp_path / "bad.jsonl"
    trace.write_text("\n".join([header, *lines]) + "\n")
    assert main(["replay", str(trace), "--json"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_missing_trace_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_health_without_daemon_exits_1(tmp_path: Path) -> None:
    assert main(["health", "--socket", str(tmp_path / "x.sock"), "--timeout", "0.5"]) == 1


@pytest.mark.parametrize(
    ("loop", "group"), [("asyncio", False), ("uvloop", True)], ids=["asyncio", "uvloop-group"]
)
def test_serve_replay_health_and_sigterm(tmp_path: Path, loop: str, group: bool) -> None:
    socket = tmp_path / "d.sock"
    env = {**os.environ, "VIOMMUD_LOG_FORMAT": "json"}
    log = tmp_path / "daemon.log"  # a file, not a pipe: nobody reads a pipe while it fills
    with log.open("w") as sink:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "viommud", "serve", "--socket", str(socket), "--loop", loop],
            stderr=sink,
            text=True,
            env=env,
        )
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cli = [sys.executable, "-m", "viommud"]
        health = subprocess.run(
            [*cli, "health", "--socket", str(socket)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert health.returncode == 0, health.stderr
        rep = subprocess.run(
            [
                *cli,
                "replay",
                str(REAL_SMMUV3 if group else FIXTURES / "smmuv3-ste-configs.jsonl"),
                "--socket",
                str(socket),
                "--json",
                *(["--group-commit", "128"] if group else []),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert rep.returncode == 0, rep.stderr
        report = json.loads(rep.stdout)
        assert report["trace"] == ("smmuv3-linux61-strict" if group else "smmuv3-ste-configs")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    err = log.read_text()
    assert daemon.returncode == 0
    events = [json.loads(line) for line in err.splitlines()]
    names = [e["event"] for e in events]
    for name in (
        "server_started",
        "client_connected",
        "session_handed_over",
        "session_started",
        "session_progress",
        "client_disconnected",
        "shutdown_started",
        "shutdown_complete",
    ):
        assert name in names, name
    # at info, no line per batch: a session_progress line sums them up
    assert not [e for e in events if e["event"].endswith("_forwarded")]
    progress = next(e for e in events if e["event"] == "session_progress")
    assert {"client", "vm", "doorbells", "commands", "host_calls", "p50_ms", "p99_ms"} <= set(
        progress
    )
    assert progress["doorbells"] > 0
    assert not [e for e in events if e["level"] in ("error", "critical")]
    assert not socket.exists()


def test_verify_exit_status_1_when_an_invalidation_is_missed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = str(FIXTURES / "smmuv3-every-opcode.jsonl")
    assert main(["replay", trace, "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verify"]["missed"] == 0
    # a dispatcher that forgets every TLB invalidation: the oracle must say so
    monkeypatch.setattr(
        "viommud.dispatcher.smmuv3.SmmuDispatcher.targets",
        lambda self, inv: (
            []
            if inv.scope.value != "device"
            else [self.topology.slots[self.topology.vdevices[inv.device].iommu]]
        ),
    )
    assert main(["replay", trace, "--verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["verify"]["missed"] > 0
