"""quantize.py: recipes select by tensor-name scope, calibration data is predict()'s preprocessing, SNR report.

A tiny two-layer .tflite stands in for the model: its tensors are named like litert-torch names rfdetr's (one
FULLY_CONNECTED in ``…Joiner_backbone…``, one in ``…Transformer_transformer…``), so the scoping is tested on the
real regexes without a multi-minute conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nailkit.tflite import quantize as Q
from nailkit.tflite import passes as tflite_passes

BACKBONE_T = "m/rfdetr.models.backbone.Joiner_backbone/torch.nn.modules.linear.Linear_fc;"
DECODER_T = "m/rfdetr.models.transformer.Transformer_transformer/torch.nn.modules.linear.Linear_fc;"


def _two_layer_tflite(k: int = 16, h: int = 32, n: int = 8) -> bytes:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    rng = np.random.default_rng(0)
    buffers = [fb.BufferT()]

    def buf(arr=None):
        b = fb.BufferT()
        if arr is not None:
            b.data = np.frombuffer(np.ascontiguousarray(arr, dtype=np.float32).tobytes(), dtype=np.uint8)
        buffers.append(b)
        return len(buffers) - 1

    def tensor(name, shape, b):
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), fb.TensorType.FLOAT32, b
        return t

    tensors = [tensor("args_0", (1, k), buf()),
               tensor("w1", (h, k), buf(rng.standard_normal((h, k)) / 4)), tensor("b1", (h,), buf(np.zeros(h))),
               tensor(BACKBONE_T, (1, h), buf()),
               tensor("w2", (n, h), buf(rng.standard_normal((n, h)) / 6)), tensor("b2", (n,), buf(np.zeros(n))),
               tensor(DECODER_T, (1, n), buf())]
    ops = []
    for ins, out in (([0, 1, 2], 3), ([3, 4, 5], 6)):
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = 0, ins, [out]
        o.builtinOptionsType = fb.BuiltinOptions.FullyConnectedOptions
        o.builtinOptions = fb.FullyConnectedOptionsT()
        ops.append(o)
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    sg = fb.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [0], [6], ops, "main"

    def tmap(name, idx):
        t = fb.TensorMapT()
        t.name, t.tensorIndex = name, idx
        return t

    sig = fb.SignatureDefT()
    sig.inputs, sig.outputs, sig.signatureKey, sig.subgraphIndex = [tmap("args_0", 0)], [tmap("output_0", 6)], \
        "serving_default", 0
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sg], buffers
    model.signatureDefs = [sig]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("q") / "tiny_fp32.tflite"
    p.write_bytes(_two_layer_tflite())
    return p


def _calib(n=8):
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(n)]


def _int_ops(path):
    """Output tensor name → input dtypes of every FULLY_CONNECTED."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    ts = {t["index"]: t for t in it.get_tensor_details()}
    return {ts[o["outputs"][0]]["name"]: [np.dtype(ts[i]["dtype"]).name for i in o["inputs"] if i >= 0]
            for o in it._get_ops_details() if o["op_name"] == "FULLY_CONNECTED"}


def test_recipe_names_and_scopes():
    assert set(Q.RECIPES) == {"backbone_w8a8", "backbone_w8a16", "snr_guided", "full_int8"}
    r = Q.build_recipe("backbone_w8a8")
    assert {e["operation"] for e in r} == set(Q.MATMUL_OPS)
    assert all(e["regex"] == Q.BACKBONE_SCOPE for e in r)
    assert all(e["op_config"]["activation_tensor_config"]["num_bits"] == 8 for e in r)
    r16 = Q.build_recipe("backbone_w8a16")
    assert all(e["op_config"]["activation_tensor_config"]["num_bits"] == 16 for e in r16)
    assert all(e["op_config"]["weight_tensor_config"]["num_bits"] == 8 for e in r16)
    with pytest.raises(ValueError, match="unknown recipe"):
        Q.build_recipe("int4")


@pytest.mark.parametrize("name,weight_dtype", [("backbone_w8a8", "int8"), ("backbone_w8a16", "int16")])
def test_backbone_recipe_quantizes_backbone_only(tiny, tmp_path, name, weight_dtype):
    res = Q.quantize_tflite(tiny, name, _calib(), tmp_path / f"{name}.tflite")
    ops = _int_ops(res.path)
    assert ops[BACKBONE_T][0] == weight_dtype  # activation input quantised (int8 / int16)
    assert ops[BACKBONE_T][1] == "int8"  # weights int8
    assert ops[DECODER_T] == ["float32", "float32", "float32"]  # decoder layer untouched
    assert res.num_calibration == 8 and res.size_bytes > 0
    # runs, and stays close to the float model on calibration-like data
    x = _calib(1)[0]
    y_q = next(iter(Q.run_once(res.path, x).values()))
    y_f = next(iter(Q.run_once(tiny, x).values()))
    assert y_q.shape == y_f.shape
    assert np.abs(y_q - y_f).max() <= 0.1 * np.abs(y_f).max()


