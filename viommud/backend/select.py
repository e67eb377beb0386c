"""Choosing a backend: ``--backend {emulated,iommufd,auto}``.

``auto`` (the command line's default) takes the real /dev/iommu when the device node
exists and the emulator otherwise; ``iommufd`` insists on the real one and fails with
``BackendUnavailable`` (the CLI's exit status 2) when it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from viommud.backend.base import Backend
from viommud.host import HostConfig

__all__ = [
    "BACKENDS",
    "DEV_IOMMU",
    "BackendUnavailable",
    "backend_factory",
    "emulated_backend",
    "resolve",
]

DEV_IOMMU = "/dev/iommu"
BACKENDS = ("emulated", "iommufd", "auto")

BackendFactory = Callable[[HostConfig], Backend]


class BackendUnavailable(Exception):  # noqa: N818 - reads as the condition it reports
    """The requested backend cannot be used on this machine."""


def resolve(name: str, *, dev_iommu: str = DEV_IOMMU) -> str:
    """``emulated`` or ``iommufd`` for a ``--backend`` value."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r} (choose {', '.join(BACKENDS)})")
    present = os.path.exists(dev_iommu)
    if name == "auto":
        return "iommufd" if present else "emulated"
    if name == "iommufd" and not present:
        raise BackendUnavailable(
            f"--backend iommufd: {dev_iommu} does not exist (no iommufd in this kernel, "
            "or the device node is not visible here); use --backend emulated"
        )
    return name


def emulated_backend(host: HostConfig) -> Backend:
    """The emulated kernel for ``host`` (the default backend)."""
    from viommud.backend.emulator.kernel import EmulatedIommufd  # noqa: PLC0415 - keeps startup lean

    return EmulatedIommufd(host)


def preload(name: str) -> None:
    """Import what sessions on backend ``name`` will need (a spare session process does it
    before its client arrives); ``auto`` as ``resolve`` decides it, nothing for a name it
    refuses (the session reports that itself)."""
    try:
        name = resolve(name)
    except BackendUnavailable:
        return
    if name == "emulated":
        import viommud.backend.emulator.kernel  # noqa: F401, PLC0415 - the point


def backend_factory(name: str = "auto", *, dev_iommu: str = DEV_IOMMU) -> BackendFactory:
    """A ``host -> Backend`` factory for ``name``; raises ``BackendUnavailable``."""
    if resolve(name, dev_iommu=dev_iommu) == "emulated":
        return emulated_backend

    def real(host: HostConfig) -> Backend:
        from viommud.backend.real import RealIommufd  # noqa: PLC0415 - keeps startup lean

        return RealIommufd(host, path=dev_iommu)

    return real
