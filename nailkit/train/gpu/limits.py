"""What the device tool carries and returns (shared/ENV-NOTES.md, .library/device/README.md), and the error raised
when a chunk, manifest, wheel set or working tree does not fit or cannot be used."""

from __future__ import annotations

MiB = 1 << 20
#: What the device tool carries and returns (shared/ENV-NOTES.md, .library/device/README.md).
TREE_LIMIT = 64 * MiB
RETURN_MAX_FILES = 8
RETURN_MAX_FILE = 16 * MiB
RETURN_MAX_CALL = 64 * MiB


class GpuTransferError(ValueError):
    """A chunk, manifest, wheel set or working tree that cannot be used, with a message naming it."""

