"""Tests compare replies in their JSON form (docs/trace-format.md "Responses")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from viommud.replies import Reply
from viommud.shell.replies import reply_json


def as_json(reply: Reply | dict[str, Any]) -> dict[str, Any]:
    """A session's reply as the responses file shows it (a test harness's JSON as it is)."""
    return reply if isinstance(reply, dict) else reply_json(reply)


def as_json_list(replies: Sequence[Reply | Exception | dict[str, Any]] | None) -> Any:
    """Group commit's replies (an Exception stays as it is; None stays None)."""
    if replies is None:
        return None
    return [r if isinstance(r, Exception | dict) else reply_json(r) for r in replies]
