"""Writing a checkpoint nailkit makes (``train-demo``'s packaged ``.pth``): ``torch.save``'s zip format with its
members deflated.

``torch.save`` stores every member of its zip uncompressed (so that ``torch.load(mmap=True)`` can map the tensors).
The members are ordinary zip entries, and ``torch.load`` reads deflated ones just as well, so rewriting them
compressed gives the same file to every loader (``torch.load`` with or without ``weights_only``, rfdetr, nailkit's
``load_checkpoint``), fp32-exact, byte for byte the same tensors — only ``mmap=True`` needs the stored form.

Why: the trained demo model lives in git, and a submission's diffs may add up to 256 MiB. Replacing the 135.5 MB
stored file with another stored one counts both (271 MB, refused); fp32 weights deflate by ~7.5%
(135.5 → 125.4 MB measured on the committed demo), which brings a replacement under the limit.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from nailkit.core.artifacts import atomic_write

#: zlib level for the members (9: smallest; ~5 s for a 135 MB checkpoint on one core).
DEFLATE_LEVEL = 9


def deflate_torch_zip(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                      archive_name: str | None = None) -> None:
    """Copy ``torch.save``'s zip ``src`` to ``dst`` with every member deflated (order and bytes kept). The members'
    top folder (torch names it after the file it wrote, here a temporary) becomes ``archive_name`` when given."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED,
                                                      compresslevel=DEFLATE_LEVEL) as zout:
        for info in zin.infolist():
            name = info.filename
            if archive_name:
                name = f"{archive_name}/{name.split('/', 1)[1]}"
            with zin.open(info) as fh:
                zout.writestr(name, fh.read())


def save_checkpoint(payload: Any, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (no half-written file on failure), members deflated unless
    ``compress=False``."""
    import torch

    path = Path(path)

    def write(tmp: Path) -> None:
        if not compress:
            torch.save(payload, tmp)
            return
        stored = tmp.with_name(tmp.name + ".stored")
        try:
            torch.save(payload, stored)
            deflate_torch_zip(stored, tmp, archive_name=path.stem)
        finally:
            stored.unlink(missing_ok=True)

    return atomic_write(path, write)
