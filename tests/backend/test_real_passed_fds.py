"""The real backend's import_fd / adopt_device, without /dev/iommu (a plain file stands in
for it: nothing here issues an ioctl). The kernel takes a memfd by its own number, so
import_fd hands the caller's fd back and never closes it; a passed cdev belongs to the
backend from adopt_device on and is closed when the device is closed (which is how the
kernel unbinds a VFIO cdev), exactly once."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.backend.test_emulated import HOST
from viommud.backend.real import RealIommufd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def real(tmp_path: Path) -> RealIommufd:
    node = tmp_path / "iommu"
    node.write_bytes(b"")
    return RealIommufd(HOST, path=str(node), sysfs=str(tmp_path / "sysfs"))


def test_import_fd_is_the_fd_itself_and_stays_the_callers(real: RealIommufd) -> None:
    fd = os.memfd_create("ram")
    try:
        assert real.import_fd(fd) == fd
        real.close_fd(fd)
        os.fstat(fd)  # still open: the caller's to close
        real.import_fd(fd)
        real.close()
        os.fstat(fd)
    finally:
        os.close(fd)


def test_adopted_cdev_is_opened_and_closed_once(real: RealIommufd) -> None:
    base = open_fds()
    passed = os.open("/dev/null", os.O_RDWR)
    real.adopt_device("a0", passed)
    assert real.open_device("a0") == passed
    real.close_device(passed)
    assert open_fds() == base  # the passed fd is gone
    with pytest.raises(OSError, match="not an open device") as gone:
        real.close_device(passed)
    assert gone.value.errno == errno.EBADF
    real.close()


def test_an_adopted_cdev_never_opened_is_closed_with_the_backend(real: RealIommufd) -> None:
    base = open_fds()
    real.adopt_device("a0", os.open("/dev/null", os.O_RDWR))
    assert open_fds() == base + 1
    real.close()
    assert open_fds() == base - 1  # the /dev/iommu stand-in as well


def test_adopt_refusals_close_the_fd(real: RealIommufd) -> None:
    base = open_fds()
    with pytest.raises(OSError, match="no host device") as unknown:
        real.adopt_device("nope", os.open("/dev/null", os.O_RDWR))
    assert unknown.value.errno == errno.ENODEV
    real.adopt_device("a0", os.open("/dev/null", os.O_RDWR))
    with pytest.raises(OSError, match="already has a passed fd") as busy:
        real.adopt_device("a0", os.open("/dev/null", os.O_RDWR))
    assert busy.value.errno == errno.EBUSY
    assert open_fds() == base + 1
    real.close()
