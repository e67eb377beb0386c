"""Structured logging, configured once by the CLI (never at import).

Events are snake_case facts (``client_connected``, ``batch_forwarded``, ``guest_error`` …)
with bound context (``client``, ``vm``, ``viommu``); JSON lines on stderr by default, console
rendering when stderr is a terminal or ``--log-format console``. The vocabulary (every event
and key) is in docs/operations.md §5, and a test keeps it complete. Strings a client chose
(its VM, trace and client names) go through ``clip`` before they are bound to lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


CONFIGURED: dict[str, str] = {}  # the level and format configure() chose (for session processes)


def configure(
    level: str | None = None,
    fmt: str | None = None,
    stream: TextIO | None = None,
    *,
    default_level: str = "info",
) -> None:
    """Set up structlog (and stdlib logging for third-party libraries).

    ``level``/``fmt`` fall back to $VIOMMUD_LOG_LEVEL / $VIOMMUD_LOG_FORMAT, then to
    ``default_level`` and to ``console`` on a TTY, ``json`` elsewhere.
    """
    out = stream if stream is not None else sys.stderr
    level_name = (level or os.environ.get("VIOMMUD_LOG_LEVEL") or default_level).lower()
    if level_name not in LEVELS:
        raise ValueError(f"unknown log level {level_name!r} (use {', '.join(LEVELS)})")
    fmt_name = (fmt or os.environ.get("VIOMMUD_LOG_FORMAT") or "auto").lower()
    if fmt_name == "auto":
        fmt_name = "console" if out.isatty() else "json"
    if fmt_name not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt_name!r} (use json or console)")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt_name == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    CONFIGURED.update(level=level_name, format=fmt_name)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
            if fmt_name == "json"
            else _passthrough,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level_name]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through stdlib logging: same stream, same rendering.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level_name], logging.INFO))


def _passthrough(_logger: Any, _name: str, event: Any) -> Any:
    return event


CLIP = 128  # characters of a client-chosen string on a log line


def clip(text: str, limit: int = CLIP) -> str:
    """``text`` cut to at most ``limit`` characters, the cut marked ``…(+N)`` (N characters
    dropped), so a client's 64 KB name cannot blow up every log line it is bound to."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(f"…(+{len(text)})"), 0)
    return f"{text[:keep]}…(+{len(text) - keep})"


# One line per batch is too much at INFO (a doorbell costs ~14 us more with it, ~40 % of
# the throughput): the models' per-batch lines go out at DEBUG, and each session logs a
# ``session_progress`` line at most once a second instead (viommud.shell.progress).
PER_BATCH_EVENTS = frozenset({"batch_forwarded", "group_forwarded", "request_completed"})


class DemotingLogger:
    """A bound logger whose per-batch ``info`` lines (``PER_BATCH_EVENTS``) are logged at
    DEBUG; everything else passes through. ``bind`` keeps the demotion."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def bind(self, **context: Any) -> DemotingLogger:
        return DemotingLogger(self._inner.bind(**context))

    def info(self, event: str, *args: Any, **kw: Any) -> Any:
        inner = self._inner  # the events are the models' (documented there)
        return (inner.debug if event in PER_BATCH_EVENTS else inner.info)(event, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("viommud").bind(**context)
