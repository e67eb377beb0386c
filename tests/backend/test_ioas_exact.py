"""IOMMU_IOAS_MAP / IOAS_UNMAP fast paths (issue 17) against the general ones.

* The emulated kernel: an argument of exactly the struct's size takes
  ``IoasIoctls._ioas_map_exact`` / ``_ioas_unmap_exact`` (fields unpacked straight from the
  argument) instead of ``copy_cmd_from_user``, the decoded struct and ``Call``. Two emulators
  built identically, one with those paths switched off (``kernel.IOAS_MAP_SIZE`` /
  ``IOAS_UNMAP_SIZE``), get the same raw arguments (bad sizes and tails, unknown IDs,
  overlaps, overflows, reserved IOVAs, unpinnable pages, partial unmaps): errno, the
  argument as written back, the areas, objects, host flushes and cache journal must match.
* The typed calls: ``Iommufd.ioas_map`` / ``ioas_unmap`` with a log nobody reads pack the
  struct themselves; against the same calls through ``_simple`` (a log that keeps its
  entries) the bytes handed to the backend, the results, errors and the counts must match.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import iommufd as uapi
from tests.backend.test_emulated import HOST, MAP_RW, U64_MAX, Rig
from viommud.backend import calls as calls_mod
from viommud.backend.calls import BackendCallError, CallLog, Iommufd
from viommud.backend.emulator import kernel, testing, usercopy

PAGE = 4096
FIXED = uapi.IOMMU_IOAS_MAP_FIXED_IOVA
BASE = 1 << 32
MSI = 0x0800_0000  # inside the ARM SMMUv3 software MSI window (a reserved range)
UNMAPPED_VA = 0x7000_0000_0000  # no user memory there: pinning fails
MAP_FMT = uapi.IoasMap.FORMAT
UNMAP_FMT = uapi.IoasUnmap.FORMAT


@dataclass(frozen=True)
class Scene:
    rig: Rig
    ioas: int
    other: int  # a second IOAS
    dev: int  # a device object (not an IOAS)
    va: int  # 16 pages of user memory


def build(domain: str) -> Scene:
    """An IOAS (with the device of ``domain`` attached, or none) holding a few areas."""
    rig = Rig(HOST)
    ioas = rig.ioas()
    other = rig.ioas()
    dev = rig.bind("a0" if domain != "vtd" else "v0")
    if domain != "none":
        assert rig.attach("a0" if domain == "arm" else "v0", ioas)[0] == 0
    va = rig.be.memory.alloc(16 * PAGE)
    for page, pages in ((0, 1), (2, 2), (8, 1)):
        arg = bytearray(
            MAP_FMT.pack(40, MAP_RW | FIXED, ioas, 0, va, pages * PAGE, BASE + page * PAGE)
        )
        assert rig.raw(uapi.IOMMU_IOAS_MAP, arg) == 0
    return Scene(rig, ioas, other, dev, va)


def mostly(draw: st.DrawFn, valid: Any, *others: Any) -> Any:
    return draw(st.sampled_from([valid] * (3 * len(others)) + list(others)))


@st.composite
def raw_arg(draw: st.DrawFn) -> tuple[int, str, tuple[int, ...], int, bytes]:
    """(request, which IOAS, the fields after ``ioas_id``, ``size``, the argument's
    tail past the struct, or a negative count of bytes cut)."""
    which = mostly(draw, "ioas", "other", "dev", "unknown")
    page = draw(st.integers(0, 12))
    pages = draw(st.integers(1, 4))
    if draw(st.booleans()):
        iova = mostly(
            draw,
            BASE + page * PAGE,
            BASE + page * PAGE + 0x800,
            0,
            U64_MAX,
            U64_MAX - PAGE + 1,
            MSI,
        )
        length = mostly(draw, pages * PAGE, 0, 0x800, U64_MAX, U64_MAX - 1, 1 << 63)
        flags = mostly(draw, MAP_RW | FIXED, MAP_RW, FIXED, 0, MAP_RW | FIXED | 8, 1)
        user_va = mostly(draw, "va", UNMAPPED_VA, U64_MAX - PAGE + 1, "va+0x800", "va+page", 0)
        reserved = mostly(draw, 0, 1)
        size = mostly(draw, 40, 32, 48, 39, 4, 0, 1 << 16 | 40)
        fields: tuple[Any, ...] = (flags, reserved, user_va, length, iova)
        request = uapi.IOMMU_IOAS_MAP
    else:
        iova = mostly(draw, BASE + page * PAGE, 0, BASE + page * PAGE + 1, U64_MAX, BASE - PAGE)
        length = mostly(draw, pages * PAGE, 0, U64_MAX, U64_MAX - 1, 1, 16 * PAGE)
        size = mostly(draw, 24, 16, 32, 23, 4, 1 << 8 | 24)
        fields = (iova, length)
        request = uapi.IOMMU_IOAS_UNMAP
    tail = mostly(draw, b"", bytes(8), b"\x01" + bytes(7), b"-1")
    return request, which, fields, size, tail


def _pack(scene: Scene, call: tuple[int, str, tuple[Any, ...], int, bytes]) -> bytearray:
    request, which, fields, size, tail = call
    ioas_id = {"ioas": scene.ioas, "other": scene.other, "dev": scene.dev, "unknown": 999}[which]
    if request == uapi.IOMMU_IOAS_MAP:
        flags, reserved, user_va, length, iova = fields
        if isinstance(user_va, str):
            user_va = scene.va + {"va": 0, "va+0x800": 0x800, "va+page": 5 * PAGE}[user_va]
        arg = bytearray(MAP_FMT.pack(size, flags, ioas_id, reserved, user_va, length, iova))
    else:
        arg = bytearray(UNMAP_FMT.pack(size, ioas_id, *fields))
    if tail == b"-1":
        del arg[-1:]
    else:
        arg += tail
    return arg


def observe(scene: Scene) -> dict[str, Any]:
    be = scene.rig.be
    return {
        "areas": {
            obj_id: [repr(a) for a in be._objects[obj_id].areas]  # type: ignore[attr-defined]
            for obj_id in (scene.ioas, scene.other)
        },
        "objects": be.live_objects(),
        "issued": {unit: testing.issued(be, unit) for unit in ("smmu0", "smmu1")},
        "vtd": [repr(f) for f in testing.vtd_flushes(be)],
        "journal": [repr(e) for e in be.cache_model.journal],
    }


def replay(domain: str, raw: list[Any], *, exact: bool) -> list[Any]:
    scene = build(domain)
    out: list[Any] = []
    with pytest.MonkeyPatch.context() as patch:
        if not exact:  # every argument: the general path
            patch.setattr(kernel, "IOAS_MAP_SIZE", -1)
            patch.setattr(kernel, "IOAS_UNMAP_SIZE", -1)
        for call in raw:
            arg = _pack(scene, call)
            rc = scene.rig.raw(call[0], arg)
            out.append((rc, bytes(arg), observe(scene)))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    domain=st.sampled_from(["arm", "vtd", "none"]),
    raw=st.lists(raw_arg(), min_size=1, max_size=6),
)
def test_exact_paths_match_the_general_dispatch(domain: str, raw: list[Any]) -> None:
    assert replay(domain, raw, exact=True) == replay(domain, raw, exact=False)


CASES = {
    "map": (uapi.IOMMU_IOAS_MAP, "ioas", (MAP_RW | FIXED, 0, "va", PAGE, BASE + 4 * PAGE), 40, b""),
    "map-auto-iova": (uapi.IOMMU_IOAS_MAP, "ioas", (MAP_RW, 0, "va", PAGE, 0), 40, b""),
    "map-eexist": (uapi.IOMMU_IOAS_MAP, "ioas", (MAP_RW | FIXED, 0, "va", PAGE, BASE), 40, b""),
    "map-enoent": (uapi.IOMMU_IOAS_MAP, "unknown", (MAP_RW | FIXED, 0, "va", PAGE, BASE), 40, b""),
    "map-wrong-kind": (uapi.IOMMU_IOAS_MAP, "dev", (MAP_RW | FIXED, 0, "va", PAGE, BASE), 40, b""),
    "map-overflow": (
        uapi.IOMMU_IOAS_MAP,
        "ioas",
        (MAP_RW | FIXED, 0, "va", 2 * PAGE, U64_MAX - PAGE + 1),
        40,
        b"",
    ),
    "map-unpinnable": (
        uapi.IOMMU_IOAS_MAP,
        "ioas",
        (MAP_RW | FIXED, 0, UNMAPPED_VA, PAGE, BASE + 4 * PAGE),
        40,
        b"",
    ),
    "map-reserved-field": (
        uapi.IOMMU_IOAS_MAP,
        "ioas",
        (MAP_RW | FIXED, 1, "va", PAGE, BASE + 4 * PAGE),
        40,
        b"",
    ),
    "unmap": (uapi.IOMMU_IOAS_UNMAP, "ioas", (BASE, PAGE), 24, b""),
    "unmap-all": (uapi.IOMMU_IOAS_UNMAP, "ioas", (0, U64_MAX), 24, b""),
    "unmap-partial": (uapi.IOMMU_IOAS_UNMAP, "ioas", (BASE, 3 * PAGE), 24, b""),
    "unmap-straddle": (uapi.IOMMU_IOAS_UNMAP, "ioas", (BASE + 3 * PAGE, PAGE), 24, b""),
    "unmap-enoent": (uapi.IOMMU_IOAS_UNMAP, "ioas", (BASE + 5 * PAGE, PAGE), 24, b""),
    "unmap-unknown-id": (uapi.IOMMU_IOAS_UNMAP, "unknown", (BASE, PAGE), 24, b""),
    "unmap-zero": (uapi.IOMMU_IOAS_UNMAP, "ioas", (BASE, 0), 24, b""),
    "unmap-overflow": (uapi.IOMMU_IOAS_UNMAP, "ioas", (U64_MAX - PAGE + 1, 2 * PAGE), 24, b""),
}


@pytest.mark.parametrize("domain", ["arm", "vtd", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_paths_case_by_case(domain: str, case: str) -> None:
    """The named cases, each one alone and after the others (state carried over)."""
    call = CASES[case]
    assert replay(domain, [call], exact=True) == replay(domain, [call], exact=False)
    rest = [*CASES.values(), call]
    assert replay(domain, rest, exact=True) == replay(domain, rest, exact=False)


def test_cases_cover_the_errnos() -> None:
    """The named cases reach success and every errno they are named for."""
    rcs = {name: replay("arm", [call], exact=True)[0][0] for name, call in CASES.items()}
    assert rcs["map"] == rcs["unmap"] == rcs["unmap-all"] == rcs["map-auto-iova"] == 0
    assert rcs["map-eexist"] == errno.EEXIST
    assert rcs["map-enoent"] == rcs["map-wrong-kind"] == rcs["unmap-unknown-id"] == errno.ENOENT
    assert rcs["map-overflow"] == rcs["unmap-overflow"] == errno.EOVERFLOW
    assert rcs["map-reserved-field"] == errno.EOPNOTSUPP
    assert rcs["unmap-enoent"] == rcs["unmap-straddle"] == errno.ENOENT
    assert rcs["unmap-zero"] == errno.EINVAL
    assert rcs["map-unpinnable"] != 0
    # partial progress: the first area goes, the straddled one stays, ENOENT
    assert rcs["unmap-partial"] == errno.ENOENT


@pytest.mark.parametrize("request_", [uapi.IOMMU_IOAS_MAP, uapi.IOMMU_IOAS_UNMAP])
def test_exact_paths_are_taken(request_: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The arguments ``Iommufd.ioas_map`` / ``ioas_unmap`` pass skip ``copy_cmd_from_user``;
    one byte more takes the general path."""
    scene = build("arm")
    taken: list[object] = []
    general = usercopy.copy_cmd_from_user

    def spy(*args: Any) -> Any:
        taken.append(args[1])
        return general(*args)

    monkeypatch.setattr(kernel, "copy_cmd_from_user", spy)
    call = CASES["map"] if request_ == uapi.IOMMU_IOAS_MAP else CASES["unmap"]
    assert scene.rig.raw(request_, _pack(scene, call)) == 0
    assert taken == []
    longer = (*call[:4], bytes(8))
    scene.rig.raw(request_, _pack(scene, longer))
    assert len(taken) == 1


