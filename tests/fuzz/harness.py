"""A seeded, structure-aware mutation fuzzer for what a client controls (issue 14).

Seeds come from the fixtures (docs/trace-format.md traces of the three models): their
headers' hosts (HELLO), their records (RECORD JSON), their doorbells and requests (guest
data), and whole frame streams built from them. An input is a seed with one to four
mutations: bytes flipped, set to edge values, inserted, deleted, duplicated, spliced from
another seed, truncated; JSON values replaced by edge values of other types, keys dropped
or added, then sometimes the encoded text mutated as bytes.

Targets, each counting inputs and *internal errors* (an exception that escapes where none
may, or an ERROR frame saying ``internal error``):

* ``frames``: ``wire.FrameDecoder`` on mutated frame streams cut into random chunks, and
  ``Frame.json`` / ``Frame.guest_data`` on what it yields (only ``WireError`` may escape);
* ``hello``: a new ``Connection`` per mutated HELLO (only frames may come out);
* ``session``: a ``Connection`` set up with a fixture's vIOMMUs, fed mutated RECORD, CMDS
  and REQUEST frames (the trace parser, the three frontends, dispatchers and backend);
* ``smmuv3``, ``vtd``, ``virtio``: the guest decoders (``viommud.guest``) on mutated
  commands, descriptors, STEs, context / PASID entries and requests (only ``ValueError``,
  their refusal, may escape).

Hypothesis draws far fewer inputs per second; this covers 10^6 inputs in minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import lzma
import random
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from protocols.frames import FrameType
from viommud import wire
from viommud.backend.select import emulated_backend
from viommud.guest import smmuv3 as g_smmuv3
from viommud.guest import virtio as g_virtio
from viommud.guest import vtd as g_vtd
from viommud.shell.connection import Connection

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
EDGE_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
EDGE_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1 << 31,
    1 << 63,
    1 << 64,
    -(1 << 63),
    10**40,
    1.5,
    float("1e308"),
    "",
    "x" * 300,
    "\ud800",
    "0x",
    "0xffffffffffffffffffff",
    "zz",
    "ab" * 40,
    [],
    [1, "a", None],
    {},
    {"a": {"b": [1]}},
)
REQUEST_TYPES = (
    FrameType.RECORD,
    FrameType.CMDS,
    FrameType.REQUEST,
    FrameType.STATS,
    FrameType.STATE_SAVE,
    FrameType.STATE_LOAD,
)
# a STATE_LOAD document to mutate (docs/state-format.md): the shape, not a valid checksum
STATE_TEMPLATE: dict[str, Any] = {
    "format": "viommud-state",
    "version": 1,
    "server": "viommud/0.1.0",
    "host": {"iommus": [], "devices": []},
    "compat": None,
    "viommus": {},
    "journal": [],
    "totals": {},
    "checksum": "sha256:" + "0" * 64,
}


@dataclass
class Result:
    target: str
    inputs: int = 0
    internal_errors: int = 0
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def failed(self, what: str) -> None:
        self.internal_errors += 1
        if len(self.samples) < 5:
            self.samples.append(what)


@dataclass
class Seeds:
    hosts: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    guest: dict[str, list[bytes]] = field(default_factory=dict)  # model -> doorbells/requests
    sessions: list[tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]] = field(
        default_factory=list
    )  # (host, config records, vIOMMU -> model)


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n > 4000:  # the big captures: their first records are seeds enough
                return
            if line.strip():
                yield json.loads(line)


def load_seeds() -> Seeds:
    seeds = Seeds()
    for path in sorted(FIXTURES.glob("*.jsonl*")):
        lines = _lines(path)
        header = next(lines)
        host = header["host"]
        seeds.hosts.append(host)
        config: list[dict[str, Any]] = []
        models: dict[str, str] = {}
        for record in lines:
            op = record.get("op")
            if op == "viommu_create":
                models[record["viommu"]] = record["model"]
            if op in ("cmds", "request"):
                model = models.get(record["viommu"], "smmuv3")
                bucket = seeds.guest.setdefault(model, [])
                if len(bucket) < 3000:
                    bucket.append(bytes.fromhex(record["data"]))
            elif op != "viommu_destroy" and len(config) < 200:
                config.append(record)
            if len(seeds.records) < 5000 or op not in ("cmds", "request"):
                seeds.records.append(record)
        seeds.sessions.append((host, config, models))
    return seeds


# -- mutations ------------------------------------------------------------------------------
def mutate_bytes(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        op = rng.randrange(8)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice(EDGE_BYTES)
        elif op == 2:
            at = rng.randrange(n + 1)
            buf[at:at] = rng.randbytes(rng.choice((1, 2, 4, 8, 16, 17)))
        elif op == 3 and n:
            at = rng.randrange(n)
            del buf[at : at + rng.choice((1, 2, 4, 8, 16, 64))]
        elif op == 4 and n:
            at = rng.randrange(n)
            piece = buf[at : at + rng.choice((4, 8, 16, 32))]
            buf[at:at] = piece * rng.choice((1, 2, 8))
        elif op == 5 and pool:
            other = rng.choice(pool)
            at = rng.randrange(n + 1)
            buf[at:] = other[rng.randrange(len(other) + 1) :]
        elif op == 6 and n:
            del buf[rng.randrange(n) :]
        elif n >= 8:  # an aligned word set to an edge value
            at = rng.randrange(n // 8) * 8
            buf[at : at + 8] = rng.choice((0, 1 << 63, (1 << 64) - 1, 1 << 32)).to_bytes(
                8, "little"
            )
    return bytes(buf)


def mutate_json(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """``value`` with one structural change somewhere inside."""
    if isinstance(value, dict) and value and depth < 4:
        value = dict(value)
        key = rng.choice(list(value))
        op = rng.randrange(6)
        if op == 0:
            del value[key]
        elif op == 1:
            value[rng.choice(("op", "viommu", "model", "extra", "token", ""))] = rng.choice(
                EDGE_VALUES
            )
        elif op == 2:
            value[key] = rng.choice(EDGE_VALUES)
        else:
            value[key] = mutate_json(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and depth < 4:
        value = list(value)
        at = rng.randrange(len(value))
        op = rng.randrange(4)
        if op == 0:
            del value[at]
        elif op == 1:
            value.append(rng.choice(value))
        else:
            value[at] = mutate_json(rng, value[at], depth + 1)
        return value
    if isinstance(value, str) and value and rng.random() < 0.5:
        text = list(value)
        text[rng.randrange(len(text))] = rng.choice("0fgx:-. \u00e9")
        return "".join(text)
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return value ^ (1 << rng.randrange(66))
    return rng.choice(EDGE_VALUES)


def json_payload(rng: random.Random, value: Any, pool: list[bytes]) -> bytes:
    text = json.dumps(mutate_json(rng, value)).encode("utf-8", "surrogatepass")
    if rng.random() < 0.25:
        text = mutate_bytes(rng, text, pool)
    return text


# -- targets --------------------------------------------------------------------------------
def _quiet_logger(debug: bool) -> Any:
    level = logging.DEBUG if debug else logging.INFO
    return structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    ).bind(client=1)


def _check_replies(out: bytes, result: Result, what: str) -> None:
    decoder = wire.FrameDecoder()
    decoder.receive_data(out)
    while (frame := decoder.next_frame()) is not None:
        if frame.type == FrameType.ERROR and b"internal error" in frame.payload:
            result.failed(f"{what}: {frame.payload[:300]!r}")


def fuzz_frames(rng: random.Random, n: int, seeds: Seeds) -> Result:
    result = Result("frames")
    streams = []
    for host in seeds.hosts:
        streams.append(wire.encode_json(FrameType.HELLO, 1, {"protocol": 1, "host": host}))
    for i, record in enumerate(seeds.records[:2000]):
        streams.append(wire.encode_json(FrameType.RECORD, i, record))
    for model, datas in seeds.guest.items():
        kind = FrameType.REQUEST if model == "virtio-iommu" else FrameType.CMDS
        streams += [wire.encode_guest_data(kind, 7, "v0", d) for d in datas[:500]]
    for _ in range(n):
        stream = b"".join(rng.choice(streams) for _ in range(rng.choice((1, 2, 3, 5))))
        data = mutate_bytes(rng, stream, streams)
        result.inputs += 1
        decoder = wire.FrameDecoder(max_payload=rng.choice((1 << 20, 1 << 16, 64)))
        try:
            at = 0
            while at < len(data):
                step = rng.choice((1, 7, 12, 100, len(data)))
                decoder.receive_data(data[at : at + step])
                at += step
                while (frame := decoder.next_frame()) is not None:
                    _frame_views(frame)
            decoder.receive_data(b"")  # EOF: a frame cut short is a WireError
            while (frame := decoder.next_frame()) is not None:
                _frame_views(frame)
        except wire.WireError:
            pass
        except Exception:  # what this fuzzer is looking for
            result.failed(f"frames {data[:64].hex()}: {traceback.format_exc(limit=3)}")
    return result


def _frame_views(frame: wire.Frame) -> None:
    for view in (lambda: frame.json(max_depth=wire.MAX_JSON_DEPTH), frame.guest_data):
        with contextlib.suppress(wire.WireError):
            view()


def fuzz_hello(rng: random.Random, n: int, seeds: Seeds) -> Result:
    result = Result("hello")
    pool = [json.dumps(h).encode() for h in seeds.hosts]
    options = ("compact", "calls", "group_commit", "verify", "compact_writes", "probe")
    for _ in range(n):
        hello: dict[str, Any] = {"protocol": 1, "host": rng.choice(seeds.hosts)}
        for key in rng.sample(options, rng.randrange(3)):
            hello[key] = True
        for key in ("vm", "trace", "client", "compat"):
            if rng.random() < 0.3:
                hello[key] = rng.choice(("vm-1", "qemu", "architecture", "t"))
        payload = json_payload(rng, hello, pool)
        result.inputs += 1
        connection = Connection(1, emulated_backend, None, _quiet_logger(False))
        try:
            out = connection.receive(wire.encode(FrameType.HELLO, 1, payload))
            out += connection.receive(wire.encode(FrameType.STATS, 2))
            _check_replies(out, result, f"hello {payload[:200]!r}")
            connection.close()
        except Exception:
            result.failed(f"hello {payload[:200]!r}: {traceback.format_exc(limit=3)}")
    return result


def _session(
    rng: random.Random, seeds: Seeds
) -> tuple[Connection, dict[str, str], list[dict[str, Any]]]:
    host, config, models = rng.choice([s for s in seeds.sessions if s[2]])
    connection = Connection(1, emulated_backend, None, _quiet_logger(rng.random() < 0.25))
    hello = {"protocol": 1, "host": host, "compact": rng.random() < 0.5}
    if rng.random() < 0.3:
        hello["group_commit"] = True
    if rng.random() < 0.2:
        hello["verify"] = True
    frames = [wire.encode_json(FrameType.HELLO, 1, hello)]
    frames += [wire.encode_json(FrameType.RECORD, 2, r) for r in config]
    connection.receive(b"".join(frames))
    return connection, models, config


def fuzz_session(rng: random.Random, n: int, seeds: Seeds) -> Result:
    result = Result("session")
    record_pool = [json.dumps(r).encode() for r in seeds.records[:500]]
    connection, models, config = _session(rng, seeds)
    used = 0
    for _ in range(n):
        if connection.closing or used >= 400:
            connection.close()
            connection, models, config = _session(rng, seeds)
            used = 0
        used += 1
        frames = []
        for _ in range(rng.choice((1, 1, 2, 4))):
            kind = rng.choice(REQUEST_TYPES)
            if kind == FrameType.RECORD:
                record = rng.choice(config or seeds.records)
                frames.append(wire.encode(kind, 3, json_payload(rng, record, record_pool)))
            elif kind in (FrameType.STATS, FrameType.STATE_SAVE):
                frames.append(wire.encode(kind, 3, b""))
            elif kind == FrameType.STATE_LOAD:
                frames.append(wire.encode(kind, 3, json_payload(rng, STATE_TEMPLATE, record_pool)))
            else:
                viommu = rng.choice(list(models))
                model = models[viommu]
                pool = seeds.guest.get(model) or [b"\0" * 16]
                data = mutate_bytes(rng, rng.choice(pool), pool)
                if model == "virtio-iommu" and rng.random() < 0.8:
                    kind = FrameType.REQUEST
                elif model != "virtio-iommu" and rng.random() < 0.8:
                    kind = FrameType.CMDS
                frames.append(wire.encode_guest_data(kind, 3, viommu, data))
        stream = b"".join(frames)
        result.inputs += 1
        try:
            _check_replies(connection.receive(stream), result, f"session {stream[:200].hex()}")
        except Exception:
            result.failed(f"session {stream[:200].hex()}: {traceback.format_exc(limit=4)}")
            connection, models, config = _session(rng, seeds)
    connection.close()
    return result


def _decoder_target(
    name: str, sizes: tuple[int, ...], decode: Callable[[random.Random, bytes], object]
) -> Callable[[random.Random, int, Seeds], Result]:
    def run(rng: random.Random, n: int, seeds: Seeds) -> Result:
        result = Result(name)
        model = {"smmuv3": "smmuv3", "vtd": "vtd", "virtio": "virtio-iommu"}[name]
        pool = [d[i : i + s] for d in seeds.guest.get(model, []) for s in sizes[:1] for i in (0,)]
        pool = [p for p in pool if p] or [bytes(sizes[0])]
        for _ in range(n):
            data = mutate_bytes(rng, rng.choice(pool), pool)
            if rng.random() < 0.3:  # a size the structure wants, random content
                data = rng.randbytes(rng.choice(sizes))
            result.inputs += 1
            try:
                decode(rng, data)
            except ValueError:
                pass
            except Exception:
                result.failed(f"{name} {data[:64].hex()}: {traceback.format_exc(limit=3)}")
        return result

    return run


def _smmuv3(rng: random.Random, data: bytes) -> object:
    words = g_smmuv3.split_words(data[: len(data) // 16 * 16] if rng.random() < 0.9 else data)
    for w0, w1 in words:
        g_smmuv3.decode_fields(w0, w1)
        g_smmuv3.kind_name(w0 & 0xFF)
    return g_smmuv3.decode_ste(data[:64]) if len(data) >= 64 else None


def _vtd(rng: random.Random, data: bytes) -> object:
    for at in range(0, len(data) - 15, 16):
        qw0 = int.from_bytes(data[at : at + 8], "little")
        qw1 = int.from_bytes(data[at + 8 : at + 16], "little")
        g_vtd.decode_fields(qw0, qw1)
        g_vtd.kind_name(g_vtd.descriptor_type(qw0))
    g_vtd.decode_context_entry(data[: rng.choice((16, 32, len(data)))])
    return g_vtd.decode_pasid_entry(data[: rng.choice((64, len(data)))])


def _virtio(rng: random.Random, data: bytes) -> object:
    decoded = g_virtio.decode(data, rng.choice("ABC"), vsva=rng.random() < 0.8)
    g_virtio.kind_name(data[0] if data else 0)
    if isinstance(decoded, g_virtio.Unknown | g_virtio.Malformed):
        return decoded  # refusals: as_fields (the parity tests' view) is for requests
    return g_virtio.as_fields(decoded)


TARGETS: dict[str, Callable[[random.Random, int, Seeds], Result]] = {
    "frames": fuzz_frames,
    "hello": fuzz_hello,
    "session": fuzz_session,
    "smmuv3": _decoder_target("smmuv3", (16, 64, 32, 48), _smmuv3),
    "vtd": _decoder_target("vtd", (16, 32, 64), _vtd),
    "virtio": _decoder_target("virtio", (24, 36, 40, 20, 8, 64), _virtio),
}


def run(target: str, n: int, seed: int, seeds: Seeds) -> Result:
    started = time.perf_counter()
    result = TARGETS[target](random.Random(f"{target}:{seed}"), n, seeds)
    result.seconds = time.perf_counter() - started
    return result
