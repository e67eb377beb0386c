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
import time
from collections.abc import Callable
from dataclasses import dataclass
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


# Warnings a client can repeat as often as it likes (a doorbell of 100,000 bad commands is
# 100,000 guest errors) are aggregated per session: at most one line per (event, vIOMMU,
# code) per ``REPEAT_WINDOW`` seconds; the ones held back are counted and reported by one
# ``events_suppressed`` line when the window ends, with the first held-back line's keys
# (its offending bytes among them). The value names the key that is the "code".
AGGREGATED = {
    "guest_error": "code",
    "backend_error": "errno",
    "config_record_failed": "op",
    "device_busy": "device",
    "host_resync_failed": "",
    "verify_missed": "",
    "internal_error": "frame_type",
}
REPEAT_WINDOW = 1.0
LONG = 512  # characters of any string on a session's warning / error / debug line


@dataclass(slots=True)
class _Window:
    started: float
    log: Any  # the inner logger of the first line (its vIOMMU), for the summary
    level: str
    code: Any
    count: int = 0
    first: dict[str, Any] | None = None


class _Repeats:
    """One session's open windows, shared by every logger bound from its root."""

    __slots__ = ("clock", "windows")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.windows: dict[tuple[str, Any, Any], _Window] = {}

    def report(self, event: str, window: _Window) -> None:
        if not window.count:
            return
        log, code, count, first = window.log, window.code, window.count, window.first
        if window.level == "error":  # the level of the lines it stands for
            log.error("events_suppressed", suppressed=event, code=code, count=count, first=first)
        else:
            log.warning("events_suppressed", suppressed=event, code=code, count=count, first=first)

    def flush(self, *, all_windows: bool = False) -> None:
        """Report (and close) every window whose second is over, or every window."""
        if not self.windows:
            return
        now = self.clock()
        for key, window in list(self.windows.items()):
            if all_windows or now - window.started >= REPEAT_WINDOW:
                del self.windows[key]
                self.report(key[0], window)


def _clipped(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with every string longer than ``LONG`` cut (``clip``): a virtio request's
    ``raw_hex`` or a client's device name cannot make a line megabytes long."""
    for value in kw.values():
        if isinstance(value, str) and len(value) > LONG:
            return {k: clip(v, LONG) if isinstance(v, str) else v for k, v in kw.items()}
    return kw


class SessionLogger:
    """A session's logger (docs/operations.md §5): per-batch ``info`` lines
    (``PER_BATCH_EVENTS``) go out at DEBUG; the events of ``AGGREGATED`` at most once per
    (event, vIOMMU, code) per ``REPEAT_WINDOW`` seconds, the rest counted into
    ``events_suppressed``; long strings are clipped. ``bind`` shares the windows."""

    __slots__ = ("_inner", "_repeats", "_viommu")

    def __init__(
        self,
        inner: Any,
        repeats: _Repeats | None = None,
        viommu: Any = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._repeats = repeats if repeats is not None else _Repeats(clock)
        self._viommu = viommu

    def bind(self, **context: Any) -> SessionLogger:
        return SessionLogger(
            self._inner.bind(**context), self._repeats, context.get("viommu", self._viommu)
        )

    @property
    def batch_lines(self) -> bool:
        """Whether the per-batch lines, lowered to DEBUG here, reach the output (the models
        skip building them otherwise: viommud.models.base.batch_lines)."""
        check = getattr(self._inner, "is_enabled_for", None)
        return True if check is None else bool(check(logging.DEBUG))

    def info(self, event: str, *args: Any, **kw: Any) -> Any:
        inner = self._inner  # the events are the models' (documented there)
        return (inner.debug if event in PER_BATCH_EVENTS else inner.info)(event, *args, **kw)

    def debug(self, event: str, *args: Any, **kw: Any) -> Any:
        inner = self._inner
        return inner.debug(event, *args, **_clipped(kw))

    def warning(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("warning", event, args, kw)

    def error(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("error", event, args, kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._emit("exception", event, args, kw)

    def flush(self, *, all_windows: bool = False) -> None:
        """Report the windows that are over (the connection calls this after every chunk,
        the session process once a second), or all of them (at the session's end)."""
        self._repeats.flush(all_windows=all_windows)

    def _emit(self, level: str, event: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        kw = _clipped(kw)
        inner = self._inner
        code_key = AGGREGATED.get(event)
        if code_key is not None:
            repeats = self._repeats
            code = kw.get(code_key) if code_key else None
            key = (event, kw.get("viommu", self._viommu), code)
            now = repeats.clock()
            window = repeats.windows.get(key)
            if window is not None:
                if now - window.started < REPEAT_WINDOW:
                    window.count += 1
                    if window.first is None:
                        window.first = kw
                    return None
                del repeats.windows[key]
                repeats.report(event, window)
            repeats.windows[key] = _Window(
                now, inner, "error" if level != "warning" else "warning", code
            )
        return getattr(inner, level)(event, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


DemotingLogger = SessionLogger  # its first job; the name the callers know


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("viommud").bind(**context)
