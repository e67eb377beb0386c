"""The real backend (viommud.backend.real) without /dev/iommu, and backend selection.

``fcntl.ioctl`` is replaced by ``FakeKernel``: it records the exact bytes ``RealIommufd``
hands to the kernel and feeds them to an ``EmulatedIommufd`` that reads the same process
memory (the ``CtypesMemory`` the real backend's pointers point into). The emulator decodes
those bytes with the kernel's rules, so a request the real backend encoded wrongly would
fail there; the captured bytes are also compared with the uAPI encoding field by field, and
whole trace replays through both backends must produce the same backend call log.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from protocols import iommufd as uapi
from tests.backend.test_emulated import HOST
from viommud.backend import real as real_mod
from viommud.backend import select
from viommud.backend.base import Backend, UserFault
from viommud.backend.calls import CallLog, Iommufd
from viommud.backend.emulator.kernel import EmulatedIommufd
from viommud.backend.real import CtypesMemory, RealIommufd, vfio_cdev_path
from viommud.host import HostConfig
from viommud.shell import cli
from viommud.shell.replay import replay_embedded

REPO = Path(__file__).resolve().parents[2]
VFIO_REQUESTS = {
    uapi.VFIO_DEVICE_BIND_IOMMUFD,
    uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT,
}


class FakeKernel:
    """``fcntl.ioctl`` for the real backends made while it is installed."""

    def __init__(self) -> None:
        self.backends: list[tuple[RealIommufd, EmulatedIommufd, dict[int, int]]] = []
        self.captured: list[tuple[int, bytes]] = []

    def attach(self, backend: RealIommufd) -> None:
        emu = EmulatedIommufd(backend.host, memory=backend.memory)
        self.backends.append((backend, emu, {backend.iommufd: emu.iommufd}))

    def closed(self, backend: RealIommufd, fd: int) -> None:
        for owner, emu, fds in self.backends:
            if owner is backend and fd in fds:
                emu.close_device(fds.pop(fd))

    def _route(self, fd: int) -> tuple[EmulatedIommufd, int, RealIommufd]:
        for backend, emu, fds in self.backends:
            if fd in fds:
                return emu, fds[fd], backend
            device = backend._devices.get(fd)
            if device is not None:
                fds[fd] = emu.open_device(device)
                return emu, fds[fd], backend
        raise OSError(errno.EBADF, "not a fake fd")

    def ioctl(self, fd: int, request: int, arg: Any = 0, mutate: bool = True) -> int:
        buf = bytearray() if isinstance(arg, int) else bytearray(arg)
        self.captured.append((request, bytes(buf)))
        emu, emu_fd, backend = self._route(fd)
        if request == uapi.VFIO_DEVICE_BIND_IOMMUFD and len(buf) >= 12:
            # the struct names the real /dev/iommu fd; the emulator knows its own
            (named,) = struct.unpack_from("<i", buf, 8)
            if named == backend.iommufd:
                buf[8:12] = struct.pack("<i", emu.iommufd)
        rc = emu.ioctl(emu_fd, request, buf)
        if request == uapi.VFIO_DEVICE_BIND_IOMMUFD and len(buf) >= 12:
            buf[8:12] = arg[8:12]
        if not isinstance(arg, int):
            arg[:] = buf
        if rc:
            raise OSError(rc, os.strerror(rc))
        return 0


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    sysfs = tmp_path / "sys"
    devdir = tmp_path / "dev-vfio"
    devdir.mkdir()
    for n, pdev in enumerate(HOST.devices):
        (sysfs / pdev.id / "vfio-dev" / f"vfio{n}").mkdir(parents=True)
        (devdir / f"vfio{n}").write_bytes(b"")
    (tmp_path / "iommu").write_bytes(b"")
    monkeypatch.setattr(real_mod, "VFIO_DEVICES_DIR", str(devdir))
    monkeypatch.setattr(real_mod, "SYS_PCI_DEVICES", str(sysfs))
    return fake


class TrackedReal(RealIommufd):
    """A RealIommufd whose device closes reach the fake kernel (close(2) would)."""

    kernel: FakeKernel

    def close_device(self, fd: int) -> None:
        super().close_device(fd)
        self.kernel.closed(self, fd)


def make_real(kernel: FakeKernel, tmp_path: Path, host: HostConfig = HOST) -> RealIommufd:
    backend = TrackedReal(host, path=str(tmp_path / "iommu"), sysfs=real_mod.SYS_PCI_DEVICES)
    backend.kernel = kernel
    kernel.attach(backend)
    return backend


# ======================================================================================
# CtypesMemory
# ======================================================================================


def test_ctypes_memory() -> None:
    mem = CtypesMemory()
    addr = mem.alloc(16)
    assert mem.read(addr, 16) == bytes(16)
    mem.write(addr + 4, b"abcd")
    assert mem.read(addr, 8) == b"\0\0\0\0abcd"
    assert mem.mapped(addr, 16)
    assert not mem.mapped(addr, 17)
    with pytest.raises(UserFault):
        mem.read(addr + 10, 8)
    with pytest.raises(UserFault):
        mem.write(0, b"x")
    assert mem.read(0, 0) == b""
    mem.write(0, b"")
    mem.free(addr)
    with pytest.raises(UserFault):
        mem.read(addr, 1)
    with pytest.raises(ValueError, match="not the start"):
        mem.free(addr)
    with pytest.raises(ValueError, match="negative"):
        mem.alloc(-1)
    empty = mem.alloc(0)
    assert not mem.mapped(empty, 1)


# ======================================================================================
# Request bytes
# ======================================================================================


def test_is_a_backend(kernel: FakeKernel, tmp_path: Path) -> None:
    backend: Backend = make_real(kernel, tmp_path)
    assert backend.name == "iommufd"
    backend.close()


def test_typed_calls_reach_the_kernel_byte_for_byte(kernel: FakeKernel, tmp_path: Path) -> None:
    backend = make_real(kernel, tmp_path)
    client = Iommufd(backend, CallLog(keep=True))
    dev = client.bind("a0", "smmu0")
    ioas = client.ioas_alloc()
    parent = client.hwpt_alloc("smmu0", dev.dev_id, ioas, flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    viommu = client.viommu_alloc("smmu0", dev.dev_id, parent, uapi.IOMMU_VIOMMU_TYPE_ARM_SMMUV3)
    vdev = client.vdevice_alloc("smmu0", viommu, dev.dev_id, 8)
    ste = struct.pack("<QQ", 0xB, 0)
    nested = client.hwpt_alloc(
        "smmu0", dev.dev_id, viommu, data_type=uapi.IOMMU_HWPT_DATA_ARM_SMMUV3, data=ste
    )
    client.attach(dev, nested)
    entries = [struct.pack("<QQ", 0x11 | (5 << 48), 0), struct.pack("<QQ", 0x40 | (8 << 32), 52)]
    result = client.invalidate(
        "smmu0",
        object_kind="viommu",
        object_id=viommu,
        data_type=uapi.IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
        entry_len=16,
        entries=entries,
    )
    assert (result.errno, result.done) == (0, 2)
    buf = backend.memory.alloc(1 << 16)
    assert client.ioas_map(None, ioas, 0x10000, 1 << 16, user_va=buf) == 0x10000
    assert client.ioas_unmap(None, ioas, 0x10000, 1 << 16) == 1 << 16
    client.detach(dev)
    for obj in (vdev, nested, viommu, parent, ioas):
        client.destroy("smmu0", obj)
    client.unbind(dev)

    names = [uapi.IOCTL_NAMES[req] for req, _ in kernel.captured]
    assert names == [
        "VFIO_DEVICE_BIND_IOMMUFD",
        "IOMMU_IOAS_ALLOC",
        "IOMMU_HWPT_ALLOC",
        "IOMMU_VIOMMU_ALLOC",
        "IOMMU_VDEVICE_ALLOC",
        "IOMMU_HWPT_ALLOC",
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        "IOMMU_HWPT_INVALIDATE",
        "IOMMU_IOAS_MAP",
        "IOMMU_IOAS_UNMAP",
        "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        *["IOMMU_DESTROY"] * 5,
    ]
    expected: list[uapi.UapiStruct] = [
        uapi.VfioDeviceBindIommufd(iommufd=backend.iommufd),
        uapi.IoasAlloc(),
        uapi.HwptAlloc(flags=1, dev_id=dev.dev_id, pt_id=ioas),
        uapi.ViommuAlloc(type=1, dev_id=dev.dev_id, hwpt_id=parent),
        uapi.VdeviceAlloc(viommu_id=viommu, dev_id=dev.dev_id, virt_id=8),
    ]
    for (request, raw), want in zip(kernel.captured, expected, strict=False):
        assert raw == bytes(uapi.encode(want)), uapi.IOCTL_NAMES[request]
    # the structures with pointers: decoded as the kernel does, the pointers hold the data
    nested_req = uapi.decode(uapi.HwptAlloc, kernel.captured[5][1])
    assert nested_req.data_len == 16
    assert backend.memory.read(nested_req.data_uptr, 16) != b""  # the scratch buffer, reused
    inv = uapi.decode(uapi.HwptInvalidate, kernel.captured[7][1])
    assert (inv.hwpt_id, inv.data_type, inv.entry_len, inv.entry_num) == (viommu, 1, 16, 2)
    amap = uapi.decode(uapi.IoasMap, kernel.captured[8][1])
    assert (amap.ioas_id, amap.user_va, amap.length, amap.iova) == (ioas, buf, 1 << 16, 0x10000)
    assert amap.flags == 7
    for request, raw in kernel.captured:
        assert request >> 8 == uapi.IOMMUFD_TYPE  # _IO(';', nr): no size, no direction
        if request not in VFIO_REQUESTS:
            (size,) = struct.unpack_from("<I", raw)
            assert size == len(raw)
    backend.close()


def test_errnos_and_null_argument(kernel: FakeKernel, tmp_path: Path) -> None:
    backend = make_real(kernel, tmp_path)
    arg = uapi.encode(uapi.Destroy(id=77))
    assert backend.ioctl(backend.iommufd, uapi.IOMMU_DESTROY, arg) == errno.ENOENT
    assert backend.ioctl(backend.iommufd, uapi.IOMMU_DESTROY, bytearray()) == errno.EFAULT
    assert kernel.captured[-1] == (uapi.IOMMU_DESTROY, b"")
    arg = uapi.encode(uapi.IoasAlloc())
    assert backend.ioctl(backend.iommufd, uapi.IOMMU_IOAS_ALLOC, arg) == 0
    assert uapi.decode(uapi.IoasAlloc, arg).out_ioas_id == 1  # written back in place
    backend.close()
    backend.close()  # idempotent


def test_open_device(kernel: FakeKernel, tmp_path: Path) -> None:
    backend = make_real(kernel, tmp_path)
    with pytest.raises(OSError, match="no host device") as info:
        backend.open_device("nope")
    assert info.value.errno == errno.ENODEV
    fd = backend.open_device("a0")
    with pytest.raises(OSError, match="already open"):
        backend.open_device("a0")
    backend.close_device(fd)
    with pytest.raises(OSError, match="not an open device"):
        backend.close_device(fd)
    with pytest.raises(OSError, match="no VFIO cdev"):
        vfio_cdev_path("0000:ff:00.0", sysfs=str(tmp_path / "sys"))
    backend.close()


def test_event_fds_are_plain_files(kernel: FakeKernel, tmp_path: Path) -> None:
    backend = make_real(kernel, tmp_path)
    read_fd, write_fd = os.pipe()
    assert backend.write(write_fd, b"abc") == (0, 3)
    assert backend.read(read_fd, 8) == (0, b"abc")
    backend.close_fd(read_fd)
    backend.close_fd(write_fd)
    assert backend.read(read_fd, 8)[0] == errno.EBADF
    assert backend.write(write_fd, b"x")[0] == errno.EBADF
    fd = backend.open_device("a1")
    backend.close_fd(fd)
    assert fd not in backend._devices
    backend.close()


FIXTURES = [
    "smmuv3-every-opcode.jsonl",
    "smmuv3-guest-errors.jsonl",
    "smmuv3-ste-configs.jsonl",
    "vtd-every-descriptor.jsonl",
    "vtd-shared-domain.jsonl",
]


@pytest.mark.parametrize("name", FIXTURES)
def test_replay_through_the_real_backend_matches_the_emulator(
    kernel: FakeKernel, tmp_path: Path, name: str
) -> None:
    trace = REPO / "fixtures" / name
    hosts: list[HostConfig] = []

    def real_factory(host: HostConfig) -> Backend:
        hosts.append(host)
        sysfs = Path(real_mod.SYS_PCI_DEVICES)
        devdir = Path(real_mod.VFIO_DEVICES_DIR)
        for pdev in host.devices:
            node = sysfs / pdev.id / "vfio-dev"
            if not node.exists():
                (node / f"vfio-{pdev.id}").mkdir(parents=True)
                (devdir / f"vfio-{pdev.id}").write_bytes(b"")
        return make_real(kernel, tmp_path, host)

    emulated_calls, real_calls = io.StringIO(), io.StringIO()
    one = asyncio.run(replay_embedded(trace, calls=emulated_calls))
    two = asyncio.run(replay_embedded(trace, factory=real_factory, calls=real_calls))
    assert hosts
    assert one.exit_code == two.exit_code
    assert one.report is not None
    assert two.report is not None
    assert one.report["backend"] == two.report["backend"]
    strip = ("elapsed",)
    lines_one = [json.loads(line) for line in emulated_calls.getvalue().splitlines()]
    lines_two = [json.loads(line) for line in real_calls.getvalue().splitlines()]
    for line in (*lines_one, *lines_two):
        for key in strip:
            line.pop(key, None)
    assert lines_one == lines_two
    assert any(req == uapi.IOMMU_HWPT_INVALIDATE for req, _ in kernel.captured) or "ste" in name


# ======================================================================================
# --backend {emulated,iommufd,auto}
# ======================================================================================


def test_resolve(tmp_path: Path) -> None:
    present, absent = tmp_path / "iommu", tmp_path / "none"
    present.write_bytes(b"")
    assert select.resolve("auto", dev_iommu=str(present)) == "iommufd"
    assert select.resolve("auto", dev_iommu=str(absent)) == "emulated"
    assert select.resolve("emulated", dev_iommu=str(present)) == "emulated"
    assert select.resolve("iommufd", dev_iommu=str(present)) == "iommufd"
    with pytest.raises(select.BackendUnavailable, match="does not exist"):
        select.resolve("iommufd", dev_iommu=str(absent))
    with pytest.raises(select.BackendUnavailable, match="unknown backend"):
        select.resolve("kvm")


def test_backend_factory(kernel: FakeKernel, tmp_path: Path) -> None:
    emulated = select.backend_factory("auto", dev_iommu=str(tmp_path / "none"))(HOST)
    assert isinstance(emulated, EmulatedIommufd)
    real = select.backend_factory("iommufd", dev_iommu=str(tmp_path / "iommu"))(HOST)
    assert isinstance(real, RealIommufd)
    real.close()


@pytest.mark.skipif(os.path.exists("/dev/iommu"), reason="this machine has /dev/iommu")
@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--backend", "iommufd", "--socket", "/nonexistent/x.sock"],
        ["replay", "--backend", "iommufd", str(REPO / "fixtures" / "smmuv3-every-opcode.jsonl")],
    ],
    ids=["serve", "replay"],
)
def test_cli_refuses_a_missing_dev_iommu(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "/dev/iommu does not exist" in err
    assert "--backend emulated" in err


@pytest.mark.skipif(os.path.exists("/dev/iommu"), reason="this machine has /dev/iommu")
def test_cli_auto_replays_on_the_emulator(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen: list[str] = []

    def spy(name: str = "auto", **kw: str) -> select.BackendFactory:
        chosen.append(select.resolve(name, **kw))
        return select.backend_factory(name, **kw)

    monkeypatch.setattr(cli, "backend_factory", spy)
    trace = str(REPO / "fixtures" / "smmuv3-every-opcode.jsonl")
    assert cli.main(["replay", trace, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["backend"]["calls"]["IOMMU_HWPT_INVALIDATE"] == 3
    assert chosen == ["emulated"]
