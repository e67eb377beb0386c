"""The initramfs builder: the newc archive and the /init script."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from capture.assets import Module
from capture.initramfs import MARK, Entry, Workload, build, init_script, newc, read_newc


def test_newc_round_trip_keeps_every_kind_of_member() -> None:
    entries = [
        Entry("bin", stat.S_IFDIR | 0o755),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        Entry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
        Entry("odd", stat.S_IFREG | 0o644, b"abcde"),  # a size that needs padding
    ]
    assert read_newc(newc(entries)) == entries


def test_newc_is_what_cpio_reads(tmp_path: Path) -> None:
    """The archive is a valid newc for GNU cpio too (skips where cpio is not installed)."""
    cpio = Path("/usr/bin/cpio")
    if not cpio.exists():
        pytest.skip("cpio is not installed")
    archive = newc(
        [
            Entry("d", stat.S_IFDIR | 0o755),
            Entry("d/file", stat.S_IFREG | 0o644, b"payload"),
            Entry("link", stat.S_IFLNK | 0o777, b"d/file"),
        ]
    )
    listing = subprocess.run(
        [str(cpio), "-t", "--quiet"], input=archive, capture_output=True, check=True
    )
    assert listing.stdout.decode().split() == ["d", "d/file", "link"]


def test_read_newc_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="no newc header at offset 0"):
        read_newc(b"not an archive" * 10)


def _module(tmp_path: Path, name: str) -> Module:
    path = tmp_path / f"{name}.ko"
    path.write_bytes(b"\x7fELF" + name.encode())
    return Module(name, path, ())


def test_build_holds_busybox_modules_console_and_init(tmp_path: Path) -> None:
    modules = [_module(tmp_path, "virtio_ring"), _module(tmp_path, "virtio_net")]
    members = {e.name: e for e in read_newc(build(b"BUSYBOX", modules, Workload()))}
    assert members["bin/busybox"].data == b"BUSYBOX"
    assert stat.S_ISCHR(members["dev/console"].mode)
    assert members["dev/console"].rdev == (5, 1)
    assert members["lib/modules/virtio_net.ko"].data == b"\x7fELFvirtio_net"
    assert members["init"].mode & 0o111
    init = members["init"].data.decode()
    assert "for m in virtio_ring virtio_net; do" in init


def test_init_script_follows_the_workload() -> None:
    full = init_script([], Workload(disk_kib=128))
    assert "count=128 " in full
    assert "count=2 iflag=direct" in full  # 128 KiB read back in 64 KiB blocks
    assert "tftp -g -r payload.bin" in full
    assert '"$group/type"' in full
    assert full.rstrip().endswith("poweroff -f")
    bare = init_script([], Workload(disk_kib=0, net=False, rebind=False))
    assert "/dev/vda of=" not in bare
    assert "udhcpc" not in bare
    assert "unbind" not in bare
    for text in (full, bare):
        assert f'echo "{MARK} $*"' in text
        assert "say workload-done" in text


def test_init_script_is_valid_sh(tmp_path: Path) -> None:
    """The script parses (``sh -n``) with and without modules and workload parts."""
    for script in (
        init_script([_module(tmp_path, "a")], Workload()),
        init_script([], Workload(disk_kib=0, net=False, rebind=False)),
    ):
        path = tmp_path / "init"
        path.write_text(script)
        subprocess.run(["sh", "-n", str(path)], check=True)
