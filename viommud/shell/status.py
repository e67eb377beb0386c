"""What a running daemon holds, for ``viommud status`` (STATUS frame) and the metrics.

``Totals`` adds session reports (the replay report's shape, docs/trace-format.md §3)
together: the daemon keeps one for sessions that have ended and adds the live ones on demand.
``describe_*``
turn live objects into JSON-ready dicts, ``render_table`` turns the STATUS reply into the
table ``viommud status`` prints.

A vIOMMU model may offer a ``status() -> dict`` method to describe itself; without it the
description is read from the model's ``topology`` where it has the usual shape (``vdevices``
by guest ID, ``slots`` per physical IOMMU), and from the backend's live objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from viommud.shell.progress import Histogram

if TYPE_CHECKING:
    from viommud.models import Viommu


def _add(into: dict[str, int], other: dict[str, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + int(value)


@dataclass(slots=True)
class Totals:
    """Counters of any number of sessions, in the replay report's vocabulary."""

    commands: dict[str, int] = field(default_factory=dict)  # by kind, "model:NAME"
    errors: dict[str, int] = field(default_factory=dict)  # guest-visible, by code
    barriers: int = 0
    calls: dict[str, int] = field(default_factory=dict)  # backend calls, by ioctl
    invalidation_entries: int = 0
    errnos: dict[str, int] = field(default_factory=dict)  # failed backend calls, by errno
    baseline_invalidate_calls: int = 0
    config_errors: int = 0
    sessions: int = 0

    def add(self, report: dict[str, Any]) -> None:
        """Add one session report (``Session.report()``)."""
        _add(self.commands, report["commands"]["by_kind"])
        _add(self.errors, report["errors"]["by_code"])
        self.barriers += int(report["barriers"])
        backend = report["backend"]
        _add(self.calls, backend["calls"])
        self.invalidation_entries += int(backend["invalidation_entries"])
        _add(self.errnos, backend.get("errnos", {}))
        self.baseline_invalidate_calls += int(report["baseline"]["invalidate_calls"])
        self.config_errors += int(report.get("config_errors", 0))
        self.sessions += 1

    def merged(self, *others: Totals) -> Totals:
        out = Totals()
        for part in (self, *others):
            _add(out.commands, part.commands)
            _add(out.errors, part.errors)
            out.barriers += part.barriers
            _add(out.calls, part.calls)
            out.invalidation_entries += part.invalidation_entries
            _add(out.errnos, part.errnos)
            out.baseline_invalidate_calls += part.baseline_invalidate_calls
            out.config_errors += part.config_errors
            out.sessions += part.sessions
        return out

    @property
    def invalidate_calls(self) -> int:
        return self.calls.get("IOMMU_HWPT_INVALIDATE", 0)

    @property
    def coalescing_ratio(self) -> float | None:
        """Baseline invalidate calls per invalidate call made (None before the first)."""
        calls = self.invalidate_calls
        return self.baseline_invalidate_calls / calls if calls else None

    def to_json(self) -> dict[str, Any]:
        ratio = self.coalescing_ratio
        return {
            "commands": {
                "total": sum(self.commands.values()),
                "by_kind": dict(sorted(self.commands.items())),
            },
            "errors": {
                "total": sum(self.errors.values()),
                "by_code": dict(sorted(self.errors.items())),
            },
            "barriers": self.barriers,
            "backend": {
                "calls": dict(sorted(self.calls.items())),
                "invalidation_entries": self.invalidation_entries,
                "errnos": dict(sorted(self.errnos.items())),
            },
            "baseline": {"invalidate_calls": self.baseline_invalidate_calls},
            "coalescing_ratio": round(ratio, 4) if ratio is not None else None,
            "config_errors": self.config_errors,
        }


@dataclass(slots=True)
class Snapshot:
    """What the daemon holds at one instant (taken on the event loop's thread)."""

    totals: Totals = field(default_factory=Totals)
    clients: int = 0
    sessions: int = 0
    objects: dict[str, int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=dict)  # by frame: cmds, request


