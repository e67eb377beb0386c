"""One client's protocol state, sans-I/O: bytes in, reply bytes out.

``Connection.receive`` takes whatever the peer sent and returns the replies to write back,
in request order (docs/protocol.md): HELLO first (or STATUS, answered without a session),
then records, each answered by exactly one frame. The asyncio server (``shell.server``)
owns the socket; tests and the stored-output check drive a ``Connection`` directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from protocols.frames import PROTOCOL_VERSION, FrameType
from protocols.virtio_iommu import RequestType
from viommud import __version__, state, wire
from viommud.backend.base import Backend
from viommud.backend.calls import BackendCallError
from viommud.frontends.compat import COMPAT_POLICIES
from viommud.guest_memory import GuestResources, close_all
from viommud.host import HostConfig, HostConfigError
from viommud.replies import DoorbellReply
from viommud.session import RecordRefused, Session
from viommud.shell import testframe
from viommud.shell.claims import Claims, busy_message
from viommud.shell.endpoints import token_matches
from viommud.shell.limits import MAX_HELLO_FRAME, Limits
from viommud.shell.logs import SessionLogger, clip
from viommud.shell.passed import FdQueue, give
from viommud.shell.progress import Progress
from viommud.shell.replies import encode_doorbell, encode_error, encode_response
from viommud.shell.statedir import StateDir, StateDirError
from viommud.shell.status import backend_objects, count_kinds, describe_viommu
from viommud.trace import (
    DeviceAttach,
    DeviceDetach,
    Record,
    Request,
    TraceError,
    ViommuCreate,
    ViommuDestroy,
    parse_record,
)

BackendFactory = Callable[[HostConfig], Backend]

# Before a session exists only HELLO and STATUS are taken, and those are small: a longer
# frame is refused from its header (docs/protocol.md §1). The host a HELLO may describe is
# bounded too, so that checking it stays cheap (docs/protocol.md §2).
MAX_HELLO_PAYLOAD = MAX_HELLO_FRAME
MAX_HOST_IOMMUS = 4096
MAX_HOST_DEVICES = 65536  # validation is linear: 65,536 devices take ~0.16 s
_HELLO_NAMES = ("client", "trace", "vm")  # optional strings, for logs and status
# Frames a --state-dir file counts (``frames``): the session's records, doorbells, requests.
_GUEST_FRAMES = frozenset({FrameType.RECORD, FrameType.CMDS, FrameType.REQUEST})
_CMDS = int(FrameType.CMDS)  # a Frame's type, as the internal_error line names it


class _Fatal(Exception):  # noqa: N818 - control flow: reply with a fatal ERROR, then close
    pass


class Connection:
    """Protocol state of one client: hello, then records, each answered in order."""

    def __init__(
        self,
        client_id: int,
        factory: BackendFactory,
        fixed_host: HostConfig | None,
        log: Any,
        *,
        transport: str = "unix",
        peer: str = "",
        token: str | None = None,
        status: Callable[[int], dict[str, Any]] | None = None,
        limits: Limits | None = None,
        claims: Claims | None = None,
        handoff: bool = False,
        state_dir: StateDir | None = None,
        testing: bool = False,
    ) -> None:
        """``testing``: TEST frames are taken (``serve --testing``, docs/protocol.md §11).
        ``limits``: frame sizes and per-session quotas (docs/operations.md §10).
        ``claims``: where physical devices are claimed (EBUSY across sessions).
        ``handoff``: the listener's side of a session process: validate HELLO, then stop
        and leave the session to the process (``handed_off`` holds the bytes to pass on)."""
        self.client_id = client_id
        self.factory = factory
        self.fixed_host = fixed_host
        self.log = log
        self.compact = False
        self.compact_writes = False  # CMDS_OK_WRITES for clean VT-d doorbells
        self.group_commit = False
        # Runs of well-formed CMDS frames are taken without Frame objects (``_doorbells``);
        # False: every frame takes ``next_frame`` / ``_dispatch`` (the tests compare both).
        self.cmds_lane = True
        self.session: Session | None = None
        self.limits = limits if limits is not None else Limits()
        self.decoder = wire.FrameDecoder(max_payload=self.limits.max_hello_frame)
        self.closing = False
        self.transport = transport  # "unix" or "tcp"
        self.peer = peer
        self.token = token  # required in HELLO / STATUS when set (TCP listeners)
        self.authenticated = token is None
        self.status = status
        self.connected_at = time.monotonic()
        self.trace = ""
        self.vm = ""
        self.viommu: str | None = None  # the vIOMMU being worked on, for backend_error
        self.claims = claims
        self.handoff = handoff
        self.handed_off: bytes | None = None  # the HELLO frame and what followed it
        self.progress = Progress()
        self._attached: dict[tuple[str, int], str] = {}  # (vIOMMU, vid) -> device
        self._held: dict[str, int] = {}  # device -> attachments of this session
        # serve --state-dir (shell/statedir.py): the session's token, request frames answered
        # and how many of them the state file holds
        self.state_dir = state_dir
        self.session_token: str | None = None
        self.frames = 0
        self._stored = 0
        # serve --state-dir: a resumed session whose VMM had passed guest RAM or device fds
        # waits for them (MEMORY / DEVICES) and an empty STATE_LOAD: (state, frames)
        self._pending: tuple[bytes, int] | None = None
        self.testing = testing
        # TEST frames with a delay: events to raise later, taken by the byte pump
        self.deferred: list[testframe.Deferred] = []
        # fds passed with frames (SCM_RIGHTS, docs/protocol.md §12): those waiting for their
        # frame, the bytes received so far (their positions), those of the frame at hand
        self._fds = FdQueue()
        self.received = 0
        self._passed: list[int] = []
        self.handed_fds: list[tuple[int, list[int]]] = []  # with handed_off: positions in it

    def receive(self, data: bytes, fds: Sequence[int] = (), *, truncated: bool = False) -> bytes:
        """Feed bytes from the peer; returns the reply bytes to send. ``fds``: the file
        descriptors that came with ``data`` (one recvmsg; the Connection owns them now);
        ``truncated``: the kernel dropped some (MSG_CTRUNC)."""
        self.decoder.receive_data(data)
        self.received += len(data)
        out: list[bytes] = []
        if fds or truncated:
            out += self._queue_fds(fds, truncated)
        while not self.closing:
            if self.group_commit and self._pending is None:  # doorbells waiting together
                run = self.decoder.take_guest_data(FrameType.CMDS)
                if run:
                    if self._fds.count:  # a doorbell takes no fds
                        self._drop_fds(self._take_fds(), FrameType.CMDS)
                    self.frames += len(run)
                    out.append(self._group(run))
                    out += self._events()
                    continue
            elif (
                self.cmds_lane
                and self._pending is None
                and self.session is not None
                and not self._fds.count
            ):
                run = self.decoder.take_guest_data(FrameType.CMDS)
                if run:
                    self._doorbells(run, out)
                    continue
            try:
                frame = self.decoder.next_frame()
            except wire.WireError as exc:
                self.log.warning("protocol_error", error=str(exc), raw_hex=exc.raw.hex())
                out.append(encode_error(0, str(exc), fatal=True))
                self.closing = True
                break
            if frame is None:
                break
            if frame.type in _GUEST_FRAMES and self._pending is None:
                self.frames += 1
            if self._fds.count:
                self._passed = self._take_fds()
            try:
                out.append(self._dispatch(frame))
            except _Fatal as exc:
                self.log.warning("protocol_error", error=clip(str(exc), 512), seq=frame.seq)
                out.append(encode_error(frame.seq, str(exc), fatal=True))
                self.closing = True
            except wire.WireError as exc:
                out.append(encode_error(frame.seq, str(exc), fatal=False))
            except Exception as exc:  # a bug must not take the daemon or other clients down
                self.log.exception("internal_error", seq=frame.seq, frame_type=frame.type)
                out.append(encode_error(frame.seq, f"internal error: {exc!r}", fatal=False))
            if self._passed:  # fds that came with a frame that takes none (or refused)
                self._drop_fds(self._passed, frame.type)
            if self.handed_off is not None:
                break
            if not self.closing and self.handed_off is None:
                out += self._events()
        if self.frames != self._stored and self.session_token is not None:
            self._store()  # before the replies leave: the file is never older than them
        if self.session is not None:
            self.log.flush()  # repeated warnings whose second is over
            if self.progress.due():
                self.log.info("session_progress", **_progress_keys(self.progress))
        return b"".join(out)

    # -- passed fds (docs/protocol.md §12) --------------------------------------------
    def _queue_fds(self, fds: Sequence[int], truncated: bool) -> list[bytes]:
        """Queue the fds of one recvmsg; a fatal ERROR when some were lost or too many wait."""
        if self.closing:
            close_all(fds)
            return []
        if truncated:
            close_all(fds)
            why = "file descriptors lost: more came with one message than the daemon takes"
        elif not self._fds.add(self.received - 1, fds):
            why = f"more than {self._fds.limit} file descriptors wait for their frames"
        else:
            return []
        self._fds.close()
        self.log.warning("protocol_error", error=why)
        self.closing = True
        return [encode_error(0, why, fatal=True)]

    def _take_fds(self) -> list[int]:
        """The fds of the frame just taken from the decoder (it ends where the buffer starts)."""
        return self._fds.take(self.received - self.decoder.buffered)

    def _drop_fds(self, fds: list[int], frame_type: int) -> None:
        close_all(fds)
        self._passed = []
        self.log.warning("fds_closed", count=len(fds), frame_type=f"0x{frame_type:02x}")

    def _give(self, frame: wire.Frame, session: Session) -> bytes:
        """MEMORY / DEVICES: the fds that came with the frame, to the session's resources."""
        fds, self._passed = self._passed, []
        name = FrameType(frame.type).name
        if self.transport != "unix":
            close_all(fds)
            why = f"EOPNOTSUPP: {name} needs the Unix socket (fds cannot cross TCP)"
            return encode_error(frame.seq, why, fatal=False)
        try:
            body = give(
                frame.type,
                session,
                frame.json(max_depth=wire.MAX_JSON_DEPTH),
                fds,
                attached=set(self._attached.values()),
            )
        except (ValueError, wire.WireError) as exc:  # GuestResourceError, PassedFdError, JSON
            close_all(fds)  # what the refusal has not closed yet
            self.log.warning("resources_refused", frame_type=name, error=clip(str(exc), 512))
            text = str(exc) if not isinstance(exc, wire.WireError) else f"EINVAL: {name}: {exc}"
            return encode_error(frame.seq, text, fatal=False)
        self.log.info("resources_given", frame_type=name, fds=len(fds))
        return wire.encode_json(FrameType.RESPONSE, frame.seq, body)

    def _group(self, run: list[tuple[int, str, bytes]]) -> bytes:
        """Group commit: the CMDS frames that were waiting together, answered in order after
        their work is done (Session.doorbells; docs/protocol.md, HELLO ``group_commit``)."""
        session = self.session
        assert session is not None  # group_commit is only set by HELLO
        started = time.perf_counter()
        calls_before = session.calls.seq
        replies: list[bytes | None] = [None] * len(run)
        by_viommu: dict[str, tuple[list[int], list[bytes]]] = {}
        for i, (_, name, data) in enumerate(run):
            slots, datas = by_viommu.setdefault(name, ([], []))
            slots.append(i)
            datas.append(data)
        try:
            for viommu, (slots, datas) in by_viommu.items():
                self.viommu = viommu
                answers = session.doorbells(viommu, datas)
                for i, answer in zip(slots, answers, strict=True):
                    seq = run[i][0]
                    if isinstance(answer, Exception):
                        replies[i] = encode_error(seq, str(answer), fatal=False)
                    else:
                        self.progress.commands += answer.consumed
                        self.progress.errors += len(answer.errors)
                        replies[i] = self._doorbell_reply(seq, answer)
        except Exception as exc:  # a bug must not take the daemon or other clients down
            self.log.exception("internal_error", seq=run[0][0], frame_type=FrameType.CMDS)
            for i, (seq, _, _) in enumerate(run):
                if replies[i] is None:
                    replies[i] = encode_error(seq, f"internal error: {exc!r}", fatal=False)
        elapsed = (time.perf_counter() - started) / len(run)
        for _ in run:
            self.progress.batch("cmds", elapsed, commands=0, errors=0, host_calls=0)
        self.progress.host_calls += session.calls.seq - calls_before
        return b"".join(r for r in replies if r is not None)

    def _doorbells(self, run: list[tuple[int, str, bytes]], out: list[bytes]) -> None:
        """CMDS frames taken in one pass (``FrameDecoder.take_guest_data``: whole frames with
        a valid header and vIOMMU name, no fds waiting, a session, nothing pending): each
        handled and answered as ``receive`` handles it through ``next_frame`` and
        ``_dispatch``, its EVENT frames right after its reply."""
        session = self.session
        assert session is not None
        for seq, viommu, data in run:
            self.frames += 1
            try:
                out.append(self._cmds(session, seq, viommu, data))
            except wire.WireError as exc:
                out.append(encode_error(seq, str(exc), fatal=False))
            except Exception as exc:  # a bug must not take the daemon or other clients down
                self.log.exception("internal_error", seq=seq, frame_type=_CMDS)
                out.append(encode_error(seq, f"internal error: {exc!r}", fatal=False))
            out += self._events()

    def _cmds(self, session: Session, seq: int, viommu: str, data: bytes) -> bytes:
        """One CMDS frame's doorbell and its reply (docs/protocol.md)."""
        started = time.perf_counter()
        calls_before = session.calls.seq
        self.viommu = viommu
        try:
            answer = session.doorbell(viommu, data)
        except RecordRefused as exc:
            return encode_error(seq, str(exc), fatal=False)
        if (
            self.compact
            and not answer.errors
            and not answer.interrupts
            and answer.status_writes is None
            and not session.calls.keep
        ):
            reply = wire.encode_cmds_ok(seq, answer.consumed, answer.syncs)  # encode_doorbell's
        else:
            reply = self._doorbell_reply(seq, answer)
        self.progress.doorbell(
            time.perf_counter() - started,
            answer.consumed,
            len(answer.errors),
            session.calls.seq - calls_before,
        )
        return reply

    def _events(self) -> list[bytes]:
        """EVENT frames for the host events that reached the session's vEVENTQs, sent right
        after the reply during which they appeared (docs/protocol.md §10)."""
        session = self.session
        if session is None:
            return []
        try:
            events = session.events()
        except BackendCallError as exc:  # a failed read(2): the events stay where they are
            self.log.error("event_read_failed", error=str(exc))
            return []
        return [wire.encode_json(FrameType.EVENT, 0, event.to_json()) for event in events]

    def push_events(self) -> bytes:
        """EVENT frames for what the session's queues hold now, to send between replies
        while the client is idle (docs/protocol.md §10, "Push"); nothing once the
        connection is closing or handed over."""
        if self.closing or self.handed_off is not None:
            return b""
        return b"".join(self._events())

    def _test(self, frame: wire.Frame, session: Session) -> bytes:
        """TEST (docs/protocol.md §11): raise a host event now, or after ``delay_ms``."""
        if not self.testing:
            return encode_error(frame.seq, testframe.NOT_ENABLED, fatal=False)
        try:
            delay, action = testframe.prepare(
                frame.json(max_depth=wire.MAX_JSON_DEPTH), session.backend
            )
        except testframe.TestRefused as exc:
            return encode_error(frame.seq, str(exc), fatal=False)
        if delay:
            self.deferred.append(testframe.Deferred(delay, action))
            return wire.encode_json(FrameType.RESPONSE, frame.seq, {"ok": True, "deferred": True})
        return wire.encode_json(FrameType.RESPONSE, frame.seq, action())

    def _doorbell_reply(self, seq: int, reply: DoorbellReply) -> bytes:
        return encode_doorbell(
            seq, reply, compact=self.compact, writes=self.compact_writes, calls=self._calls()
        )

    def _calls(self) -> list[dict[str, Any]] | None:
        """The call log entries since the last reply, when the client streams them."""
        session = self.session
        assert session is not None
        return session.drain_calls() if session.calls.keep else None

    def _dispatch(self, frame: wire.Frame) -> bytes:
        kind = frame.type
        if kind == FrameType.HELLO:
            return self._hello(frame)
        if kind == FrameType.STATUS:
            return self._status(frame)
        session = self.session
        if session is None:
            raise _Fatal("the first frame must be HELLO")
        if self._pending is not None and kind in _GUEST_FRAMES:
            return encode_error(frame.seq, _PENDING, fatal=False)
        if kind == FrameType.CMDS:
            viommu, data = frame.guest_data()
            return self._cmds(session, frame.seq, viommu, data)
        if kind == FrameType.RECORD:
            try:
                record = parse_record(0, frame.json(max_depth=wire.MAX_JSON_DEPTH))
                self.viommu = getattr(record, "viommu", None)
                refusal = self._before(session, record)
                if refusal is not None:
                    return encode_error(frame.seq, refusal, fatal=False)
                response = session.handle(record)
            except TraceError as exc:
                return encode_error(frame.seq, exc.message, fatal=False)
            except RecordRefused as exc:
                self._after(record, ok=False)
                return encode_error(frame.seq, str(exc), fatal=False)
            self._after(record, ok=bool(getattr(response, "ok", True)))
            return encode_response(frame.seq, response, self._calls())
        if kind == FrameType.REQUEST:
            started = time.perf_counter()
            calls_before = session.calls.seq
            viommu, data = frame.guest_data()
            self.viommu = viommu
            refusal = self._mapping_quota(session, viommu, data)
            if refusal is not None:
                return encode_error(frame.seq, refusal, fatal=False)
            try:
                response = session.handle(Request(0, viommu, data))
            except RecordRefused as exc:
                return encode_error(frame.seq, str(exc), fatal=False)
            reply = encode_response(frame.seq, response, self._calls())
            elapsed = time.perf_counter() - started
            self.progress.batch(
                "request",
                elapsed,
                commands=1,
                errors=int(getattr(response, "status", "OK") != "OK"),
                host_calls=session.calls.seq - calls_before,
            )
            return reply
        if kind == FrameType.STATS:
            return wire.encode_json(FrameType.STATS_OK, frame.seq, session.report())
        if kind in (FrameType.STATE_SAVE, FrameType.STATE_LOAD):
            return self._state(frame, session)
        if kind == FrameType.TEST:
            return self._test(frame, session)
        if kind in (FrameType.MEMORY, FrameType.DEVICES):
            return self._give(frame, session)
        raise _Fatal(f"frame type 0x{kind:02x} is not a request")

    def _hello(self, frame: wire.Frame) -> bytes:
        if self.session is not None:
            raise _Fatal("HELLO was already exchanged")
        try:
            hello = frame.json(max_depth=wire.MAX_JSON_DEPTH)
        except wire.WireError as exc:
            raise _Fatal(f"bad HELLO: {exc}") from None
        if not isinstance(hello, dict):
            raise _Fatal("HELLO payload must be a JSON object")
        protocol = hello.get("protocol")
        if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
            raise _Fatal(
                f"client speaks protocol {clip(repr(protocol), 32)}, this daemon {PROTOCOL_VERSION}"
            )
        self._authenticate(hello.get("token"))
        names = {key: hello.get(key) for key in _HELLO_NAMES}
        for key, value in names.items():
            if value is not None and not isinstance(value, str):
                raise _Fatal(f"bad HELLO: {key!r} must be a string")
        reply: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "server": f"viommud/{__version__}",
            "backend": "emulated",
        }
        if hello.get("probe"):
            self.closing = True  # health check: answer and hang up, no session
            return wire.encode_json(FrameType.HELLO_OK, frame.seq, reply)
        event_depth = _event_depth(hello.get("events"))
        compat = hello.get("compat")
        if compat is not None and compat not in COMPAT_POLICIES:
            raise _Fatal("bad HELLO: 'compat' must be 'architecture' or 'qemu'")
        host = self._host_for(hello.get("host"))
        if self.handoff:  # the session process answers this HELLO (server.py, worker.py)
            self.vm = names["vm"] or names["trace"] or ""
            self.log = self.log.bind(vm=clip(self.vm))
            self.handed_off = (
                wire.encode(frame.type, frame.seq, frame.payload) + self.decoder.pending()
            )
            # fds queued for the frames after HELLO go along, placed in handed_off
            start = self.received - len(self.handed_off)
            self.handed_fds = self._fds.export(start)
            return b""
        backend = self.factory(host)
        reply["backend"] = backend.name
        reply["host"] = host.to_json()
        self.trace = names["trace"] or ""
        # Every later line of this session names its VM (HELLO "vm", else the trace name),
        # cut short on the log: the client chose it.
        self.vm = names["vm"] or self.trace
        # per-batch lines at DEBUG (session_progress sums them up once a second), repeated
        # warnings aggregated per (event, vIOMMU, code) and second (docs/operations.md §5)
        self.log = SessionLogger(self.log.bind(vm=clip(self.vm)))
        if self.claims is not None:
            self.claims.name(clip(self.vm))
        # Compact replies (CMDS_OK) only for clients that asked and need no call log.
        self.compact = bool(hello.get("compact")) and not hello.get("calls")
        self.compact_writes = self.compact and bool(hello.get("compact_writes"))
        # Group commit: consecutive waiting doorbells may share host calls (opt-in: the
        # call counts then depend on how the client's frames arrive).
        self.group_commit = bool(hello.get("group_commit"))
        self.session = Session(
            backend,
            keep_calls=bool(hello.get("calls")),
            verify=bool(hello.get("verify")),
            log=self.log,
            compat=compat,
            event_depth=event_depth,
            # STATE_SAVE needs the journal; it holds every live mapping, so only on request
            journal=bool(hello.get("state")) or self.state_dir is not None,
        )
        self.session.calls.on_error = self._backend_error
        # the session may send large doorbells now
        self.decoder.max_payload = self.limits.max_frame
        self.log.info(
            "session_started",
            client_name=clip(names["client"] or ""),
            trace=clip(self.trace),
        )
        if self.state_dir is not None:
            reply.update(self._resume(hello.get("resume")))
        elif hello.get("resume") is not None:
            raise _Fatal("this daemon keeps no session state (serve --state-dir)")
        return wire.encode_json(FrameType.HELLO_OK, frame.seq, reply)

    # -- quotas and device ownership ---------------------------------------------------
    def _before(self, session: Session, record: Record) -> str | None:
        """Why ``record`` is refused before the session sees it (a quota, a device another
        session holds), or None. A device is claimed here, before its attach."""
        limits = self.limits
        if (
            isinstance(record, ViommuCreate)
            and record.viommu not in session.viommus
            and len(session.viommus) >= limits.max_viommus
        ):
            return f"quota: at most {limits.max_viommus} vIOMMUs per session (--max-viommus)"
        if isinstance(record, DeviceAttach) and record.device not in self._held:
            if len(self._held) >= limits.max_devices:
                return f"quota: at most {limits.max_devices} devices per session (--max-devices)"
            holder = (
                self.claims.claim(record.device)
                if self.claims is not None and self._devices_shared(session)
                else None
            )
            if holder is not None:
                self.log.warning("device_busy", device=record.device, holder=holder)
                return busy_message(record.device, holder)
            self._held[record.device] = 0
        return None

    def _devices_shared(self, session: Session) -> bool:
        """Whether this session's physical devices are the other sessions' too: the daemon's
        own host (``serve --host``) or a real /dev/iommu. A client-supplied host on the
        emulated kernel is that session's alone (its own emulated machine), so 64 replays of
        one trace at once do not contend for its devices."""
        return self.fixed_host is not None or session.backend.name != "emulated"

    def _after(self, record: Record, *, ok: bool) -> None:
        """Keep the device claims in line with what the session holds after ``record``."""
        if isinstance(record, DeviceAttach):
            if ok:
                old = self._attached.get((record.viommu, record.vid))
                if old is not None:
                    self._drop(old)
                self._attached[(record.viommu, record.vid)] = record.device
                self._held[record.device] = self._held.get(record.device, 0) + 1
            elif not self._held.get(record.device):
                self._drop(record.device)
        elif isinstance(record, DeviceDetach) and ok:
            device = self._attached.pop((record.viommu, record.vid), None)
            if device is not None:
                self._drop(device)
        elif isinstance(record, ViommuDestroy) and ok:
            for key in [k for k in self._attached if k[0] == record.viommu]:
                self._drop(self._attached.pop(key))

    def _drop(self, device: str) -> None:
        count = self._held.get(device, 0) - 1
        if count > 0:
            self._held[device] = count
            return
        self._held.pop(device, None)
        if self.claims is not None:
            self.claims.release(device)

    def _adopt(self, new: Session) -> str | None:
        """Claim the devices a rebuilt session (STATE_LOAD, resume) holds, as their attaches
        would have; None, or why not (a device another session holds: nothing is kept)."""
        journal = new.journal
        if journal is None:
            return None
        attached, held = dict(self._attached), dict(self._held)
        for record in journal.records():
            refusal = self._before(new, record) if isinstance(record, DeviceAttach) else None
            if refusal is not None:
                for device in [d for d in self._held if d not in held]:
                    if self.claims is not None:
                        self.claims.release(device)
                self._attached, self._held = attached, held
                return refusal
            self._after(record, ok=True)
        return None

    def _mapping_quota(self, session: Session, viommu: str, data: bytes) -> str | None:
        """A virtio MAP request beyond ``max_mappings`` mappings in the session is refused."""
        if not data or data[0] != RequestType.MAP:
            return None
        total = 0
        for instance in session.viommus.values():
            frontend = getattr(instance, "frontend", None)
            domains = getattr(frontend, "domains", None)
            if isinstance(domains, dict):
                total += sum(len(d.mappings) for d in domains.values())
        limit = self.limits.max_mappings
        if total >= limit:
            return f"quota: at most {limit} mappings per session (--max-mappings)"
        return None

    def _host_for(self, requested: Any) -> HostConfig:
        wanted: HostConfig | None = None
        if isinstance(
            requested, dict
        ):  # bounded, so a HELLO cannot make the daemon build a huge host
            for key, limit in (("iommus", MAX_HOST_IOMMUS), ("devices", MAX_HOST_DEVICES)):
                items = requested.get(key)
                if isinstance(items, list) and len(items) > limit:
                    raise _Fatal(f"bad host in HELLO: more than {limit} host.{key}")
        if requested is not None:
            try:
                wanted = HostConfig.from_json(requested)
            except HostConfigError as exc:
                raise _Fatal(f"bad host in HELLO: {exc}") from None
        if self.fixed_host is None:
            if wanted is None:
                raise _Fatal("this daemon has no host of its own: send one in HELLO")
            return wanted
        if wanted is not None:
            problems = wanted.missing_from(self.fixed_host)
            if problems:
                raise _Fatal(
                    "this daemon's host lacks what the client needs: " + "; ".join(problems)
                )
        return self.fixed_host

    def _backend_error(self, ioctl: str, errno_name: str, piommu: str | None) -> None:
        self.log.warning(
            "backend_error", ioctl=ioctl, errno=errno_name, piommu=piommu, viommu=self.viommu
        )

    def _authenticate(self, presented: Any) -> None:
        if self.authenticated:
            return
        if self.token is None or not token_matches(self.token, presented):
            self.log.warning("auth_failed", transport=self.transport, peer=self.peer)
            raise _Fatal("this listener needs the daemon's token (docs/protocol.md §5)")
        self.authenticated = True

    def _status(self, frame: wire.Frame) -> bytes:
        if not self.authenticated:
            try:
                body = frame.json(max_depth=wire.MAX_JSON_DEPTH) if frame.payload else {}
            except wire.WireError as exc:
                raise _Fatal(f"bad STATUS: {exc}") from None
            self._authenticate(body.get("token") if isinstance(body, dict) else None)
        if self.status is None:
            return encode_error(
                frame.seq,
                "STATUS is not answered here: ask the daemon on a new connection",
                fatal=False,
            )
        return wire.encode_json(FrameType.STATUS_OK, frame.seq, self.status(self.client_id))

    def _state(self, frame: wire.Frame, session: Session) -> bytes:
        """STATE_SAVE / STATE_LOAD (docs/protocol.md §9): the session as a state document,
        or a new session rebuilt from one, swapped in only once complete."""
        if frame.type == FrameType.STATE_SAVE:
            try:
                return wire.encode(FrameType.STATE, frame.seq, state.save(session))
            except state.StateError as exc:
                return encode_error(frame.seq, f"state refused: {exc}", fatal=False)
        # an empty STATE_LOAD completes the resume that waited for the VMM's fds
        resumed = self._pending if not frame.payload else None
        blob = resumed[0] if resumed is not None else frame.payload
        try:
            new = state.load(blob, session, self.factory(session.backend.host))
        except state.StateError as exc:
            self.log.warning("state_refused", error=clip(str(exc), 512))
            return encode_error(frame.seq, f"state refused: {exc}", fatal=False)
        refusal = self._adopt(new)
        if refusal is not None:
            _give_back(new, session)
            self.log.warning("state_refused", error=clip(refusal, 512))
            return encode_error(frame.seq, f"state refused: {refusal}", fatal=False)
        new.calls.on_error = self._backend_error
        body: dict[str, Any] = {"viommus": {n: v.model for n, v in sorted(new.viommus.items())}}
        body["records"] = len(new.journal.entries) if new.journal is not None else 0
        if new.calls.keep:
            body["calls"] = new.drain_calls()
        self.session = new
        session.close()
        self._stored = -1  # a --state-dir file is rewritten with the new session
        if resumed is not None:
            self._pending = None
            self.frames = body["frames"] = resumed[1]
            self.log.info("session_resumed", viommus=sorted(new.viommus), frames=resumed[1])
        self.log.info("state_loaded", viommus=sorted(new.viommus), records=body["records"])
        return wire.encode_json(FrameType.STATE_LOADED, frame.seq, body)

    def _resume(self, token: Any) -> dict[str, Any]:
        """serve --state-dir: a token for the new session, or the saved session of
        ``token`` rebuilt into it (docs/state-format.md §6)."""
        state_dir = self.state_dir
        session = self.session
        assert state_dir is not None
        assert session is not None
        try:
            token, blob = state_dir.claim(token)
        except StateDirError as exc:
            raise _Fatal(f"cannot resume: {exc}") from None
        out: dict[str, Any] = {"session_token": token}
        if blob is not None:
            try:
                doc = state.decode(blob)
                frames = int(doc.get("frames", 0))
            except (state.StateError, ValueError, TypeError) as exc:
                state_dir.release(token)
                raise _Fatal(f"cannot resume: state refused: {exc}") from None
            needs = state.passed(doc)
            if needs:  # fds cannot be in a file: the VMM passes them again first
                self._pending = (blob, frames)
                self.session_token = token
                out["resumed"] = {"viommus": doc["viommus"], "frames": frames, "needs": needs}
                self.log.info("session_resume_pending", frames=frames, needs=sorted(needs))
                return out  # nothing stored: the file keeps the saved session
            try:
                new = state.load(blob, session, self.factory(session.backend.host))
            except (state.StateError, ValueError, TypeError) as exc:
                state_dir.release(token)
                raise _Fatal(f"cannot resume: state refused: {exc}") from None
            refusal = self._adopt(new)
            if refusal is not None:
                _give_back(new, session)
                state_dir.release(token)
                raise _Fatal(f"cannot resume: {refusal}")
            new.calls.on_error = self._backend_error
            new.drain_calls()
            self.session = new
            session.close()
            self.frames = self._stored = frames
            out["resumed"] = {
                "viommus": {n: v.model for n, v in sorted(new.viommus.items())},
                "frames": frames,
            }
            self.log.info("session_resumed", viommus=sorted(new.viommus), frames=frames)
        self.session_token = token
        self._store()
        return out

    def _store(self) -> None:
        state_dir, session, token = self.state_dir, self.session, self.session_token
        if state_dir is None or session is None or token is None:
            return
        try:
            state_dir.store(token, session, self.frames)
        except OSError as exc:
            self.log.error("state_store_failed", error=str(exc))
            return
        self._stored = self.frames

    def describe(self) -> dict[str, Any]:
        """This client for STATUS: transport, peer, and its session's vIOMMUs and objects."""
        out: dict[str, Any] = {
            "client": self.client_id,
            "transport": self.transport,
            "peer": self.peer,
            "connected_s": round(time.monotonic() - self.connected_at, 3),
            "session": None,
        }
        session = self.session
        if session is not None:
            held = backend_objects(session.backend)
            out["session"] = {
                "vm": self.vm,
                "trace": self.trace,
                "backend": session.backend.name,
                "viommus": [describe_viommu(v) for _, v in sorted(session.viommus.items())],
                "objects": count_kinds(held) if held is not None else None,
                "counters": session.report(),
            }
        return out

    def close(self) -> dict[str, Any] | None:
        """End the session (freeing its backend objects); returns its final totals."""
        self._fds.close()
        close_all(self._passed)
        self._passed = []
        for device in list(self._held):
            if self.claims is not None:
                self.claims.release(device)
        self._held.clear()
        self._attached.clear()
        session = self.session
        if session is None:
            return None
        self.log.flush(all_windows=True)
        if self.progress.doorbells or self.progress.requests:
            self.log.info("session_progress", **_progress_keys(self.progress))
        self.session = None
        self.viommu = None  # teardown failures name their vIOMMU themselves
        token = self.session_token
        if self.state_dir is not None and token is not None:
            # kept for a client that resumes it; nothing to keep when it holds no vIOMMU
            self.state_dir.release(token)
            if not session.viommus:
                self.state_dir.discard(token)
        report = session.report()  # commands and errors, while its vIOMMUs are still there
        session.close()
        report["backend"] = session.report()["backend"]  # with the teardown calls
        return report


