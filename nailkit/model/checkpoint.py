"""The ``Checkpoint`` object: a checkpoint file resolved once and passed down, with its content hash (the artifact
cache's key: ``checkpoint_content``), file hash, stored args and inspection report, each computed once.

``content_hash`` hashes a checkpoint's tensors and config, independent of the file's name and archive layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from nailkit.core.artifacts import file_sha256
from nailkit.model.checkpoint_loading import args_of, load_checkpoint, state_dict_of
from nailkit.model.checkpoint_report import CheckpointReport, inspect_checkpoint

#: Class names written into the demo checkpoint: 2 classes, as in the researcher's nail dataset.
DEMO_CLASS_NAMES = ["background", "Nail"]
DEMO_SEED = 0


def content_hash(ckpt: dict[str, Any]) -> str:
    """Hash of a loaded checkpoint's tensors (name, dtype, shape, bytes) and its stored ``args`` config: independent of
    the file's name and of ``torch.save``'s archive layout (the same weights saved under two names hash equal)."""
    h = hashlib.sha256()
    for name, t in sorted(state_dict_of(ckpt).items()):
        if not hasattr(t, "detach"):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(_byte_dtype()).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(args_of(ckpt), sort_keys=True, default=str).encode())
    return h.hexdigest()


def checkpoint_content(checkpoint: "str | os.PathLike[str] | Checkpoint", *, trusted: bool = False,
                       length: int = 16) -> str:
    """``content_hash`` of a checkpoint, cut to ``length``: the artifact cache's key. A ``Checkpoint`` computes it
    once (pass the object down rather than its path)."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint.content[:length]
    return content_hash(load_checkpoint(checkpoint, trusted=trusted))[:length]


class Checkpoint(os.PathLike):
    """A checkpoint file resolved once, at the entry point (``nailkit.model.build.resolve_checkpoint``), and passed
    down: its path, whether its pickles may be trusted, and — each computed on first use, then kept — its content
    hash (the cache key), its file hash and its inspection report. Path-like (``open``, ``Path(ckpt)`` and
    ``str(ckpt)`` give the file), so the stages that only need the file take it as is."""

    def __init__(self, path: str | os.PathLike[str], *, trusted: bool = False) -> None:
        self.path = Path(path)
        self.trusted = bool(trusted)
        self._content: str | None = None
        self._sha256: str | None = None
        self._report: CheckpointReport | None = None
        self._args: dict[str, Any] | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, trusted={self.trusted})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Checkpoint) and self.path.resolve() == other.path.resolve()

    def __hash__(self) -> int:
        return hash(self.path.resolve())

    @property
    def name(self) -> str:
        return self.path.name

    def load(self) -> dict[str, Any]:
        """The checkpoint dict (``load_checkpoint``: weights-only unless ``trusted``); not kept (hundreds of MB)."""
        return load_checkpoint(self.path, trusted=self.trusted)

    def _fill(self, ckpt: dict[str, Any]) -> None:
        if self._content is None:
            self._content = content_hash(ckpt)
        if self._report is None:
            self._report = inspect_checkpoint(ckpt, where=self.path)
            self._report.path = str(self.path)
        if self._args is None:
            self._args = args_of(ckpt)

    @property
    def content(self) -> str:
        """``content_hash`` (64 hex digits), from one load of the file."""
        if self._content is None:
            self._fill(self.load())
        return self._content

    @property
    def report(self) -> CheckpointReport:
        """``inspect_checkpoint``'s report (architecture from shapes, cross-checked against ``args``)."""
        if self._report is None:
            self._fill(self.load())
        return self._report

    @property
    def args(self) -> dict[str, Any]:
        """The stored training config (``args_of``: rfdetr's Namespace as a dict; empty when absent)."""
        if self._args is None:
            self._fill(self.load())
        return self._args

    def sha256(self, length: int = 12) -> str:
        """sha256 of the file's bytes, cut to ``length`` (64: the full digest); hashed once."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path, 64)
        return self._sha256[:length]


def _byte_dtype():
    import torch

    return torch.uint8
