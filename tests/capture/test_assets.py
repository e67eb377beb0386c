"""Module dependencies from .modinfo, in load order, against a made-up kernel package tree."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from capture.assets import CaptureError, Kernel, module_closure, module_depends

RELEASE = "6.1.0-99-amd64"


def _modinfo(name: str, depends: str) -> bytes:
    return (
        b"\x7fELF\x00junk\x00license=GPL\x00depends="
        + depends.encode()
        + (b"\x00name=" + name.encode() + b"\x00vermagic=" + RELEASE.encode() + b"\x00")
    )


def _kernel(tmp_path: Path, modules: dict[str, str], builtin: list[str]) -> Kernel:
    root = tmp_path / "pkg"
    moddir = root / "lib" / "modules" / RELEASE
    for name, depends in modules.items():
        path = moddir / "kernel" / "drivers" / f"{name.replace('_', '-')}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _modinfo(name, depends)
        if name.endswith("xz"):
            path = path.with_name(path.name + ".xz")
            data = lzma.compress(data)
        path.write_bytes(data)
    moddir.mkdir(parents=True, exist_ok=True)
    (moddir / "modules.builtin").write_text(
        "".join(f"kernel/drivers/{name}.ko\n" for name in builtin)
    )
    return Kernel("amd64", "bookworm", f"linux-image-{RELEASE}", "x.deb", RELEASE, root)


def test_module_depends_reads_the_modinfo_string() -> None:
    assert module_depends(_modinfo("virtio_net", "virtio_ring,virtio,net_failover")) == (
        "virtio_ring",
        "virtio",
        "net_failover",
    )
    assert module_depends(_modinfo("virtio", "")) == ()
    assert module_depends(b"no modinfo at all") == ()


def test_closure_loads_dependencies_first_and_skips_builtins(tmp_path: Path) -> None:
    kernel = _kernel(
        tmp_path,
        {
            "virtio_net": "virtio_ring,virtio,net_failover",
            "net_failover": "failover",
            "failover": "",
            "virtio_blk": "virtio_ring,virtio",
            "virtio_ring": "",
        },
        builtin=["virtio"],
    )
    names = [m.name for m in module_closure(kernel, ["virtio_blk", "virtio_net"])]
    assert names == ["virtio_ring", "virtio_blk", "failover", "net_failover", "virtio_net"]


def test_closure_decompresses_xz_modules(tmp_path: Path) -> None:
    kernel = _kernel(tmp_path, {"virtio_iommu_xz": ""}, builtin=[])
    (module,) = module_closure(kernel, ["virtio_iommu_xz"])
    assert module.path.suffix == ".xz"
    assert module.payload().startswith(b"\x7fELF")


def test_closure_reports_a_missing_module(tmp_path: Path) -> None:
    kernel = _kernel(tmp_path, {"virtio_net": "virtio_ring"}, builtin=[])
    with pytest.raises(CaptureError, match="has no module virtio_ring and does not build it in"):
        module_closure(kernel, ["virtio_net"])


def test_closure_reports_a_cycle(tmp_path: Path) -> None:
    kernel = _kernel(tmp_path, {"a": "b", "b": "a"}, builtin=[])
    with pytest.raises(CaptureError, match="cycle: a -> b -> a"):
        module_closure(kernel, ["a"])
