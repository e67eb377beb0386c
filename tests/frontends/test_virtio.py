"""The virtio-iommu frontend on its own (sans-I/O): statuses the trace format cannot carry
(writable sizes, config space, resets), rollback on host failure, policies, the vSVA drafts'
normalisation into the intermediate form, and fault records."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.virtio_iommu import (
    FaultFlag,
    FaultReason,
    RequestType,
    ResvMemSubtype,
    Status,
    build_request,
    parse_config,
    parse_fault,
    parse_properties,
)
from tests.replies import as_json
from viommud.events import Barrier, Cache, Invalidation, Scope
from viommud.frontends.virtio.frontend import VirtioIommuFrontend
from viommud.frontends.virtio.options import (
    AttachSameDomain,
    DevicePolicy,
    EndpointInfo,
    ResvRegion,
    VirtioFeatures,
)
from viommud.frontends.virtio.request import Reply, RequestPendingError
from viommud.virtio_state import (
    DomainCreated,
    DomainDestroyed,
    DomainKind,
    EndpointAttached,
    EndpointDetached,
    Mapped,
    TableAttached,
    TableInvalidation,
    Unmapped,
)

A, D, M, U, P = (
    RequestType.ATTACH,
    RequestType.DETACH,
    RequestType.MAP,
    RequestType.UNMAP,
    RequestType.PROBE,
)
MSI = ResvRegion(0xFEE00000, 0xFEEFFFFF, ResvMemSubtype.MSI)
HOST_ARM = EndpointInfo((MSI,), frozenset({"arm-smmuv3"}))
HOST_VTD = EndpointInfo((MSI,), frozenset({"intel-vtd"}))


def device(**kw: Any) -> VirtioIommuFrontend:
    frontend = VirtioIommuFrontend(**kw)
    frontend.add_endpoint(0, EndpointInfo((MSI,), host=False))
    frontend.add_endpoint(8, EndpointInfo((MSI,), host=False))
    return frontend


def send(
    frontend: VirtioIommuFrontend, request_type: int, *, draft: str = "B", **fields: Any
) -> tuple[Reply, list[Any]]:
    frontend.receive_request(build_request(request_type, draft, **fields))
    events = frontend.events()
    return frontend.complete(), events


def status(
    frontend: VirtioIommuFrontend, request_type: int, *, draft: str = "B", **fields: Any
) -> str:
    return send(frontend, request_type, draft=draft, **fields)[0].code


# -- QEMU qtest "config" and D15 -----------------------------------------------------------------


def test_qtest_config() -> None:
    """tests/qtest/virtio-iommu-test.c "config": offsets 8, 16, 24, 28, 36."""
    config = parse_config(device().config_space())
    assert config["input_range_start"] == 0
    assert config["input_range_end"] >= 0xFFFFFFFF
    assert config["domain_range_start"] == 0
    assert config["domain_range_end"] == 0xFFFFFFFF
    assert config["bypass"] == 1
    assert config["page_size_mask"] & 0xFFF == 0
    assert config["page_size_mask"]
    assert config["probe_size"] == 512


def test_d15_bypass_survives_device_reset_not_system_reset() -> None:
    frontend = device()
    assert frontend.bypass_active
    moved = frontend.write_config(36, b"\x00")
    assert parse_config(frontend.config_space())["bypass"] == 0
    assert moved == [EndpointDetached(0, None, False), EndpointDetached(8, None, False)]
    send(frontend, A, domain=1, endpoint=0)
    events = frontend.reset()
    assert events == [EndpointDetached(0, 1, False), DomainDestroyed(1)]
    assert parse_config(frontend.config_space())["bypass"] == 0
    assert not frontend.domains
    assert not frontend.attached
    frontend.system_reset()
    assert parse_config(frontend.config_space())["bypass"] == 1


@pytest.mark.parametrize(
    ("offset", "data", "match"),
    [(36, b"\x02", "0 or 1"), (0, b"\x00", "read-only"), (36, b"\x00\x00", "read-only")],
)
def test_config_writes_refused(offset: int, data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        device().write_config(offset, data)
    with pytest.raises(ValueError, match="F_BYPASS_CONFIG"):
        device(features=VirtioFeatures(bypass_config=False)).write_config(36, b"\x00")


def test_legacy_bypass_and_no_bypass_config() -> None:
    frontend = device(
        features=VirtioFeatures(bypass_config=False, legacy_bypass=True), boot_bypass=0
    )
    assert frontend.bypass_active
    assert parse_config(frontend.config_space())["bypass"] == 0
    assert status(frontend, A, domain=1, endpoint=0, flags=1) == "INVAL"  # no BYPASS flag


# -- D12, D13, D14: what the device writes ---------------------------------------------------------


def test_d12_probe_with_short_properties_area() -> None:
    frontend = device()
    frontend.receive_request(build_request(P, endpoint=0), writable=512 - 8 + 4)
    assert frontend.events() == [Barrier(0)]
    reply = frontend.complete()
    assert reply.status is Status.INVAL
    assert reply.used == 508
    assert reply.data == bytes(504) + b"\x04\x00\x00\x00"


def test_writable_part_without_room_for_a_tail() -> None:
    frontend = device()
    frontend.receive_request(build_request(A, domain=1, endpoint=0), writable=3)
    frontend.events()
    reply = frontend.complete()
    assert (reply.status, reply.data, reply.code) == (None, b"", "IOERR")
    assert not frontend.domains


def test_d13_unknown_type_writes_nothing() -> None:
    frontend = device()
    frontend.receive_request(bytes([0x42, 0, 0, 0]))
    assert frontend.events() == [Barrier(0)]
    reply = frontend.complete()
    assert reply.used == 0
    assert reply.status is None
    assert frontend.kind_counts() == {"virtio:type_0x42": 1}
    assert frontend.error_counts == {"IOERR": 1}


def test_d14_probe_without_f_probe() -> None:
    frontend = device(features=VirtioFeatures(probe=False))
    reply, _ = send(frontend, P, endpoint=0)
    assert reply.used == 0
    assert parse_config(frontend.config_space())["probe_size"] == 0


def test_probe_reply_layout() -> None:
    frontend = VirtioIommuFrontend(probe_size=64)
    regions = (ResvRegion(0x8000000, 0x80FFFFF), MSI)
    frontend.add_endpoint(5, EndpointInfo(regions, host=False))
    reply, _ = send(frontend, P, endpoint=5)
    assert reply.status is Status.OK
    assert reply.used == 68
    props = parse_properties(reply.data[:64])
    assert [(p["subtype"], p["start"], p["end"]) for p in props] == [
        (0, 0x8000000, 0x80FFFFF),
        (1, 0xFEE00000, 0xFEEFFFFF),
    ]
    assert reply.data[48:64] == bytes(16)  # the rest of the area is zero (a NONE header)
    assert reply.data[64:] == bytes(4)


def test_probe_properties_that_do_not_fit() -> None:
    frontend = VirtioIommuFrontend(probe_size=40)
    frontend.add_endpoint(5, EndpointInfo((ResvRegion(0, 0xFFF), MSI), host=False))
    reply, _ = send(frontend, P, endpoint=5)
    assert reply.status is Status.DEVERR
    assert reply.data == bytes(40) + b"\x03\x00\x00\x00"


def test_one_request_at_a_time() -> None:
    frontend = device()
    frontend.receive_request(build_request(A, domain=1, endpoint=0))
    with pytest.raises(RequestPendingError):
        frontend.receive_request(build_request(A, domain=1, endpoint=0))
    frontend.complete()
    with pytest.raises(RuntimeError, match="no request"):
        frontend.complete()


# -- events and rollback -----------------------------------------------------------------------


def test_attach_move_events_are_host_safe_ordered() -> None:
    frontend = device()
    _, events = send(frontend, A, domain=1, endpoint=0)
    assert events == [DomainCreated(1, DomainKind.MAPPING), EndpointAttached(0, 1), Barrier(0)]
    _, events = send(frontend, A, domain=2, endpoint=0)
    assert events == [
        DomainCreated(2, DomainKind.MAPPING),
        EndpointAttached(0, 2, previous=1),
        DomainDestroyed(1),
        Barrier(0),
    ]


def test_host_failure_undoes_an_attach_move() -> None:
    frontend = device()
    send(frontend, A, domain=1, endpoint=0)
    send(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0x1000, flags=1)
    frontend.receive_request(build_request(A, domain=2, endpoint=0))
    frontend.events()
    reply = frontend.complete(Status.DEVERR, "host refused")
    assert (reply.status, reply.reason) == (Status.DEVERR, "host refused")
    assert frontend.attached == {0: 1}
    assert set(frontend.domains) == {1}
    assert len(frontend.domains[1].mappings) == 1


def test_host_failure_undoes_map_and_unmap() -> None:
    frontend = device()
    send(frontend, A, domain=1, endpoint=0)
    frontend.receive_request(
        build_request(M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=1)
    )
    assert isinstance(frontend.events()[0], Mapped)
    assert frontend.complete(Status.FAULT).status is Status.FAULT
    assert not frontend.domains[1].mappings
    send(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=1)
    send(frontend, M, domain=1, virt_start=0x1000, virt_end=0x1FFF, phys_start=0, flags=1)
    frontend.receive_request(build_request(U, domain=1, virt_start=0, virt_end=0xFFFF))
    [unmapped, _] = frontend.events()
    assert isinstance(unmapped, Unmapped)
    assert len(unmapped.mappings) == 2
    frontend.complete(Status.DEVERR)
    assert len(frontend.domains[1].mappings) == 2


def test_refused_request_leaves_no_trace() -> None:
    frontend = device(domain_range=(1, 5))
    reply, events = send(frontend, A, domain=9, endpoint=0)
    assert reply.status is Status.RANGE
    assert events == [Barrier(0)]
    assert not frontend.domains
    assert not frontend.attached


def test_endpoint_removal_detaches_first() -> None:
    frontend = device()
    send(frontend, A, domain=1, endpoint=0)
    assert frontend.remove_endpoint(0) == [EndpointDetached(0, 1, False), DomainDestroyed(1)]
    assert status(frontend, D, domain=1, endpoint=0) == "NOENT"
    with pytest.raises(ValueError, match="does not exist"):
        frontend.remove_endpoint(0)
    with pytest.raises(ValueError, match="already exists"):
        frontend.add_endpoint(8, EndpointInfo())


# -- policies (where implementations disagree) --------------------------------------------------


def test_attach_same_domain_keep_is_a_no_op() -> None:
    frontend = device()
    send(frontend, A, domain=1, endpoint=0)
    send(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=1)
    reply, events = send(frontend, A, domain=1, endpoint=0)
    assert reply.status is Status.OK
    assert events == [Barrier(0)]
    assert len(frontend.domains[1].mappings) == 1


def test_attach_same_domain_reattach_like_qemu() -> None:
    frontend = device(policy=DevicePolicy(attach_same_domain=AttachSameDomain.REATTACH))
    send(frontend, A, domain=2, endpoint=0, flags=1)
    # D5's same-endpoint variant: QEMU detaches first, the domain vanishes, reply OK
    reply, events = send(frontend, A, domain=2, endpoint=0)
    assert reply.status is Status.OK
    assert events == [
        EndpointDetached(0, 2, False),
        DomainDestroyed(2),
        DomainCreated(2, DomainKind.MAPPING),
        EndpointAttached(0, 2),
        Barrier(0),
    ]
    assert frontend.domains[2].kind is DomainKind.MAPPING


def test_unmap_reserved_policy() -> None:
    fields: dict[str, Any] = {
        "domain": 1,
        "virt_start": 0,
        "virt_end": 0xFFF,
        "reserved": 0xDEADBEEF,
    }
    frontend = device()
    send(frontend, A, domain=1, endpoint=0)
    assert status(frontend, U, **fields) == "OK"
    strict = device(policy=DevicePolicy(unmap_reserved_inval=True))
    send(strict, A, domain=1, endpoint=0)
    assert status(strict, U, **fields) == "INVAL"


def test_domain_range_check_can_be_turned_off() -> None:
    frontend = device(domain_range=(1, 5), policy=DevicePolicy(check_domain_range=False))
    assert status(frontend, A, domain=9, endpoint=0) == "OK"


def test_resource_caps() -> None:
    frontend = device(policy=DevicePolicy(max_mappings=1, max_domains=1))
    send(frontend, A, domain=1, endpoint=0)
    assert status(frontend, A, domain=2, endpoint=8) == "NOMEM"
    assert (
        status(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=1) == "OK"
    )
    assert (
        status(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=1)
        == "INVAL"
    )
    assert (
        status(frontend, M, domain=1, virt_start=0x1000, virt_end=0x1FFF, phys_start=0, flags=1)
        == "NOMEM"
    )


def test_mmio_flag_needs_f_mmio() -> None:
    frontend = device(features=VirtioFeatures(mmio=False))
    send(frontend, A, domain=1, endpoint=0)
    assert (
        status(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=5)
        == "INVAL"
    )


def test_map_overflow_and_reserved_region_compatibility() -> None:
    frontend = device(page_size_mask=(1 << 64) - 1)
    send(frontend, A, domain=1, endpoint=0)
    top = (1 << 64) - 1
    assert (
        status(frontend, M, domain=1, virt_start=0, virt_end=0xFF, phys_start=top - 0x10, flags=1)
        == "RANGE"
    )
    assert status(frontend, M, domain=1, virt_start=7, virt_end=7, phys_start=7, flags=1) == "OK"
    frontend.add_endpoint(9, EndpointInfo((ResvRegion(0, 0xFFF),), host=False))
    assert status(frontend, A, domain=1, endpoint=9) == "UNSUPP"  # its region holds a mapping


# -- vSVA: ATTACH_TABLE -------------------------------------------------------------------------

PST: dict[str, Any] = {
    "format": 2,
    "s1fmt": 0,
    "s1dss": 2,
    "s1contextptr": 0x40001000,
    "s1cdmax": 4,
}
VTD: dict[str, Any] = {"format": 4, "pgtbl_addr": 0x50000000, "addr_width": 48}


def vsva(draft: str = "B") -> VirtioIommuFrontend:
    frontend = VirtioIommuFrontend(features=VirtioFeatures(vsva=True, vsva_draft=draft))
    frontend.add_endpoint(0x300, HOST_ARM)
    frontend.add_endpoint(0x301, HOST_ARM)
    frontend.add_endpoint(0x200, HOST_VTD)
    return frontend


def test_attach_table_builds_the_vste() -> None:
    frontend = vsva()
    reply, events = send(frontend, RequestType.ATTACH_TABLE, domain=1, endpoint=0x300, **PST)
    assert reply.status is Status.OK
    created = events[0]
    assert isinstance(created, DomainCreated)
    assert created.kind is DomainKind.TABLE
    assert created.table is not None
    assert created.table.ste0 == 0x1 | 0b101 << 1 | 0x40001000 | 4 << 59
    assert created.table.ste1 == 0xD6


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        ({**PST, "reserved": b"\x01" + bytes(47)}, "INVAL"),
        ({**PST, "s1fmt": 3}, "INVAL"),
        ({**PST, "s1dss": 3}, "INVAL"),
        ({**PST, "s1cdmax": 21}, "INVAL"),
        ({**PST, "s1contextptr": 0x40001010}, "INVAL"),
        ({"format": 9}, "INVAL"),
        ({"format": 1, "asid": 3, "ttbr0": 0x1000}, "UNSUPP"),
        ({"format": 3}, "INVAL"),
        ({**VTD, "addr_width": 40}, "INVAL"),
        ({**VTD, "pgtbl_addr": 0x50000800}, "INVAL"),
        (VTD, "UNSUPP"),  # an Arm endpoint cannot walk a VT-d table
    ],
)
def test_attach_table_field_checks(fields: dict[str, Any], expect: str) -> None:
    frontend = vsva()
    assert status(frontend, RequestType.ATTACH_TABLE, domain=1, endpoint=0x300, **fields) == expect
    assert not frontend.domains


def test_attach_table_domain_rules() -> None:
    frontend = vsva()
    send(frontend, A, domain=1, endpoint=0x300)
    send(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=1)
    assert status(frontend, RequestType.ATTACH_TABLE, domain=1, endpoint=0x300, **PST) == "INVAL"
    send(frontend, U, domain=1, virt_start=0, virt_end=0xFFF)
    # draft A's flow: ATTACH, then ATTACH_TABLE on the same (empty) domain
    reply, events = send(frontend, RequestType.ATTACH_TABLE, domain=1, endpoint=0x300, **PST)
    assert reply.status is Status.OK
    assert isinstance(events[0], TableAttached)
    assert frontend.domains[1].kind is DomainKind.TABLE
    other: dict[str, Any] = {**PST, "s1contextptr": 0x40002000}
    assert status(frontend, RequestType.ATTACH_TABLE, domain=1, endpoint=0x301, **other) == "INVAL"
    assert status(frontend, RequestType.ATTACH_TABLE, domain=1, endpoint=0x301, **PST) == "OK"
    assert status(frontend, A, domain=1, endpoint=0x200) == "UNSUPP"  # VT-d cannot join it
    assert (
        status(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=1)
        == "INVAL"
    )
    assert status(frontend, A, domain=1, endpoint=0x301, flags=1) == "INVAL"


def test_draft_c_takes_raw_ste_words() -> None:
    frontend = vsva("C")
    ste0 = 0x1 | 0b101 << 1 | 0x40001000
    reply, events = send(
        frontend,
        RequestType.ATTACH_TABLE,
        draft="C",
        domain=1,
        endpoint=0x300,
        format=1,
        ste0=ste0,
        ste1=0x100000D6,
    )
    assert reply.status is Status.OK
    table = events[0].table
    assert (table.ste0, table.ste1, table.raw_ste) == (ste0, 0x100000D6, True)
    bad = status(
        frontend,
        RequestType.ATTACH_TABLE,
        draft="C",
        domain=2,
        endpoint=0x301,
        format=1,
        ste0=0x9,
        ste1=0,
    )
    assert bad == "INVAL"  # a bypass STE is not a guest table


# -- vSVA: INVALIDATE in the intermediate form --------------------------------------------------

VA = 0x7F0000400000


def invalidations(
    draft: str, table: dict[str, Any], endpoint: int, **fields: Any
) -> list[Invalidation] | str:
    frontend = vsva(draft)
    send(frontend, RequestType.ATTACH_TABLE, draft=draft, domain=1, endpoint=endpoint, **table)
    reply, events = send(frontend, RequestType.INVALIDATE, draft=draft, domain=1, **fields)
    if reply.status is not Status.OK:
        return reply.code
    out = []
    for event in events[:-1]:
        assert isinstance(event, TableInvalidation)
        assert event.domain == 1
        out.append(event.invalidation)
    return out


def _inv(caches: Cache, scope: Scope, asid: int | None = None, **kw: Any) -> tuple[Any, ...]:
    return (
        caches,
        scope,
        asid,
        kw.get("addr", 0),
        kw.get("size", 0),
        kw.get("granule", 0),
        kw.get("leaf", False),
    )


def _key(inv: Invalidation) -> tuple[Any, ...]:
    return (inv.caches, inv.scope, inv.asid, inv.addr, inv.size, inv.granule, inv.leaf)


@pytest.mark.parametrize(
    ("draft", "fields", "expect"),
    [
        (
            "B",
            {"inv_gran": 2, "inv_type": 4, "flags": 1, "pasid": 3},
            [_inv(Cache.CONFIG, Scope.ASID, 3)],
        ),
        (
            "B",
            {"inv_gran": 2, "inv_type": 3, "flags": 3, "pasid": 3, "archid": 5},
            [_inv(Cache.TLB, Scope.ASID, 5), _inv(Cache.DEVICE_TLB, Scope.ASID, 3)],
        ),
        (
            "B",
            {
                "inv_gran": 4,
                "inv_type": 1,
                "flags": 6,
                "archid": 5,
                "virt_start": VA,
                "nr_pages": 4,
                "granule": 12,
            },
            [_inv(Cache.TLB, Scope.RANGE, 5, addr=VA, size=0x4000, granule=0x1000, leaf=True)],
        ),
        ("B", {"inv_gran": 2, "inv_type": 1, "flags": 1, "pasid": 3}, [_inv(Cache.TLB, Scope.ALL)]),
        (
            "B",
            {"inv_gran": 1, "inv_type": 7},
            [
                _inv(Cache.TLB, Scope.ALL),
                _inv(Cache.DEVICE_TLB, Scope.ALL),
                _inv(Cache.CONFIG, Scope.ALL),
            ],
        ),
        ("B", {"inv_gran": 3, "inv_type": 1}, "INVAL"),
        ("B", {"inv_gran": 1, "inv_type": 8}, "INVAL"),
        ("B", {"inv_gran": 1, "inv_type": 0}, "INVAL"),
        ("B", {"inv_gran": 1, "inv_type": 1, "reserved2": 1}, "INVAL"),
        ("B", {"inv_gran": 2, "inv_type": 1}, "INVAL"),
        (
            "B",
            {"inv_gran": 4, "inv_type": 1, "virt_start": VA, "nr_pages": 0, "granule": 12},
            "INVAL",
        ),
        (
            "B",
            {"inv_gran": 4, "inv_type": 1, "virt_start": VA + 1, "nr_pages": 1, "granule": 12},
            "INVAL",
        ),
        (
            "B",
            {
                "inv_gran": 4,
                "inv_type": 1,
                "virt_start": (1 << 64) - 0x1000,
                "nr_pages": 2,
                "granule": 12,
            },
            "RANGE",
        ),
        ("B", {"inv_gran": 2, "inv_type": 4, "flags": 1, "pasid": 1 << 20}, "RANGE"),
        ("A", {"scope": 2, "flags": 1, "pasid": 3}, [_inv(Cache.CONFIG, Scope.ASID, 3)]),
        (
            "A",
            {"scope": 2, "pasid": 3, "id": 5},
            [_inv(Cache.TLB, Scope.ASID, 5), _inv(Cache.DEVICE_TLB, Scope.ASID, 3)],
        ),
        ("A", {"scope": 6}, "INVAL"),
        ("A", {"scope": 1, "flags": 4}, "INVAL"),
        (
            "C",
            {
                "scope": 3,
                "caches": 2,
                "flags": 1 | 2 | 4,
                "pasid": 3,
                "id": 0x10005,
                "address": VA,
                "nr_pages": 1,
                "page_size": 21,
            },
            [
                _inv(
                    Cache.TLB, Scope.RANGE, 5, addr=VA, size=0x200000, granule=0x200000, leaf=True
                ),
                _inv(
                    Cache.DEVICE_TLB,
                    Scope.RANGE,
                    3,
                    addr=VA,
                    size=0x200000,
                    granule=0x200000,
                    leaf=True,
                ),
            ],
        ),
        (
            "C",
            {
                "scope": 3,
                "caches": 2,
                "flags": 4 | 8,
                "id": 5,
                "address": VA,
                "nr_pages": 1,
                "page_size": 12,
            },
            [
                _inv(Cache.TLB, Scope.RANGE, None, addr=VA, size=0x1000, granule=0x1000),
                _inv(Cache.DEVICE_TLB, Scope.ALL),
            ],
        ),
        ("C", {"scope": 4, "caches": 2}, "INVAL"),
        ("C", {"scope": 1, "caches": 4}, "INVAL"),
    ],
)
def test_invalidate_arm_table(draft: str, fields: dict[str, Any], expect: list[Any] | str) -> None:
    table = (
        PST if draft != "C" else {"format": 1, "ste0": 0x1 | 0b101 << 1 | 0x40001000, "ste1": 0xD6}
    )
    got = invalidations(draft, table, 0x300, **fields)
    if isinstance(expect, str):
        assert got == expect
    else:
        assert not isinstance(got, str)
        assert [_key(i) for i in got] == expect


def test_invalidate_vtd_table_flushes_tlb_and_device_tlb_together() -> None:
    got = invalidations(
        "B", VTD, 0x200, inv_gran=4, inv_type=1, flags=4, virt_start=VA, nr_pages=2, granule=12
    )
    assert not isinstance(got, str)
    assert [_key(i) for i in got] == [
        _inv(
            Cache.TLB | Cache.DEVICE_TLB,
            Scope.RANGE,
            None,
            addr=VA,
            size=0x2000,
            granule=0x1000,
            leaf=True,
        )
    ]
    assert invalidations("B", VTD, 0x200, inv_gran=1, inv_type=4) == []  # config lives in the HWPT


def test_invalidate_domain_rules() -> None:
    frontend = vsva()
    assert status(frontend, RequestType.INVALIDATE, domain=1, inv_gran=1, inv_type=1) == "NOENT"
    send(frontend, A, domain=1, endpoint=0x300)
    assert status(frontend, RequestType.INVALIDATE, domain=1, inv_gran=1, inv_type=1) == "INVAL"


# -- faults (§4) ---------------------------------------------------------------------------------


def test_fault_records_follow_qemus_emitter() -> None:
    frontend = device(boot_bypass=0)
    assert frontend.access(7, 0x1000, write=False) == (FaultReason.UNKNOWN, FaultFlag.ADDRESS)
    assert frontend.access(0, 0x1000, write=False) == (FaultReason.DOMAIN, FaultFlag.ADDRESS)
    assert frontend.access(0, 0xFEE00004, write=True) == 0xFEE00004  # MSI passes
    send(frontend, A, domain=1, endpoint=0)
    send(frontend, M, domain=1, virt_start=0x1000, virt_end=0x1FFF, phys_start=0xA000, flags=1)
    assert frontend.access(0, 0x1234, write=False) == 0xA234
    assert frontend.access(0, 0x1234, write=True) == (
        FaultReason.MAPPING,
        FaultFlag.ADDRESS | FaultFlag.WRITE,
    )
    assert frontend.access(0, 0x3000, write=False) == (
        FaultReason.MAPPING,
        FaultFlag.ADDRESS | FaultFlag.READ,
    )
    record = parse_fault(frontend.fault_record(0, 0x1234, write=True))
    assert record == {"reason": 2, "flags": 0x102, "endpoint": 0, "pasid": 0, "address": 0x1234}
    record = parse_fault(frontend.fault_record(8, 0x5000, read=True))
    assert (record["reason"], record["flags"]) == (FaultReason.DOMAIN, FaultFlag.ADDRESS)
    record = parse_fault(frontend.fault_record(0, None, translation=False))
    assert record == {"reason": 0, "flags": 0, "endpoint": 0, "pasid": 0, "address": 0}
    # the host faulted where the guest's mapping allows it: still a mapping fault
    record = parse_fault(frontend.fault_record(0, 0x1000, read=True))
    assert (record["reason"], record["flags"]) == (FaultReason.MAPPING, 0x101)


def test_fault_pasid_only_with_vsva() -> None:
    frontend = vsva()
    record = parse_fault(frontend.fault_record(0x300, 0x1000, read=True, pasid=7))
    assert record["flags"] & FaultFlag.PASID
    assert record["pasid"] == 7
    record = parse_fault(device().fault_record(0, 0x1000, read=True, pasid=7))
    assert not record["flags"] & FaultFlag.PASID
    assert record["pasid"] == 0


def test_bypass_domain_and_bypass_config_translate_identity() -> None:
    frontend = device()
    assert frontend.access(0, 0x1234, write=True) == 0x1234  # unattached, bypass = 1
    send(frontend, A, domain=3, endpoint=0, flags=1)
    assert frontend.access(0, 0x5678, write=True) == 0x5678


def test_constructor_checks() -> None:
    for kw in (
        {"page_size_mask": 0},
        {"input_range": (5, 4)},
        {"domain_range": (5, 4)},
        {"boot_bypass": 2},
        {"features": VirtioFeatures(vsva_draft="D")},
    ):
        with pytest.raises(ValueError, match=r"mask|empty|bypass|draft"):
            VirtioIommuFrontend(**kw)


@pytest.mark.parametrize("flags", [0x2, 0x4, 0x80000000])
def test_unknown_attach_flags(flags: int) -> None:
    assert status(device(), A, domain=1, endpoint=0, flags=flags) == "INVAL"


@pytest.mark.parametrize(("mmio", "flags"), [(True, 0x8), (False, 0x8), (False, 0x4), (True, 0x10)])
def test_unknown_map_flags(mmio: bool, flags: int) -> None:
    frontend = device(features=VirtioFeatures(mmio=mmio))
    send(frontend, A, domain=1, endpoint=0)
    assert (
        status(frontend, M, domain=1, virt_start=0, virt_end=0xFFF, phys_start=0, flags=flags)
        == "INVAL"
    )


def test_model_survives_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from viommud.backend.emulator.kernel import EmulatedIommufd
    from viommud.dispatcher.virtio import VirtioDispatcher
    from viommud.host import HostConfig
    from viommud.models.virtio import VirtioViommu
    from viommud.session import Session
    from viommud.trace import Request, ViommuCreate

    session = Session(EmulatedIommufd(HostConfig.from_json({"iommus": [], "devices": []})))
    as_json(session.handle(ViommuCreate(2, "v", "virtio-iommu", (), {"emulated_endpoints": [0]})))
    viommu = session.viommus["v"]
    assert isinstance(viommu, VirtioViommu)

    def broken(self: VirtioDispatcher, request_type: int, events: list[Any]) -> None:
        raise RuntimeError("bug")

    with monkeypatch.context() as patch:
        patch.setattr(VirtioDispatcher, "run", broken)
        with pytest.raises(RuntimeError, match="bug"):
            as_json(session.handle(Request(0, "v", build_request(A, domain=1, endpoint=0))))
    assert not viommu.frontend.domains  # undone
    assert viommu.frontend.error_counts == {"DEVERR": 1}
    answer = as_json(session.handle(Request(0, "v", build_request(A, domain=1, endpoint=0))))
    assert answer["status"] == "OK"
    session.close()
