"""QEMU's trace-event format strings, as the released binaries print them, to build test logs.

Taken from the ``log`` backend's strings in Debian's builds of QEMU 7.2 (bookworm,
7.2+dfsg-7+deb12u18) and 10.0 (trixie, 10.0.13+ds-0+deb13u1), i.e. ``hw/*/trace-events``
with ``PRIx64`` as ``lx``. The log backend writes ``NAME " " FORMAT "\\n"``, prefixed by
``PID@SEC.USEC:`` under ``-msg timestamp=on`` (scripts/tracetool/backend/log.py). Only the
events whose text differs between the two are listed twice.
"""

from __future__ import annotations

import re

_SPEC = re.compile(r"%[-0-9]*(?:l|z)?([a-z])")

COMMON: dict[str, str] = {
    "vtd_inv_desc": "invalidate desc type %s high 0x%lx low 0x%lx",
    "vtd_inv_qi_head": "read head %d",
    "vtd_inv_qi_tail": "write tail %d",
    "vtd_inv_qi_fetch": "",
    "vtd_reg_write": "addr 0x%lx size 0x%lx value 0x%lx",
    "vtd_reg_dmar_root": "addr 0x%lx scalable %d",
    "vtd_dmar_enable": "enable %d",
    "vtd_inv_desc_cc_device": "context invalidate device %02x:%02x.%02x",
    "vtd_inv_desc_iotlb_domain": "iotlb invalidate whole domain 0x%x",
    "vtd_inv_desc_wait_sw": "wait invalidate status write addr 0x%lx data 0x%x",
    "vtd_switch_address_space": "Device %02x:%02x.%x switching address space (iommu enabled=%d)",
    "vtd_iotlb_cc_update": "IOTLB context update bus 0x%x devfn 0x%x high 0x%lx low 0x%lx "
    "gen %u -> gen %u",
    "smmuv3_write_mmio": "addr: 0x%lx val:0x%lx size: 0x%x(%d)",
    "smmuv3_cmdq_consume": "prod=%d cons=%d prod.wrap=%d cons.wrap=%d",
    "smmuv3_cmdq_opcode": "<--- %s",
    "smmuv3_cmdq_cfgi_ste": "streamid= 0x%x",
    "smmuv3_translate_bypass": "%s sid=0x%x STE bypass iova:0x%lx is_write=%d",
    "smmuv3_translate_abort": "%s sid=0x%x abort on iova:0x%lx is_write=%d",
    "virtio_iommu_attach": "domain=%d endpoint=%d",
    "virtio_iommu_detach": "domain=%d endpoint=%d",
    "virtio_iommu_map": "domain=%d virt_start=0x%lx virt_end=0x%lx phys_start=0x%lx flags=%d",
    "virtio_iommu_unmap": "domain=%d virt_start=0x%lx virt_end=0x%lx",
    "virtio_iommu_unmap_done": "domain=%d virt_start=0x%lx virt_end=0x%lx",
    "virtio_iommu_get_domain": "Alloc domain=%d",
    "virtio_iommu_get_endpoint": "Alloc endpoint=%d",
    "virtio_iommu_fill_resv_property": "dev= %d, type=%d start=0x%lx end=0x%lx",
    "virtio_iommu_set_config": "bypass=0x%x",
    "virtio_iommu_switch_address_space": "Device %02x:%02x.%x switching address space "
    "(iommu enabled=%d)",
}
VERSIONS: dict[str, dict[str, str]] = {
    "7.2": {
        **COMMON,
        "smmuv3_translate_success": "%s sid=0x%x iova=0x%lx translated=0x%lx perm=0x%x",
        "smmuv3_cmdq_tlbi_nh": "",
        "virtio_iommu_get_config": "page_size_mask=0x%lx input range start=0x%lx input range "
        "end=0x%lx domain range start=%d domain range end=%d probe_size=0x%x bypass=0x%x",
    },
    "10.0": {
        **COMMON,
        "smmuv3_translate_success": "%s sid=0x%x iova=0x%lx translated=0x%lx perm=0x%x stage=%d",
        "smmuv3_cmdq_tlbi_nh": "vmid=%d",
        "virtio_iommu_get_config": "page_size_mask=0x%lx input range start=0x%lx input range "
        "end=0x%lx domain range start=%u domain range end=%u probe_size=0x%x bypass=0x%x",
    },
}


class Log:
    """A QEMU log being written: ``emit(event, *args)`` adds the line QEMU would print."""

    def __init__(self, version: str, *, stamp: bool, pid: int = 4242) -> None:
        self.formats = VERSIONS[version]
        self.stamp = stamp
        self.pid = pid
        self.clock = 1796303242_000000  # microseconds
        self.lines: list[str] = []

    def emit(self, event: str, *args: object) -> None:
        fmt = self.formats[event]
        # as C prints them: %d of a uint32_t >= 2^31 is negative, %u never is
        kinds = _SPEC.findall(fmt)
        values = tuple(
            a - (1 << 32) if k == "d" and isinstance(a, int) and 1 << 31 <= a < 1 << 32 else a
            for k, a in zip(kinds, args, strict=True)
        )
        fmt = fmt.replace("%lx", "%x").replace("%u", "%d")
        text = f"{event} {fmt % values}" if fmt else f"{event} "
        if self.stamp:
            self.clock += 37
            text = f"{self.pid}@{self.clock // 1_000_000}.{self.clock % 1_000_000:06d}:{text}"
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
