"""Typed calls on a backend, and the backend call log (docs/trace-format.md §5).

``Iommufd`` packs the kernel's structures (protocols.iommufd), issues them through a
``Backend`` and unpacks the written-back fields. Every call is counted by ioctl name and,
when asked, logged as one JSON-ready dict in issue order. A call that fails raises
``BackendCallError`` carrying the errno, except ``invalidate`` whose partial progress is part
of its result.
"""

from __future__ import annotations

import errno as errno_mod
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocols import iommufd as uapi
from viommud.backend.base import Backend

_ENTRY_NUM = struct.Struct("<I")
_ENTRY_NUM_OFFSET = 24  # iommu_hwpt_invalidate.entry_num (iommufd.md §2.1)
_INVALIDATE = uapi.HwptInvalidate.FORMAT
_IOAS_MAP = uapi.IoasMap.FORMAT
_IOAS_UNMAP = uapi.IoasUnmap.FORMAT
_U64 = struct.Struct("<Q")  # iommu_ioas_map.iova at 32, iommu_ioas_unmap.length at 16
_NO_PAYLOAD: dict[str, Any] = {}  # the payload of a call nobody keeps; never written to


class BackendCallError(Exception):
    """A backend call failed with ``errno``."""

    def __init__(self, ioctl: str, err: int, args: dict[str, Any]) -> None:
        name = errno_mod.errorcode.get(err, str(err))
        super().__init__(f"{ioctl} failed: {name}")
        self.ioctl = ioctl
        self.errno = err
        self.errno_name = name
        self.call_args = args


@dataclass(frozen=True, slots=True)
class InvalidateResult:
    """``IOMMU_HWPT_INVALIDATE``: errno and the written-back entry_num (entries handled)."""

    errno: int
    done: int


# Successful results by entry_num (frozen, so shared): a call's result is built per call.
_DONE: dict[int, InvalidateResult] = {}


@dataclass(slots=True)
class CallLog:
    """Counts every backend call; keeps the call log entries when ``keep`` is set."""

    keep: bool = False
    barrier: int = 0  # the guest barrier the current work belongs to (set by the dispatcher)
    seq: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    invalidation_entries: int = 0
    errnos: dict[str, int] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    # Called with every call's payload (the verification oracle listens here).
    listener: Callable[[str, int, dict[str, Any], str | None], None] | None = None
    # Called as (ioctl, errno name, physical IOMMU) for failed calls only (the server logs
    # them as ``backend_error``); free on the hot path.
    on_error: Callable[[str, str, str | None], None] | None = None

    @property
    def detailed(self) -> bool:
        """Whether callers must build the full payload (someone keeps or reads it)."""
        return self.keep or self.listener is not None

    def add(self, ioctl: str, err: int, payload: dict[str, Any], iommu: str | None) -> None:
        self.seq += 1
        self.calls[ioctl] = self.calls.get(ioctl, 0) + 1
        if err:
            name = errno_mod.errorcode.get(err, str(err))
            self.errnos[name] = self.errnos.get(name, 0) + 1
            if self.on_error is not None:
                self.on_error(ioctl, name, iommu)
        if self.keep:
            entry: dict[str, Any] = {
                "seq": self.seq,
                "barrier": self.barrier,
                "iommu": iommu,
                "ioctl": ioctl,
            }
            entry.update(payload)
            entry["errno"] = err
            self.entries.append(entry)
        if self.listener is not None:
            self.listener(ioctl, err, payload, iommu)

    def drain(self) -> list[dict[str, Any]]:
        out = self.entries
        self.entries = []
        return out


@dataclass(frozen=True, slots=True)
class BoundDevice:
    """A host device opened and bound to the iommufd."""

    name: str
    iommu: str
    fd: int
    dev_id: int


