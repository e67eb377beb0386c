"""The emulated Linux iommufd (the default backend): see ``kernel`` for the entry point."""

from viommud.backend.emulator.kernel import EmulatedIommufd

__all__ = ["EmulatedIommufd"]
