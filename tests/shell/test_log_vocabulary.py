"""Every event the daemon logs, with every key, is documented in docs/operations.md.

The code is read with ``ast``: each call ``<logger>.<level>("event", key=...)`` on a receiver
whose name mentions ``log`` is an emission. An event name must be a string literal or an
entry of a module-level dict of literals (``_CONFIG_EVENTS[...]``); ``**helper(...)`` keys are
read from the dict literals ``helper`` returns. ``.bind(key=...)`` calls give the context
keys. The documentation's tables sit between ``<!-- events:begin/end -->`` and
``<!-- context:begin/end -->`` markers.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "viommud"
DOC = ROOT / "docs" / "operations.md"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class Emission:
    event: str
    level: str
    keys: set[str]
    where: str


@dataclass
class Vocabulary:
    emissions: list[Emission] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)  # key -> where
    unresolved: list[str] = field(default_factory=list)

    def events(self) -> dict[str, tuple[set[str], set[str]]]:
        """event -> (levels, keys)."""
        out: dict[str, tuple[set[str], set[str]]] = {}
        for e in self.emissions:
            levels, keys = out.setdefault(e.event, (set(), set()))
            levels.add(e.level)
            keys.update(e.keys)
        return out


def _is_logger(node: ast.expr) -> bool:
    return "log" in ast.unparse(node).lower()


def _module_dicts(tree: ast.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Dict):
            out[target.id] = [
                v.value
                for v in value.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            ]
    return out


def _returned_keys(tree: ast.Module) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            keys: set[str] = set()
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and isinstance(inner.value, ast.Dict):
                    keys.update(
                        k.value
                        for k in inner.value.keys
                        if isinstance(k, ast.Constant) and isinstance(k.value, str)
                    )
            out[node.name] = keys
    return out


def collect(package: Path = PACKAGE) -> Vocabulary:
    vocabulary = Vocabulary()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        dicts = _module_dicts(tree)
        helpers = _returned_keys(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            where = f"{path.relative_to(package.parent)}:{node.lineno}"
            method, receiver = node.func.attr, node.func.value
            if method == "bind" and _is_logger(receiver):
                for kw in node.keywords:
                    if kw.arg is not None:
                        vocabulary.context.setdefault(kw.arg, where)
                continue
            if method not in LEVELS or not node.args or not _is_logger(receiver):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names = [first.value]
            elif (
                isinstance(first, ast.Subscript)
                and isinstance(first.value, ast.Name)
                and first.value.id in dicts
            ):
                names = dicts[first.value.id]
            else:
                vocabulary.unresolved.append(f"{where}: {ast.unparse(first)}")
                continue
            keys = {kw.arg for kw in node.keywords if kw.arg is not None}
            for kw in node.keywords:
                if kw.arg is None:
                    call = kw.value
                    if (
                        isinstance(call, ast.Call)
                        and isinstance(call.func, ast.Name)
                        and call.func.id in helpers
                    ):
                        keys |= helpers[call.func.id]
                    else:
                        vocabulary.unresolved.append(f"{where}: **{ast.unparse(call)}")
            vocabulary.emissions.extend(Emission(n, method, keys, where) for n in names)
    return vocabulary


def _table(text: str, name: str) -> list[list[str]]:
    match = re.search(rf"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"docs/operations.md has no <!-- {name}:begin/end --> table"
    rows = []
    for raw in match.group(1).splitlines():
        line = raw.strip()
        if not line.startswith("|") or set(line) <= {"|", "-", " ", ":"}:
            continue
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header row


def _ticked(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def documented() -> tuple[dict[str, tuple[str, set[str]]], set[str]]:
    text = DOC.read_text(encoding="utf-8")
    events = {}
    for row in _table(text, "events"):
        for name in _ticked(row[0]):  # one row may document several events with one shape
            events[name] = (row[1], _ticked(row[2]))
    context = set()
    for row in _table(text, "context"):
        context |= _ticked(row[0])
    return events, context


VOCABULARY = collect()


def test_event_names_can_be_read_from_the_code() -> None:
    assert not VOCABULARY.unresolved, (
        "log calls whose event (or ** keys) is not a literal: " + "; ".join(VOCABULARY.unresolved)
    )
    assert len(VOCABULARY.emissions) > 20


def test_event_names_are_snake_case() -> None:
    bad = [f"{e.where}: {e.event}" for e in VOCABULARY.emissions if not EVENT_NAME.match(e.event)]
    assert not bad


def test_every_event_is_documented_with_its_level_and_keys() -> None:
    docs, _context = documented()
    problems = []
    for event, (levels, keys) in sorted(VOCABULARY.events().items()):
        if event not in docs:
            problems.append(f"{event}: not in docs/operations.md")
            continue
        level_cell, doc_keys = docs[event]
        problems += [f"{event}: level {lv} not documented" for lv in levels if lv not in level_cell]
        problems += [f"{event}: key `{k}` not documented" for k in sorted(keys - doc_keys)]
    assert not problems, "\n".join(problems)


def test_every_documented_event_is_emitted() -> None:
    docs, _context = documented()
    stale = sorted(set(docs) - set(VOCABULARY.events()))
    assert not stale, f"documented but never logged: {stale}"


def test_every_context_key_is_documented() -> None:
    _docs, context = documented()
    missing = sorted(set(VOCABULARY.context) - context)
    assert not missing, f"bound context keys not documented: {missing}"


def test_the_collector_sees_what_it_should(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text(
        "_EVENTS = {int: 'a_happened', str: 'b_happened'}\n"
        "def _keys(x):\n    return {'k1': x, 'k2': x}\n"
        "def f(log, x, parser):\n"
        "    log = log.bind(vm=x)\n"
        "    log.info('c_happened', k=1)\n"
        "    log.warning(_EVENTS[type(x)], **_keys(x))\n"
        "    parser.error(f'{x}')\n"
        "    log.debug(x)\n"
    )
    vocabulary = collect(package)
    assert vocabulary.events() == {
        "a_happened": ({"warning"}, {"k1", "k2"}),
        "b_happened": ({"warning"}, {"k1", "k2"}),
        "c_happened": ({"info"}, {"k"}),
    }
    assert set(vocabulary.context) == {"vm"}
    assert vocabulary.unresolved == ["pkg/m.py:9: x"]
