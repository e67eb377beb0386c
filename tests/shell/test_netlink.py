"""viommud.shell.netlink without privileges: listeners, missing namespaces, the skip reason."""

from __future__ import annotations

import pytest

from viommud.shell import netlink
from viommud.shell.endpoints import TcpAddress


def test_listener_in_our_own_namespace() -> None:
    sock = netlink.tcp_listener(TcpAddress("127.0.0.1", 0))
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_a_missing_namespace_is_reported_from_the_helper_thread() -> None:
    with pytest.raises(netlink.NetnsError, match="'viommud-absent' does not exist"):
        netlink.tcp_listener(TcpAddress("127.0.0.1", 0), "viommud-absent")
    assert not netlink.namespace_exists("viommud-absent")
    netlink.remove_namespace("viommud-absent")  # missing is not an error


def test_why_namespaces_cannot_be_managed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    reason = netlink.can_manage_namespaces()
    assert reason is not None
    assert "needs root" in reason
