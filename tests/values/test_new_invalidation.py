"""``events.new_invalidation`` (the decode loops' constructor) builds the very value that
``Invalidation(...)`` builds: equal, same hash and repr, and still frozen."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viommud.events import Cache, Invalidation, Scope, new_invalidation

OPT = st.none() | st.integers(0, (1 << 32) - 1)
U64 = st.integers(0, (1 << 64) - 1)


@given(
    st.integers(0, 1 << 20),
    st.sampled_from(list(Cache)),
    st.sampled_from(list(Scope)),
    OPT,
    OPT,
    U64,
    U64,
    st.integers(0, 1 << 16),
    st.booleans(),
    st.binary(max_size=32),
)
def test_same_value_as_the_dataclass(  # noqa: PLR0917 - one per field
    index: int,
    caches: Cache,
    scope: Scope,
    device: int | None,
    asid: int | None,
    addr: int,
    size: int,
    granule: int,
    leaf: bool,
    raw: bytes,
) -> None:
    fast = new_invalidation(index, caches, scope, device, asid, addr, size, granule, leaf, raw)
    slow = Invalidation(index, caches, scope, device, asid, addr, size, granule, leaf, raw)
    assert type(fast) is Invalidation
    assert fast == slow
    assert hash(fast) == hash(slow)
    assert repr(fast) == repr(slow)
    assert dataclasses.astuple(fast) == dataclasses.astuple(slow)


def test_still_frozen() -> None:
    inv = new_invalidation(0, Cache.TLB, Scope.ALL, None, None, 0, 0, 0, False, b"")
    with pytest.raises(dataclasses.FrozenInstanceError):
        inv.addr = 1  # type: ignore[misc]
