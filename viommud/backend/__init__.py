"""Backends: the Linux iommufd nested uAPI, emulated (default) or real (/dev/iommu)."""
