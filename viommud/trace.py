"""Trace files (docs/trace-format.md §2): JSON Lines, optionally .gz or .xz compressed.

Line 1 is the header, every other non-blank line one record. Anything malformed raises
``TraceError`` naming the line number; the reader stops there, so nothing after a bad line is
replayed. Records become frozen dataclasses: hex strings are decoded here, once.
"""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from protocols.models import ViommuModel
from viommud.host import HostConfig, HostConfigError

_VIOMMU_MODELS = tuple(ViommuModel)  # what a viommu_create record may name


class TraceError(ValueError):
    """A trace file that cannot be replayed; ``line`` is 1-based (the header is line 1)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class TraceHeader:
    name: str
    host: HostConfig
    version: int = 1


@dataclass(frozen=True, slots=True)
class ViommuCreate:
    line: int
    viommu: str
    model: str
    iommus: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class DeviceAttach:
    line: int
    viommu: str
    vid: int
    device: str


@dataclass(frozen=True, slots=True)
class DeviceDetach:
    line: int
    viommu: str
    vid: int


@dataclass(frozen=True, slots=True)
class Ste:
    line: int
    viommu: str
    vsid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ContextEntry:
    line: int
    viommu: str
    sid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PasidEntry:
    line: int
    viommu: str
    sid: int
    pasid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Cmds:
    line: int
    viommu: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Request:
    line: int
    viommu: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ViommuDestroy:
    line: int
    viommu: str


Record = (
    ViommuCreate
    | DeviceAttach
    | DeviceDetach
    | Ste
    | ContextEntry
    | PasidEntry
    | Cmds
    | Request
    | ViommuDestroy
)
CONFIG_RECORDS = (
    ViommuCreate,
    DeviceAttach,
    DeviceDetach,
    Ste,
    ContextEntry,
    PasidEntry,
    ViommuDestroy,
)


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


class _Fields:
    """Typed access to one JSON object's keys, raising TraceError with the line number."""

    __slots__ = ("line", "obj")

    def __init__(self, line: int, obj: dict[str, Any]) -> None:
        self.line = line
        self.obj = obj

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise TraceError(self.line, f"missing required key {key!r}")
        return self.obj[key]

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value:
            raise TraceError(self.line, f"{key!r} must be a non-empty string")
        return value

    def integer(self, key: str, bits: int = 32) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
            raise TraceError(self.line, f"{key!r} must be an integer in [0, 2^{bits})")
        return value

    def hexbytes(self, key: str, sizes: tuple[int, ...] | None = None, multiple: int = 1) -> bytes:
        value = self._get(key)
        if not isinstance(value, str):
            raise TraceError(self.line, f"{key!r} must be a hex string")
        try:
            data = bytes.fromhex(value)
        except ValueError:
            raise TraceError(self.line, f"{key!r} is not a valid hex string") from None
        if sizes is not None and len(data) not in sizes:
            want = " or ".join(str(s) for s in sizes)
            raise TraceError(self.line, f"{key!r} must be {want} bytes, got {len(data)}")
        if len(data) % multiple:
            raise TraceError(
                self.line, f"{key!r} must be a multiple of {multiple} bytes, got {len(data)}"
            )
        return data


def parse_record(line: int, obj: Any) -> Record:
    """Convert one decoded JSON line into a record; raises TraceError."""
    if not isinstance(obj, dict):
        raise TraceError(line, "a record must be a JSON object")
    f = _Fields(line, obj)
    op = obj.get("op")
    if op == "cmds":
        return Cmds(line, f.text("viommu"), f.hexbytes("data"))
    if op == "request":
        return Request(line, f.text("viommu"), f.hexbytes("data"))
    if op == "viommu_create":
        model = f.text("model")
        if model not in _VIOMMU_MODELS:
            raise TraceError(line, f"'model' must be one of {', '.join(_VIOMMU_MODELS)}")
        iommus = obj.get("iommus")
        if not isinstance(iommus, list) or not all(isinstance(x, str) for x in iommus):
            raise TraceError(line, "'iommus' must be a list of host iommu ids")
        options = obj.get("options", {})
        if not isinstance(options, dict):
            raise TraceError(line, "'options' must be an object")
        return ViommuCreate(line, f.text("viommu"), model, tuple(iommus), options)
    if op == "device_attach":
        return DeviceAttach(line, f.text("viommu"), f.integer("vid"), f.text("device"))
    if op == "device_detach":
        return DeviceDetach(line, f.text("viommu"), f.integer("vid"))
    if op == "ste":
        return Ste(line, f.text("viommu"), f.integer("vsid"), f.hexbytes("data", (64,)))
    if op == "context_entry":
        return ContextEntry(
            line, f.text("viommu"), f.integer("sid", 16), f.hexbytes("data", (16, 32))
        )
    if op == "pasid_entry":
        return PasidEntry(
            line,
            f.text("viommu"),
            f.integer("sid", 16),
            f.integer("pasid", 20),
            f.hexbytes("data", (64,)),
        )
    if op == "viommu_destroy":
        return ViommuDestroy(line, f.text("viommu"))
    if op is None:
        raise TraceError(line, "missing required key 'op'")
    raise TraceError(line, f"unknown op {op!r}")


