"""Intel VT-d frontend: queued-invalidation decoding, context and PASID entries."""
