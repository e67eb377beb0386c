"""The capture kit: boots an unmodified Debian kernel under QEMU (TCG) behind an emulated
SMMUv3, Intel VT-d or virtio-iommu, runs an I/O workload, and keeps QEMU's trace log, a
dump of the guest's invalidation queue and of its translation tables (docs/capture.md).

Not part of the daemon: nothing in viommud/ or protocols/ imports it.
"""
