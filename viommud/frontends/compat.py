"""The compatibility policies every frontend takes (issue 13 §5): ``architecture``, the
default, reads the guest's input as the architecture or specification does; ``qemu``
reproduces what QEMU's model does with it where the two differ, in both directions (QEMU
accepts what the architecture refuses, or refuses what it accepts). Each model's doc lists
its differences: docs/smmuv3.md, docs/vtd.md and docs/virtio-iommu.md, "Compatibility
policy"."""

from __future__ import annotations

from typing import Any, Final

__all__ = ["ARCHITECTURE", "COMPAT_POLICIES", "QEMU", "compat_option"]

ARCHITECTURE: Final = "architecture"
QEMU: Final = "qemu"
COMPAT_POLICIES: Final = (ARCHITECTURE, QEMU)


def compat_option(options: dict[str, Any], model: str) -> str:
    """The ``compat`` of a vIOMMU's options (``architecture`` when absent); ValueError for
    another value."""
    value = options.get("compat", ARCHITECTURE)
    if value not in COMPAT_POLICIES:
        raise ValueError(f"{model} option 'compat' must be 'architecture' or 'qemu'")
    return str(value)
