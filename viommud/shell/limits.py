"""What one client may cost the daemon: the ``serve`` limits (docs/operations.md §10).

``Limits`` is a frozen value the listener and every session process share (it crosses the
process boundary as JSON). Each field is a ``serve`` flag; the defaults are sized for a VMM
that attaches a handful of devices and rings doorbells at line rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

KIB = 1024
MIB = 1024 * KIB
MAX_HELLO_FRAME = 1 * MIB


@dataclass(frozen=True, slots=True)
class Limits:
    # Frame payloads. Until HELLO only HELLO and STATUS are taken: small. After HELLO the
    # largest doorbell a guest can ring: an SMMUv3 command queue holds at most 2^19 commands
    # of 16 bytes (CMDQS <= 19, SMMUv3 §6.3.25), 8 MiB; a VT-d invalidation queue less.
    max_hello_frame: int = MAX_HELLO_FRAME
    max_frame: int = 8 * MIB + 256
    # Seconds from connect to an accepted HELLO; seconds a session may send nothing (0: off,
    # a VM may leave its vIOMMU untouched for days).
    handshake_timeout: float = 10.0
    idle_timeout: float = 0.0
    # Connections at once (before and after HELLO); more are refused with an ERROR.
    max_clients: int = 1024
    # Per session.
    max_viommus: int = 64
    max_devices: int = 1024
    max_mappings: int = 1 << 20
    # Connections the kernel queues before accept (capped by net.core.somaxconn).
    backlog: int = 1024

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Limits:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})
