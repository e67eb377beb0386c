"""Guest RAM a VMM passed, mapped into a nesting parent's IOAS at IOVA = GPA.

The stage 2 of a nested vIOMMU translates guest-physical addresses; its IOAS must hold the
guest's RAM at IOVA = GPA, as QEMU maps it through its memory listener. With the memfds
the VMM passed (``viommud.guest_memory``) each region is mapped with
``IOMMU_IOAS_MAP_FILE`` (fixed IOVA, read and write). Mapping an IOAS before the
NEST_PARENT HWPT is allocated on it pins nothing; allocating the HWPT pins every page
(``iopt_table_add_domain``), where a memfd that is too short fails (EINVAL).
"""

from __future__ import annotations

import contextlib

from protocols import iommufd as uapi
from viommud.backend.calls import BackendCallError, Iommufd
from viommud.guest_memory import RamRegion

__all__ = ["ParentRam"]

_RW = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE


class ParentRam:
    """The passed RAM regions of one vIOMMU and the backend numbers of their fds."""

    __slots__ = ("_iommufd", "_numbers", "regions")

    def __init__(self, iommufd: Iommufd, regions: tuple[RamRegion, ...]) -> None:
        self._iommufd = iommufd
        self.regions = regions
        self._numbers: dict[int, int] = {}  # OS fd -> number from import_fd

    def number(self, os_fd: int) -> int:
        """The backend's number for ``os_fd`` (imported on first use)."""
        number = self._numbers.get(os_fd)
        if number is None:
            number = self._numbers[os_fd] = self._iommufd.import_fd(os_fd)
        return number

    def new_ioas(self, iommu: str) -> int:
        """A new IOAS holding the regions at IOVA = GPA (none: an empty one); on a failure
        nothing is left of it and the error is raised."""
        ioas_id = self._iommufd.ioas_alloc(iommu)
        if self.regions:
            try:
                self.map_into(iommu, ioas_id)
            except BackendCallError:
                with contextlib.suppress(BackendCallError):  # the first error is reported
                    self._iommufd.destroy(iommu, ioas_id)
                raise
        return ioas_id

    def map_into(self, iommu: str | None, ioas_id: int) -> None:
        """Map every region at IOVA = GPA; on a failure undo the ones mapped and raise."""
        done: list[RamRegion] = []
        try:
            for region in self.regions:
                self._iommufd.ioas_map_file(
                    iommu,
                    ioas_id,
                    self.number(region.fd),
                    region.offset,
                    region.size,
                    iova=region.gpa,
                    flags=_RW,
                )
                done.append(region)
        except BackendCallError:
            for region in done:
                with contextlib.suppress(BackendCallError):
                    self._iommufd.ioas_unmap(iommu, ioas_id, region.gpa, region.size)
            raise

    def close(self) -> None:
        """Forget the imported numbers (the session keeps and closes the OS fds)."""
        for number in self._numbers.values():
            self._iommufd.close_imported(number)
        self._numbers.clear()
