"""Bounded memory (issue 14): a session process's RSS stays flat from 10^5 to 10^6 strict
SMMUv3 commands through `viommud serve` (bench/session_rss.py; slow tier)."""

from __future__ import annotations

import asyncio

import pytest

from bench.session_rss import measure
from bench.transport import spawned

GROWTH_BOUND_KIB = 1024  # measured: 4 KiB (46,328 -> 46,332 KiB)
SETUP_COMMANDS = 6  # three devices: CFGI_STE + CMD_SYNC each


@pytest.mark.slow
def test_a_session_process_stays_flat_over_a_million_commands() -> None:
    with spawned("daemon") as path:
        result = asyncio.run(measure(path, (100_000, 1_000_000)))
    rss = result["rss_kib"]
    assert result["commands"] >= 1_000_000
    assert result["commands_counted"] == result["commands"] + SETUP_COMMANDS
    assert rss["1000000"] - rss["100000"] <= GROWTH_BOUND_KIB, rss
