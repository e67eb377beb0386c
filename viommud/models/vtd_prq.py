"""VT-d page requests for the guest (docs/vtd.md, "Page requests"; docs/protocol.md §10).

What the kernel gives userspace for a nested VT-d domain: mainline has no vEVENTQ type for
VT-d (``enum iommu_veventq_type`` lists ARM_SMMUV3 and TEGRA241_CMDQV only), so DMA
remapping faults of the guest's devices (the fault recording registers) never leave the
host kernel. Page requests (PCIe PRI) do: a nested HWPT allocated with
IOMMU_HWPT_FAULT_ID_VALID sends its I/O page faults to an iommufd FAULT object
(``iommufd_fault_iopf_handler``); its fd reads ``struct iommu_hwpt_pgfault`` records, one
per page request, whole groups at a time, each group with a cookie for its response.

With HELLO ``events`` and the vIOMMU option ``prs`` (ECAP.PRS) the vIOMMU allocates one
FAULT object (IOMMU_FAULT_QUEUE_ALLOC), ties every stage-1 HWPT it allocates to it, and
turns each record into the 32-byte page request descriptor (``protocols.vtd.PAGE_REQUEST``)
the guest's page request queue would receive: the guest's source ID in place of the host
device, the PASID when the request carried one, the access, the group index and LPIG, the
page address. The daemon queues them (``GuestEventQueue``: depth and lost-events rule)
until they go out as EVENT frames.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from protocols import iommufd as uapi
from protocols.vtd import build_page_request
from viommud.backend.calls import BackendCallError, Iommufd
from viommud.events import PageResponse
from viommud.models.eventq import GuestEventQueue
from viommud.topology.vtd import VtdTopology

PGFAULT_SIZE = 40  # struct iommu_hwpt_pgfault
_READ = PGFAULT_SIZE * 64  # a read takes whole groups that fit


@dataclass(slots=True)
class PageRequests:
    """A VT-d vIOMMU's FAULT object and the page requests read from it."""

    iommufd: Iommufd
    fault_id: int
    fd: int
    queue: GuestEventQueue
    # cookie of each group read and not yet answered, by (guest source ID, PASID, PRGI)
    cookies: dict[tuple[int, int | None, int], int] = field(default_factory=dict)

    @classmethod
    def open(cls, iommufd: Iommufd, depth: int) -> PageRequests:
        fault_id, fd = iommufd.fault_queue_alloc()
        return cls(iommufd, fault_id, fd, GuestEventQueue(depth))

    def read(self, topology: VtdTopology) -> None:
        """Read what the FAULT fd holds into the queue (a record of a device this vIOMMU no
        longer has is dropped: its source ID is gone)."""
        guests = {vdev.bound.dev_id: vdev for vdev in topology.vdevices.values()}
        while data := self.iommufd.read_events(self.fd, _READ):
            for at in range(0, len(data) - PGFAULT_SIZE + 1, PGFAULT_SIZE):
                fault = uapi.decode(uapi.HwptPgfault, data[at : at + PGFAULT_SIZE])
                vdev = guests.get(fault.dev_id)
                if vdev is None:
                    continue
                pasid = fault.pasid if fault.flags & uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID else None
                last = bool(fault.flags & uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE)
                if last:
                    self.cookies[(vdev.vid, pasid, fault.grpid)] = fault.cookie
                self.queue.report(vdev.iommu, page_request(vdev.vid, fault, pasid, last))

    def respond(self, responses: list[PageResponse]) -> list[PageResponse]:
        """Forward the guest's page group responses to the kernel (``write(2)`` of
        ``iommu_hwpt_page_response``: the cookie of the group, SUCCESS for response code 0,
        INVALID for any other: the uAPI has no Response Failure). Returns the responses
        that answer no group read from the FAULT fd (ignored: nothing waits on the host)."""
        stray: list[PageResponse] = []
        out = bytearray()
        for response in responses:
            cookie = self.cookies.pop((response.rid, response.pasid, response.prgi), None)
            if cookie is None:
                stray.append(response)
                continue
            code = (
                uapi.IOMMUFD_PAGE_RESP_SUCCESS
                if response.code == 0
                else uapi.IOMMUFD_PAGE_RESP_INVALID
            )
            out += uapi.encode(uapi.HwptPageResponse(cookie=cookie, code=code))
        if out:
            self.iommufd.write_responses(self.fd, bytes(out))
        return stray

    def close(self) -> None:
        """Close the fd (the kernel answers the groups still pending) and free the FAULT
        object: after the HWPTs that held it."""
        self.iommufd.close_event_fd(self.fd)
        with contextlib.suppress(BackendCallError):  # else closing the iommufd frees it
            self.iommufd.destroy(None, self.fault_id)


def page_request(rid: int, fault: uapi.HwptPgfault, pasid: int | None, last: bool) -> bytes:
    """The guest's page request descriptor for one ``iommu_hwpt_pgfault``."""
    perm = fault.perm
    return build_page_request(
        rid=rid & 0xFFFF,
        pp=int(pasid is not None),
        pasid=pasid or 0,
        exe_req=int(bool(perm & uapi.IOMMU_PGFAULT_PERM_EXEC)),
        pm_req=int(bool(perm & uapi.IOMMU_PGFAULT_PERM_PRIV)),
        rd_req=int(bool(perm & uapi.IOMMU_PGFAULT_PERM_READ)),
        wr_req=int(bool(perm & uapi.IOMMU_PGFAULT_PERM_WRITE)),
        lpig=int(last),
        prgi=fault.grpid & 0x1FF,
        addr=fault.addr >> 12,
    )
