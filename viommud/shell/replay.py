"""Replay a trace file through a daemon and build the replay report.

The report, responses and call log are docs/trace-format.md §3, §4 and §5.

Records are sent pipelined (at most ``window`` unanswered frames); replies come back in
order and are written to the responses file and the call log as they arrive. A malformed
trace line or a record the daemon refuses stops the replay: what was sent before is still
answered, and the result carries exit status 2.

``progress=True`` draws a progress bar (tqdm: records answered, records/s) on stderr; the
CLI asks for it only when stderr is a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from protocols.frames import FrameType
from viommud import wire
from viommud.backend.select import emulated_backend
from viommud.guest_memory import RamRegion
from viommud.shell.client import Client, ClientError
from viommud.shell.connection import BackendFactory
from viommud.shell.server import Server
from viommud.trace import (
    Cmds,
    ContextEntry,
    DeviceAttach,
    PasidEntry,
    Request,
    Ste,
    TraceError,
    TraceReader,
    ViommuCreate,
    record_to_json,
)

EXIT_OK = 0
EXIT_MISSED = 1
EXIT_REFUSED = 2


class Progress(Protocol):
    """What the replay needs of a progress bar (tqdm's interface)."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


def progress_bar(name: str) -> Progress:
    """A tqdm bar on stderr counting answered records (``N records [elapsed, R records/s]``)."""
    from tqdm import tqdm  # noqa: PLC0415 - only on a terminal

    return tqdm(
        desc=name,
        unit=" records",
        unit_scale=True,
        file=sys.stderr,
        mininterval=0.25,
        dynamic_ncols=True,
        leave=False,
    )


@dataclass(slots=True)
class ReplayResult:
    exit_code: int
    report: dict[str, Any] | None
    error: str | None = None


async def replay(
    trace: str | Path,
    socket_path: str | Path,
    *,
    responses: IO[str] | None = None,
    calls: IO[str] | None = None,
    window: int = 128,
    verify: bool = False,
    token: str | None = None,
    progress: bool = False,
    group_commit: int = 0,
    compat: str | None = None,
    migrate_at: int | None = None,
    migrate_to: Callable[[], Awaitable[Client]] | None = None,
    guest_memory: int | None = None,
) -> ReplayResult:
    """Replay ``trace`` on the daemon listening at ``socket_path``.

    With ``guest_memory`` (bytes, a multiple of 4096) the session first gets a sparse memfd
    of that size as guest RAM at guest-physical 0 (a MEMORY frame, docs/protocol.md §12;
    a Unix socket only), as a VMM would pass its own.

    With ``migrate_at`` N, after the first N records the session is saved (STATE_SAVE),
    loaded into a new session (STATE_LOAD) on the daemon ``migrate_to`` connects to (by
    default a new connection to ``socket_path``) and the replay goes on there.

    With ``verify`` the daemon runs the oracle; a missed invalidation gives exit status 1.
    ``group_commit`` N > 0 models N vCPUs racing for each vIOMMU's queue, each waiting on its
    own sync: at most N doorbells of one vIOMMU are unanswered at once, and the daemon may
    share host calls among those that arrive together (call counts then depend on timing;
    responses do not). 0 (the default): the daemon handles every doorbell on its own, as
    for a guest that waits on each sync. ``compat`` is the session's
    default compatibility policy (HELLO ``compat``, docs/protocol.md).
    ``socket_path`` may be ``tcp://ADDR:PORT``; ``token`` is then presented in HELLO."""
    if isinstance(group_commit, bool) or group_commit < 0:  # True was the old on/off flag
        raise ValueError(f"group_commit is a number of racing vCPUs (0: off), got {group_commit!r}")
    try:
        reader = TraceReader(trace)
    except TraceError as exc:
        return ReplayResult(EXIT_REFUSED, None, f"{trace}: {exc}")
    header = reader.header
    try:
        client = await Client.connect(socket_path, token=token)
    except ClientError as exc:
        reader.close()
        return ReplayResult(EXIT_REFUSED, None, str(exc))
    bar = progress_bar(header.name) if progress else None
    try:
        return await _run(
            client,
            reader,
            responses,
            calls,
            window=window,
            verify=verify,
            progress=bar,
            group_commit=group_commit,
            compat=compat,
            migrate_at=migrate_at,
            migrate_to=migrate_to or (lambda: Client.connect(socket_path, token=token)),
            guest_memory=guest_memory,
        )
    except ClientError as exc:
        return ReplayResult(EXIT_REFUSED, None, f"{header.name}: {exc}")
    finally:
        if bar is not None:
            bar.close()
        reader.close()
        await client.close()


async def _run(
    client: Client,
    reader: TraceReader,
    responses: IO[str] | None,
    calls: IO[str] | None,
    *,
    window: int,
    verify: bool,
    progress: Progress | None = None,
    group_commit: int = 0,
    compat: str | None = None,
    migrate_at: int | None = None,
    migrate_to: Callable[[], Awaitable[Client]] | None = None,
    guest_memory: int | None = None,
) -> ReplayResult:
    header = reader.header
    extra = {"compat": compat} if compat is not None else {}
    hello: dict[str, Any] = dict(
        host=header.host.to_json(),
        calls=calls is not None,
        trace=header.name,
        verify=verify,
        compact=True,
        compact_writes=True,
        group_commit=group_commit > 0,
        **extra,
    )
    if migrate_at is not None:
        hello["state"] = True  # the session keeps what STATE_SAVE needs
    await client.hello(**hello)
    if guest_memory is not None:
        hello["guest_memory"] = guest_memory  # _migrate gives the new session the same
        await send_guest_memory(client, guest_memory)
    moved: list[Client] = []  # the client of the session the state moved to
    started = time.perf_counter()
    lines: dict[int, int] = {}  # seq -> trace line
    records = 0
    tally = ConfigTally()
    error: str | None = None

    # --group-commit N: the unanswered doorbells of each vIOMMU (N vCPUs, each waiting on
    # its own sync, so at most N of them can be pending together)
    doorbell_of: dict[int, str] = {}
    pending: dict[str, int] = {}

    async def receive_one() -> str | None:
        """Read and write out one reply; returns a refusal, if it is one."""
        frame = await client.receive()
        line = lines.pop(frame.seq, None)
        if line is None:
            raise ClientError(f"reply for unknown request {frame.seq}")
        viommu = doorbell_of.pop(frame.seq, None)
        if viommu is not None:
            pending[viommu] -= 1
        body = frame.response()
        if frame.type == FrameType.ERROR:
            refusal = f"line {line}: the daemon refused the record: {body['error']}"
            if body.get("fatal"):
                raise ClientError(refusal)
            return refusal
        call_log = body.pop("calls", None)
        if calls is not None and call_log:
            calls.writelines(json.dumps(c, separators=(",", ":")) + "\n" for c in call_log)
        if responses is not None:
            responses.write(json.dumps({"record": line, **body}, separators=(",", ":")) + "\n")
        return None

    async def settle(limit: int) -> str | None:
        """Read replies until at most ``limit`` are outstanding; returns a refusal, if any."""
        refusal = None
        waiting = len(lines)
        while len(lines) > limit:
            refusal = await receive_one() or refusal
        if progress is not None:
            progress.update(waiting - len(lines))
        return refusal

    async def vcpus_free(viommu: str) -> str | None:
        """Read replies until fewer than ``group_commit`` doorbells of ``viommu`` wait."""
        refusal = None
        waiting = len(lines)
        await client.drain()
        while pending.get(viommu, 0) >= group_commit:
            refusal = await receive_one() or refusal
        if progress is not None:
            progress.update(waiting - len(lines))
        return refusal

    try:
        for record in reader:
            if (
                group_commit
                and isinstance(record, Cmds)
                and pending.get(record.viommu, 0) >= group_commit
            ):
                error = await vcpus_free(record.viommu)
                if error:
                    break
            seq = client.next_seq()
            if isinstance(record, Cmds):
                frame = wire.encode_guest_data(FrameType.CMDS, seq, record.viommu, record.data)
                if group_commit:
                    doorbell_of[seq] = record.viommu
                    pending[record.viommu] = pending.get(record.viommu, 0) + 1
            elif isinstance(record, Request):
                frame = wire.encode_guest_data(FrameType.REQUEST, seq, record.viommu, record.data)
            else:
                frame = wire.encode_json(FrameType.RECORD, seq, record_to_json(record))
            client.send(frame)
            lines[seq] = record.line
            records += 1
            tally.add(record)
            if records == migrate_at and migrate_to is not None:
                await client.drain()
                error = await settle(0)
                if error:
                    break
                client = await _migrate(client, migrate_to, hello, calls, moved)
            elif len(lines) >= window:
                await client.drain()
                error = await settle(window // 2)
                if error:
                    break
    except TraceError as exc:
        error = f"{reader.path}: {exc}"
    try:
        await client.drain()
        refusal = await settle(0)
        error = error or refusal
        elapsed = time.perf_counter() - started
        if error:
            return ReplayResult(EXIT_REFUSED, None, error)
        totals = await client.stats()
    finally:
        for other in moved:
            await other.close()
    report = build_report(header.name, records, totals, elapsed, tally, group_commit=group_commit)
    return ReplayResult(EXIT_MISSED if report["verify"]["missed"] else EXIT_OK, report)


async def send_guest_memory(client: Client, size: int) -> None:
    """``size`` bytes of guest RAM at guest-physical 0: a sparse memfd, passed in a MEMORY
    frame (the daemon keeps its own copy of the fd; ours is closed)."""
    fd = os.memfd_create("viommud-guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        await client.send_memory([RamRegion(0, size, fd)])
    finally:
        os.close(fd)


async def _migrate(
    client: Client,
    migrate_to: Callable[[], Awaitable[Client]],
    hello: dict[str, Any],
    calls: IO[str] | None,
    moved: list[Client],
) -> Client:
    """Save the session of ``client``, load it into a new session on the daemon
    ``migrate_to`` connects to, and return that session's client (docs/state-format.md §5).
    The rebuild's backend calls go to the call log."""
    document = await client.state_save()
    target = await migrate_to()
    moved.append(target)
    guest_memory = hello.get("guest_memory")
    await target.hello(**{k: v for k, v in hello.items() if k != "guest_memory"})
    if guest_memory is not None:
        await send_guest_memory(target, guest_memory)
    loaded = await target.state_load(document)
    await client.close()  # the source session ends: its vIOMMUs live on in the target
    if calls is not None and loaded.get("calls"):
        calls.writelines(json.dumps(c, separators=(",", ":")) + "\n" for c in loaded["calls"])
    return target


# Guest work that asks the host to invalidate something (docs/trace-format.md §3.6).
_INVALIDATING = (
    "smmuv3:CMD_TLBI_",
    "smmuv3:CMD_ATC_INV",
    "smmuv3:CMD_CFGI_CD",
    "vtd:iotlb_inv",
    "vtd:p_iotlb_inv",
    "vtd:dev_tlb_inv",
    "vtd:p_dev_tlb_inv",
    "virtio:MAP",
    "virtio:UNMAP",
)
# Host calls that carry it: invalidations, and virtio-iommu's mapping changes.
_REACHING = ("IOMMU_HWPT_INVALIDATE", "IOMMU_IOAS_MAP", "IOMMU_IOAS_UNMAP")
_STE_TRANSLATING = (5, 6, 7)  # STE Config: stage 1, stage 2, nested
_NESTED, _SECOND_LEVEL, _NONE = "nested", "second-level", "none"


class ConfigTally:
    """What the trace configured, for the report's warnings: devices attached, and the last
    configuration each device's guest entries ask for (translating or not)."""

    def __init__(self) -> None:
        self.attached = 0
        self.emulated = 0  # virtio-iommu endpoints without a host device
        self.models: set[str] = set()
        self.scalable: set[str] = set()  # vtd vIOMMUs with a 256-bit queue
        self.entries: dict[str, int] = {"ste": 0, "context_entry": 0, "pasid_entry": 0}
        # (viommu, device) -> what its last entry asks for: NESTED (a stage-1 table viommud
        # nests), SECOND_LEVEL (a legacy or PGTT=2/3 table, which it blocks: docs/vtd.md
        # "Legacy mode") or NONE (bypass, pass-through, abort, not present)
        self.translating: dict[tuple[str, int], str] = {}

    def add(self, record: object) -> None:
        if isinstance(record, ViommuCreate):
            self.models.add(record.model)
            emulated = record.options.get("emulated_endpoints")
            self.emulated += len(emulated) if isinstance(emulated, list) else 0
            if record.model == "vtd" and record.options.get("dw") == 256:
                self.scalable.add(record.viommu)
        elif isinstance(record, DeviceAttach):
            self.attached += 1
        elif isinstance(record, Ste):
            self.entries["ste"] += 1
            d0 = int.from_bytes(record.data[:8], "little")
            self.translating[record.viommu, record.vsid] = (
                _NESTED if d0 & 1 and (d0 >> 1) & 7 in _STE_TRANSLATING else _NONE
            )
        elif isinstance(record, ContextEntry):
            self.entries["context_entry"] += 1
            if record.viommu not in self.scalable:
                qw0 = int.from_bytes(record.data[:8], "little")
                self.translating[record.viommu, record.sid] = (
                    _SECOND_LEVEL if qw0 & 1 and (qw0 >> 2) & 3 in (0, 1) else _NONE
                )
        elif isinstance(record, PasidEntry):
            self.entries["pasid_entry"] += 1
            if record.pasid == 0:
                qw0 = int.from_bytes(record.data[:8], "little")
                pgtt = (qw0 >> 6) & 7
                self.translating[record.viommu, record.sid] = (
                    _NONE
                    if not qw0 & 1 or pgtt not in (1, 2, 3)
                    else _NESTED
                    if pgtt == 1
                    else _SECOND_LEVEL
                )

    def warnings(self, totals: dict[str, Any]) -> list[str]:
        """Why the guest invalidated and nothing reached the host, when that happened."""
        kinds = totals["commands"]["by_kind"]
        asked = sum(n for kind, n in kinds.items() if kind.startswith(_INVALIDATING))
        calls = totals["backend"]["calls"]
        reached = sum(calls.get(name, 0) for name in _REACHING)
        if not asked or reached:
            return []
        times = "once" if asked == 1 else f"{asked} times"
        head = f"the guest invalidated {times} and no invalidation reached the host: "
        if not self.attached and self.emulated:
            return [head + "only emulated endpoints, no host device attached"]
        if not self.attached:
            return [head + "no device attached (the trace has no device_attach record)"]
        if not calls.get("VFIO_DEVICE_BIND_IOMMUFD", 0):
            return [
                head + f"no device bound ({self.attached} device_attach records, "
                f"{totals.get('config_errors', 0)} config errors)"
            ]
        out: list[str] = []
        if "smmuv3" in self.models and not self.entries["ste"]:
            out.append(head + "no stage-1 configuration: the trace writes no STE")
        if "vtd" in self.models and not (
            self.entries["context_entry"] or self.entries["pasid_entry"]
        ):
            out.append(head + "no stage-1 configuration: the trace writes no context entry")
        elif self.scalable and not self.entries["pasid_entry"]:
            out.append(head + "no stage-1 configuration: scalable mode and no PASID entry")
        states = set(self.translating.values())
        if not out and _SECOND_LEVEL in states and _NESTED not in states:
            out.append(
                head + "every translating device uses legacy-mode or second-stage (PGTT=2/3) "
                "tables, which viommud never nests as stage 1: those devices are blocked "
                "(docs/vtd.md, Legacy mode)"
            )
        if not out and states == {_NONE}:
            out.append(
                head + "every device is in bypass, pass-through or blocked (its last STE, "
                "context or PASID entry does not translate)"
            )
        if not out:
            out.append(
                head + "no invalidation named a device bound to a stage-1 configuration "
                "(check the DIDs, ASIDs, StreamIDs and domains)"
            )
        return out


def build_report(
    name: str,
    records: int,
    totals: dict[str, Any],
    elapsed: float,
    tally: ConfigTally | None = None,
    *,
    group_commit: int = 0,
) -> dict[str, Any]:
    commands = totals["commands"]["total"]
    report = {
        "trace": name,
        "records": records,
        "commands": totals["commands"],
        "errors": totals["errors"],
        "barriers": totals["barriers"],
        "backend": totals["backend"],
        "baseline": totals["baseline"],
        "verify": totals.get("verify", {"enabled": False, "missed": 0, "over": 0}),
        "config_errors": totals.get("config_errors", 0),
        "group_commit": group_commit,
        "elapsed_s": round(elapsed, 6),
        "commands_per_s": round(commands / elapsed, 1) if elapsed > 0 else 0.0,
    }
    warnings = tally.warnings(totals) if tally is not None else []
    if warnings:
        report["warnings"] = warnings
    return report


async def replay_embedded(
    trace: str | Path,
    *,
    factory: BackendFactory = emulated_backend,
    responses: IO[str] | None = None,
    calls: IO[str] | None = None,
    verify: bool = False,
    progress: bool = False,
    group_commit: int = 0,
    compat: str | None = None,
    migrate_at: int | None = None,
    fresh_backend: str = "emulated",
    guest_memory: int | None = None,
) -> ReplayResult:
    """Start a daemon on a temporary Unix socket in this process and replay through it.

    With ``migrate_at`` the state moves after that many records to a fresh daemon process
    (``viommud serve --backend fresh_backend`` on another temporary socket), which
    answers the rest of the trace."""
    with tempfile.TemporaryDirectory(prefix="viommud-") as tmp:
        socket_path = Path(tmp) / "viommud.sock"
        server = Server(socket_path, factory=factory)
        await server.start()
        stop = asyncio.Event()
        serving = asyncio.create_task(server.run(stop.wait))
        async with contextlib.AsyncExitStack() as stack:

            async def migrate_to() -> Client:
                fresh = await stack.enter_async_context(
                    fresh_daemon(Path(tmp) / "fresh.sock", fresh_backend)
                )
                return await Client.connect(fresh)

            try:
                return await replay(
                    trace,
                    socket_path,
                    responses=responses,
                    calls=calls,
                    verify=verify,
                    progress=progress,
                    group_commit=group_commit,
                    compat=compat,
                    migrate_at=migrate_at,
                    migrate_to=migrate_to,
                    guest_memory=guest_memory,
                )
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
    raise AssertionError("unreachable")  # pragma: no cover - the block returns or raises


@contextlib.asynccontextmanager
async def fresh_daemon(socket_path: Path, backend: str = "emulated") -> AsyncIterator[Path]:
    """A new ``viommud serve`` process on ``socket_path``, stopped (SIGTERM, then SIGKILL
    after 10 s) when the block ends."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "viommud",
        "serve",
        "--socket",
        str(socket_path),
        "--backend",
        backend,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60.0
        # listening, not only bound: the socket file appears before listen(2)
        while not await asyncio.to_thread(_listening, socket_path):
            if process.returncode is not None or time.monotonic() > deadline:
                raise ClientError(f"the fresh daemon on {socket_path} did not start")
            await asyncio.sleep(0.05)
        yield socket_path
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10.0):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


def _listening(path: Path) -> bool:
    """Whether a daemon accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def render_table(report: dict[str, Any]) -> str:
    """The report as a short human table."""
    backend = report["backend"]
    baseline = report["baseline"]["invalidate_calls"]
    invalidates = backend["calls"].get("IOMMU_HWPT_INVALIDATE", 0)
    kinds = ", ".join(
        f"{k} {v}" for k, v in sorted(report["commands"]["by_kind"].items(), key=lambda kv: -kv[1])
    )
    codes = ", ".join(f"{k} {v}" for k, v in report["errors"]["by_code"].items()) or "none"
    calls = ", ".join(f"{k} {v}" for k, v in backend["calls"].items()) or "none"
    saved = f" ({100 * (1 - invalidates / baseline):.1f}% fewer)" if baseline else ""
    verify = report["verify"]
    rows = [
        ("trace", report["trace"]),
        ("records", f"{report['records']}"),
        ("commands", f"{report['commands']['total']}  [{kinds}]"),
        ("guest errors", f"{report['errors']['total']}  [{codes}]"),
        ("barriers", f"{report['barriers']}"),
        ("backend calls", calls),
        ("invalidate calls", f"{invalidates} vs baseline {baseline}{saved}"),
        ("invalidation entries", f"{backend['invalidation_entries']}"),
        (
            "verify",
            f"missed {verify['missed']}, over {verify['over']}" if verify["enabled"] else "off",
        ),
        ("elapsed", f"{report['elapsed_s']:.3f} s  ({report['commands_per_s']:,.0f} commands/s)"),
        (
            "group commit",
            f"{report['group_commit']} vCPUs racing per vIOMMU (at most that many doorbells "
            "pending together)"
            if report.get("group_commit")
            else "off (each doorbell on its own)",
        ),
    ]
    rows += [("warning", text) for text in report.get("warnings", [])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
