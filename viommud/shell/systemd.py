"""systemd integration without extra dependencies: socket activation and readiness.

Both protocols are small and stable (sd_listen_fds(3), sd_notify(3)):

* **Socket activation.** The service manager binds the listening sockets (viommud.socket),
  starts the daemon with them open from fd 3 on and sets ``LISTEN_PID`` (the daemon's
  pid), ``LISTEN_FDS`` (how many) and optionally ``LISTEN_FDNAMES``. ``listen_sockets()``
  takes them over and removes the variables, so child processes do not inherit them.
* **Readiness.** With ``Type=notify`` the manager waits for ``READY=1`` on the datagram
  socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace);
  ``notify()`` sends it, and ``STOPPING=1`` / ``STATUS=...`` lines the same way.
* **Watchdog.** With ``WatchdogSec=`` the manager sets ``WATCHDOG_USEC`` (and
  ``WATCHDOG_PID``) and restarts the service unless ``WATCHDOG=1`` arrives within that
  time; ``watchdog_interval()`` says how often to send it (half the timeout, as
  sd_watchdog_enabled(3) advises), the listener's event loop sends it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

SD_LISTEN_FDS_START = 3
_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SystemdError(RuntimeError):
    """The service manager handed over something the daemon cannot serve on."""


@dataclass(frozen=True, slots=True)
class ListenSocket:
    name: str  # from LISTEN_FDNAMES (FileDescriptorName=), "unknown" when not given
    sock: socket.socket

    @property
    def is_unix(self) -> bool:
        return self.sock.family == socket.AF_UNIX


def listen_fd_numbers(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """``(fd, name)`` of the sockets passed to process ``pid`` per ``environ`` (no I/O)."""
    if environ.get("LISTEN_PID", "") != str(pid):
        return []  # not for us (or not activated at all)
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise SystemdError(f"LISTEN_FDS={environ.get('LISTEN_FDS')!r} is not a number") from None
    if count < 0:
        raise SystemdError(f"LISTEN_FDS={count} is negative")
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if names and len(names) != count:
        raise SystemdError(f"LISTEN_FDNAMES has {len(names)} names for {count} descriptors")
    return [(SD_LISTEN_FDS_START + i, names[i] if names else "unknown") for i in range(count)]


def listen_sockets(
    environ: MutableMapping[str, str] | None = None,
    *,
    unset_environment: bool = True,
    start: int = SD_LISTEN_FDS_START,
) -> list[ListenSocket]:
    """Take over the listening sockets systemd passed to this process (may be none).

    ``start`` moves the first descriptor (tests use free descriptor numbers)."""
    env = os.environ if environ is None else environ
    fds = listen_fd_numbers(env, os.getpid())
    if unset_environment:
        for key in _ENV:
            env.pop(key, None)
    out = []
    for number, name in fds:
        fd = number - SD_LISTEN_FDS_START + start
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise SystemdError(f"passed descriptor {fd} ({name}) is not a socket: {exc}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise SystemdError(
                f"passed descriptor {fd} ({name}) is not a listening stream socket "
                "(viommud.socket must use ListenStream=)"
            )
        sock.setblocking(False)
        out.append(ListenSocket(name, sock))
    return out


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when
    the manager asks for none (no or a bad ``WATCHDOG_USEC``, a ``WATCHDOG_PID`` that is
    another process's). No I/O."""
    if environ.get("WATCHDOG_PID", str(pid)) != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager.

    Returns False when not started by a manager that listens (no ``NOTIFY_SOCKET``); raises
    OSError when the socket is named but cannot be reached, or when its queue is full (the
    send never blocks: it runs in the listener's event loop).
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        raise OSError(f"NOTIFY_SOCKET={address!r} is neither a path nor an abstract name")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        sock.connect(address)
        sock.send(state.encode())
    return True
