"""Command line: ``viommud serve``, ``viommud replay``, ``viommud health``, ``viommud status``.

``main(argv)`` returns the exit status, so tests call it directly. The global options
(``--log-level``, ``--log-format``) may come before or after the subcommand. A reader that
goes away early (``viommud status --json | head -c 10``) ends the command quietly with
status 1, as the Python documentation recommends for SIGPIPE (signal module, "Note on
SIGPIPE").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from protocols.models import ViommuModel
from viommud import __version__
from viommud.backend.select import BACKENDS, BackendUnavailable, backend_factory
from viommud.host import HostConfig, HostConfigError
from viommud.shell import logs, systemd
from viommud.shell.client import DEFAULT_TIMEOUT, ClientError, health, timeouts
from viommud.shell.client import status as fetch_status
from viommud.shell.endpoints import (
    EndpointError,
    parse_host_port,
    parse_tcp,
    read_token,
    token_file_is_private,
)
from viommud.shell.limits import Limits
from viommud.shell.replay import EXIT_REFUSED, render_table, replay, replay_embedded
from viommud.shell.server import Server
from viommud.shell.sessions import default_spares
from viommud.shell.status import render_table as render_status
from viommud.trace import TraceError, TraceReader

DEFAULT_SOCKET = os.environ.get("VIOMMUD_SOCKET", "/run/viommud/viommud.sock")


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The options every subcommand takes, before or after its name. The subcommands'
    copies default to SUPPRESS, so that one given before the name is not reset."""
    parser.add_argument(
        "--log-level",
        choices=sorted(logs.LEVELS),
        default=default,
        help="default: info for serve, warning otherwise ($VIOMMUD_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console", "auto"),
        default=default,
        help="default: console on a TTY, json elsewhere ($VIOMMUD_LOG_FORMAT)",
    )


