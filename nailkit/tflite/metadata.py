"""Metadata embedded inside a ``.tflite``, readable with nothing but a flatbuffer reader or a zip reader.

Two copies of the same JSON document are written, following LiteRT's own metadata convention (a named entry in the
model's ``metadata`` buffer map, plus associated files in a zip archive appended to the flatbuffer — the TFLite
Support/MediaPipe layout; the interpreter ignores bytes after the flatbuffer):

1. ``Model.metadata["nailkit_metadata"]`` → a buffer holding UTF-8 JSON;
2. an appended zip with ``nailkit_metadata.json`` (the same JSON) and ``labels.txt`` (one class name a line).

So an app reads it with its flatbuffer runtime (``model.metadata`` lookup) or any zip library (Java's ZipFile,
Python's zipfile), and a tool with ``read_metadata(path)``.

The document (``build_metadata``) holds: class names (and rfdetr's extra no-object slot), the input (name, shape,
layout NHWC/NCHW, dtype, RGB order, resize rule, mean/std on a 0–1 scale), each output's name, shape and meaning,
the post-processing steps and their version, the graph's role in a multi-graph target, and free-form extras.

Reading needs numpy only for nothing: the zip path is stdlib; the flatbuffer path uses the ``flatbuffers`` package
and ai-edge-litert's generated schema (``ai_edge_litert.schema_py_generated``), or a 40-line stdlib walk when those
are absent (``_read_flatbuffer_stdlib``): reading needs neither TensorFlow nor torch.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

from nailkit.tflite.flatbuffer import pack_model, read_bytes, schema, unpack

METADATA_NAME = "nailkit_metadata"
ZIP_MEMBER = "nailkit_metadata.json"
LABELS_MEMBER = "labels.txt"
SCHEMA_VERSION = 1
POSTPROCESS_VERSION = "nailkit-postprocess/1 (rfdetr 1.11.2 predict())"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MetadataError(ValueError):
    pass


def build_metadata(*, class_names: Sequence[str], num_classes: Optional[int] = None, resolution: int,
                   input_name: str = "input", layout: str = "NHWC", outputs: Sequence[dict[str, Any]] = (),
                   postprocess_version: str = POSTPROCESS_VERSION, postprocess_steps: Sequence[str] = (),
                   graph: Optional[dict[str, Any]] = None, model_name: str = "RFDETRSegPreview",
                   extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The metadata document for one ``.tflite`` (plain JSON types only)."""
    if layout not in ("NHWC", "NCHW"):
        raise MetadataError(f"layout must be NHWC or NCHW, not {layout!r}")
    shape = [1, resolution, resolution, 3] if layout == "NHWC" else [1, 3, resolution, resolution]
    names = [str(n) for n in class_names]
    doc: dict[str, Any] = {
        "schema": f"nailkit-tflite-metadata/{SCHEMA_VERSION}",
        "model": model_name,
        "class_names": names,
        "num_classes": int(num_classes if num_classes is not None else len(names)),
        "no_object_slot": "the logit slot with id == num_classes is rfdetr's no-object class ('__background__')",
        "input": {"name": input_name, "shape": shape, "layout": layout, "dtype": "float32", "color": "RGB",
                  "resize": f"bilinear to {resolution}x{resolution}, aspect ratio not kept",
                  "scale": "pixel / 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "normalization": "(pixel/255 - mean) / std per channel"},
        "outputs": [dict(o) for o in outputs],
        "postprocess": {"version": postprocess_version, "steps": list(postprocess_steps)},
    }
    if graph:
        doc["graph"] = dict(graph)
    if extra:
        doc["extra"] = dict(extra)
    json.dumps(doc)  # fail now on non-JSON values
    return doc


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------

def embed_metadata(src: str | os.PathLike[str], metadata: dict[str, Any], dst: str | os.PathLike[str] | None = None,
                   *, labels: Optional[Sequence[str]] = None) -> Path:
    """Write ``src`` with ``metadata`` embedded (buffer map entry + appended zip) to ``dst`` (default: in place).

    An earlier nailkit entry and an earlier appended zip are replaced. The model's tensors and ops are untouched
    (the flatbuffer is re-serialised with its buffers 16-byte aligned). Written to a temporary name, then renamed.
    """
    src, dst = Path(src), Path(dst) if dst is not None else Path(src)
    raw = read_bytes(src, MetadataError)
    text = json.dumps(metadata, indent=1, sort_keys=False).encode("utf-8")
    # re-serialising reads only what the root table references, so an earlier appended zip is dropped here
    fb = _with_metadata_entry(raw, METADATA_NAME, text)
    names = labels if labels is not None else metadata.get("class_names", [])
    out = io.BytesIO()
    out.write(fb)
    # zipfile's append mode on non-zip data writes a new archive after it, with offsets from the file's start
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as z:
        z.writestr(ZIP_MEMBER, text)
        z.writestr(LABELS_MEMBER, "".join(f"{n}\n" for n in names))
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(dst.parent), prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(out.getvalue())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dst


def _with_metadata_entry(fb: bytes, name: str, payload: bytes) -> bytes:
    s = schema()
    model = unpack(fb)
    for b in model.buffers or []:
        if (b.offset or 0) > 1:
            raise MetadataError("this .tflite keeps tensor data outside the flatbuffer (buffer offsets); "
                                "re-serialising it is not supported")
    model.metadata = [m for m in (model.metadata or []) if (m.name or b"") not in (name, name.encode())]
    buf = s.BufferT()
    import numpy as np

    buf.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers = list(model.buffers or []) + [buf]
    entry = s.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)


    return pack_model(model)


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------

