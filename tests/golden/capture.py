"""Stored outputs of every bundled fixture, through the daemon's sans-I/O connection.

Each fixture is framed as the replay client frames it and fed to one ``Connection`` (bytes
in, bytes out; no socket, so the grouping of frames is fixed, not timing-dependent). Three
modes per fixture:

- ``doorbell``: HELLO with the call log and the oracle, one frame fed at a time;
- ``group``: the same with ``group_commit``, frames fed 32 at a time (runs of waiting doorbells);
- ``compact``: the replay client's binary replies (CMDS_OK / CMDS_OK_WRITES), no call log.

Every reply frame is kept (type, seq, body), then the STATS report and the teardown totals.
``python -m tests.golden.capture`` rewrites the stored files; the test compares against them.
"""

from __future__ import annotations

import json
import lzma
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocols.frames import PROTOCOL_VERSION, FrameType
from viommud import wire
from viommud.backend.base import Backend
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.host import HostConfig
from viommud.shell.connection import Connection
from viommud.trace import Cmds, Request, TraceReader, record_to_json

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
OUTPUTS = Path(__file__).resolve().parent / "outputs"
MODES = {
    "doorbell": ({"calls": True, "verify": True}, 1),
    "group": ({"calls": True, "verify": True, "group_commit": True}, 32),
    "compact": ({"compact": True, "compact_writes": True}, 1),
}


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.iterdir() if ".jsonl" in p.name)


class _QuietLog:
    """A logger that drops everything (the outputs, not the log lines, are stored)."""

    def bind(self, **_kw: Any) -> _QuietLog:
        return self

    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_kw: None


def _frames(trace: Path, hello: dict[str, Any]) -> Iterator[bytes]:
    reader = TraceReader(trace)
    header = reader.header
    body = {
        "protocol": PROTOCOL_VERSION,
        "client": "golden",
        "host": header.host.to_json(),
        "trace": header.name,
        **hello,
    }
    yield wire.encode_json(FrameType.HELLO, 1, body)
    seq = 1
    for record in reader:
        seq += 1
        if isinstance(record, Cmds):
            yield wire.encode_guest_data(FrameType.CMDS, seq, record.viommu, record.data)
        elif isinstance(record, Request):
            yield wire.encode_guest_data(FrameType.REQUEST, seq, record.viommu, record.data)
        else:
            yield wire.encode_json(FrameType.RECORD, seq, record_to_json(record))
    yield wire.encode_json(FrameType.STATS, seq + 1, {})


def _backend(host: HostConfig) -> Backend:
    return EmulatedIommufd(host)


def _body(frame: wire.Frame) -> Any:
    try:
        return frame.response()
    except wire.WireError:
        return {"hex": frame.payload.hex()}


def run(trace: Path, mode: str) -> list[Any]:
    """Every reply of ``trace`` in ``mode``, then the teardown totals, as JSON values."""
    hello, chunk = MODES[mode]
    connection = Connection(1, _backend, None, _QuietLog())
    decoder = wire.FrameDecoder()
    out: list[Any] = []
    pending: list[bytes] = []

    def feed() -> None:
        decoder.receive_data(connection.receive(b"".join(pending)))
        pending.clear()
        while (frame := decoder.next_frame()) is not None:
            body = _body(frame)
            if frame.type == FrameType.HELLO_OK and isinstance(body, dict):
                body.pop("server", None)  # carries the package version
            out.append([int(frame.type), frame.seq, body])

    for frame in _frames(trace, hello):
        pending.append(frame)
        if len(pending) >= chunk:
            feed()
    if pending:
        feed()
    out.append(["teardown", connection.close()])
    return out


def stored_path(trace: Path, mode: str) -> Path:
    return OUTPUTS / f"{trace.name.split('.jsonl')[0]}.{mode}.jsonl.xz"


def encode(outputs: list[Any]) -> bytes:
    return "".join(json.dumps(o, sort_keys=True) + "\n" for o in outputs).encode()


def load(path: Path) -> list[Any]:
    return [json.loads(line) for line in lzma.decompress(path.read_bytes()).splitlines()]


def main() -> int:
    OUTPUTS.mkdir(exist_ok=True)
    for trace in fixtures():
        for mode in MODES:
            path = stored_path(trace, mode)
            path.write_bytes(lzma.compress(encode(run(trace, mode)), preset=9))
            print(f"{path.relative_to(OUTPUTS.parent)}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
