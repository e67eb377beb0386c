"""Group commit: doorbells that arrive together share host calls (docs/coalescing.md)."""
