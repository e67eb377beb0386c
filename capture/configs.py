"""The machines the kit boots: one per vIOMMU model and invalidation policy."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONFIGS", "Config", "QueueDump"]

# Where QEMU 7.2 maps the vIOMMU's registers (hw/arm/virt.c VIRT_SMMU; hw/i386's
# Q35_HOST_BRIDGE_IOMMU_ADDR), and the registers giving the queue's base and size.
SMMU_BASE = 0x0905_0000
VTD_BASE = 0xFED9_0000


@dataclass(frozen=True, slots=True)
class QueueDump:
    """Which guest invalidation queue to dump through the monitor, and how to size it.

    ``base_reg``: the 64-bit register holding its base (SMMUv3 CMDQ_BASE, VT-d IQA);
    ``prod_reg``/``cons_reg``: the producer/consumer registers, kept in the manifest.
    """

    kind: str  # "smmuv3-cmdq" | "vtd-iq"
    mmio: int
    base_reg: int
    prod_reg: int
    cons_reg: int

    def span(self, base_value: int) -> tuple[int, int]:
        """(guest physical address, size in bytes) of the queue the register value names."""
        if self.kind == "smmuv3-cmdq":
            # SMMUv3 6.3.26 CMDQ_BASE: ADDR [51:5], LOG2SIZE [4:0]; entries are 16 bytes.
            return base_value & 0x000F_FFFF_FFFF_FFE0, 16 << (base_value & 0x1F)
        # VT-d 11.4.9.3 IQA_REG: IQA [63:12], DW [11], QS [2:0]: 2^QS 4 KiB pages.
        return base_value & ~0xFFF & (2**64 - 1), 4096 << (base_value & 0x7)


SMMU_CMDQ = QueueDump("smmuv3-cmdq", SMMU_BASE, 0x90, 0x98, 0x9C)
VTD_IQ = QueueDump("vtd-iq", VTD_BASE, 0x90, 0x88, 0x80)

# QEMU trace events: everything about invalidation and configuration, nothing that fires per
# DMA access (translate, IOTLB lookups, page walks), which would make the logs huge.
SMMU_EVENTS = (
    "smmuv3_write_mmio",
    "smmuv3_cmdq_*",
    "smmuv3_config_cache_inv",
    "smmuv3_s1_range_inval",
    "smmuv3_record_event",
    "smmuv3_write_gerror*",
    "smmuv3_unhandled_cmd",
    "smmuv3_inv_notifiers_iova",
    "smmu_iotlb_inv_*",
)
VTD_EVENTS = (
    "vtd_inv_*",
    "vtd_reg_write",
    "vtd_reg_write_gcmd",
    "vtd_reg_dmar_root",
    "vtd_dmar_enable",
    "vtd_switch_address_space",
    "vtd_dmar_fault",
    "vtd_fsts_ppf",
    "vtd_frr_new",
    "vtd_warn_*",
    "vtd_context_cache_reset",
    "vtd_iotlb_reset",
    "vtd_as_unmap_whole",
)
VIRTIO_IOMMU_EVENTS = ("virtio_iommu_*", "-virtio_iommu_translate*")

MODULES = ("virtio_pci", "virtio_blk", "virtio_net")

ARM_VIRT = ("-machine", "virt,iommu=smmuv3", "-cpu", "cortex-a57")
Q35 = ("-machine", "q35")


@dataclass(frozen=True, slots=True)
class Config:
    """One machine: guest architecture and kernel suite, QEMU options, kernel command line."""

    name: str
    model: str  # "smmuv3" | "vtd" | "virtio-iommu"
    arch: str  # Debian architecture of the guest
    suite: str  # where its kernel comes from
    machine: tuple[str, ...]  # QEMU options before the devices
    cmdline: str  # kernel arguments after the console
    events: tuple[str, ...]
    queue: QueueDump | None
    modules: tuple[str, ...] = MODULES
    root_ports: bool = False  # devices behind pcie-root-ports (needed for ATS on q35)
    ats: bool = False  # ats=on on the virtio devices (with device-iotlb=on)
    domain_switch: bool = True  # the workload may switch the network device's domain
    description: str = ""

    @property
    def console(self) -> str:
        return "ttyAMA0" if self.arch == "arm64" else "ttyS0"


CONFIGS: dict[str, Config] = {
    config.name: config
    for config in (
        Config(
            "smmuv3-strict",
            "smmuv3",
            "arm64",
            "bookworm",
            ARM_VIRT,
            "iommu.strict=1",
            SMMU_EVENTS,
            SMMU_CMDQ,
            description="Arm virt with QEMU's SMMUv3 (stage 1), strict invalidation",
        ),
        Config(
            "smmuv3-lazy",
            "smmuv3",
            "arm64",
            "bookworm",
            ARM_VIRT,
            "iommu.strict=0",
            SMMU_EVENTS,
            SMMU_CMDQ,
            description="Arm virt with QEMU's SMMUv3, lazy (flush queue) invalidation",
        ),
        Config(
            "vtd-legacy",
            "vtd",
            "amd64",
            "bookworm",
            (*Q35, "-device", "intel-iommu,intremap=off,device-iotlb=on"),
            "intel_iommu=on iommu.strict=1",
            VTD_EVENTS,
            VTD_IQ,
            root_ports=True,
            ats=True,
            description="q35 with intel-iommu in legacy mode, device-IOTLB, strict",
        ),
        Config(
            "vtd-scalable",
            "vtd",
            "amd64",
            "bookworm",
            (*Q35, "-device", "intel-iommu,intremap=off,x-scalable-mode=on,device-iotlb=on"),
            "intel_iommu=on iommu.strict=1",
            VTD_EVENTS,
            VTD_IQ,
            root_ports=True,
            ats=True,
            # QEMU 7.2's scalable mode loses the virtio-net rings once the device has been in
            # a pass-through (identity) domain: "Guest says index N is available", then the
            # guest spins. The capture keeps to one DMA domain per device here.
            domain_switch=False,
            description="q35 with intel-iommu in scalable mode, device-IOTLB, strict",
        ),
        Config(
            "virtio-iommu",
            "virtio-iommu",
            "amd64",
            # Debian's 6.1 kernels leave CONFIG_VIRTIO_IOMMU unset; bookworm-backports' build
            # (6.12) has it as a module.
            "bookworm-backports",
            (*Q35, "-device", "virtio-iommu-pci"),
            "iommu.strict=1",
            VIRTIO_IOMMU_EVENTS,
            None,
            modules=("virtio_iommu", *MODULES),
            description="q35 with virtio-iommu-pci (ACPI VIOT), strict",
        ),
    )
}
