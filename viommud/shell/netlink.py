"""The one door to netlink: every use of pyroute2 in viommud goes through this module.

What the daemon needs is small: open a TCP listening socket *inside* a named network
namespace (the VMM's) while the daemon itself stays where it was started. A socket belongs
to the namespace it was created in for its whole life, so a short-lived helper thread
switches itself into the namespace (``pyroute2.netns.setns``; a namespace switch is per
thread), creates and binds the socket there and hands it back. No process-wide switch, no
fork.

The other helpers (namespaces, veth pairs, addresses) are what the integration tests and
operators' scripts need to build a namespace topology; they use the synchronous ``IPRoute``
and only names pyroute2 re-exports at its root, plus its documented ``pyroute2.netns``
module.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from pyroute2 import IPRoute, netns

from viommud.shell.endpoints import TcpAddress, bind_tcp

NETNS_DIR = Path("/var/run/netns")


class NetnsError(OSError):
    """A network namespace is missing or cannot be entered."""


def namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    return sorted(netns.listnetns())


def namespace_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def enter_namespace(name: str) -> None:
    """Move the *calling thread* into namespace ``name`` (it must exist)."""
    if not namespace_exists(name):
        raise NetnsError(f"network namespace {name!r} does not exist")
    try:
        netns.setns(name, flags=0)
    except OSError as exc:
        raise NetnsError(f"cannot enter network namespace {name!r}: {exc}") from None


def tcp_listener(address: TcpAddress, namespace: str | None = None) -> socket.socket:
    """A listening TCP socket bound to ``address``, created inside ``namespace`` if given."""
    if namespace is None:
        return bind_tcp(address)
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            enter_namespace(namespace)
            result.append(bind_tcp(address))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    helper = threading.Thread(target=work, name=f"netns-{namespace}", daemon=True)
    helper.start()
    helper.join()
    if failure:
        raise failure[0]
    return result[0]


# -- namespace topology (tests, operators' scripts) --------------------------------------
def create_namespace(name: str) -> None:
    """Create the named namespace ``name`` with its loopback up."""
    netns.create(name)
    with _ipr(name) as ipr:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up")


def remove_namespace(name: str) -> None:
    """Remove namespace ``name`` (its interfaces go with it); missing is not an error."""
    if namespace_exists(name):
        netns.remove(name)


def veth_pair(left: tuple[str, str, str], right: tuple[str, str, str], prefixlen: int = 24) -> None:
    """Join two namespaces with a veth pair.

    ``left`` and ``right`` are ``(namespace, interface name, IPv4 address)``; each end is
    moved into its namespace, addressed and brought up.
    """
    (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) = left, right
    with IPRoute() as ipr:
        ipr.link("add", ifname=if_a, kind="veth", peer=if_b)
        try:
            for ifname, ns in ((if_a, ns_a), (if_b, ns_b)):
                (index,) = ipr.link_lookup(ifname=ifname)
                ipr.link("set", index=index, net_ns_fd=ns)
        except BaseException:
            with contextlib.suppress(Exception):
                for index in ipr.link_lookup(ifname=if_a):
                    ipr.link("del", index=index)
            raise
    for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        with _ipr(ns) as ipr:
            (index,) = ipr.link_lookup(ifname=ifname)
            ipr.addr("add", index=index, address=addr, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")


def interfaces(name: str) -> list[str]:
    """Interface names in namespace ``name``."""
    with _ipr(name) as ipr:
        return sorted(str(link.get("ifname")) for link in ipr.link("dump"))


@contextlib.contextmanager
def _ipr(name: str) -> Iterator[IPRoute]:
    ipr = IPRoute(netns=name, flags=0)
    try:
        yield ipr
    finally:
        ipr.close()


def can_manage_namespaces() -> str | None:
    """None when this process may create namespaces; otherwise the reason it may not."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces (/proc/self/ns/net is missing)"
    return None