def backend_objects(backend: Any) -> list[tuple[int, str]] | None:
    """``(id, kind)`` of the backend's live iommufd objects, when the backend can tell."""
    live = getattr(backend, "live_objects", None)
    if not callable(live):
        return None
    return [(int(obj_id), str(kind)) for obj_id, kind in live()]


def count_kinds(objects: list[tuple[int, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _obj_id, kind in objects:
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def describe_viommu(instance: Viommu) -> dict[str, Any]:
    """One live vIOMMU: name, model, command/error counts, its physical IOMMUs with their
    objects, and its devices (``Viommu.status``)."""
    held = instance.status()
    return {
        "name": instance.name,
        "model": str(instance.model),
        "commands": sum(instance.kind_counts().values()),
        "errors": sum(instance.error_counts().values()),
        "piommus": [
            {
                "iommu": p.iommu,
                "viommu_id": p.viommu_id,
                "s2_hwpt_id": p.s2_hwpt_id,
                "nested_hwpts": list(p.nested_hwpts),
            }
            for p in held.piommus
        ],
        "hwpts": held.hwpts,
        "vdevices": [
            {
                "vid": v.vid,
                "device": v.device,
                "iommu": v.iommu,
                "vdevice_id": v.vdevice_id,
                "hwpt_id": v.hwpt_id,
            }
            for v in held.vdevices
        ],
    }


# -- the table ``viommud status`` prints -------------------------------------------------
def render_table(status: dict[str, Any]) -> str:
    """The STATUS reply as a table an operator can read at a glance."""
    lines = [
        f"{status['server']}  pid {status['pid']}  up {_duration(status['uptime_s'])}  "
        f"clients {status['connected_clients']}  sessions {status['sessions']['active']} "
        f"live / {status['sessions']['closed']} ended",
        "listening: " + ", ".join(_listener(listener) for listener in status["listeners"]),
        "",
    ]
    rows: list[tuple[str, ...]] = [
        ("CLIENT", "PEER", "VM", "VIOMMU", "MODEL", "VDEVICES", "HWPTS", "COMMANDS", "ERRORS")
    ]
    for client in status["clients"]:
        session = client.get("session")
        head = (str(client["client"]), str(client.get("peer") or client["transport"]))
        if not session:
            rows.append((*head, "-", "-", "-", "-", "-", "-", "-"))
            continue
        viommus = session.get("viommus") or [None]
        for viommu in viommus:
            vm = str(session.get("vm") or session.get("trace") or "-")
            if viommu is None:
                rows.append((*head, vm, "-", "-", "0", "0", "0", "0"))
                continue
            rows.append(
                (
                    *head,
                    vm,
                    viommu["name"],
                    viommu["model"],
                    _count(viommu.get("vdevices")),
                    str(viommu.get("hwpts", "?")),
                    str(viommu["commands"]),
                    str(viommu["errors"]),
                )
            )
    if len(rows) == 1:
        lines.append("no clients connected")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.extend(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        )
    totals = status["totals"]
    calls = totals["backend"]["calls"]
    ratio = totals.get("coalescing_ratio")
    objects = status.get("objects") or {}
    lines += [
        "",
        f"commands {totals['commands']['total']}  barriers {totals['barriers']}  "
        f"guest errors {totals['errors']['total']}  config errors {totals['config_errors']}",
        f"backend calls {sum(calls.values())}  invalidate {calls.get('IOMMU_HWPT_INVALIDATE', 0)} "
        f"vs baseline {totals['baseline']['invalidate_calls']}"
        + (f"  (coalescing x{ratio:.2f})" if ratio else "")
        + (
            "  errnos " + ", ".join(f"{k} {v}" for k, v in totals["backend"]["errnos"].items())
            if totals["backend"]["errnos"]
            else ""
        ),
        "live objects "
        + (", ".join(f"{kind} {n}" for kind, n in objects.items()) if objects else "none"),
    ]
    return "\n".join(lines)


def _count(items: Any) -> str:
    return str(len(items)) if isinstance(items, list) else "?"


def _listener(listener: dict[str, Any]) -> str:
    text = f"{listener['kind']} {listener['address']}"
    if listener.get("netns"):
        text += f" (netns {listener['netns']})"
    if listener.get("activated"):
        text += " (socket-activated)"
    return text


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
