"""Decoders of guest structures (commands, STE, context and PASID entries): bytes in, frozen
values out, with the guest-visible reason for anything refused."""
