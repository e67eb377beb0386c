"""Importers: foreign captures of what a guest did -> v1 trace files (docs/trace-format.md §2).

``viommud import FORMAT LOG -o TRACE.jsonl`` (viommud/shell/cli.py) picks the importer by
format name; the only one
today is ``qemu-log`` (viommud/importers/qemu_log.py: QEMU trace logs of the intel-iommu and
arm-smmuv3 devices). What a log cannot tell — the host, and which host device the guest sees
under which ID — comes from options or a small host file (``load_host_spec``).
"""

from viommud.importers.options import (
    HostSpec,
    ImportLogError,
    ImportOptions,
    load_host_spec,
    parse_attach,
    write_trace,
)

__all__ = [
    "HostSpec",
    "ImportLogError",
    "ImportOptions",
    "load_host_spec",
    "parse_attach",
    "write_trace",
]
