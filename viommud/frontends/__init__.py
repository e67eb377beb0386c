"""Guest-facing frontends: one decoder per emulated IOMMU model."""
