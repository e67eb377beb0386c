"""The Linux iommufd uAPI (``/dev/iommu``) and the VFIO cdev calls that feed it, declared.

Reference: the Linux iommufd uAPI (``include/uapi/linux/iommufd.h``, ``drivers/iommu/iommufd/``);
the "iommufd.md §n" numbering is listed in docs/backend.md.

Every structure is declared twice and a test proves both agree:

* a construct ``Struct`` (``*_LAYOUT``), the readable specification with the reference
  section in its doc string. Reserved fields the kernel never reads are ``Padding``; reserved
  fields the kernel checks (and answers EOPNOTSUPP for) are named fields, because their
  value matters;
* a frozen, slotted dataclass with the same field names (``__reserved`` becomes
  ``reserved``, ``__reserved2`` becomes ``reserved2``; ``ste[2]`` / ``cmd[2]`` become
  ``ste0``/``ste1`` and ``cmd0``/``cmd1``), a ``FORMAT`` (``struct.Struct``) for the fast
  path, ``MIN_SIZE`` (the kernel's minimum user size) and ``PADDING`` (the dataclass fields
  the construct declaration treats as ``Padding``). Every field has a default; ``size`` /
  ``argsz`` default to the full structure size.

``encode(obj)`` and ``decode(cls, buf)`` convert between dataclasses and packed bytes; no
construct ``Container`` leaves this module.
"""

from __future__ import annotations

from protocols.iommufd.layouts import *  # noqa: F403
from protocols.iommufd.numbers import *  # noqa: F403
from protocols.iommufd.structs import *  # noqa: F403
from protocols.iommufd.structs import T as T
from protocols.iommufd.structs import decode as decode
from protocols.iommufd.structs import encode as encode
from protocols.iommufd.structs import field_names as field_names