class Iommufd:
    """The iommufd calls viommud makes, with the kernel's structures underneath."""

    def __init__(self, backend: Backend, log: CallLog | None = None) -> None:
        self.backend = backend
        self.log = log if log is not None else CallLog()
        self._scratch = 0
        self._scratch_size = 0
        # Where ``bind`` finds a VFIO cdev fd the VMM passed for a device (the session's
        # guest resources hand it over, once); None or a None answer: open it by name.
        self.take_device_fd: Callable[[str], int | None] | None = None

    # -- plumbing -----------------------------------------------------------------------
    def _buffer(self, data: bytes) -> int:
        """Copy ``data`` into (reused) user memory; returns its address."""
        if len(data) > self._scratch_size:
            memory = self.backend.memory
            if self._scratch:
                memory.free(self._scratch)
            self._scratch_size = max(4096, 1 << (len(data) - 1).bit_length())
            self._scratch = memory.alloc(self._scratch_size)
        self.backend.memory.write(self._scratch, data)
        return self._scratch

    def _call(self, fd: int, request: int, obj: Any) -> tuple[int, Any]:
        arg = uapi.encode(obj)
        err = self.backend.ioctl(fd, request, arg)
        return err, uapi.decode(type(obj), arg)

    def _simple(
        self,
        iommu: str | None,
        fd: int,
        request: int,
        obj: Any,
        args: dict[str, Any],
        *,
        out_field: str | None = None,
    ) -> Any:
        err, out = self._call(fd, request, obj)
        name = uapi.IOCTL_NAMES[request]
        payload: dict[str, Any] = {"args": args}
        if out_field is not None and not err:
            payload["out"] = {out_field: getattr(out, out_field)}
        self.log.add(name, err, payload, iommu)
        if err:
            raise BackendCallError(name, err, args)
        return out

    # -- devices (VFIO cdev) --------------------------------------------------------------
    def bind(self, device: str, iommu: str) -> BoundDevice:
        """Open ``device`` (the cdev the VMM passed, if any, else by name) and bind it."""
        try:
            passed = self.take_device_fd(device) if self.take_device_fd is not None else None
            if passed is not None:
                self.backend.adopt_device(device, passed)  # the backend owns it from here
            fd = self.backend.open_device(device)
        except OSError as exc:
            err = exc.errno or errno_mod.ENODEV
            self.log.add("VFIO_DEVICE_BIND_IOMMUFD", err, {"args": {"device": device}}, iommu)
            raise BackendCallError("VFIO_DEVICE_BIND_IOMMUFD", err, {"device": device}) from None
        args = {"device": device}
        try:
            out = self._simple(
                iommu,
                fd,
                uapi.VFIO_DEVICE_BIND_IOMMUFD,
                uapi.VfioDeviceBindIommufd(iommufd=self.backend.iommufd),
                args,
                out_field="out_devid",
            )
        except BackendCallError:
            self.backend.close_device(fd)
            raise
        return BoundDevice(device, iommu, fd, out.out_devid)

    def unbind(self, dev: BoundDevice) -> None:
        self.backend.close_device(dev.fd)

    def attach(self, dev: BoundDevice, pt_id: int) -> None:
        self._simple(
            dev.iommu,
            dev.fd,
            uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            uapi.VfioDeviceAttachIommufdPt(pt_id=pt_id),
            {"dev_id": dev.dev_id, "pt_id": pt_id},
        )

    def detach(self, dev: BoundDevice) -> None:
        self._simple(
            dev.iommu,
            dev.fd,
            uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT,
            uapi.VfioDeviceDetachIommufdPt(),
            {"dev_id": dev.dev_id},
        )

    # -- iommufd objects ------------------------------------------------------------------
    def ioas_alloc(self, iommu: str | None = None) -> int:
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_IOAS_ALLOC,
            uapi.IoasAlloc(),
            {},
            out_field="out_ioas_id",
        )
        return int(out.out_ioas_id)

    def ioas_map(
        self,
        iommu: str | None,
        ioas_id: int,
        iova: int,
        length: int,
        *,
        user_va: int,
        readable: bool = True,
        writeable: bool = True,
        fixed_iova: bool = True,
    ) -> int:
        """``IOMMU_IOAS_MAP``; returns the IOVA (the kernel's choice without fixed_iova)."""
        flags = (
            (uapi.IOMMU_IOAS_MAP_FIXED_IOVA if fixed_iova else 0)
            | (uapi.IOMMU_IOAS_MAP_WRITEABLE if writeable else 0)
            | (uapi.IOMMU_IOAS_MAP_READABLE if readable else 0)
        )
        log = self.log
        if not (log.keep or log.listener is not None):
            # nobody reads the payload: the struct packed and its iova read back directly
            # (the same bytes, call and counts: tests/backend/test_ioas_exact.py)
            arg = bytearray(
                _IOAS_MAP.pack(_IOAS_MAP.size, flags, ioas_id, 0, user_va, length, iova)
            )
            err = self.backend.ioctl(self.backend.iommufd, uapi.IOMMU_IOAS_MAP, arg)
            log.add("IOMMU_IOAS_MAP", err, _NO_PAYLOAD, iommu)
            if err:
                raise BackendCallError(
                    "IOMMU_IOAS_MAP",
                    err,
                    {
                        "ioas_id": ioas_id,
                        "iova": iova,
                        "length": length,
                        "user_va": user_va,
                        "flags": flags,
                    },
                )
            return int(_U64.unpack_from(arg, 32)[0])
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_IOAS_MAP,
            uapi.IoasMap(flags=flags, ioas_id=ioas_id, user_va=user_va, length=length, iova=iova),
            {
                "ioas_id": ioas_id,
                "iova": iova,
                "length": length,
                "user_va": user_va,
                "flags": flags,
            },
            out_field="iova",
        )
        return int(out.iova)

    def ioas_map_file(
        self,
        iommu: str | None,
        ioas_id: int,
        fd: int,
        start: int,
        length: int,
        *,
        iova: int | None = None,
        flags: int = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE,
    ) -> int:
        """``IOMMU_IOAS_MAP_FILE`` of bytes ``[start, start + length)`` of ``fd`` (a number
        from ``import_fd``) at ``iova`` (FIXED_IOVA), or where the kernel chooses when
        ``iova`` is None; ``flags`` are the protection bits. Returns the IOVA."""
        flags &= uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
        if iova is not None:
            flags |= uapi.IOMMU_IOAS_MAP_FIXED_IOVA
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_IOAS_MAP_FILE,
            uapi.IoasMapFile(
                flags=flags,
                ioas_id=ioas_id,
                fd=fd,
                start=start,
                length=length,
                iova=iova if iova is not None else 0,
            ),
            {
                "ioas_id": ioas_id,
                "iova": iova,
                "length": length,
                "fd": fd,
                "start": start,
                "flags": flags,
            },
            out_field="iova",
        )
        return int(out.iova)

    def import_fd(self, os_fd: int) -> int:
        """``Backend.import_fd``: the number IOAS_MAP_FILE takes for ``os_fd`` (no ioctl,
        not logged)."""
        return self.backend.import_fd(os_fd)

    def close_imported(self, fd: int) -> None:
        """Forget a number ``import_fd`` returned (mappings made from it stay)."""
        self.backend.close_fd(fd)

    def ioas_unmap(self, iommu: str | None, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``; returns the bytes unmapped (iova 0, length 2^64-1: all)."""
        log = self.log
        if not (log.keep or log.listener is not None):  # as ioas_map
            arg = bytearray(_IOAS_UNMAP.pack(_IOAS_UNMAP.size, ioas_id, iova, length))
            err = self.backend.ioctl(self.backend.iommufd, uapi.IOMMU_IOAS_UNMAP, arg)
            log.add("IOMMU_IOAS_UNMAP", err, _NO_PAYLOAD, iommu)
            if err:
                raise BackendCallError(
                    "IOMMU_IOAS_UNMAP", err, {"ioas_id": ioas_id, "iova": iova, "length": length}
                )
            return int(_U64.unpack_from(arg, 16)[0])
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_IOAS_UNMAP,
            uapi.IoasUnmap(ioas_id=ioas_id, iova=iova, length=length),
            {"ioas_id": ioas_id, "iova": iova, "length": length},
            out_field="length",
        )
        return int(out.length)

    def hwpt_alloc(
        self,
        iommu: str,
        dev_id: int,
        pt_id: int,
        *,
        flags: int = 0,
        data_type: int = uapi.IOMMU_HWPT_DATA_NONE,
        data: bytes = b"",
        fault_id: int = 0,
    ) -> int:
        """``IOMMU_HWPT_ALLOC``; a ``fault_id`` sets IOMMU_HWPT_FAULT_ID_VALID: the domain's
        I/O page faults go to that FAULT object."""
        if fault_id:
            flags |= uapi.IOMMU_HWPT_FAULT_ID_VALID
        args: dict[str, Any] = {
            "flags": flags,
            "dev_id": dev_id,
            "pt_id": pt_id,
            "data_type": data_type,
        }
        if data:
            args["data"] = data.hex()
        if fault_id:
            args["fault_id"] = fault_id
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_HWPT_ALLOC,
            uapi.HwptAlloc(
                flags=flags,
                dev_id=dev_id,
                pt_id=pt_id,
                data_type=data_type,
                data_len=len(data),
                data_uptr=self._buffer(data) if data else 0,
                fault_id=fault_id,
            ),
            args,
            out_field="out_hwpt_id",
        )
        return int(out.out_hwpt_id)

    def viommu_alloc(self, iommu: str, dev_id: int, hwpt_id: int, viommu_type: int) -> int:
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_VIOMMU_ALLOC,
            uapi.ViommuAlloc(type=viommu_type, dev_id=dev_id, hwpt_id=hwpt_id),
            {"type": viommu_type, "dev_id": dev_id, "hwpt_id": hwpt_id},
            out_field="out_viommu_id",
        )
        return int(out.out_viommu_id)

    def vdevice_alloc(self, iommu: str, viommu_id: int, dev_id: int, virt_id: int) -> int:
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_VDEVICE_ALLOC,
            uapi.VdeviceAlloc(viommu_id=viommu_id, dev_id=dev_id, virt_id=virt_id),
            {"viommu_id": viommu_id, "dev_id": dev_id, "virt_id": virt_id},
            out_field="out_vdevice_id",
        )
        return int(out.out_vdevice_id)

    # -- vEVENTQ (iommufd uAPI IOMMU_VEVENTQ_ALLOC; docs/smmuv3.md, "Events") -------------
    def veventq_alloc(
        self, iommu: str, viommu_id: int, veventq_type: int, depth: int
    ) -> tuple[int, int]:
        """A vEVENTQ of ``veventq_type`` on ``viommu_id``: ``(object id, fd)``."""
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_VEVENTQ_ALLOC,
            uapi.VeventqAlloc(viommu_id=viommu_id, type=veventq_type, veventq_depth=depth),
            {"viommu_id": viommu_id, "type": veventq_type, "veventq_depth": depth},
            out_field="out_veventq_id",
        )
        return int(out.out_veventq_id), int(out.out_veventq_fd)

    # -- FAULT (iommufd uAPI IOMMU_FAULT_QUEUE_ALLOC; docs/vtd.md, "Page requests") -----
    def fault_queue_alloc(self, iommu: str | None = None) -> tuple[int, int]:
        """A FAULT object for I/O page faults: ``(object id, fd)``."""
        out = self._simple(
            iommu,
            self.backend.iommufd,
            uapi.IOMMU_FAULT_QUEUE_ALLOC,
            uapi.FaultQueueAlloc(),
            {},
            out_field="out_fault_id",
        )
        return int(out.out_fault_id), int(out.out_fault_fd)

    def read_events(self, fd: int, count: int) -> bytes:
        """``read(2)`` on a vEVENTQ or FAULT fd: whole records (header + payload) that fit in
        ``count``; empty when none is queued. Not a call-log entry (not an ioctl)."""
        err, data = self.backend.read(fd, count)
        if err:
            raise BackendCallError("read", err, {"fd": fd})
        return data

    def write_responses(self, fd: int, data: bytes) -> int:
        """``write(2)`` of ``iommu_hwpt_page_response`` records on a FAULT fd; returns the
        bytes the kernel took. Not a call-log entry (not an ioctl)."""
        err, done = self.backend.write(fd, data)
        if err:
            raise BackendCallError("write", err, {"fd": fd})
        return done

    def close_event_fd(self, fd: int) -> None:
        self.backend.close_fd(fd)

    def destroy(self, iommu: str | None, obj_id: int) -> None:
        self._simple(
            iommu, self.backend.iommufd, uapi.IOMMU_DESTROY, uapi.Destroy(id=obj_id), {"id": obj_id}
        )

    def invalidate(
        self,
        iommu: str,
        *,
        object_kind: str,
        object_id: int,
        data_type: int,
        entry_len: int,
        entries: list[bytes],
    ) -> InvalidateResult:
        """One ``IOMMU_HWPT_INVALIDATE`` array call; never raises for an errno."""
        return self.invalidate_array(
            iommu,
            object_kind=object_kind,
            object_id=object_id,
            data_type=data_type,
            entry_len=entry_len,
            array=b"".join(entries),
            count=len(entries),
        )

    def invalidate_array(
        self,
        iommu: str,
        *,
        object_kind: str,
        object_id: int,
        data_type: int,
        entry_len: int,
        array: bytes,
        count: int | None = None,
    ) -> InvalidateResult:
        """``invalidate`` with the entries already laid out back to back in ``array``
        (``count`` of them; by default as many as fit)."""
        if count is None:
            count = len(array) // entry_len
        # The hot path packs struct iommu_hwpt_invalidate directly (same FORMAT as
        # uapi.HwptInvalidate) and reads back entry_num, the one field the kernel writes.
        arg = bytearray(
            _INVALIDATE.pack(
                _INVALIDATE.size,
                object_id,
                self._buffer(array) if array else 0,
                data_type,
                entry_len,
                count,
                0,
            )
        )
        backend = self.backend
        err = backend.ioctl(backend.iommufd, uapi.IOMMU_HWPT_INVALIDATE, arg)
        done: int = _ENTRY_NUM.unpack_from(arg, _ENTRY_NUM_OFFSET)[0]
        log = self.log
        log.invalidation_entries += count
        if log.keep or log.listener is not None:  # CallLog.detailed
            payload: dict[str, Any] = {
                "object": {"kind": object_kind, "id": object_id},
                "data_type": uapi.INVALIDATE_DATA_NAMES.get(data_type, str(data_type)),
                "entries": [
                    array[at : at + entry_len].hex() for at in range(0, len(array), entry_len)
                ],
                "entry_num": done,
            }
        else:
            payload = _NO_PAYLOAD  # nobody reads it (CallLog.add: neither kept nor listened)
        log.add("IOMMU_HWPT_INVALIDATE", err, payload, iommu)
        if err:
            return InvalidateResult(err, done)
        result = _DONE.get(done)
        if result is None:
            result = InvalidateResult(0, done)
            if len(_DONE) < 4096:
                _DONE[done] = result
        return result
