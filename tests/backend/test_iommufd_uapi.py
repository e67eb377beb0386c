"""``protocols.iommufd``: each fast ``FORMAT`` agrees with its construct declaration.

The dataclasses and ``struct`` formats are what the backend runs; the construct ``*_LAYOUT``
declarations are the readable specification. Both are written independently, so these tests
build and parse random values through both and compare bytes and fields. Fields the
declaration treats as ``Padding`` (reserved bytes the kernel never reads) are ignored when
parsing and built as zero.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import iommufd as uapi

_INT_RANGES = {
    "B": (0, 0xFF),
    "H": (0, 0xFFFF),
    "I": (0, 0xFFFF_FFFF),
    "i": (-(1 << 31), (1 << 31) - 1),
    "Q": (0, (1 << 64) - 1),
}


def _codes(fmt: struct.Struct) -> list[str]:
    """One code per field: ``'3s'`` stays one code, ``'I'`` one per field."""
    out: list[str] = []
    count = ""
    for ch in fmt.format.lstrip("<"):
        if ch.isdigit():
            count += ch
        elif ch == "s":
            out.append(f"{count}s")
            count = ""
        else:
            out.extend([ch] * int(count or "1"))
            count = ""
    return out


def _value(code: str) -> st.SearchStrategy[Any]:
    if code.endswith("s"):
        n = int(code[:-1])
        return st.binary(min_size=n, max_size=n)
    lo, hi = _INT_RANGES[code]
    return st.integers(lo, hi)


def _instances(cls: type[uapi.UapiStruct]) -> st.SearchStrategy[uapi.UapiStruct]:
    names = uapi.field_names(cls)
    codes = _codes(cls.FORMAT)
    assert len(names) == len(codes), cls
    values = {
        name: st.just(0) if name in cls.PADDING else _value(code)
        for name, code in zip(names, codes, strict=True)
    }
    return st.builds(cls, **values)


@pytest.mark.parametrize("cls", uapi.STRUCTS, ids=lambda c: c.__name__)
def test_sizes_agree(cls: type[uapi.UapiStruct]) -> None:
    assert cls.FORMAT.size == cls.LAYOUT.sizeof()
    assert cls.FORMAT.size >= cls.MIN_SIZE
    assert set(uapi.field_names(cls)) >= cls.PADDING
    declared = {sub.name for sub in cls.LAYOUT.subcon.subcons if sub.name}
    assert declared == set(uapi.field_names(cls)) - cls.PADDING


@pytest.mark.parametrize("cls", uapi.STRUCTS, ids=lambda c: c.__name__)
def test_defaults(cls: type[uapi.UapiStruct]) -> None:
    obj = cls()
    for size_field in ("size", "argsz"):
        if size_field in uapi.field_names(cls):
            assert getattr(obj, size_field) == cls.FORMAT.size
    assert uapi.decode(cls, uapi.encode(obj)) == obj


@pytest.mark.parametrize("cls", uapi.STRUCTS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_build_agrees(cls: type[uapi.UapiStruct], data: st.DataObject) -> None:
    obj = data.draw(_instances(cls))
    fields = {n: getattr(obj, n) for n in uapi.field_names(cls) if n not in cls.PADDING}
    assert bytes(uapi.encode(obj)) == cls.LAYOUT.build(fields)


@pytest.mark.parametrize("cls", uapi.STRUCTS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_parse_agrees(cls: type[uapi.UapiStruct], data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=cls.FORMAT.size, max_size=cls.FORMAT.size))
    fast = uapi.decode(cls, raw)
    parsed = cls.LAYOUT.parse(raw)
    for name in uapi.field_names(cls):
        if name not in cls.PADDING:
            assert getattr(fast, name) == parsed[name], name
    assert bytes(uapi.encode(fast)) == raw


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=60))
def test_decode_zero_fills_short_and_ignores_long(raw: bytes) -> None:
    obj = uapi.decode(uapi.HwptAlloc, raw)
    padded = (raw + bytes(48))[:48]
    assert bytes(uapi.encode(obj)) == padded


def test_names_and_numbers() -> None:
    assert uapi.IOCTL_NAMES[0x3B8D] == "IOMMU_HWPT_INVALIDATE"
    assert uapi.IOCTL_NAMES[uapi.VFIO_DEVICE_BIND_IOMMUFD] == "VFIO_DEVICE_BIND_IOMMUFD"
    assert all(req >> 8 == uapi.IOMMUFD_TYPE for req in uapi.IOCTL_NAMES)
    assert len(set(uapi.IOCTL_NAMES.values())) == len(uapi.IOCTL_NAMES)
    assert uapi.INVALIDATE_DATA_NAMES == {0: "HWPT_VTD_S1", 1: "VIOMMU_ARM_SMMUV3"}
    assert uapi.HwptAlloc(flags=1, dev_id=2, pt_id=3) == uapi.HwptAlloc(
        48, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0
    )
