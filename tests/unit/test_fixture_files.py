"""The hand-made traces on disk are exactly what fixtures/generate.py writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

GENERATOR = Path(__file__).resolve().parents[2] / "fixtures" / "generate.py"


def test_fixtures_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("fixtures_generate", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python fixtures/generate.py"
