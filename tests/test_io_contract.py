"""nailkit.portable.io_contract: outputs identified by shape and meaning (one rule), (de)quantisation, numpy-only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nailkit.portable import io_contract
from nailkit.portable.io_contract import dequantize, identify_outputs, input_layout, mask_layout, quantize


def _d(name, shape, dtype=np.float32, quantization=(0.0, 0)):
    return {"name": name, "shape": np.array(shape), "dtype": dtype, "quantization": quantization}


CANONICAL = [_d("pred_boxes", [1, 200, 4]), _d("pred_logits", [1, 200, 3]), _d("pred_masks", [1, 200, 108, 108]),
             _d("enc_scores", [1, 1296]), _d("topk_indices", [1, 200], np.int32)]


def test_outputs_identified_by_shape_not_position_or_name():
    names = ["StatefulPartitionedCall:0", "x", "y", "z", "w"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        order = rng.permutation(len(CANONICAL))
        details = [dict(CANONICAL[i], name=names[j]) for j, i in enumerate(order)]  # names carry no meaning
        idx = identify_outputs(details)
        assert {k: CANONICAL[order[v]]["name"] for k, v in idx.items()} == {c["name"]: c["name"] for c in CANONICAL}


def test_four_columns_names_then_values_decide_else_refuse():
    details = [_d("out_logits", [1, 10, 4]), _d("out_pred_boxes", [1, 10, 4]), _d("m", [1, 10, 8, 8])]
    assert identify_outputs(details)["pred_boxes"] == 1
    assert identify_outputs([_d("a_logits", [1, 10, 4]), _d("b", [1, 10, 4])])["pred_logits"] == 0
    anonymous = [_d("a", [1, 10, 4]), _d("b", [1, 10, 4]), _d("m", [1, 10, 8, 8])]
    with pytest.raises(ValueError, match="cannot tell boxes from logits"):
        identify_outputs(anonymous)
    logits = np.full((1, 10, 4), -3.0, np.float32)
    boxes = np.full((1, 10, 4), 0.5, np.float32)
    assert identify_outputs(anonymous, values=[logits, boxes, np.zeros((1, 10, 8, 8))])["pred_boxes"] == 1


@pytest.mark.parametrize("details,match", [
    ([_d("a", [1, 10, 4]), _d("b", [1, 10, 3]), _d("m", [1, 10, 8, 8]), _d("n", [1, 10, 8, 8])],
     "two outputs look like pred_masks"),
    ([_d("a", [1, 10, 5]), _d("b", [1, 10, 3])], r"no \[1,Q,4\] box output"),
    ([_d("a", [1, 10, 4]), _d("b", [1, 9, 3])], "disagree on the number of queries"),
    ([_d("a", [1, 10, 4]), _d("b", [1, 10, 3]), _d("m", [1, 7, 8, 8])], "no axis of Q=10"),
    ([_d("a", [1, 10, 4])], "expected two rank-3 outputs"),
])
def test_unrecognisable_outputs_raise(details, match):
    with pytest.raises(ValueError, match=match):
        identify_outputs(details)


def test_layouts():
    assert mask_layout([1, 200, 108, 108], 200) == "NQHW" and mask_layout([1, 108, 108, 200], 200) == "NHWQ"
    assert input_layout([1, 432, 432, 3]) == ("NHWC", 432) and input_layout([1, 3, 432, 432]) == ("NCHW", 432)
    with pytest.raises(ValueError, match="not square"):
        input_layout([1, 24, 32, 3])


def test_quantize_dequantize_round_trip_and_passthrough():
    det = {"name": "x", "dtype": np.int8, "quantization": (0.05, -3)}
    x = np.linspace(-8, 8, 81, dtype=np.float32)
    q = quantize(x, det)
    assert q.dtype == np.int8 and q.min() == -128 and q.max() == 127  # clipped at the int8 range
    back = dequantize(q, det)
    inside = (x > -6.2) & (x < 6.4)
    assert np.abs(back[inside] - x[inside]).max() <= 0.025 + 1e-6  # half a step
    f = np.ones(3, np.float32)
    assert quantize(f, {"dtype": np.float32}) is not None and dequantize(f, {"quantization": (0.0, 0)}).dtype == np.float32
    idx = np.arange(4, dtype=np.int32)
    assert dequantize(idx, {"quantization": (0.0, 0)}).dtype == np.int32  # topk_indices stay integers
    with pytest.raises(ValueError, match="without a quantisation scale"):
        quantize(x, {"name": "x", "dtype": np.int8, "quantization": (0.0, 0)})


def test_io_contract_imports_with_numpy_only(tmp_path):
    """It ships in the bundle: importing it must not pull torch, nailkit or anything else heavy."""
    code = ("import sys, runpy; sys.path.insert(0, sys.argv[1]); import io_contract; "
            "bad = [m for m in ('torch', 'nailkit', 'tensorflow', 'onnxruntime', 'ai_edge_litert') if m in sys.modules];"
            "print(bad)")
    src = Path(io_contract.__file__)
    (tmp_path / "io_contract.py").write_bytes(src.read_bytes())
    out = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
