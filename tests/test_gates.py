"""nailkit.verify.gates: every tolerance as data, one check(stage, metrics) -> failures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nailkit.verify import gates

REPO = Path(__file__).resolve().parent.parent

FP32_OK = {"pre_topk_max_abs": 1e-6, "forced_max_abs": 1e-5, "forced_min_mask_iou": 1.0, "unforced_agree_untied": True}
DET_OK = {"unmatched_a": 0, "unmatched_b": 0, "all_same_class": True, "max_box_l1_px": 0.1, "max_score_diff": 1e-5,
          "min_mask_iou": 0.9995}


def test_tflite_gates():
    assert gates.check("tflite_fp32", FP32_OK) == []
    assert gates.check("tflite_fp32", dict(FP32_OK, pre_topk_max_abs=1e-3)) == ["pre-TopK max-abs 1.00e-03 > 0.0001"]
    assert gates.check("tflite_fp32", dict(FP32_OK, unforced_agree_untied=False))
    assert gates.check("tflite_fp32", dict(FP32_OK, forced_max_abs=float("nan")))  # NaN never passes
    assert gates.check("tflite_fp16", {"control_ratio_max": 1.2, "control_ratio": {}}) == []
    assert gates.check("tflite_int8", {"control_ratio_max": 2.0, "control_ratio": {}})
    assert gates.check("tflite_int8", {}) == ["no rounding control was measured (control_ratio_max missing)"]
    assert gates.tflite_stage("int8") == "tflite_int8"
    with pytest.raises(ValueError, match="no TFLite gate"):
        gates.tflite_stage("int4")


def test_onnx_gate_and_overrides():
    ok = {"max_abs": {"pred_boxes": 1e-5, "pred_logits": 2e-4}, "detections": DET_OK}
    assert gates.check("onnx", ok) == []
    bad = {"max_abs": {"pred_boxes": 1e-5, "pred_logits": 2e-3}, "detections": dict(DET_OK, min_mask_iou=0.99)}
    fails = gates.check("onnx", bad)
    assert len(fails) == 2 and "pred_logits max-abs" in fails[0] and "mask IoU" in fails[1]
    assert gates.check("onnx", bad, {"max_abs": 1e-2, "min_mask_iou": 0.9}) == []
    with pytest.raises(ValueError, match="unknown gate stage"):
        gates.check("coreml", {})


def test_consistency_gates_per_precision():
    row = {"matched_frac": 0.8, "same_class": True, "min_mask_iou": 0.82, "max_score_diff": 5e-3}
    assert gates.check("consistency_fp16", row) == []
    assert len(gates.check("consistency_fp32", row)) == 3
    assert gates.consistency_stage("int8") is None and gates.consistency_stage("fp16") == "consistency_fp16"


def test_each_tolerance_lives_in_gates_only():
    """No other module of the package holds a gate number of its own (grep for the names and the literals)."""
    pattern = re.compile(r"(MAX_ABS_TOL|MIN_MASK_IOU|tie_eps\s*[:=]\s*[0-9]|control_ratio\"?\s*:\s*[0-9]|"
                         r"min_mask_iou\s*[:=]\s*0\.|0\.999\b)")
    hits = []
    for p in sorted((REPO / "nailkit").rglob("*.py")):
        if p.name == "gates.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []
