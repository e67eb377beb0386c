"""Importers: foreign captures of what a guest did -> v1 trace files (docs/trace-format.md §2).

``viommud import FORMAT LOG -o TRACE.jsonl`` (viommud/shell/cli.py) picks the importer by
format name; the only one
today is ``qemu-log`` (viommud/importers/qemu_log.py: QEMU trace logs of the intel-iommu,
arm-smmuv3 and virtio-iommu devices). The host, and which host device the guest sees under
which ID, is made up from the log unless options or a small host file
(``load_host_spec``) say it.
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
