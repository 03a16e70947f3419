"""nailkit.tflite.passes: the rank-2 × constant lift keeps every value and leaves no risky op; fp16 GEMM weights round
only the weights; pack_model round-trips (nailkit.tflite.flatbuffer)."""

from __future__ import annotations

import numpy as np
import pytest

from _probes import write_probe_model
from nailkit.gpu.op_check import op_check
from nailkit.tflite import passes as tflite_passes
from nailkit.tflite.flatbuffer import pack_model


@pytest.fixture()
def probe(tmp_path):
    return write_probe_model(tmp_path / "r2.tflite", "rank2_const")


def test_lift_keeps_values_and_clears_the_pattern(probe, tmp_path, cpu_run):
    x = np.random.default_rng(1).standard_normal((24, 32)).astype(np.float32)
    before = cpu_run(probe, x)
    assert len(tflite_passes.risky_constant_binary_ops(probe)) == 1
    out = tmp_path / "lifted.tflite"
    assert tflite_passes.lift_constant_binary_ops(probe, out) == 1
    assert tflite_passes.risky_constant_binary_ops(out) == []
    np.testing.assert_array_equal(cpu_run(out, x), before)
    assert op_check(out).histogram == {"RESHAPE": 2, "ADD": 1}
    assert tflite_passes.lift_constant_binary_ops(out) == 0  # idempotent: nothing left to lift


def test_clean_model_untouched(tmp_path):
    clean = write_probe_model(tmp_path / "clean.tflite", "clean")  # per-channel constant: not risky
    raw = clean.read_bytes()
    assert tflite_passes.risky_constant_binary_ops(clean) == []
    assert tflite_passes.lift_constant_binary_ops(clean) == 0 and clean.read_bytes() == raw


def test_pack_model_round_trip(probe, tmp_path, cpu_run):
    model = tflite_passes.load_model_t(probe)
    again = tmp_path / "again.tflite"
    again.write_bytes(pack_model(model))
    x = np.ones((24, 32), np.float32)
    np.testing.assert_array_equal(cpu_run(again, x), cpu_run(probe, x))


def test_not_a_flatbuffer_is_named(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="bad.tflite: not a TFLite flatbuffer"):
        tflite_passes.lift_constant_binary_ops(bad)


def _constant(model, name):
    sg = model.subgraphs[0]
    t = next(t for t in sg.tensors if (t.name.decode() if isinstance(t.name, bytes) else t.name) == name)
    data = model.buffers[t.buffer].data
    return t, (None if data is None else bytes(bytearray(data)))


def test_fp16_gemm_weights_rounds_only_the_weights(tmp_path, cpu_run):
    src = write_probe_model(tmp_path / "fc.tflite", "fc_const")
    dst = tmp_path / "fc_fp16.tflite"
    assert tflite_passes.fp16_gemm_weights(src, dst) == {"fp16_tensors": 1, "fp16_bytes": 4 * 8 * 2}
    a, b = tflite_passes.load_model_t(src), tflite_passes.load_model_t(dst)
    w32 = np.frombuffer(_constant(a, "weights")[1], np.float32).reshape(4, 8)
    t16, w16 = _constant(b, "weights_fp16")
    assert t16.type == 1 and w16 == w32.astype(np.float16).tobytes()  # FLOAT16, the weights rounded
    assert _constant(b, "weights")[1] is None  # now DEQUANTIZE's output: no fp32 copy left in the file
    for name in ("bias", "offset"):  # every other constant keeps its fp32 bits
        assert _constant(b, name)[1] == _constant(a, name)[1]
    assert op_check(dst).histogram == {"DEQUANTIZE": 1, "FULLY_CONNECTED": 1, "ADD": 1}
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    bias = np.frombuffer(_constant(a, "bias")[1], np.float32)
    offset = np.frombuffer(_constant(a, "offset")[1], np.float32)
    want = x @ w32.astype(np.float16).astype(np.float32).T + bias + offset
    got = cpu_run(dst, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got - cpu_run(src, x)).max() > 1e-5  # the weights did change (not fp16-exact)