def _positive(text: str) -> int:
    """A ``--migrate-at`` value: a positive record count."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of records, got {text!r}")
    return value


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A ``--guest-memory`` value: bytes, or a number with K, M, G or T (powers of 1024), a
    positive multiple of 4096."""
    number, unit = text.strip(), ""
    if number and number[-1].upper() in "KMGT":
        number, unit = number[:-1], number[-1].upper()
    try:
        value = int(number) * _SIZE_UNITS[unit]
    except ValueError:
        value = 0
    if value <= 0 or value % 4096:
        raise argparse.ArgumentTypeError(
            f"expected a positive size, a multiple of 4096 (e.g. 4G, 512M), got {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    """A ``--timeout`` value: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    """A limit: a positive whole number."""
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _seconds_or_off(text: str) -> float:
    """A deadline: seconds, or 0 for none."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (0: off), got {text!r}")
    return value


# serve flag -> (Limits field, parser, help); the defaults are Limits' (docs/operations.md §10)
_LIMIT_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--max-hello-frame": ("max_hello_frame", _count, "bytes of a frame before HELLO"),
    "--max-frame": ("max_frame", _count, "bytes of a frame in a session"),
    "--handshake-timeout": (
        "handshake_timeout",
        _seconds_or_off,
        "seconds from connect to an accepted HELLO (0: off)",
    ),
    "--idle-timeout": (
        "idle_timeout",
        _seconds_or_off,
        "seconds a session may send nothing (0: off)",
    ),
    "--max-clients": ("max_clients", _count, "connections at once"),
    "--max-viommus": ("max_viommus", _count, "vIOMMUs per session"),
    "--max-devices": ("max_devices", _count, "attached devices per session"),
    "--max-mappings": ("max_mappings", _count, "virtio-iommu mappings per session"),
    "--backlog": ("backlog", _count, "connections the kernel queues (capped by somaxconn)"),
}


def _limit_options(serve: argparse.ArgumentParser) -> None:
    defaults = Limits()
    for flag, (name, parse, help_text) in _LIMIT_FLAGS.items():
        default = getattr(defaults, name)
        serve.add_argument(
            flag, dest=name, type=parse, default=default, help=f"{help_text} (default {default:g})"
        )


def _at_least_one(what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= 1, else ``expected a number of WHAT (1 or more)``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"expected a number of {what} (1 or more), got {text!r}"
            )
        return value

    return parse


_vcpus = _at_least_one("racing vCPUs")  # --group-commit: vCPUs racing for a vIOMMU's queue
_spares = _at_least_one("spare session processes")  # --spares: kept started


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viommud", description="VMM-side virtual-IOMMU emulator daemon"
    )
    parser.add_argument("--version", action="version", version=f"viommud {__version__}")
    _global_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common])

    serve = add("serve", "run the daemon on a Unix socket")
    serve.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    serve.add_argument(
        "--socket-mode",
        help="permissions of the socket (octal; default 0600, 0660 with --socket-group)",
    )
    serve.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group of the socket (name or number); its members may connect (mode 0660)",
    )
    serve.add_argument(
        "--allow-uid",
        action="append",
        type=int,
        default=[],
        metavar="UID",
        help="Unix peers allowed besides the daemon's own user (repeatable; default: "
        "whoever the socket's permissions let in)",
    )
    serve.add_argument(
        "--in-process",
        action="store_true",
        help="run every session in the daemon's own process (default: one process per "
        "session, so that one session can only slow itself)",
    )
    serve.add_argument(
        "--spares",
        type=_spares,
        metavar="N",
        help="session processes kept started, so that N clients saying HELLO together are "
        "answered at once (1 or more; default: one per CPU the daemon may use, "
        f"here {default_spares()}; ignored with --in-process)",
    )
    _limit_options(serve)
    serve.add_argument(
        "--testing",
        action="store_true",
        help="take TEST frames that raise host events in a session (tests only, like the "
        "kernel's CONFIG_IOMMUFD_TEST; docs/protocol.md §11)",
    )
    serve.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the listener and the session processes: the standard library's "
        "(default) or uvloop, when installed "
        "(pip install 'viommud[fast]')",
    )
    serve.add_argument(
        "--host",
        type=Path,
        help="fixed host (JSON: a trace header's host "
        "object, or a trace whose header to use); clients must fit in it",
    )
    serve.add_argument(
        "--grace", type=float, default=5.0, help="seconds running clients get at shutdown"
    )
    serve.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="emulated, iommufd (/dev/iommu) or auto: iommufd when /dev/iommu exists "
        "(default auto)",
    )
    serve.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="tcp://ADDR:PORT",
        help="also serve on TCP (off unless given; repeatable); needs --token-file",
    )
    serve.add_argument(
        "--token-file",
        type=Path,
        help="file holding the token TCP clients must present in HELLO",
    )
    serve.add_argument(
        "--netns",
        metavar="NAME",
        help="create the --listen sockets inside this named network namespace (ip netns)",
    )
    serve.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics over HTTP here (e.g. 127.0.0.1:9708)",
    )

    serve.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="keep each session's state in DIR, crash-safely, so that a client can resume it "
        "after the daemon was killed or upgraded (docs/state-format.md)",
    )

    rep = add("replay", "replay a trace and print the replay report")
    rep.add_argument("trace", type=Path)
    rep.add_argument("--socket", help="replay through this daemon (default: an embedded one)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument("--responses", type=Path, help="write guest-visible responses here")
    rep.add_argument("--calls", type=Path, help="write the backend call log here")
    rep.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="emulated, iommufd (/dev/iommu) or auto: iommufd when /dev/iommu exists "
        "(default auto)",
    )
    rep.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the oracle (default): exit 1 if a barrier missed an invalidation "
        "(docs/oracle.md); --no-verify skips it",
    )
    rep.add_argument(
        "--group-commit",
        type=_vcpus,
        default=0,
        metavar="N",
        help="model N vCPUs racing for each vIOMMU's queue: at most N doorbells of one "
        "vIOMMU pending at once, and doorbells that arrive together share host calls "
        "(docs/coalescing.md); fewer calls, counts that depend on timing. Default: off, "
        "every doorbell on its own (a guest that waits on each sync)",
    )
    rep.add_argument(
        "--compat",
        choices=("architecture", "qemu"),
        help="how vIOMMUs (smmuv3, vtd, virtio-iommu) treat guest input the architecture "
        "and QEMU read differently ('Compatibility policy' in docs/smmuv3.md, docs/vtd.md, "
        "docs/virtio-iommu.md); default: the architecture's reading, or the vIOMMU's own "
        "'compat' option",
    )
    rep.add_argument("--token-file", type=Path, help="token for a tcp:// --socket")
    rep.add_argument(
        "--migrate-at",
        type=_positive,
        metavar="N",
        help="after N records save the session, load it into a fresh daemon process (with "
        "--socket: a new session of that daemon) and replay the rest there "
        "(docs/state-format.md)",
    )
    rep.add_argument(
        "--guest-memory",
        type=_size,
        metavar="SIZE",
        help="give the session SIZE bytes of guest RAM at guest-physical 0 before the trace "
        "(a sparse memfd passed in a MEMORY frame, docs/protocol.md §12; e.g. 4G; Unix "
        "socket only)",
    )
    rep.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"--socket: give up when connecting, or getting HELLO answered, takes longer "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    rep.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )

    hc = add("health", "exit 0 if the daemon answers HELLO")
    hc.add_argument("--socket", default=DEFAULT_SOCKET, help="a path or tcp://ADDR:PORT")
    hc.add_argument("--timeout", type=_seconds, default=2.0, metavar="SECONDS")
    hc.add_argument("--token-file", type=Path, help="token for a tcp:// --socket")

    imp = add("import", "turn a QEMU trace log into a v1 trace file")
    imp.add_argument("format", choices=["qemu-log"], help="what LOG is")
    imp.add_argument("log", type=Path)
    imp.add_argument("-o", "--output", type=Path, required=True, help="TRACE.jsonl[.gz|.xz]")
    imp.add_argument(
        "--host",
        type=Path,
        help="host file: a JSON host object (iommus, devices, optional attach list of "
        "{vid, device}) or a trace whose header to use; default: made up from --attach",
    )
    imp.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="VID=DEVICE",
        help="guest ID (number or BB:DD.F) of a host device (repeatable)",
    )
    imp.add_argument("--ats", action="store_true", help="devices made up from --attach have ATS")
    imp.add_argument(
        "--model",
        choices=[ViommuModel.VTD, ViommuModel.SMMUV3, ViommuModel.VIRTIO_IOMMU],
        help="default: from the log",
    )
    imp.add_argument("--dw", type=int, choices=[128, 256], help="VT-d queue width")
    imp.add_argument("--name", help="trace name (default: the output file's name)")
    imp.add_argument("--viommu", help="vIOMMU name (default: vvtd0 / vsmmu0 / viommu0)")
    imp.add_argument(
        "--synthesize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the context/PASID entries and STEs the log cannot show (default; "
        "docs/vtd.md); --no-synthesize leaves them out",
    )
    imp.add_argument(
        "--cmdq-dump",
        type=Path,
        metavar="FILE",
        help="SMMUv3: raw little-endian dump of the command queue from its base (.xz read); "
        "default: queue.bin[.xz] or LOG.cmdq[.bin] beside the log",
    )

    st = add("status", "show a running daemon's clients, vIOMMUs and counters")
    st.add_argument("--socket", default=DEFAULT_SOCKET, help="a path or tcp://ADDR:PORT")
    st.add_argument("--json", action="store_true", help="print the STATUS reply as JSON")
    st.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS")
    st.add_argument("--token-file", type=Path, help="token for a tcp:// --socket")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            code = _main(argv)
        finally:  # also after argparse's --help / --version, which exit
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        # The reader of stdout went away: nothing more to say. stdout now points at
        # /dev/null so that the interpreter's final flush cannot fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        logs.configure(
            args.log_level,
            args.log_format,
            default_level="info" if args.command == "serve" else "warning",
        )
    except ValueError as exc:
        print(f"viommud: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "status":
        return _status(args)
    if args.command == "import":
        return _import(args)
    return _health(args)


def _load_host(path: Path) -> HostConfig:
    if path.suffix in (".jsonl", ".gz", ".xz"):
        reader = TraceReader(path)
        reader.close()
        return reader.header.host
    return HostConfig.from_json(json.loads(path.read_text()))


def _serve(args: argparse.Namespace) -> int:
    fixed_host = None
    if args.host is not None:
        try:
            fixed_host = _load_host(args.host)
        except (OSError, ValueError, TraceError, HostConfigError) as exc:
            print(f"viommud: cannot use host {args.host}: {exc}", file=sys.stderr)
            return 2
    try:
        group = _group(args.socket_group) if args.socket_group is not None else None
    except KeyError:
        print(f"viommud: no group {args.socket_group!r} (--socket-group)", file=sys.stderr)
        return 2
    socket_mode = args.socket_mode or ("0660" if group is not None else "0600")
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        print(f"viommud: bad --socket-mode {socket_mode!r}", file=sys.stderr)
        return 2
    try:
        network = _network_options(args)
    except (EndpointError, systemd.SystemdError) as exc:
        print(f"viommud: {exc}", file=sys.stderr)
        return 2
    try:
        factory = backend_factory(args.backend)
    except BackendUnavailable as exc:
        print(f"viommud: {exc}", file=sys.stderr)
        return 2
    if args.state_dir is not None:
        try:
            args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            print(f"viommud: cannot use --state-dir {args.state_dir}: {exc}", file=sys.stderr)
            return 2
    server = Server(
        args.socket,
        factory=factory,
        fixed_host=fixed_host,
        state_dir=args.state_dir,
        mode=mode,
        grace=args.grace,
        notify=systemd.notify,
        watchdog=systemd.watchdog_interval(os.environ, os.getpid()),
        limits=Limits(**{name: getattr(args, name) for name, _, _ in _LIMIT_FLAGS.values()}),
        processes=not args.in_process,
        spares=args.spares,
        backend=args.backend,
        allow_uids=args.allow_uid,
        group=group,
        session_loop=args.loop,
        testing=args.testing,
        **network,
    )
    _more_files()
    try:
        runner = _loop_factory(args.loop)
    except ImportError:
        print("viommud: --loop uvloop needs uvloop: pip install 'viommud[fast]'", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=runner) as loop_runner:
            loop_runner.run(server.run())
    except OSError as exc:
        print(f"viommud: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _group(name: str) -> int:
    """A group by name or number (KeyError when there is none)."""
    import grp  # noqa: PLC0415 - POSIX only, serve only

    if name.isdigit():
        return int(name)
    return grp.getgrnam(name).gr_gid


def _more_files() -> None:
    """Raise the soft limit of open files to the hard one: every client is a descriptor
    (two while a session process takes it over)."""
    import resource  # noqa: PLC0415 - POSIX only, serve only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """None for the standard loop; uvloop's factory (ImportError when it is missing)."""
    if name == "asyncio":
        return None
    import uvloop  # noqa: PLC0415 - optional extra

    return uvloop.new_event_loop


def _network_options(args: argparse.Namespace) -> dict[str, Any]:
    """TCP listeners, token, namespace, metrics and systemd sockets for ``Server``."""
    tcp = [parse_tcp(url) for url in args.listen]
    metrics = parse_host_port(args.metrics) if args.metrics else None
    token = read_token(args.token_file) if args.token_file else None
    if token is not None and not token_file_is_private(args.token_file):
        logs.get_logger().warning("token_file_readable", path=str(args.token_file))
    if args.netns is not None:
        if not tcp:
            raise EndpointError("--netns places --listen tcp:// sockets: give at least one")
        from viommud.shell import netlink  # noqa: PLC0415 - pyroute2 only when asked for

        if not netlink.namespace_exists(args.netns):
            raise EndpointError(f"network namespace {args.netns!r} does not exist")
    activated = systemd.listen_sockets()
    if token is None and (tcp or any(not listen.is_unix for listen in activated)):
        raise EndpointError("TCP listeners need a token: give --token-file")
    return {
        "tcp": tcp,
        "netns": args.netns,
        "token": token,
        "activated": activated,
        "metrics": metrics,
    }


def _client_token(args: argparse.Namespace) -> str | None:
    """The token for a tcp:// target (raises EndpointError when it cannot be read)."""
    if args.token_file is None:
        return None
    return read_token(args.token_file)


@contextlib.contextmanager
def _maybe_open(path: Path | None) -> Iterator[IO[str] | None]:
    if path is None:
        yield None
        return
    with path.open("w", encoding="utf-8") as handle:
        yield handle


def _replay(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:  # the backend of the embedded daemon (a --socket daemon has its own)
        factory = backend_factory("emulated" if args.socket else args.backend)
    except BackendUnavailable as exc:
        print(f"viommud: {exc}", file=sys.stderr)
        return 2
    try:
        token = _client_token(args)
    except EndpointError as exc:
        print(f"viommud: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        with (
            timeouts(args.timeout),
            _maybe_open(args.responses) as responses,
            _maybe_open(args.calls) as calls,
        ):
            if args.socket:
                result = asyncio.run(
                    replay(
                        args.trace,
                        args.socket,
                        responses=responses,
                        calls=calls,
                        verify=args.verify,
                        token=token,
                        progress=progress,
                        group_commit=args.group_commit,
                        compat=args.compat,
                        migrate_at=args.migrate_at,
                        guest_memory=args.guest_memory,
                    )
                )
            else:
                result = asyncio.run(
                    replay_embedded(
                        args.trace,
                        factory=factory,
                        responses=responses,
                        calls=calls,
                        verify=args.verify,
                        progress=progress,
                        group_commit=args.group_commit,
                        compat=args.compat,
                        migrate_at=args.migrate_at,
                        fresh_backend=args.backend,
                        guest_memory=args.guest_memory,
                    )
                )
    except OSError as exc:
        print(f"viommud: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if result.error:
        print(f"viommud: {result.error}", file=sys.stderr)
    if result.report is not None:
        if args.json:
            print(json.dumps(result.report, indent=None))
        else:
            print(render_table(result.report))
    return result.exit_code


def _health(args: argparse.Namespace) -> int:
    try:
        server = asyncio.run(health(args.socket, args.timeout, token=_client_token(args)))
    except (ClientError, EndpointError) as exc:
        print(f"viommud: unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {server}")
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        reply = asyncio.run(fetch_status(args.socket, args.timeout, token=_client_token(args)))
    except (ClientError, EndpointError) as exc:
        print(f"viommud: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=None))
    else:
        print(render_status(reply))
    return 0


def _import(args: argparse.Namespace) -> int:
    """``viommud import qemu-log LOG -o TRACE``: a QEMU trace log to a trace file."""
    from viommud.importers import (  # noqa: PLC0415 - only for import
        ImportLogError,
        ImportOptions,
        load_host_spec,
        parse_attach,
        qemu_log,
        write_trace,
    )
    from viommud.importers.qemu_events import read_lines  # noqa: PLC0415
    from viommud.importers.qemu_smmuv3 import find_dump  # noqa: PLC0415

    name = args.name or args.output.name.split(".")[0]
    try:
        options = ImportOptions(
            model=args.model,
            name=name,
            viommu=args.viommu,
            dw=args.dw,
            synthesize=args.synthesize,
            spec=load_host_spec(args.host) if args.host is not None else None,
            extra_attach=[parse_attach(a) for a in args.attach],
            ats=args.ats,
        )
        dump = args.cmdq_dump or find_dump(args.log)
        header, records = qemu_log.convert(read_lines(args.log), options, dump)
        write_trace(args.output, header, records)
    except (ImportLogError, OSError) as exc:
        print(f"viommud: import: {exc}", file=sys.stderr)
        return 2
    for note in header.get("notes", []):
        print(f"viommud: import: note: {note}", file=sys.stderr)
    cmds = sum(1 for r in records if r["op"] in ("cmds", "request"))
    unit = "requests" if any(r["op"] == "request" for r in records) else "doorbells"
    print(f"{args.output}: {len(records)} records, {cmds} {unit}", file=sys.stderr)
    return 0