def test_full_int8_quantizes_every_layer(tiny, tmp_path):
    res = Q.quantize_tflite(tiny, "full_int8", _calib(), tmp_path / "full.tflite")
    ops = _int_ops(res.path)
    assert ops[BACKBONE_T][1] == "int8" and ops[DECODER_T][1] == "int8"


def test_layer_snr_and_snr_guided_exclusion(tiny, tmp_path):
    res, qt = Q.quantize_tflite(tiny, "backbone_w8a8", _calib(), tmp_path / "a.tflite", return_quantizer=True)
    rows = Q.layer_snr(qt, tiny, _calib(2))
    by = {r["tensor"]: r for r in rows}
    assert BACKBONE_T in by and np.isfinite(by[BACKBONE_T]["snr"]) and by[BACKBONE_T]["snr"] > 10
    # ai-edge-quantizer's SNR is a power ratio; snr_db is 10·log10 of it (what snr_guided_recipe's threshold means)
    assert by[BACKBONE_T]["snr_db"] == pytest.approx(10 * np.log10(by[BACKBONE_T]["snr"]))
    recipe, excluded = Q.snr_guided_recipe(rows, snr_db=by[BACKBONE_T]["snr_db"] + 0.01,
                                           quantized_tensors=[BACKBONE_T])
    assert excluded == [BACKBONE_T]
    recipe, excluded = Q.snr_guided_recipe(rows, snr_db=by[BACKBONE_T]["snr_db"] - 0.01,
                                           quantized_tensors=[BACKBONE_T])
    assert excluded == []
    assert Q.snr_guided_recipe([{"tensor": "t", "snr": 100.0}], snr_db=20.5, quantized_tensors=["t"])[1] == ["t"]
    assert Q.snr_guided_recipe([{"tensor": "t", "snr": 100.0}], snr_db=19.5, quantized_tensors=["t"])[1] == []
    assert [r.get("snr") for r in rows] == sorted(r.get("snr") for r in rows)
    assert Q.quantized_output_tensors(res.path) == [BACKBONE_T]
    # a threshold above every SNR excludes the quantised layer → nothing left in int8
    recipe, excluded = Q.snr_guided_recipe(rows, snr_db=1e9, quantized_tensors=[BACKBONE_T])
    assert excluded == [BACKBONE_T]
    assert recipe[0]["regex"].startswith("^(?!")
    with pytest.raises(ValueError, match="selects no op"):  # the only quantisable layer is excluded
        Q.quantize_tflite(tiny, "snr_guided", _calib(), tmp_path / "g.tflite", recipe=recipe)
    # excluding a layer that is not there leaves the backbone layer quantised
    recipe, _ = Q.snr_guided_recipe([{"tensor": "other", "snr": 0.0}], snr_db=10)
    res3 = Q.quantize_tflite(tiny, "snr_guided", _calib(), tmp_path / "h.tflite", recipe=recipe)
    assert _int_ops(res3.path)[BACKBONE_T][1] == "int8"
    # a threshold of -inf keeps it
    recipe, excluded = Q.snr_guided_recipe(rows, snr_db=-1e9, quantized_tensors=[BACKBONE_T])
    assert excluded == []


