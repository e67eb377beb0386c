"""The construct boundary: parsed Containers become plain dicts here and nowhere else."""

from __future__ import annotations

from typing import Any


def flatten_words(parsed: Any) -> dict[str, int]:
    """Merge the per-word containers of a parsed declaration into one ``{field: int}`` dict,
    leaving out construct's hidden keys (``_io`` and friends)."""
    out: dict[str, int] = {}
    for key, value in parsed.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            for name, raw in value.items():
                if not name.startswith("_"):
                    out[name] = int(raw)
        else:
            out[key] = int(value)
    return out
