"""A session's state as a document (docs/state-format.md): STATE_SAVE and STATE_LOAD.

The state of a session is what a fresh daemon needs to show the guest the same vIOMMUs:
every live vIOMMU's creation (model, host IOMMUs, options), its devices, the stream table /
context / PASID entries the guest wrote, the configuration invalidations that made the
vIOMMU read them, the virtio-iommu domains, mappings and tables, and the session's totals.
It is kept as the records that recreate it (``Journal``): the configuration records and
the guest work that changed configuration, in the order they happened, less what changed
nothing a later record can see (doorbells of TLB / ATC invalidations that end with their
own barrier, virtio-iommu requests answered with an error, PROBE and INVALIDATE requests,
and everything of a vIOMMU that was destroyed). Loading re-drives those records through a
fresh ``Session`` (so every backend object is recreated by the normal code path, and the
oracle sees what it needs), then restores the totals.

The document is JSON with a format version and a SHA-256 of its canonical form; a document
of another version, a corrupted or truncated one, one that names host devices this daemon
lacks, or one that does not rebuild is refused whole: the new session is built aside and
only swapped in once complete.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from viommud import __version__
from viommud.backend.base import Backend
from viommud.backend.calls import BackendCallError
from viommud.guest_memory import GuestResources
from viommud.host import HostConfig, HostConfigError
from viommud.models import RecordRefused
from viommud.replies import ConfigReply
from viommud.session import Session
from viommud.topology import TopologyError
from viommud.trace import DeviceAttach, Record, TraceError, parse_record, record_to_json

__all__ = ["FORMAT", "VERSION", "StateError", "decode", "encode", "load", "passed", "save"]

FORMAT = "viommud-state"
VERSION = 1


class StateError(ValueError):
    """A state document this daemon refuses (the message says why); nothing was changed."""


# -- the document ---------------------------------------------------------------------------


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def encode(doc: dict[str, Any]) -> bytes:
    """The document's bytes, with its checksum (docs/state-format.md §1)."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    return _canonical({**body, "checksum": f"sha256:{digest}"})


def decode(blob: bytes) -> dict[str, Any]:
    """Check a document's form, version and checksum; raises StateError."""
    try:
        doc = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        raise StateError(f"not a state document: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"not a state document: 'format' must be {FORMAT!r}")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise StateError(f"state format version {version!r} is not supported (this daemon reads 1)")
    checksum = doc.get("checksum")
    body = {k: v for k, v in doc.items() if k != "checksum"}
    want = f"sha256:{hashlib.sha256(_canonical(body)).hexdigest()}"
    if checksum != want:
        raise StateError("state checksum mismatch: the document is corrupted")
    for key, kind in (("host", dict), ("journal", list), ("totals", dict)):
        if not isinstance(doc.get(key), kind):
            raise StateError(f"bad state: {key!r} must be a JSON {kind.__name__}")
    compat = doc.get("compat")
    if compat is not None and not isinstance(compat, str):
        raise StateError("bad state: 'compat' must be a string or null")
    _resources(doc)
    return doc


def _resources(doc: dict[str, Any]) -> tuple[list[list[int]], list[str]]:
    """The ``resources`` of a document (docs/state-format.md §1): the passed RAM layout and
    the devices bound through a passed cdev; empty when absent."""
    raw = doc.get("resources", {})
    ram = raw.get("ram", []) if isinstance(raw, dict) else None
    devices = raw.get("devices", []) if isinstance(raw, dict) else None
    if (
        not isinstance(ram, list)
        or not all(
            isinstance(r, list)
            and len(r) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r)
            for r in ram
        )
        or not isinstance(devices, list)
        or not all(isinstance(d, str) for d in devices)
    ):
        raise StateError(
            "bad state: 'resources' must be {ram: [[gpa, size], ...], devices: [name, ...]}"
        )
    return ram, devices


def passed(doc: dict[str, Any]) -> dict[str, Any]:
    """What a decoded document needs its VMM to pass again before it loads (fds cannot be
    in a document): ``ram`` ([[gpa, size], ...]) and ``devices``, each only when not empty."""
    ram, devices = _resources(doc)
    return {k: v for k, v in (("ram", ram), ("devices", devices)) if v}


def save(session: Session, *, frames: int | None = None) -> bytes:
    """The state document of ``session`` (docs/state-format.md); ``frames``, when given, is
    the number of request frames the session answered (a ``--state-dir`` file, §6)."""
    if session.journal is None:
        raise StateError(
            "this session keeps no state: ask for it in HELLO (state: true) or serve with "
            "--state-dir"
        )
    totals = session.report()
    totals["calls_seq"] = session.calls.seq
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "server": f"viommud/{__version__}",
        "host": session.backend.host.to_json(),
        "compat": session.compat,
        "viommus": {name: session.viommus[name].model for name in sorted(session.viommus)},
        "journal": [record_to_json(r) for r in session.journal.records()],
        "totals": totals,
    }
    passed = _passed(session)
    if passed:
        doc["resources"] = passed
    if frames is not None:
        doc["frames"] = frames
    return encode(doc)


