"""The SMMUv3 command-queue frontend: a sans-I/O state machine (h11 style).

``receive_data(doorbell)`` takes the 16-byte CMDQ entries the guest published with one
CMDQ_PROD write; ``next_event()`` returns the intermediate-form events (viommud.events) one
by one, then ``NEED_DATA``. The frontend never calls a backend and never logs: it applies the
guest-visible rules of the emulated SMMU and keeps the guest-visible state (the stream
table contents the guest wrote, per-opcode and per-error counters). What the dispatcher
needs of that state travels in the events: a ``StreamTableInvalidated`` carries the STEs of
its range. Failures found downstream come back through one call, ``host_failed``; plain
doorbells taken in bulk (group commit) are counted through ``took_plain``.

Guest-visible rules (SMMUv3 §4.1.3 command errors, reference smmuv3.md §2.3):
* CERROR_ILL for an unknown opcode, a command for a feature this vSMMU does not advertise,
  a non-zero reserved field, SSec=1 on the Non-secure queue, or a reserved encoding
  (CMD_SYNC CS=0b11, ATC_INV Size > 52, range-invalidation encodings listed in
  ``_check_range``). The queue stops at the bad entry; the replay then continues after it,
  as a Linux guest that acknowledges the error and skips the entry does (docs/trace-format.md §2.5).
* The emulated vSMMU is an accelerated, stage-1-only SMMU like QEMU's ``accel=on``:
  IDR0.S2P=0, HYP=0, PRI=0, STALL_MODEL=0b01 (no stall), MSI=0, no MPAM, no DPT,
  IDR3.RIL as configured, IDR0.ATS as configured.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from protocols.smmuv3 import CERROR_ILL, COMMAND_SIZE, SSEC_OPS, STE_SIZE, Opcode
from viommud.events import (
    Barrier,
    Cache,
    Event,
    GuestError,
    Invalidation,
    Scope,
    StreamTableInvalidated,
    new_invalidation,
)
from viommud.frontends.compat import ARCHITECTURE, QEMU, compat_option
from viommud.guest.smmuv3 import COMMAND, DEFINED, kind_name

NEED_DATA: Final = None  # what next_event() returns once the doorbell is fully consumed


ATC_INV_SIZE_ALL = 52

_SYNC_DEFINED = DEFINED[Opcode.CMD_SYNC]
_TLBI_NH_VA = int(Opcode.TLBI_NH_VA)

# Commands this vSMMU recognises but does not implement, with the reason given to the guest.
_NO_HYP = "EL2 TLB invalidation needs IDR0.HYP, which this vSMMU does not advertise"
_SECURE_ONLY = "Secure command on the Non-secure queue"
_NO_S2 = "stage-2 invalidation on a stage-1-only vSMMU (IDR0.S2P=0)"
_NO_DPT = "DPT invalidation needs DPT support, which this vSMMU does not advertise"
_UNSUPPORTED: Final[dict[int, str]] = {
    Opcode.CFGI_VMS_PIDM: "CFGI_VMS_PIDM needs MPAM, which this vSMMU does not advertise",
    Opcode.TLBI_EL3_ALL: _SECURE_ONLY,
    Opcode.TLBI_EL3_VA: _SECURE_ONLY,
    Opcode.TLBI_EL2_ALL: _NO_HYP,
    Opcode.TLBI_EL2_ASID: _NO_HYP,
    Opcode.TLBI_EL2_VA: _NO_HYP,
    Opcode.TLBI_EL2_VAA: _NO_HYP,
    Opcode.TLBI_S12_VMALL: _NO_S2,
    Opcode.TLBI_S2_IPA: _NO_S2,
    Opcode.PRI_RESP: "PRI_RESP needs IDR0.PRI, which this vSMMU does not advertise",
    Opcode.RESUME: "RESUME needs stall support (IDR0.STALL_MODEL=0b01: none)",
    Opcode.STALL_TERM: "STALL_TERM needs stall support (IDR0.STALL_MODEL=0b01: none)",
    Opcode.TLBI_S_EL2_ALL: _SECURE_ONLY,
    Opcode.TLBI_S_EL2_ASID: _SECURE_ONLY,
    Opcode.TLBI_S_EL2_VA: _SECURE_ONLY,
    Opcode.TLBI_S_EL2_VAA: _SECURE_ONLY,
    Opcode.TLBI_S_S12_VMALL: _SECURE_ONLY,
    Opcode.TLBI_S_S2_IPA: _SECURE_ONLY,
    Opcode.TLBI_SNH_ALL: _SECURE_ONLY,
    Opcode.DPTI_ALL: _NO_DPT,
    Opcode.DPTI_PA: _NO_DPT,
}

# Under the ``qemu`` policy: commands QEMU's smmuv3_cmdq_consume accepts with only a trace
# event (trace_smmuv3_unhandled_cmd), whatever their fields: accepted, nothing done.
QEMU_IGNORED: Final = frozenset(
    {
        Opcode.TLBI_EL3_ALL,
        Opcode.TLBI_EL3_VA,
        Opcode.TLBI_EL2_ALL,
        Opcode.TLBI_EL2_ASID,
        Opcode.TLBI_EL2_VA,
        Opcode.TLBI_EL2_VAA,
        Opcode.PRI_RESP,
        Opcode.RESUME,
        Opcode.STALL_TERM,
    }
)


class FrameError(ValueError):
    """The doorbell itself is malformed (not a whole number of commands); ``data`` is it."""

    def __init__(self, message: str, data: bytes) -> None:
        super().__init__(message)
        self.data = data


@dataclass(frozen=True, slots=True)
class SmmuFeatures:
    """What this vSMMU advertises to the guest (its ID registers)."""

    ril: bool = True  # IDR3.RIL: range invalidation (TG/NUM/SCALE/TTL)
    ats: bool = True  # IDR0.ATS: ATC_INV accepted
    # How commands the architecture refuses but QEMU accepts are treated (docs/smmuv3.md,
    # "Compatibility policy"): "architecture" (CERROR_ILL) or "qemu" (as QEMU does).
    compat: str = ARCHITECTURE

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SmmuFeatures:
        unknown = set(options) - {"ril", "ats", "compat"}
        if unknown:
            raise ValueError(f"unknown smmuv3 options: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key in ("ril", "ats"):
            if key in options:
                if not isinstance(options[key], bool):
                    raise ValueError(f"smmuv3 option {key!r} must be a boolean")
                values[key] = options[key]
        values["compat"] = compat_option(options, "smmuv3")
        return cls(**values)


@dataclass(slots=True)
class DoorbellSummary:
    """What the last doorbell did, for the reply: entries consumed and syncs completed."""

    consumed: int = 0
    syncs: int = 0


def _field(word: int, lo: int, width: int) -> int:
    return (word >> lo) & ((1 << width) - 1)


@dataclass(slots=True)
class SmmuV3Frontend:
    """One vSMMU's command queue, as the guest sees it."""

    features: SmmuFeatures = field(default_factory=SmmuFeatures)
    # The guest's stream table: the last STE written for each vSID (``ste`` records).
    stream_table: dict[int, bytes] = field(default_factory=dict)
    # Commands seen per opcode (all of them, good or bad) and errors per code.
    opcode_counts: list[int] = field(default_factory=lambda: [0] * 256)
    error_counts: dict[str, int] = field(default_factory=dict)
    barriers: int = 0
    last: DoorbellSummary = field(default_factory=DoorbellSummary)
    _events: deque[Event] = field(default_factory=deque)

    model: ClassVar[str] = "smmuv3"

    # -- guest memory -------------------------------------------------------------------
    def write_ste(self, vsid: int, data: bytes) -> None:
        """The guest wrote ``data`` as the STE of ``vsid`` (SMMUv3 §5.2)."""
        if len(data) != STE_SIZE:
            raise FrameError(f"an STE is {STE_SIZE} bytes, got {len(data)}", data)
        self.stream_table[vsid] = bytes(data)

    # -- sans-I/O verbs -----------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Consume one doorbell's commands; events become available from next_event()."""
        if len(data) % COMMAND_SIZE:
            raise FrameError(
                f"a CMDQ doorbell is a whole number of {COMMAND_SIZE}-byte commands, "
                f"got {len(data)} bytes",
                bytes(data),
            )
        events = self._events
        append = events.append
        counts = self.opcode_counts
        handlers = _HANDLERS
        if self.features.compat == QEMU:
            handlers = _QEMU_HANDLERS
            data = _qemu_fields(data)
        syncs = 0
        for index, (w0, w1) in enumerate(COMMAND.iter_unpack(data)):
            opcode = w0 & 0xFF
            counts[opcode] += 1
            handler = handlers.get(opcode)
            event = (
                handler(self, index, w0, w1)
                if handler is not None
                else self._illegal(index, w0, w1, f"unknown opcode 0x{opcode:02x}")
            )
            if event is None:
                continue
            if type(event) is Barrier:
                syncs += 1
            append(event)
        self.barriers += syncs
        self.last = DoorbellSummary(len(data) // COMMAND_SIZE, syncs)

    def next_event(self) -> Event | None:
        """The next event of the doorbell, or NEED_DATA when it is fully consumed."""
        events = self._events
        return events.popleft() if events else NEED_DATA

    def events(self) -> list[Event]:
        """Drain every pending event at once (the dispatcher plans per doorbell)."""
        out = list(self._events)
        self._events.clear()
        return out

    def host_failed(self, errors: Iterable[GuestError]) -> None:
        """Count the guest-visible errors the host caused (``Outcome.host_errors``): commands
        this frontend let through that a host call then refused."""
        counts = self.error_counts
        for error in errors:
            counts[error.code] = counts.get(error.code, 0) + 1

    def took_plain(self, commands: bytes, syncs: int, last: DoorbellSummary) -> None:
        """Count plain doorbells that were taken in bulk (viommud.group_commit.smmuv3_screen)
        as ``receive_data`` would have counted them one by one: ``commands`` are theirs, back
        to back (valid TLB invalidations and CMD_SYNCs only), ``syncs`` the CMD_SYNCs among
        them, ``last`` the summary of the last doorbell."""
        opcodes = commands[::COMMAND_SIZE]  # W0[7:0] is each command's first byte
        counts = self.opcode_counts
        for op in set(opcodes):
            counts[op] += opcodes.count(op)
        self.barriers += syncs
        self.last = last

    def kind_counts(self) -> dict[str, int]:
        """Commands seen, keyed ``smmuv3:NAME`` as the replay report wants."""
        return {f"smmuv3:{kind_name(op)}": n for op, n in enumerate(self.opcode_counts) if n}

    # -- per-opcode rules ---------------------------------------------------------------
    def _illegal(self, index: int, w0: int, w1: int, reason: str) -> GuestError:
        counts = self.error_counts
        counts[CERROR_ILL] = counts.get(CERROR_ILL, 0) + 1
        return GuestError(index, CERROR_ILL, reason, COMMAND.pack(w0, w1))

    def _common_checks(self, index: int, w0: int, w1: int) -> GuestError | None:
        opcode = w0 & 0xFF
        defined = DEFINED.get(opcode)
        if defined is None:
            return self._illegal(index, w0, w1, f"unknown opcode 0x{opcode:02x}")
        unsupported = _UNSUPPORTED.get(opcode)
        if unsupported is not None:
            return self._illegal(index, w0, w1, unsupported)
        m0, m1 = defined
        if w0 & ~m0 or w1 & ~m1:
            return self._illegal(
                index,
                w0,
                w1,
                f"reserved bits set: W0 0x{w0 & ~m0 & 0xFFFFFFFFFFFFFFFF:016x} "
                f"W1 0x{w1 & ~m1 & 0xFFFFFFFFFFFFFFFF:016x}",
            )
        if opcode in SSEC_OPS and w0 & (1 << 10):
            return self._illegal(index, w0, w1, "SSec=1 on the Non-secure command queue")
        return None

    def _check_range(self, index: int, w0: int, w1: int) -> GuestError | None:
        """Range-invalidation encodings (SMMUv3 §4.4.1.1, IDR3.RIL)."""
        num, scale = _field(w0, 12, 5), _field(w0, 20, 5)
        ttl, tg = _field(w1, 8, 2), _field(w1, 10, 2)
        if self.features.compat == QEMU:
            return None  # smmuv3_range_inval takes any encoding (see _qemu_range)
        if tg == 0:
            if num or scale or ttl:
                return self._illegal(index, w0, w1, "NUM/SCALE/TTL set with TG=0")
            return None
        if not self.features.ril:
            return self._illegal(index, w0, w1, "range invalidation without IDR3.RIL")
        if ttl == 0 and num == 0 and scale == 0:
            return self._illegal(index, w0, w1, "reserved range encoding TTL=0 NUM=0 SCALE=0")
        if tg == 2 and ttl == 1:
            return self._illegal(index, w0, w1, "TTL=1 with a 16KB granule")
        return None

    def _on_prefetch(self, index: int, w0: int, w1: int) -> Event | None:
        # PREFETCH_* (§4.2) are hints: accepted, nothing to forward.
        return self._common_checks(index, w0, w1)

    def _on_cfgi_ste(self, index: int, w0: int, w1: int) -> Event | None:
        error = self._common_checks(index, w0, w1)
        if error is not None:
            return error
        sid = w0 >> 32
        ste = self.stream_table.get(sid)
        stes = () if ste is None else ((sid, ste),)
        return StreamTableInvalidated(index, sid, sid, COMMAND.pack(w0, w1), stes)

    def _on_cfgi_ste_range(self, index: int, w0: int, w1: int) -> Event | None:
        error = self._common_checks(index, w0, w1)
        if error is not None:
            return error
        span_log2 = _field(w1, 0, 5) + 1  # §4.3.2: 2^(Range+1) STEs; Range=31 is CFGI_ALL
        if span_log2 >= 32:
            first, last = 0, 0xFFFFFFFF
        else:
            first = (w0 >> 32) & ~((1 << span_log2) - 1)
            last = first + (1 << span_log2) - 1
        stes = tuple(sorted((s, ste) for s, ste in self.stream_table.items() if first <= s <= last))
        return StreamTableInvalidated(index, first, last, COMMAND.pack(w0, w1), stes)

    def _on_cfgi_cd(self, index: int, w0: int, w1: int) -> Event | None:
        error = self._common_checks(index, w0, w1)
        if error is not None:
            return error
        return Invalidation(
            index,
            Cache.CONFIG,
            Scope.DEVICE,
            device=w0 >> 32,
            asid=_field(w0, 12, 20),  # SSID: the CD index
            leaf=bool(w1 & 1),
            raw=COMMAND.pack(w0, w1),
        )

    def _on_cfgi_cd_all(self, index: int, w0: int, w1: int) -> Event | None:
        error = self._common_checks(index, w0, w1)
        if error is not None:
            return error
        return Invalidation(
            index, Cache.CONFIG, Scope.DEVICE, device=w0 >> 32, raw=COMMAND.pack(w0, w1)
        )

    def _on_tlbi_all(self, index: int, w0: int, w1: int) -> Event | None:
        error = self._common_checks(index, w0, w1)
        if error is not None:
            return error
        return Invalidation(index, Cache.TLB, Scope.ALL, raw=COMMAND.pack(w0, w1))

    def _on_tlbi_asid(self, index: int, w0: int, w1: int) -> Event | None:
        error = self._common_checks(index, w0, w1)
        if error is not None:
            return error
        return Invalidation(index, Cache.TLB, Scope.ASID, asid=w0 >> 48, raw=COMMAND.pack(w0, w1))

    def _on_tlbi_va(self, index: int, w0: int, w1: int) -> Event | None:
        # Hot path: TLBI_NH_VA/VAA have no SSec and are supported, so the common checks
        # reduce to the reserved bits; the slow path words the error.
        m0, m1 = DEFINED[w0 & 0xFF]
        if w0 & ~m0 or w1 & ~m1:
            return self._common_checks(index, w0, w1)
        features = self.features
        tg = (w1 >> 10) & 3
        num, scale = (w0 >> 12) & 0x1F, (w0 >> 20) & 0x1F
        # _check_range is called only when it could refuse: a single address (TG=0) with
        # NUM/SCALE/TTL set, or a range without RIL / reserved TTL=NUM=SCALE=0 / 16 KB TTL=1
        if features.compat == QEMU:
            w0, w1 = _qemu_range(w0, w1)
            tg = (w1 >> 10) & 3
            num, scale = (w0 >> 12) & 0x1F, (w0 >> 20) & 0x1F
        elif (
            (num or scale or w1 & 0x300)  # TG=0: a single address needs all three 0
            if not tg
            else not (
                features.ril
                and (num or scale or w1 & 0x300)
                and not (tg == 2 and (w1 >> 8) & 3 == 1)
            )
        ):
            error = self._check_range(index, w0, w1)
            if error is not None:
                return error
        addr = w1 & ~0xFFF & 0xFFFFFFFFFFFFFFFF
        if tg:
            granule = 1 << (tg * 2 + 10)
            size = ((num + 1) << scale) * granule
        else:
            granule, size = 0, 1 << 12  # a single address: every entry that contains it
        return new_invalidation(
            index,
            Cache.TLB,
            Scope.RANGE,
            None,
            (w0 >> 48) if w0 & 0xFF == _TLBI_NH_VA else None,
            addr,
            size,
            granule,
            bool(w1 & 1),
            COMMAND.pack(w0, w1),
        )

    def _on_atc_inv(self, index: int, w0: int, w1: int) -> Event | None:
        error = self._common_checks(index, w0, w1)
        if error is not None:
            return error
        qemu = self.features.compat == QEMU
        if not self.features.ats:
            if qemu:
                return None  # QEMU: accepted, nothing done; no device has an ATC
            return self._illegal(index, w0, w1, "ATC_INV without IDR0.ATS")
        size_log2 = _field(w1, 0, 6)
        if size_log2 > ATC_INV_SIZE_ALL:
            if not qemu:
                return self._illegal(index, w0, w1, f"ATC_INV Size {size_log2} > 52")
            size_log2 = ATC_INV_SIZE_ALL  # accepted as QEMU does: the whole ATC
            w1 = w1 & ~0x3F | ATC_INV_SIZE_ALL
        if size_log2 == ATC_INV_SIZE_ALL:
            addr, size = 0, 0
        else:
            size = 1 << (12 + size_log2)  # §4.5.1: 2^Size pages of 4KB, aligned to the span
            addr = (w1 & ~0xFFF) & ~(size - 1) & 0xFFFFFFFFFFFFFFFF
        ssv = bool(w0 & (1 << 11))
        return Invalidation(
            index,
            Cache.DEVICE_TLB,
            Scope.DEVICE,
            device=w0 >> 32,
            asid=_field(w0, 12, 20) if ssv else None,
            addr=addr,
            size=size,
            raw=COMMAND.pack(w0, w1),
        )

    def _on_sync(self, index: int, w0: int, w1: int) -> Event | None:
        if w0 & ~_SYNC_DEFINED[0] or w1 & ~_SYNC_DEFINED[1]:
            return self._common_checks(index, w0, w1)  # words the reserved-bits error
        if (w0 >> 12) & 3 == 3 and self.features.compat != QEMU:
            return self._illegal(index, w0, w1, "CMD_SYNC CS=0b11 is reserved")
        return Barrier(index)

    def _on_unsupported(self, index: int, w0: int, w1: int) -> Event | None:
        return self._common_checks(index, w0, w1)

    def _on_qemu_ignored(self, index: int, w0: int, w1: int) -> Event | None:
        return None  # QEMU: trace_smmuv3_unhandled_cmd, nothing else


def _qemu_fields(data: bytes) -> bytes:
    """The commands with their reserved bits cleared: QEMU reads each command's fields and
    ignores the rest, so a reserved bit changes nothing there (nor, cleared, on the host)."""
    out = []
    for w0, w1 in COMMAND.iter_unpack(data):
        defined = DEFINED.get(w0 & 0xFF)
        out.append(
            COMMAND.pack(w0, w1)
            if defined is None
            else COMMAND.pack(w0 & defined[0], w1 & defined[1])
        )
    return b"".join(out)


def _qemu_range(w0: int, w1: int) -> tuple[int, int]:
    """A TLBI_NH_VA/VAA encoding the architecture refuses, as a valid one that invalidates
    at least what QEMU's smmuv3_range_inval does (the host queue takes only valid ones):
    TG=0 drops NUM/SCALE/TTL (QEMU: one address); with TG != 0 and no IDR3.RIL the range
    is kept (QEMU always advertises RIL); TTL=0 NUM=0 SCALE=0 becomes the TG=0 form (every
    entry holding the address, a superset of its one granule); TTL=1 with a 16KB granule
    drops TTL (any level)."""
    num, scale = _field(w0, 12, 5), _field(w0, 20, 5)
    ttl, tg = _field(w1, 8, 2), _field(w1, 10, 2)
    ranges = 0x1F << 12 | 0x1F << 20
    if tg == 0 or (ttl == 0 and num == 0 and scale == 0):
        return w0 & ~ranges, w1 & ~(0xF << 8)
    if tg == 2 and ttl == 1:
        return w0, w1 & ~(0x3 << 8)
    return w0, w1


_Handler = Any  # Callable[[SmmuV3Frontend, int, int, int], Event | None]

_HANDLERS: Final[dict[int, _Handler]] = {
    Opcode.PREFETCH_CONFIG: SmmuV3Frontend._on_prefetch,
    Opcode.PREFETCH_ADDR: SmmuV3Frontend._on_prefetch,
    Opcode.CFGI_STE: SmmuV3Frontend._on_cfgi_ste,
    Opcode.CFGI_STE_RANGE: SmmuV3Frontend._on_cfgi_ste_range,
    Opcode.CFGI_CD: SmmuV3Frontend._on_cfgi_cd,
    Opcode.CFGI_CD_ALL: SmmuV3Frontend._on_cfgi_cd_all,
    Opcode.TLBI_NH_ALL: SmmuV3Frontend._on_tlbi_all,
    Opcode.TLBI_NH_ASID: SmmuV3Frontend._on_tlbi_asid,
    Opcode.TLBI_NH_VA: SmmuV3Frontend._on_tlbi_va,
    Opcode.TLBI_NH_VAA: SmmuV3Frontend._on_tlbi_va,
    Opcode.TLBI_NSNH_ALL: SmmuV3Frontend._on_tlbi_all,
    Opcode.ATC_INV: SmmuV3Frontend._on_atc_inv,
    Opcode.CMD_SYNC: SmmuV3Frontend._on_sync,
    **dict.fromkeys(_UNSUPPORTED, SmmuV3Frontend._on_unsupported),
}
_QEMU_HANDLERS: Final[dict[int, _Handler]] = {
    **_HANDLERS,
    **dict.fromkeys(QEMU_IGNORED, SmmuV3Frontend._on_qemu_ignored),
}
