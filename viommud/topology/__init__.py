"""Topology: the guest-to-host mappings of each vIOMMU, as data (DESIGN.md point 3).

One module per vIOMMU model; what they share lives here.
"""

from __future__ import annotations


class TopologyError(Exception):
    """A topology change the daemon refuses; ``guest_code`` is what the guest sees, if any."""

    def __init__(self, message: str, guest_code: str | None = None) -> None:
        super().__init__(message)
        self.guest_code = guest_code
