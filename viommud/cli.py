"""Command line: ``viommud serve``, ``viommud replay``, ``viommud health``.

``main(argv)`` returns the exit status, so tests call it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from viommud import __version__, logs
from viommud.client import ClientError, health
from viommud.host import HostConfig, HostConfigError
from viommud.replay import EXIT_REFUSED, render_table, replay, replay_embedded
from viommud.server import Server
from viommud.trace import TraceError, TraceReader

DEFAULT_SOCKET = os.environ.get("VIOMMUD_SOCKET", "/run/viommud/viommud.sock")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viommud", description="VMM-side virtual-IOMMU emulator daemon"
    )
    parser.add_argument("--version", action="version", version=f"viommud {__version__}")
    parser.add_argument(
        "--log-level",
        choices=sorted(logs.LEVELS),
        help="default: info for serve, warning otherwise ($VIOMMUD_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console", "auto"),
        help="default: console on a TTY, json elsewhere ($VIOMMUD_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon on a Unix socket")
    serve.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    serve.add_argument("--socket-mode", default="0600", help="permissions of the socket (octal)")
    serve.add_argument(
        "--host",
        type=Path,
        help="fixed host (JSON: a trace header's host "
        "object, or a trace whose header to use); clients must fit in it",
    )
    serve.add_argument(
        "--grace", type=float, default=5.0, help="seconds running clients get at shutdown"
    )

    rep = sub.add_parser("replay", help="replay a trace and print the replay report")
    rep.add_argument("trace", type=Path)
    rep.add_argument("--socket", help="replay through this daemon (default: an embedded one)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument("--responses", type=Path, help="write guest-visible responses here")
    rep.add_argument("--calls", type=Path, help="write the backend call log here")

    hc = sub.add_parser("health", help="exit 0 if the daemon answers HELLO")
    hc.add_argument("--socket", default=DEFAULT_SOCKET)
    hc.add_argument("--timeout", type=float, default=2.0)
    return parser


def main(argv: list[str] | None = None) -> int:
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
        mode = int(args.socket_mode, 8)
    except ValueError:
        print(f"viommud: bad --socket-mode {args.socket_mode!r}", file=sys.stderr)
        return 2
    server = Server(args.socket, fixed_host=fixed_host, mode=mode, grace=args.grace)
    try:
        asyncio.run(server.run())
    except OSError as exc:
        print(f"viommud: cannot serve on {args.socket}: {exc}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _maybe_open(path: Path | None) -> Iterator[IO[str] | None]:
    if path is None:
        yield None
        return
    with path.open("w", encoding="utf-8") as handle:
        yield handle


def _replay(args: argparse.Namespace) -> int:
    try:
        with _maybe_open(args.responses) as responses, _maybe_open(args.calls) as calls:
            if args.socket:
                result = asyncio.run(
                    replay(args.trace, args.socket, responses=responses, calls=calls)
                )
            else:
                result = asyncio.run(replay_embedded(args.trace, responses=responses, calls=calls))
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
        server = asyncio.run(health(args.socket, args.timeout))
    except ClientError as exc:
        print(f"viommud: unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {server}")
    return 0