def read_metadata_zip(path: str | os.PathLike[str]) -> Optional[dict[str, Any]]:
    """The JSON from the appended zip (stdlib ``zipfile`` only), or None when the file has no such zip."""
    try:
        with zipfile.ZipFile(path) as z:
            if ZIP_MEMBER not in z.namelist():
                return None
            return json.loads(z.read(ZIP_MEMBER).decode("utf-8"))
    except zipfile.BadZipFile:
        return None


def read_metadata_flatbuffer(path: str | os.PathLike[str]) -> Optional[dict[str, Any]]:
    """The JSON from ``Model.metadata[nailkit_metadata]`` (flatbuffer reader only), or None."""
    raw = read_bytes(path, MetadataError)
    entries = metadata_entries(raw)
    data = entries.get(METADATA_NAME)
    return None if data is None else json.loads(data.decode("utf-8"))


def metadata_entries(raw: bytes) -> dict[str, bytes]:
    """Every ``Model.metadata`` entry: name → buffer bytes."""
    try:
        from ai_edge_litert import schema_py_generated as s
    except ImportError:
        return _read_flatbuffer_stdlib(raw)
    m = s.Model.GetRootAs(raw, 0)
    out = {}
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        buf = m.Buffers(md.Buffer())
        out[(md.Name() or b"").decode()] = buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
    return out


def _read_flatbuffer_stdlib(raw: bytes) -> dict[str, bytes]:
    """The same walk with ``struct`` only (tflite schema: Model.buffers = field 4, Model.metadata = field 6;
    Metadata.name = 0, .buffer = 1; Buffer.data = 0)."""

    def table(pos: int) -> tuple[int, int]:
        vt = pos - struct.unpack_from("<i", raw, pos)[0]
        return pos, vt

    def field(tab: tuple[int, int], idx: int) -> Optional[int]:
        pos, vt = tab
        vt_len = struct.unpack_from("<H", raw, vt)[0]
        off = 4 + 2 * idx
        if off >= vt_len:
            return None
        rel = struct.unpack_from("<H", raw, vt + off)[0]
        return pos + rel if rel else None

    def deref(p: int) -> int:
        return p + struct.unpack_from("<I", raw, p)[0]

    def vector(p: int) -> tuple[int, int]:
        v = deref(p)
        return v + 4, struct.unpack_from("<I", raw, v)[0]

    root = table(struct.unpack_from("<I", raw, 0)[0])
    out: dict[str, bytes] = {}
    mf, bf = field(root, 6), field(root, 4)
    if mf is None or bf is None:
        return out
    mstart, mlen = vector(mf)
    bstart, blen = vector(bf)
    for i in range(mlen):
        md = table(deref(mstart + 4 * i))
        npos, bpos = field(md, 0), field(md, 1)
        name = ""
        if npos is not None:
            s0, n = vector(npos)
            name = raw[s0:s0 + n].decode()
        bi = struct.unpack_from("<I", raw, bpos)[0] if bpos is not None else 0
        data = b""
        if bi < blen:
            bt = table(deref(bstart + 4 * bi))
            dpos = field(bt, 0)
            if dpos is not None:
                d0, dn = vector(dpos)
                data = raw[d0:d0 + dn]
        out[name] = data
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The embedded metadata: the flatbuffer entry, else the appended zip. Raises MetadataError when neither."""
    try:
        doc = read_metadata_flatbuffer(path)
    except MetadataError:
        raise
    except Exception:  # noqa: BLE001 - a malformed map falls back to the zip copy
        doc = None
    if doc is None:
        doc = read_metadata_zip(path)
    if doc is None:
        raise MetadataError(f"{path}: no nailkit metadata embedded (no '{METADATA_NAME}' metadata entry and no "
                            f"appended zip with {ZIP_MEMBER}); embed it with nailkit.tflite.metadata.embed_metadata")
    return doc
