"""The command line against operators' pitfalls, run as processes: a socket that never
answers, a reader that goes away early, global options after the subcommand
(docs/operations.md §5, §6, §8)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, Daemon
from viommud.shell.cli import _parser
from viommud.shell.client import Client, ClientError, timeouts

SMALL = FIXTURES / "smmuv3-every-opcode.jsonl"
VIOMMUD = [sys.executable, "-m", "viommud"]


@pytest.fixture
def mute_socket(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that accepts connections (the kernel's backlog) and never answers."""
    path = tmp_path / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    try:
        yield path
    finally:
        listener.close()


def test_replay_to_a_socket_that_never_answers_gives_up(mute_socket: Path) -> None:
    started = time.monotonic()
    run = subprocess.run(
        [*VIOMMUD, "replay", str(SMALL), "--socket", str(mute_socket), "--timeout", "0.3"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert time.monotonic() - started < 5
    assert run.returncode == 2
    assert f"no answer to HELLO from {mute_socket} within 0.3 s" in run.stderr
    assert "Traceback" not in run.stderr


def test_replay_timeout_must_be_positive() -> None:
    run = subprocess.run(
        [*VIOMMUD, "replay", str(SMALL), "--socket", "x", "--timeout", "0"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert run.returncode == 2
    assert "expected a positive number of seconds" in run.stderr


async def test_the_handshake_timeout_applies_to_clients_made_inside_the_block(
    mute_socket: Path,
) -> None:
    with timeouts(0.2):
        client = await Client.connect(mute_socket)
    try:
        assert client.timeout == 0.2
        with pytest.raises(ClientError, match=f"no answer to HELLO from {mute_socket}"):
            await client.hello()
    finally:
        await client.close()


@pytest.mark.parametrize("target", ["{tmp}/absent.sock", "tcp://127.0.0.1:1"])
async def test_connect_failures_name_the_target(tmp_path: Path, target: str) -> None:
    where = target.format(tmp=tmp_path)
    with pytest.raises(ClientError, match=f"cannot connect to {where}: "):
        await Client.connect(where, wait=2)


async def test_closed_stdout_ends_every_printing_subcommand_quietly(daemon: Daemon) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    socket_ = str(daemon.socket)
    commands = [
        ["status", "--json", "--socket", socket_],
        ["status", "--socket", socket_],
        ["health", "--socket", socket_],
        ["replay", str(SMALL), "--json"],
        ["replay", str(SMALL), "--socket", socket_],
        ["--version"],
    ]
    try:
        processes = [
            await asyncio.create_subprocess_exec(
                *VIOMMUD, *args, stdout=write_end, stderr=asyncio.subprocess.PIPE
            )
            for args in commands
        ]
    finally:
        os.close(write_end)
    async with asyncio.timeout(30):
        results = [(await p.communicate())[1].decode() for p in processes]
    for args, process, err in zip(commands, processes, results, strict=True):
        assert err == "", (args, err)
        assert process.returncode == (0 if args == ["--version"] else 1), (args, err)


def test_global_options_after_the_subcommand() -> None:
    run = subprocess.run(
        [*VIOMMUD, "replay", str(SMALL), "--json", "--log-level", "debug", "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["trace"] == "smmuv3-every-opcode"
    events = [json.loads(line)["event"] for line in run.stderr.splitlines()]
    assert "command_decoded" in events  # debug lines: the option after `replay` took effect


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["serve"], None),
        (["serve", "--log-level", "debug"], "debug"),
        (["--log-level", "error", "serve"], "error"),
        (["--log-level", "error", "status", "--log-level", "debug"], "debug"),
    ],
)
def test_global_options_parse_on_either_side(argv: list[str], level: str | None) -> None:
    assert _parser().parse_args(argv).log_level == level
