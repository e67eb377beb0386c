"""ARM SMMUv3 frontend: guest command-queue and stream-table decoding."""