# -- the typed calls ----------------------------------------------------------------------
class Recorder:
    """A backend that records each ioctl's argument before and after the call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[tuple[int, int, bytes, bytes, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        before = bytes(arg)
        rc = int(self.inner.ioctl(fd, request, arg))
        self.seen.append((fd, request, before, bytes(arg), rc))
        return rc


def typed(domain: str, ops: list[tuple[Any, ...]], *, keep: bool) -> list[Any]:
    scene = build(domain)
    backend = Recorder(scene.rig.be)
    errors: list[tuple[str, str, str | None]] = []
    log = CallLog(keep=keep, on_error=lambda *e: errors.append(e))
    fd = Iommufd(backend, log)
    out: list[Any] = []
    for op in ops:
        try:
            if op[0] == "map":
                _, iova, length, va, fixed, readable = op
                user_va = scene.va + va if va >= 0 else UNMAPPED_VA
                got = fd.ioas_map(
                    "smmu0",
                    scene.ioas,
                    iova,
                    length,
                    user_va=user_va,
                    fixed_iova=fixed,
                    readable=readable,
                )
            else:
                _, iova, length = op
                got = fd.ioas_unmap("smmu1", scene.ioas, iova, length)
            out.append(("ok", got))
        except BackendCallError as exc:
            out.append(("err", exc.ioctl, exc.errno, exc.call_args, str(exc)))
    return [out, backend.seen, log.seq, log.calls, log.errnos, errors, observe(scene)]


typed_op = st.one_of(
    st.tuples(
        st.just("map"),
        st.sampled_from(
            [BASE, BASE + PAGE, BASE + 8 * PAGE, BASE + 0x800, U64_MAX - PAGE + 1, MSI]
        ),
        st.sampled_from([PAGE, 2 * PAGE, 0, 0x800]),
        st.sampled_from([0, PAGE, 0x800, -1]),
        st.booleans(),
        st.booleans(),
    ),
    st.tuples(
        st.just("unmap"),
        st.sampled_from([BASE, BASE + PAGE, BASE + 3 * PAGE, 0, U64_MAX]),
        st.sampled_from([PAGE, 2 * PAGE, 0, U64_MAX]),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(domain=st.sampled_from(["arm", "vtd", "none"]), ops=st.lists(typed_op, max_size=8))
def test_typed_calls_match_the_detailed_path(domain: str, ops: list[Any]) -> None:
    fast = typed(domain, ops, keep=False)
    slow = typed(domain, ops, keep=True)
    assert fast == slow


def test_typed_fast_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a log nobody reads, ``ioas_map`` / ``ioas_unmap`` build no struct object."""

    def fail(*args: object) -> object:
        raise AssertionError("the detailed path was taken")

    monkeypatch.setattr(Iommufd, "_simple", fail)
    out = typed(
        "arm", [("map", BASE + 4 * PAGE, PAGE, 0, True, True), ("unmap", BASE, PAGE)], keep=False
    )
    assert out[0] == [("ok", BASE + 4 * PAGE), ("ok", PAGE)]
    assert calls_mod._NO_PAYLOAD == {}
