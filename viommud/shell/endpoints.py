"""Where the daemon listens and how TCP clients prove who they are (docs/operations.md).

A *target* names a daemon: a Unix socket path (``/run/viommud/viommud.sock``) or a TCP
address ``tcp://ADDR:PORT`` (``tcp://[::1]:7070`` for IPv6). TCP is off unless the operator
asks for it, and then every connection must present the shared token (``--token-file``) in
its HELLO (or in a STATUS request): the Unix socket is guarded by its file permissions, a
TCP port by nothing else.
"""

from __future__ import annotations

import hmac
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

MIN_TOKEN_LENGTH = 16


class EndpointError(ValueError):
    """An address or a token file the daemon cannot use; the message says why."""


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_tcp(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith("tcp://")


def parse_tcp(target: str) -> TcpAddress:
    """``tcp://ADDR:PORT`` → TcpAddress; raises EndpointError."""
    if not is_tcp(target):
        raise EndpointError(f"{target!r} is not a tcp://ADDR:PORT address")
    return parse_host_port(target[len("tcp://") :])


def parse_host_port(text: str) -> TcpAddress:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` → TcpAddress; raises EndpointError."""
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise EndpointError(f"bad address {text!r}: {exc}") from None
    if not host or port is None or parts.path or parts.query or parts.username:
        raise EndpointError(f"bad address {text!r}: expected ADDR:PORT")
    return TcpAddress(host, port)


def bind_tcp(address: TcpAddress, backlog: int = 128) -> socket.socket:
    """A non-blocking TCP socket bound to ``address`` and listening."""
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _name, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def read_token(path: str | Path) -> str:
    """The shared secret in ``path`` (surrounding whitespace removed); raises EndpointError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EndpointError(f"cannot read token file {path}: {exc}") from None
    token = text.strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise EndpointError(
            f"token file {path}: the token must be one word of at least "
            f"{MIN_TOKEN_LENGTH} characters (e.g. `openssl rand -hex 32`)"
        )
    return token


def token_file_is_private(path: str | Path) -> bool:
    """False when group or others may read the token file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True
    return not stat.S_IMODE(mode) & 0o077


def token_matches(expected: str, presented: object) -> bool:
    """Constant-time comparison of the presented token with the expected one.

    Anything but a string of UTF-8-encodable characters is simply a wrong token: JSON lets a
    client send a lone surrogate (``"\\ud800"``), which no token file can hold."""
    if not isinstance(presented, str):
        return False
    try:
        candidate = presented.encode()
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected.encode(), candidate)
