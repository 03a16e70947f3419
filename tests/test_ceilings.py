"""bench/ceilings.py: the XNNPACK GEMM probe computes its layer and runs on XNNPACK (no timing thresholds)."""

from __future__ import annotations

import numpy as np
import pytest

from nailkit.bench.backends import BackendSpec
from nailkit.bench.ceilings import (
    ceiling_precision,
    fully_connected_tflite,
    gemm_probe,
    PRECISIONS,
    probe_weights,
)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_probe_model_computes_the_layer(precision):
    from ai_edge_litert.interpreter import Interpreter

    m, k, n = 8, 64, 32
    interp = Interpreter(model_content=fully_connected_tflite(m, k, n, precision))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert tuple(inp["shape"]) == (m, k) and tuple(out["shape"]) == (m, n)
    w, b = probe_weights(k, n)
    rng = np.random.default_rng(0)
    if precision == "int8":
        scale, _ = inp["quantization"]
        xq = rng.integers(-100, 100, size=(m, k), dtype=np.int8)
        interp.set_tensor(inp["index"], xq)
        interp.invoke()
        oscale, ozp = out["quantization"]
        y = (interp.get_tensor(out["index"]).astype(np.float32) - ozp) * oscale
        ref = (xq.astype(np.float32) * scale) @ w.T + b
        assert np.abs(y - np.clip(ref, -128 * oscale, 127 * oscale)).max() <= 2 * oscale + 0.05
    else:
        x = rng.standard_normal((m, k)).astype(np.float32)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        tol = 1e-4 if precision == "fp32" else 0.05
        assert np.abs(y - (x @ w.T + b)).max() <= tol


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_probe_runs_on_xnnpack(precision, threads):
    p = gemm_probe(precision, threads, m=128, k=128, n=128, seconds=0.05, min_runs=2)
    assert p.xnnpack
    assert p.runs >= 2 and p.best_gflops > 0 and p.median_gflops > 0
    assert p.best_gflops >= p.median_gflops
    assert p.to_json()["precision"] == precision


def test_probe_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        fully_connected_tflite(4, 4, 4, "int4")


def test_each_backend_is_held_against_the_ceiling_of_its_precision():
    assert ceiling_precision(BackendSpec("pt", "torch", "c.pth", 432)) == "fp32"
    assert ceiling_precision(BackendSpec("ort", "onnxruntime", "m.onnx", 432, meta={"precision": "int8"})) == "fp32"
    for precision, ceiling in (("fp32", "fp32"), ("fp16", "fp32"), ("int8", "dynamic_int8"), ("w8a8", "int8"),
                               (None, "fp32")):
        meta = {} if precision is None else {"precision": precision}
        assert ceiling_precision(BackendSpec("t", "tflite", "m.tflite", 432, meta=meta)) == ceiling, precision