def _coco_split(tmp_path, n=5):
    from PIL import Image

    d = tmp_path / "train"
    d.mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        name = f"img_{i}.jpg"
        Image.fromarray(rng.integers(0, 255, size=(40 + i, 60, 3), dtype=np.uint8)).save(d / name)
        images.append({"id": i, "file_name": name, "width": 60, "height": 40 + i})
    (d / "_annotations.coco.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return d


def test_calibration_inputs_use_predict_preprocessing(tmp_path):
    from nailkit.portable.preprocess import preprocess, to_nhwc

    d = _coco_split(tmp_path)
    picked = Q.calibration_images(d, n=3, seed=0)
    assert len(picked) == 3 and len(set(picked)) == 3
    assert picked == Q.calibration_images(d, n=3, seed=0)  # deterministic
    assert Q.calibration_images(d, n=10) == Q.split_images(d)  # all when fewer
    xs = Q.calibration_inputs(d, 48, n=3, seed=0)
    for p, x in zip(picked, xs):
        assert x.shape == (1, 48, 48, 3) and x.dtype == np.float32
        assert np.array_equal(x, to_nhwc(preprocess(p, 48)[0]))


def test_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="_annotations.coco.json"):
        Q.split_images(tmp_path)
    d = _coco_split(tmp_path)
    (d / "img_0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        Q.split_images(d)


# ----------------------------------------------------------------------------------------------------------------
# the full-integer DIV failure: an int8 DIV refuses a divisor element at its zero point (a divisor quantised to 0)
# ----------------------------------------------------------------------------------------------------------------

def _div_tflite(dtype: str, divisor_raw=None, divisor_zero_point: int | None = None) -> bytes:
    return Q.one_div_tflite(dtype, divisor_raw, divisor_zero_point)


def test_int8_div_refuses_a_divisor_at_its_zero_point(tmp_path):
    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    x8 = np.full((1, 4), 10, np.int8)
    ok = write("ok.tflite", _div_tflite("int8"))
    # int8 DIV itself runs in this runtime (scales equal or not, negative divisors too)
    assert Q.invoke_error(ok, x8) is None
    assert Q.invoke_error(write("neg.tflite", _div_tflite("int8", [-20, 40, 80, 10])), x8) is None
    rows = Q.quantized_divisions(ok)
    assert len(rows) == 1 and rows[0]["node"] == 0 and rows[0]["output_type"] == "int8"
    assert rows[0]["divisor"]["elements_at_zero_point"] == 0 and not rows[0]["fails_on_every_invoke"]
    assert rows[0]["divisor"]["zero_band"] == [pytest.approx(-0.025), pytest.approx(0.025)]
    # a raw 0 is not the problem when the zero point is elsewhere (it dequantises to 1.0) ...
    assert Q.invoke_error(write("raw0.tflite", _div_tflite("int8", [0, 40, 80, 10], -20)), x8) is None
    # ... an element AT the zero point (= a divisor quantised to 0.0) is: the exact message
    bad = write("bad.tflite", _div_tflite("int8", [20, 40, 80, 10], 20))
    err = Q.invoke_error(bad, x8)
    assert err is not None and Q.DIV_ZERO_CHECK in err and "(DIV) failed to invoke" in err
    row = Q.quantized_divisions(bad)[0]
    assert row["fails_on_every_invoke"] and row["divisor"]["elements_at_zero_point"] == 1
    assert row["divisor"]["dequantized_min"] <= 0.0 <= row["divisor"]["dequantized_max"] and row["divisor"]["constant"]
    # float DIV is not quantised: not listed
    assert Q.quantized_divisions(write("f.tflite", _div_tflite("float32"))) == []


def test_quantizes_to_zero_point_finds_the_small_divisors():
    # the sine embedding's dim_t (1 ... ~8660) at the scale a full-int8 calibration gives it (range [0, max]):
    # every value below scale/2 lands on the zero point -128
    dim_t = 10000 ** (2 * (np.arange(128) // 2) / 128)
    scale = dim_t.max() / 255
    at_zp = Q.quantizes_to_zero_point(dim_t, scale, -128)
    assert at_zp[:2].all() and not at_zp[-1] and at_zp.sum() == int((dim_t < scale / 2).sum()) > 0
    assert not Q.quantizes_to_zero_point([1.0, 2.0], 0.05, 0).any()


def _with_external_buffers(model: bytes) -> bytes:
    """The same model with every constant's data after the flatbuffer (Buffer.offset/size), as ai-edge-quantizer
    writes large models."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    m = fb.ModelT.InitFromPackedBuf(model, 0)
    big = [i for i, b in enumerate(m.buffers) if b.data is not None and len(b.data) > 0]
    payload = {i: bytes(np.asarray(m.buffers[i].data, dtype=np.uint8)) for i in big}
    for i in big:
        m.buffers[i].data, m.buffers[i].offset, m.buffers[i].size = None, 1 << 40, len(payload[i])

    def pack() -> bytes:
        bld = flatbuffers.Builder(1024)
        bld.Finish(m.Pack(bld), file_identifier=b"TFL3")
        return bytes(bld.Output())

    head = pack()
    pos, tail = len(head) + (-len(head)) % 16, b""
    for i in big:
        m.buffers[i].offset = pos + len(tail)
        tail += payload[i] + b"\0" * ((-len(payload[i])) % 16)
    head2 = pack()
    assert len(head2) == len(head)
    return head2 + b"\0" * (pos - len(head2)) + tail


def test_quantized_files_keep_their_tensor_data_inside_the_flatbuffer(tiny, tmp_path):
    """ai-edge-quantizer appends the tensor data of large models after the flatbuffer (Buffer.offset); quantize_tflite
    inlines it (inline_buffers), so the file can be re-serialised (embedded metadata) — and runs the same."""
    from ai_edge_litert import schema_py_generated as fb

    ext = _with_external_buffers(tiny.read_bytes())
    assert any((b.offset or 0) > 1 for b in fb.ModelT.InitFromPackedBuf(ext, 0).buffers)
    ext_path, inl_path = tmp_path / "ext.tflite", tmp_path / "inl.tflite"
    ext_path.write_bytes(ext)
    inl = tflite_passes.inline_buffers(ext)
    inl_path.write_bytes(inl)
    assert not any((b.offset or 0) > 1 for b in fb.ModelT.InitFromPackedBuf(inl, 0).buffers)
    assert tflite_passes.inline_buffers(inl) == inl  # nothing left to move
    x = _calib(1)[0]
    a, b, c = Q.run_once(tiny, x), Q.run_once(ext_path, x), Q.run_once(inl_path, x)
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)
    res = Q.quantize_tflite(tiny, "backbone_w8a8", _calib(), tmp_path / "a.tflite")
    assert not any((b.offset or 0) > 1 for b in fb.ModelT.InitFromPackedBuf(Path(res.path).read_bytes(), 0).buffers)
