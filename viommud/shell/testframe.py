"""The TEST frame (docs/protocol.md §11): raise a host event in a session, for tests.

Off unless the daemon runs with ``viommud serve --testing``, as the kernel's
IOMMU_TEST_CMD exists only with CONFIG_IOMMUFD_TEST. A session process has its own
emulated kernel, so a test cannot reach it from outside: it asks the session to do what
the hardware would (an SMMUv3 event, a PCIe page request, a DMA fault) and then watches
what reaches it. Each op maps onto a hook of ``viommud.backend.emulator.testing``:

* ``trigger_vevent``: ``device`` (host device), ``record`` (hex, the 32-byte SMMUv3 event
  record with the physical StreamID): ``testing.inject_event``, the selftest's
  TRIGGER_VEVENT for a real device;
* ``trigger_iopf``: ``device``, ``addr``, optional ``perm`` (list of ``read``, ``write``,
  ``exec``, ``priv``; default read), ``pasid``, ``grpid``, ``last`` (default true):
  ``testing.inject_iopf``, the selftest's TRIGGER_IOPF;
* ``device_fault``: ``device``, optional ``address``, ``read``, ``write``, ``pasid``,
  ``translation`` (default true): ``testing.inject_device_fault``.

Every op takes ``delay_ms`` (0..60000): the event is raised that long after the answer,
while the client sends nothing (what the push of EVENT frames is for); and ``repeat``
(1..4096): raised that many times at once (a queue overflows without a read between). This module is
sans-I/O: a delayed op is a ``Deferred`` the byte pump schedules on its event loop.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocols import iommufd as uapi
from viommud.events import DeviceFault

if TYPE_CHECKING:
    from viommud.backend.emulator.context import IommufdContext

MAX_DELAY_MS = 60_000
MAX_REPEAT = 4096
_PERMS = {
    "read": uapi.IOMMU_PGFAULT_PERM_READ,
    "write": uapi.IOMMU_PGFAULT_PERM_WRITE,
    "exec": uapi.IOMMU_PGFAULT_PERM_EXEC,
    "priv": uapi.IOMMU_PGFAULT_PERM_PRIV,
}
OPS = ("trigger_vevent", "trigger_iopf", "device_fault")
NOT_ENABLED = "TEST frames are refused: the daemon was not started with serve --testing"


class TestRefused(ValueError):  # noqa: N818 - a refusal, as RecordRefused
    """A TEST frame that cannot be carried out; the message is the ERROR's text."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True, slots=True)
class Deferred:
    """An event to raise ``delay`` seconds from now (``run`` returns its result)."""

    delay: float
    run: Callable[[], dict[str, Any]]


def prepare(body: Any, backend: object) -> tuple[float, Callable[[], dict[str, Any]]]:
    """Check a TEST payload; returns (delay in seconds, the action). Raises TestRefused."""
    if not isinstance(body, dict):
        raise TestRefused("bad TEST: the payload must be a JSON object")
    op = body.get("op")
    if op not in OPS:
        raise TestRefused(f"bad TEST: 'op' must be one of {', '.join(OPS)}")
    # imported here: a session process loads the emulator only for the backend it serves
    from viommud.backend.emulator import testing  # noqa: PLC0415
    from viommud.backend.emulator.context import IommufdContext  # noqa: PLC0415

    if not isinstance(backend, IommufdContext):
        raise TestRefused("TEST needs the emulated backend (the real kernel has no such hook)")
    device = body.get("device")
    if not isinstance(device, str):
        raise TestRefused("bad TEST: 'device' must be a host device name")
    delay = _integer(body, "delay_ms", 0, 0, MAX_DELAY_MS) / 1000
    repeat = _integer(body, "repeat", 1, 1, MAX_REPEAT)
    try:
        testing.bound_device(backend, device)
    except ValueError:
        raise TestRefused(f"bad TEST: {device} is not bound in this session") from None
    action = _action(op, body, backend, device)

    def run() -> dict[str, Any]:
        results = [action() for _ in range(repeat)]
        failed = [r for r in results if not r["ok"]]
        return failed[0] if failed else results[0]

    return delay, run


def _action(
    op: str, body: dict[str, Any], backend: IommufdContext, device: str
) -> Callable[[], dict[str, Any]]:
    from viommud.backend.emulator import testing  # noqa: PLC0415 - see prepare

    if op == "trigger_vevent":
        record = _hex(body, "record", uapi.VeventArmSmmuv3.MIN_SIZE)
        return lambda: _errno(testing.inject_event(backend, device, record))
    if op == "trigger_iopf":
        addr = _integer(body, "addr", None, 0, (1 << 64) - 1)
        perm = _perm(body.get("perm", ["read"]))
        pasid = body.get("pasid")
        if pasid is not None:
            pasid = _integer(body, "pasid", None, 0, (1 << 20) - 1)
        grpid = _integer(body, "grpid", 0, 0, (1 << 9) - 1)
        last = _flag(body, "last", default=True)
        return lambda: _errno(
            testing.inject_iopf(
                backend, device, addr, perm=perm, pasid=pasid, grpid=grpid, last=last
            )
        )
    address = body.get("address")
    if address is not None:
        address = _integer(body, "address", None, 0, (1 << 64) - 1)
    pasid = body.get("pasid")
    if pasid is not None:
        pasid = _integer(body, "pasid", None, 0, (1 << 20) - 1)
    fault = DeviceFault(
        device,
        address,
        read=_flag(body, "read", default=False),
        write=_flag(body, "write", default=False),
        pasid=pasid,
        translation=_flag(body, "translation", default=True),
    )

    def raise_fault() -> dict[str, Any]:
        testing.inject_device_fault(backend, fault)
        return {"ok": True}

    return raise_fault


def _errno(err: int) -> dict[str, Any]:
    if not err:
        return {"ok": True}
    name = errno.errorcode.get(err, str(err))
    why = {
        errno.EOPNOTSUPP: "no queue of that type: the host drops the event",
        errno.ENOENT: "the device has nowhere to report it: the host drops the event",
    }.get(err, "refused")
    return {"ok": False, "error": f"{name}: {why}"}


def _integer(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            value = None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TestRefused(f"bad TEST: {key!r} must be an integer {low}..{high}")
    return value


def _flag(body: dict[str, Any], key: str, *, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise TestRefused(f"bad TEST: {key!r} must be a boolean")
    return value


def _hex(body: dict[str, Any], key: str, size: int) -> bytes:
    value = body.get(key)
    try:
        data = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        data = None
    if data is None or len(data) != size:
        raise TestRefused(f"bad TEST: {key!r} must be {size} bytes of hex")
    return data


def _perm(value: Any) -> int:
    if not isinstance(value, list) or not all(isinstance(p, str) and p in _PERMS for p in value):
        raise TestRefused(f"bad TEST: 'perm' must be a list of {', '.join(_PERMS)}")
    perm = 0
    for name in value:
        perm |= _PERMS[name]
    return perm