MAX_EVENT_DEPTH = 65536


def _event_depth(value: Any) -> int:
    """HELLO ``events``: absent / false: 0 (no events); true: 64; an integer: that depth."""
    if value is None or value is False:
        return 0
    if value is True:
        return 64
    if isinstance(value, int) and 1 <= value <= MAX_EVENT_DEPTH:
        return value
    raise _Fatal(f"bad HELLO: 'events' must be a boolean or a queue depth 1..{MAX_EVENT_DEPTH}")


def _progress_keys(progress: Progress) -> dict[str, Any]:
    """The ``session_progress`` line of the window just ended (``Progress.take``)."""
    line = progress.take()
    return {
        "doorbells": line["doorbells"],
        "requests": line["requests"],
        "commands": line["commands"],
        "host_calls": line["host_calls"],
        "errors": line["errors"],
        "p50_ms": line["p50_ms"],
        "p99_ms": line["p99_ms"],
    }


_PENDING = (
    "this resumed session waits for the guest RAM and device fds its VMM passed "
    "(MEMORY / DEVICES) and an empty STATE_LOAD (docs/state-format.md §6)"
)


def _give_back(new: Session, old: Session) -> None:
    """A rebuilt session refused after ``state.load``: the VMM's memfds and the cdevs it did
    not use go back to ``old``, then it is closed."""
    old.use_resources(new.resources)
    new.use_resources(GuestResources())
    new.close()
