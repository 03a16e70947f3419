"""Metadata embedded in a .tflite reads back with nothing but a zip reader, or a flatbuffer walk (stdlib struct), and
the model still runs bit-identically."""

from __future__ import annotations

import json
import struct
import zipfile

import numpy as np
import pytest

from _probes import write_probe_model
from nailkit.gpu.op_check import op_check
from nailkit.tflite import metadata as tm


@pytest.fixture()
def model(tmp_path):
    return write_probe_model(tmp_path / "m.tflite", "clean")


def _doc(**kw):
    return tm.build_metadata(class_names=["hand", "Nail"], resolution=432,
                             outputs=[{"name": "pred_masks", "shape": [1, 16, 108, 108], "meaning": "mask logits"}],
                             postprocess_steps=["sigmoid", "top-k"], graph={"name": "graph_c", "of": 3}, **kw)


def test_embed_and_read_back_with_zip_only(model, tmp_path):
    doc = _doc()
    out = tm.embed_metadata(model, doc, tmp_path / "with_md.tflite")
    raw = out.read_bytes()
    assert raw[4:8] == b"TFL3"  # still a flatbuffer at offset 0
    with zipfile.ZipFile(out) as z:  # stdlib zip reader, nothing else
        assert sorted(z.namelist()) == ["labels.txt", "nailkit_metadata.json"]
        assert json.loads(z.read("nailkit_metadata.json")) == doc
        assert z.read("labels.txt").decode().splitlines() == ["hand", "Nail"]
    # zip offsets are absolute (strict readers, e.g. Android's, need that): the first local header is where the
    # central directory says it is
    eocd = raw.rfind(b"PK\x05\x06")
    cd_off = struct.unpack_from("<I", raw, eocd + 16)[0]
    assert raw[cd_off:cd_off + 4] == b"PK\x01\x02"
    first_local = struct.unpack_from("<I", raw, cd_off + 42)[0]
    assert raw[first_local:first_local + 4] == b"PK\x03\x04"


def test_read_back_from_flatbuffer_metadata_map_stdlib_only(model, tmp_path):
    doc = _doc(extra={"parity": {"mask_iou": 0.99}})
    out = tm.embed_metadata(model, doc, tmp_path / "with_md.tflite")
    entries = tm._read_flatbuffer_stdlib(out.read_bytes())  # struct-only walk of Model.metadata
    assert json.loads(entries[tm.METADATA_NAME].decode()) == doc
    assert tm.read_metadata_flatbuffer(out) == doc  # through the generated schema
    assert tm.read_metadata(out) == doc
    assert doc["input"]["layout"] == "NHWC" and doc["input"]["mean"] == [0.485, 0.456, 0.406]
    assert doc["postprocess"]["version"] == tm.POSTPROCESS_VERSION


def test_model_runs_identically_and_ops_unchanged(model, tmp_path, cpu_run):
    out = tm.embed_metadata(model, _doc(), tmp_path / "with_md.tflite")
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    np.testing.assert_array_equal(cpu_run(out, x), cpu_run(model, x))
    assert op_check(out).histogram == op_check(model).histogram


def test_re_embedding_replaces_not_duplicates(model):
    tm.embed_metadata(model, _doc())
    tm.embed_metadata(model, _doc(model_name="second"))
    raw = model.read_bytes()
    names = list(tm._read_flatbuffer_stdlib(raw))
    assert names.count(tm.METADATA_NAME) == 1
    assert tm.read_metadata(model)["model"] == "second"
    with zipfile.ZipFile(model) as z:
        assert json.loads(z.read("nailkit_metadata.json"))["model"] == "second"
    assert raw.count(b"PK\x05\x06") == 1  # the old appended zip is gone


def test_missing_metadata_and_not_a_model(model, tmp_path):
    with pytest.raises(tm.MetadataError, match="no nailkit metadata"):
        tm.read_metadata(model)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(tm.MetadataError, match="TFL3"):
        tm.read_metadata(bad)
    with pytest.raises(tm.MetadataError, match="layout"):
        tm.build_metadata(class_names=["a"], resolution=432, layout="HWC")