def _passed(session: Session) -> dict[str, Any]:
    """What the VMM passed that the rebuild needs again (fds cannot travel in a document):
    the RAM layout, and the devices attached through a passed cdev."""
    resources = session.resources
    attached = (
        {r.device for r in session.journal.records() if isinstance(r, DeviceAttach)}
        if session.journal is not None
        else set()
    )
    out: dict[str, Any] = {}
    if resources.regions:
        out["ram"] = resources.layout()
    devices = sorted(resources.given & attached)
    if devices:
        out["devices"] = devices
    return out


def _check_passed(doc: dict[str, Any], resources: GuestResources) -> None:
    """Refuse a load whose session was not given what the saved one had been given."""
    ram, devices = _resources(doc)
    have = resources.layout()
    if ram != have:
        if ram and not have:
            raise StateError(
                "the saved session's guest RAM was passed by its VMM ("
                + ", ".join(f"{gpa:#x}+{size:#x}" for gpa, size in ram)
                + "): pass the same RAM (a MEMORY frame) before STATE_LOAD"
            )
        raise StateError(
            f"guest RAM layout differs: the state's is {ram or 'synthetic'}, this session "
            f"was given {have}"
        )
    missing = [d for d in devices if d not in resources.devices]
    if missing:
        raise StateError(
            "the saved session bound "
            + ", ".join(missing)
            + " through a cdev its VMM passed: pass the fd of each before STATE_LOAD"
        )


def load(blob: bytes, like: Session, backend: Backend) -> Session:
    """A new session on ``backend`` holding the state of ``blob``, with the options of
    ``like`` (which must hold no vIOMMU). Raises StateError; then nothing is left of the
    new session and ``like`` is untouched."""
    if like.viommus:
        raise StateError(
            f"STATE_LOAD needs a session without vIOMMUs (this one has {len(like.viommus)})"
        )
    doc = decode(blob)
    try:
        saved_host = HostConfig.from_json(doc["host"])
    except HostConfigError as exc:
        raise StateError(f"bad state: host: {exc}") from None
    problems = saved_host.missing_from(backend.host)
    if problems:
        raise StateError("this daemon's host lacks what the state needs: " + "; ".join(problems))
    records: list[Record] = []
    for index, obj in enumerate(doc["journal"]):
        try:
            records.append(parse_record(index + 1, obj))
        except TraceError as exc:
            raise StateError(f"bad state: journal record {index + 1}: {exc.message}") from None
    totals = _totals(doc["totals"])
    _check_passed(doc, like.resources)
    session = like.sibling(backend, compat=doc["compat"])
    # The RAM and cdevs the VMM passed move to the rebuilt session (back on a refusal;
    # cdevs a failed rebuild bound and unbound again are closed: pass them anew).
    session.use_resources(like.resources)
    like.use_resources(GuestResources())
    # The rebuild's calls continue the saved call log's numbering and barrier count.
    session.calls.seq = totals["calls_seq"]
    session.stats.barriers = totals["barriers"]
    try:
        for index, record in enumerate(records):
            reply = session.handle(record)
            if isinstance(reply, ConfigReply) and not reply.ok:
                raise StateError(
                    f"the state does not rebuild: journal record {index + 1} "
                    f"({type(record).__name__}): {reply.error}"
                )
        rebuilt = {name: v.model for name, v in session.viommus.items()}
        if rebuilt != doc.get("viommus"):
            raise StateError(
                f"the state does not rebuild: it names vIOMMUs {doc.get('viommus')!r}, "
                f"its journal makes {rebuilt!r}"
            )
        session.restore_totals(totals)
    except (StateError, RecordRefused, TopologyError, BackendCallError, ValueError) as exc:
        _give_back(session, like)
        if isinstance(exc, StateError):
            raise
        raise StateError(f"the state does not rebuild: {exc}") from None
    except BaseException:
        _give_back(session, like)
        raise
    session.set_compat(like.compat)
    return session


def _give_back(session: Session, like: Session) -> None:
    """A refused rebuild: close it, the VMM's RAM and unused cdevs back to ``like``."""
    like.use_resources(session.resources)
    session.use_resources(GuestResources())
    session.close()


def _totals(raw: dict[str, Any]) -> dict[str, Any]:
    """The saved totals, checked to be the report's shape (docs/state-format.md §3)."""
    try:
        out = {
            "by_kind": _counts(raw["commands"]["by_kind"]),
            "by_code": _counts(raw["errors"]["by_code"]),
            "barriers": _count(raw["barriers"]),
            "calls": _counts(raw["backend"]["calls"]),
            "invalidation_entries": _count(raw["backend"]["invalidation_entries"]),
            "errnos": _counts(raw["backend"]["errnos"]),
            "baseline": _count(raw["baseline"]["invalidate_calls"]),
            "missed": _count(raw["verify"]["missed"]),
            "over": _count(raw["verify"]["over"]),
            "config_errors": _count(raw["config_errors"]),
            "calls_seq": _count(raw["calls_seq"]),
        }
    except (KeyError, TypeError) as exc:
        raise StateError(f"bad state: totals: missing or malformed {exc}") from None
    return out


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(repr(value))
    return value


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise TypeError(repr(value))
    return {str(k): _count(v) for k, v in value.items()}
