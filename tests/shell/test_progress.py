"""`viommud replay` draws a progress bar (records, records/s) on a terminal, nothing otherwise."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from tests.conftest import FIXTURES, REAL_SMMUV3
from viommud.shell.cli import main

SMALL = FIXTURES / "smmuv3-every-opcode.jsonl"


def test_quiet_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(SMALL), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("{")


def test_forced_bar_counts_records(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(SMALL), "--json", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "smmuv3-every-opcode" in err
    assert " records" in err


def test_bar_on_a_terminal() -> None:
    leader, follower = pty.openpty()
    # A fresh pty is 0 columns wide; give it the size of a real terminal window.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "viommud", "replay", str(REAL_SMMUV3), "--json"],
            stdout=subprocess.PIPE,
            stderr=follower,
        )
        os.close(follower)
        follower = -1
        out, _ = proc.communicate(timeout=120)
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    assert out.startswith(b"{")  # the report on stdout is untouched
    text = terminal.decode(errors="replace")
    assert "smmuv3-linux61-strict" in text
    assert "records/s" in text
