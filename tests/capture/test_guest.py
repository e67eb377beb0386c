"""The QEMU command line, the queue geometry, and the run loop against a fake QEMU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from capture.configs import CONFIGS, SMMU_CMDQ, VTD_IQ
from capture.guest import qemu_argv, run_guest

FAKE = Path(__file__).with_name("fake_qemu.py")


def _argv(name: str, tmp_path: Path) -> list[str]:
    return qemu_argv(
        CONFIGS[name], Path("/usr/bin/qemu"), Path("/k/vmlinuz"), Path("/k/initrd"), tmp_path
    )


def test_queue_span_decodes_the_base_registers() -> None:
    # SMMUv3 CMDQ_BASE: RA bit 62 set, ADDR 0x5b700000, LOG2SIZE 16 -> 64 Ki entries of 16 B.
    assert SMMU_CMDQ.span(0x4000_0000_5B70_0010) == (0x5B70_0000, 1 << 20)
    # VT-d IQA: 0x2409000 with DW (bit 11) and QS 1 -> two 4 KiB pages.
    assert VTD_IQ.span(0x0240_9801) == (0x0240_9000, 8192)


def test_every_virtio_device_goes_through_the_viommu(tmp_path: Path) -> None:
    """Without iommu_platform the guest's virtio drivers bypass the DMA API entirely."""
    for name in CONFIGS:
        devices = [a for a in _argv(name, tmp_path) if a.startswith(("virtio-blk", "virtio-net"))]
        assert len(devices) == 2, name
        for device in devices:
            assert "iommu_platform=on" in device, name
            assert "disable-legacy=on" in device, name


def test_vtd_configs_put_ats_devices_behind_root_ports(tmp_path: Path) -> None:
    argv = _argv("vtd-legacy", tmp_path)
    assert "intel-iommu,intremap=off,device-iotlb=on" in argv
    assert argv.count("pcie-root-port,id=rp1,chassis=1,slot=1") == 1
    blk = next(a for a in argv if a.startswith("virtio-blk-pci"))
    assert blk.endswith(",ats=on,bus=rp1")
    assert "x-scalable-mode=on" in " ".join(_argv("vtd-scalable", tmp_path))


def test_smmuv3_argv_traces_no_per_dma_event(tmp_path: Path) -> None:
    argv = _argv("smmuv3-strict", tmp_path)
    assert argv[argv.index("-machine") + 1] == "virt,iommu=smmuv3"
    assert "-no-shutdown" in argv
    assert argv[argv.index("-append") + 1].endswith("iommu.strict=1")
    events = (tmp_path / "events").read_text().split()
    assert "smmuv3_write_mmio" in events
    assert not any("translate" in event or "lookup" in event for event in events)


def _run(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    config = CONFIGS["smmuv3-strict"]
    argv = [sys.executable, str(FAKE), *_argv("smmuv3-strict", tmp_path)[1:]]
    return run_guest(config, argv, tmp_path, timeout=timeout, stop_wait=1.0)


def test_run_dumps_the_queue_after_the_power_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path, "ok", monkeypatch)
    assert run.problems == []
    assert run.workload_done
    assert run.markers[-1] == "poweroff"
    assert run.exit_code == 0  # QEMU left through the monitor's quit
    assert run.dump_info == {
        "kind": "smmuv3-cmdq",
        "base_register": "0x400000005b700004",
        "address": "0x5b700000",
        "size": 256,
        "prod": "0x3",
        "cons": "0x3",
    }
    assert run.dump is not None
    assert run.dump.read_bytes() == bytes(range(256))
    assert "reboot: Power down" in run.console.read_text()


def test_a_hung_guest_is_stopped_dumped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path, "hang", monkeypatch, timeout=3.0)
    assert run.timed_out
    assert "no power-off within 3 s" in run.problems
    assert "the machine did not stop; the dump is of a running guest" in run.problems
    assert "the guest did not finish the workload" in run.problems
    assert run.exit_code == 0
    assert run.seconds < 20


def test_a_crashed_qemu_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path, "crash", monkeypatch)
    assert "QEMU closed the console before the guest powered off" in run.problems
    assert run.exit_code == 3
    assert run.dump is None


def test_smp_sets_the_vcpus(tmp_path: Path) -> None:
    default = _argv("smmuv3-strict", tmp_path)
    assert default[default.index("-smp") + 1] == "1"
    two = qemu_argv(
        CONFIGS["vtd-legacy"], Path("/q"), Path("/k/vmlinuz"), Path("/k/initrd"), tmp_path, smp=2
    )
    assert two[two.index("-smp") + 1] == "2"
