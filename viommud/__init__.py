"""viommud: a VMM-side virtual-IOMMU emulator daemon.

The package is laid out as the data flows (see docs/architecture.md):
``frontends`` decode guest command streams, ``topology`` maps guest devices to host
objects, ``dispatcher`` plans host calls per barrier, ``backend`` speaks the iommufd uAPI,
and ``server`` / ``client`` / ``replay`` are the thin I/O shell around them.
"""

__version__ = "0.1.0"
