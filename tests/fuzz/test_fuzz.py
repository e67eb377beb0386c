"""The fuzz tier (issue 14): the frame decoder, HELLO and RECORD JSON, the sessions behind
them and the three guest decoders, fed mutated inputs (tests/fuzz/harness.py), with 0
internal errors. The default tier runs a few thousand inputs so the harness cannot rot;
the slow tier runs 1,050,000 (``VIOMMUD_FUZZ_SEED`` picks another deterministic stream)."""

from __future__ import annotations

import os
import random

import pytest

from tests.fuzz import harness

SEED = int(os.environ.get("VIOMMUD_FUZZ_SEED", "1"))
# inputs per target in the slow tier: 1,050,000 in all (~2-5 min on two busy cores)
SLOW = {
    "frames": 200_000,
    "hello": 100_000,
    "session": 300_000,
    "smmuv3": 150_000,
    "vtd": 150_000,
    "virtio": 150_000,
}


@pytest.fixture(scope="module")
def seeds() -> harness.Seeds:
    return harness.load_seeds()


def _check(result: harness.Result, n: int) -> None:
    print(  # the tier's figures, in the log of `pytest -m slow -s`
        f"fuzz {result.target}: {result.inputs} inputs, {result.internal_errors} internal "
        f"errors, {result.seconds:.1f} s ({result.inputs / max(result.seconds, 1e-9):.0f}/s)"
    )
    assert result.inputs == n
    assert result.internal_errors == 0, "\n".join(result.samples)


@pytest.mark.parametrize("target", list(harness.TARGETS))
def test_quick(target: str, seeds: harness.Seeds) -> None:
    _check(harness.run(target, 2_000, SEED, seeds), 2_000)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("target", list(SLOW))
def test_slow(target: str, seeds: harness.Seeds) -> None:
    _check(harness.run(target, SLOW[target], SEED, seeds), SLOW[target])


def test_the_slow_tier_runs_a_million_inputs() -> None:
    assert sum(SLOW.values()) >= 1_000_000
    assert set(SLOW) == set(harness.TARGETS)


def test_the_harness_finds_an_internal_error(seeds: harness.Seeds) -> None:
    """A decoder that fails on some inputs is caught (the harness is not a stub)."""

    def broken(rng: object, data: bytes) -> object:
        if len(data) > 40:
            raise KeyError("boom")
        return None

    run = harness._decoder_target("virtio", (24, 64), broken)
    result = run(random.Random(1), 500, seeds)
    assert result.internal_errors > 0
    assert "KeyError" in result.samples[0]