def parse_header(obj: Any) -> TraceHeader:
    if not isinstance(obj, dict):
        raise TraceError(1, "the header must be a JSON object")
    if obj.get("format") != "viommud-trace":
        raise TraceError(1, "header 'format' must be 'viommud-trace'")
    if obj.get("version") != 1:
        raise TraceError(1, f"unsupported trace version {obj.get('version')!r} (this is 1)")
    name = obj.get("name", "")
    if not isinstance(name, str):
        raise TraceError(1, "header 'name' must be a string")
    try:
        host = HostConfig.from_json(obj.get("host"))
    except HostConfigError as exc:
        raise TraceError(1, str(exc)) from None
    return TraceHeader(name=name, host=host)


class TraceReader:
    """Reads a trace lazily: ``header`` is parsed at open, records as iterated."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = _open_text(self.path)
            first = self._file.readline()
        except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
            raise TraceError(1, f"cannot read {self.path}: {exc}") from None
        if not first.strip():
            self._file.close()
            raise TraceError(1, "empty trace: the first line must be the header")
        try:
            self.header = parse_header(json.loads(first))
        except json.JSONDecodeError as exc:
            self._file.close()
            raise TraceError(1, f"invalid JSON: {exc.msg}") from None
        except TraceError:
            self._file.close()
            raise

    def __iter__(self) -> Iterator[Record]:
        line = 1
        try:
            while True:
                try:
                    text = self._file.readline()
                except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
                    raise TraceError(line + 1, f"cannot read: {exc}") from None
                if not text:
                    return
                line += 1
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise TraceError(line, f"invalid JSON: {exc.msg}") from None
                yield parse_record(line, obj)
        finally:
            self._file.close()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def record_to_json(record: Record) -> dict[str, Any]:
    """The JSON form of a record (as in a trace file), without the line number."""
    if isinstance(record, Cmds):
        return {"op": "cmds", "viommu": record.viommu, "data": record.data.hex()}
    if isinstance(record, Request):
        return {"op": "request", "viommu": record.viommu, "data": record.data.hex()}
    if isinstance(record, ViommuCreate):
        return {
            "op": "viommu_create",
            "viommu": record.viommu,
            "model": record.model,
            "iommus": list(record.iommus),
            "options": record.options,
        }
    if isinstance(record, DeviceAttach):
        return {
            "op": "device_attach",
            "viommu": record.viommu,
            "vid": record.vid,
            "device": record.device,
        }
    if isinstance(record, DeviceDetach):
        return {"op": "device_detach", "viommu": record.viommu, "vid": record.vid}
    if isinstance(record, Ste):
        return {
            "op": "ste",
            "viommu": record.viommu,
            "vsid": record.vsid,
            "data": record.data.hex(),
        }
    if isinstance(record, ContextEntry):
        return {
            "op": "context_entry",
            "viommu": record.viommu,
            "sid": record.sid,
            "data": record.data.hex(),
        }
    if isinstance(record, PasidEntry):
        return {
            "op": "pasid_entry",
            "viommu": record.viommu,
            "sid": record.sid,
            "pasid": record.pasid,
            "data": record.data.hex(),
        }
    return {"op": "viommu_destroy", "viommu": record.viommu}


def render_trace(header: dict[str, Any], records: Iterable[dict[str, Any]]) -> str:
    """A trace file's text (docs/trace-format.md §2): the header line, then one compact JSON record
    a line."""
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [json.dumps(r, separators=(",", ":")) for r in records]
    return "\n".join(lines) + "\n"


def store_trace(path: Path, text: str, *, check: bool = False) -> bool:
    """Write ``text`` to ``path`` (compressed by extension, as the reader expects), or with
    ``check`` only compare. Returns whether the file holds ``text`` afterwards."""
    if check:
        if not path.exists():
            return False
        raw = path.read_bytes()
        if path.suffix == ".xz":
            raw = lzma.decompress(raw)
        elif path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8") == text
    data = text.encode("utf-8")
    if path.suffix == ".xz":
        data = lzma.compress(data, preset=9)
    elif path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return True
