"""Addresses and tokens: what `--listen`, `--metrics` and `--token-file` accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from viommud.shell.endpoints import (
    EndpointError,
    TcpAddress,
    bind_tcp,
    is_tcp,
    parse_host_port,
    parse_tcp,
    read_token,
    token_file_is_private,
    token_matches,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://127.0.0.1:7070", TcpAddress("127.0.0.1", 7070)),
        ("tcp://[::1]:7070", TcpAddress("::1", 7070)),
        ("tcp://localhost:0", TcpAddress("localhost", 0)),
    ],
)
def test_tcp_targets(text: str, expected: TcpAddress) -> None:
    assert is_tcp(text)
    assert parse_tcp(text) == expected


@pytest.mark.parametrize(
    "text", ["127.0.0.1:7070", "tcp://127.0.0.1", "tcp://:7070", "tcp://h:99999", "tcp://h:1/x"]
)
def test_bad_tcp_targets(text: str) -> None:
    with pytest.raises(EndpointError):
        parse_tcp(text)


def test_host_port_and_its_text() -> None:
    assert str(parse_host_port("0.0.0.0:9708")) == "0.0.0.0:9708"
    assert str(parse_host_port("[::]:9708")) == "[::]:9708"
    assert not is_tcp(Path("/run/viommud/viommud.sock"))


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  " + "a1" * 16 + "\n")
    path.chmod(0o600)
    assert read_token(path) == "a1" * 16
    assert token_file_is_private(path)
    path.chmod(0o644)
    assert not token_file_is_private(path)


@pytest.mark.parametrize("content", ["", "short", "two words but long enough"])
def test_weak_or_malformed_tokens_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(EndpointError, match="at least 16"):
        read_token(path)


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match="cannot read token file"):
        read_token(tmp_path / "absent")


def test_token_comparison() -> None:
    assert token_matches("s" * 20, "s" * 20)
    assert not token_matches("s" * 20, "s" * 19 + "t")
    assert not token_matches("s" * 20, None)
    assert not token_matches("s" * 20, 12345)


def test_bind_tcp_listens_on_a_free_port() -> None:
    sock = bind_tcp(TcpAddress("127.0.0.1", 0))
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1"
        assert port > 0
        assert not sock.getblocking()
    finally:
        sock.close()
