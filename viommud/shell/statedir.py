"""``serve --state-dir DIR``: each session's state kept on disk, so that a client can resume
its session after the daemon was killed or upgraded (docs/state-format.md §6).

One file per session, ``DIR/TOKEN.state``: the session's state document (viommud.state)
with ``frames``, the number of request frames the session had answered. It is rewritten
(a temporary file, fsync, rename, fsync of the directory) before the replies of the frames
that changed it leave the daemon, so a reply the client read is never newer than the file.
A client resumes with HELLO ``resume: TOKEN``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from viommud import state
from viommud.session import Session

_TOKEN = re.compile(r"[0-9a-f]{32}")


class StateDirError(Exception):
    """A resume this daemon refuses (unknown or busy token); the message says why."""


@dataclass(slots=True)
class StateDir:
    """The directory of saved sessions. A session live on a connection holds an exclusive
    ``flock`` on ``DIR/TOKEN.lock`` (so the claim holds across processes, and a process
    that dies releases it)."""

    path: Path
    _locks: dict[str, int] = field(default_factory=dict)  # token -> the locked fd

    def __post_init__(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _file(self, token: str) -> Path:
        return self.path / f"{token}.state"

    def _lock(self, token: str) -> bool:
        fd = os.open(self.path / f"{token}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._locks[token] = fd
        return True

    def claim(self, token: object) -> tuple[str, bytes | None]:
        """A token for a new session (``token`` None), or the saved state of ``token``;
        StateDirError for a token that is malformed, unknown or in use."""
        if token is None:
            token = secrets.token_hex(16)
            self._lock(token)
            return token, None
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise StateDirError("'resume' must be a session token (32 lowercase hex digits)")
        if not self._file(token).exists():
            raise StateDirError("no saved session for that token")
        if not self._lock(token):
            raise StateDirError("that session is live on another connection")
        try:
            blob = self._file(token).read_bytes()
        except FileNotFoundError:
            self.release(token)
            raise StateDirError("no saved session for that token") from None
        return token, blob

    def release(self, token: str) -> None:
        fd = self._locks.pop(token, None)
        if fd is not None:
            os.close(fd)  # closing the fd drops the lock

    def store(self, token: str, session: Session, frames: int) -> None:
        """Write the session's state, crash-safely (atomic rename after fsync)."""
        blob = state.save(session, frames=frames)
        final = self._file(token)
        temporary = final.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, final)
        directory = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def discard(self, token: str) -> None:
        """Remove the session's file (and its lock file; call after ``release``)."""
        for path in (self._file(token), self.path / f"{token}.lock"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
