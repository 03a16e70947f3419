"""The one flatbuffer reader/writer of ``.tflite`` files: the schema (ai-edge-litert's generated one), the 'TFL3'
identifier check with an error that names the file, and ``pack_model`` (a ``ModelT`` → bytes, tensor data 16-byte
aligned as TFLite's own converter writes it). Every module that reads or re-serialises a model's structure goes
through here (running a model is ``nailkit.portable.io_contract``'s job)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nailkit.portable.io_contract import TFLITE_MAGIC


def schema():
    """ai-edge-litert's generated TFLite schema module (``schema_py_generated``)."""
    from ai_edge_litert import schema_py_generated as s

    return s


def check_identifier(raw: bytes, src: str | os.PathLike[str], error: type[Exception] = ValueError) -> bytes:
    """``raw`` unchanged when it carries the TFLite identifier at bytes 4-8; else ``error`` naming ``src``."""
    if len(raw) < 8 or raw[4:8] != TFLITE_MAGIC:
        raise error(f"{src}: not a TFLite flatbuffer (expected the 'TFL3' identifier at bytes 4-8)")
    return raw


def read_bytes(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> bytes:
    """The file's bytes, after the identifier check."""
    return check_identifier(Path(path).read_bytes(), path, error)


def read_model(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> tuple[Any, bytes]:
    """``(Model, raw bytes)``: the flatbuffer's read-only root table (cheap: nothing is unpacked)."""
    raw = read_bytes(path, error)
    return schema().Model.GetRootAs(raw, 0), raw


def unpack(raw: bytes) -> Any:
    """The object API's ``ModelT`` of ``raw`` (every table unpacked: for rewrites)."""
    return schema().ModelT.InitFromPackedBuf(raw, 0)


def pack_model(model: Any) -> bytes:
    """Serialise a ``ModelT`` with 16-byte aligned buffers (as TFLite's converter does: force_align 16)."""
    import flatbuffers

    class AlignedBuilder(flatbuffers.Builder):
        def StartVector(self, elemSize, numElems, alignment):  # noqa: N802 - flatbuffers' API
            if elemSize == 1 and numElems >= 16:
                alignment = max(alignment, 16)
            return super().StartVector(elemSize, numElems, alignment)

    size = sum(len(b.data) for b in (model.buffers or []) if b.data is not None)
    b = AlignedBuilder(size + (1 << 20))
    b.Finish(model.Pack(b), file_identifier=TFLITE_MAGIC)
    return bytes(b.Output())
