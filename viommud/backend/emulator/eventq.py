"""Event queues: IOMMU_VEVENTQ_ALLOC, IOMMU_FAULT_QUEUE_ALLOC and their fds (§1.8, §1.10).

Mirrors ``drivers/iommu/iommufd/eventq.c``: each queue comes with an anonymous fd that
holds it while open; ``read`` / ``write`` / ``poll`` stand for the fd's file operations
(vEVENT records with the lost-events header; fault groups out, page responses in).
"""

from __future__ import annotations

import errno
from dataclasses import replace

from protocols import iommufd as uapi
from viommud.backend.emulator.context import EventFile, IommufdContext
from viommud.backend.emulator.objects import FaultObject, VeventqObject, ViommuObject
from viommud.backend.emulator.usercopy import ENOERR, Call

__all__ = ["PAGE_RESPONSE_SIZE", "PGFAULT_SIZE", "EventqIoctls"]

PGFAULT_SIZE = 40
PAGE_RESPONSE_SIZE = 8


class EventqIoctls(IommufdContext):
    """The event-queue handlers and fd operations of ``EmulatedIommufd``."""

    # -- event fds: read(2) / write(2) / poll(2); close(2) is kernel.close_fd ------------
    def read(self, fd: int, count: int) -> tuple[int, bytes]:
        """``read(fd, count)`` on a vEVENTQ or FAULT fd: ``(errno, data)``."""
        file = self._event_files.get(fd)
        if file is None:
            return (errno.EINVAL if fd in self._files else errno.EBADF), b""
        obj = self._objects.get(file.obj_id)
        if isinstance(obj, VeventqObject):
            return ENOERR, obj.read(count)
        assert isinstance(obj, FaultObject)
        if count % PGFAULT_SIZE:
            return errno.ESPIPE, b""
        return ENOERR, self._fault_read(obj, count)

    def write(self, fd: int, data: bytes) -> tuple[int, int]:
        """``write(fd, data)``: page responses on a FAULT fd; ``(errno, bytes consumed)``."""
        file = self._event_files.get(fd)
        if file is None:
            return (errno.EINVAL if fd in self._files else errno.EBADF), 0
        obj = self._objects.get(file.obj_id)
        if not isinstance(obj, FaultObject):
            return errno.EINVAL, 0  # a vEVENTQ fd has no write
        if len(data) % PAGE_RESPONSE_SIZE:
            return errno.ESPIPE, 0
        done = 0
        while done < len(data):
            resp = uapi.decode(uapi.HwptPageResponse, data[done : done + PAGE_RESPONSE_SIZE])
            if resp.code not in (uapi.IOMMUFD_PAGE_RESP_SUCCESS, uapi.IOMMUFD_PAGE_RESP_INVALID):
                return (errno.EINVAL, 0) if not done else (ENOERR, done)
            if obj.response.pop(resp.cookie, None) is None:
                return (errno.EINVAL, 0) if not done else (ENOERR, done)
            done += PAGE_RESPONSE_SIZE
        return ENOERR, done

    def poll(self, fd: int) -> bool:
        """EPOLLIN: something to read on a vEVENTQ or FAULT fd."""
        file = self._event_files.get(fd)
        obj = self._objects.get(file.obj_id) if file else None
        return isinstance(obj, VeventqObject | FaultObject) and bool(obj.deliver)

    # -- IOMMU_VEVENTQ_ALLOC (§1.8) ----------------------------------------------------------
    def _ioctl_veventq_alloc(self, call: Call[uapi.VeventqAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags or cmd.reserved or cmd.type == uapi.IOMMU_VEVENTQ_TYPE_DEFAULT:
            return errno.EOPNOTSUPP
        if not cmd.veventq_depth:
            return errno.EINVAL
        viommu: ViommuObject = self._get(cmd.viommu_id, ViommuObject)
        if self._veventq(viommu, cmd.type) is not None:
            return errno.EEXIST
        queue = self._insert(
            lambda obj_id: VeventqObject(obj_id, viommu.id, cmd.type, cmd.veventq_depth)
        )
        fd = self._new_fd()
        if call.respond(replace(cmd, out_veventq_id=queue.id, out_veventq_fd=fd)):
            self._destroy(queue)  # pragma: no cover - respond cannot fault here
            return errno.EFAULT  # pragma: no cover
        self._event_files[fd] = EventFile(fd, queue.id)
        return ENOERR

    # -- IOMMU_FAULT_QUEUE_ALLOC (§1.10) -----------------------------------------------------
    def _ioctl_fault_queue_alloc(self, call: Call[uapi.FaultQueueAlloc]) -> int:
        cmd = call.cmd
        if cmd.flags:
            return errno.EOPNOTSUPP
        fault = self._insert(FaultObject)
        fd = self._new_fd()
        if call.respond(replace(cmd, out_fault_id=fault.id, out_fault_fd=fd)):
            self._destroy(fault)  # pragma: no cover - respond cannot fault here
            return errno.EFAULT  # pragma: no cover
        self._event_files[fd] = EventFile(fd, fault.id)
        return ENOERR

    def _fault_read(self, fault: FaultObject, count: int) -> bytes:
        """``iommufd_fault_fops_read``: whole groups that fit; each gets a cookie."""
        out = bytearray()
        while fault.deliver:
            group = fault.deliver[0]
            if len(group) * PGFAULT_SIZE > count - len(out):
                break
            del fault.deliver[0]
            cookie = 1
            while cookie in fault.response:
                cookie += 1
            fault.response[cookie] = group
            for item in group:
                out += uapi.encode(replace(item, cookie=cookie))
        return bytes(out)
