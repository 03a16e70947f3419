"""Runners: outputs mapped by shape and meaning, NHWC/NCHW inputs, every backend agrees, clear errors, `predict` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nailkit.portable.postprocess import RawOutputs
from nailkit.runtime.base import canonical_outputs
from nailkit.runtime.onnx_runner import OnnxRunner
from nailkit.runtime.predict import check_writable_dir
from nailkit.runtime.runners import make_runner, normalize_backend
from nailkit.runtime.tflite_runner import TFLiteRunner

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
R, Q, C, MH = 24, 5, 3, 6

# A tiny TFLite "rfdetr" made with TensorFlow in a subprocess (tensorflow/triton import order): NHWC input like
# onnx2tf's, NHWC masks [1,h,w,Q], outputs named so that sorting by name puts them in the wrong order.
TINY_TFLITE = r'''
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
R, Q, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def convert(f):
    c = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    return c.convert()
@tf.function(input_signature=[tf.TensorSpec([1, R, R, 3], tf.float32)])
def nhwc(x):
    m = tf.reduce_mean(x, axis=[1, 2])
    logits = tf.reshape(tf.range(Q * 3, dtype=tf.float32), [1, Q, 3]) * 0.1 + tf.reduce_sum(m) - 3.0
    boxes = tf.sigmoid(tf.reshape(tf.range(Q * 4, dtype=tf.float32), [1, Q, 4]) * 0.05 + tf.reduce_sum(m))
    masks = tf.image.resize(x[..., :1], [R // 4, R // 4]) * tf.reshape(tf.range(1, Q + 1, dtype=tf.float32),
                                                                        [1, 1, 1, Q])
    return {"a_masks": masks, "b_boxes": boxes, "c_logits": logits}
@tf.function(input_signature=[tf.TensorSpec([1, R, R + 8, 3], tf.float32)])
def wrong(x):
    return {"y": tf.reduce_mean(x, axis=[1, 2], keepdims=True)}
open(os.path.join(out, "tiny_nhwc.tflite"), "wb").write(convert(nhwc))
open(os.path.join(out, "wrong_input.tflite"), "wb").write(convert(wrong))
'''


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tflite")
    proc = subprocess.run([PY, "-c", TINY_TFLITE, str(R), str(Q), str(d)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return d


def _tiny_torch_module(nhwc: bool):
    import torch

    class Tiny(torch.nn.Module):
        def forward(self, x):
            if nhwc:
                x = x.permute(0, 3, 1, 2)
            m = x.mean(dim=(2, 3))
            logits = torch.arange(Q * C, dtype=torch.float32).reshape(1, Q, C) * 0.1 + m.sum() - 3.0
            boxes = torch.sigmoid(torch.arange(Q * 4, dtype=torch.float32).reshape(1, Q, 4) * 0.05 + m.sum())
            masks = torch.nn.functional.avg_pool2d(x[:, :1], 4) * torch.arange(1, Q + 1).float().reshape(1, Q, 1, 1)
            return masks, logits, boxes  # deliberately not rfdetr's order

    return Tiny().eval()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("tiny_onnx")
    paths = {}
    for layout in ("NCHW", "NHWC"):
        shape = (1, 3, R, R) if layout == "NCHW" else (1, R, R, 3)
        p = d / f"tiny_{layout.lower()}.onnx"
        torch.onnx.export(_tiny_torch_module(layout == "NHWC"), torch.rand(*shape), str(p), dynamo=False,
                          input_names=["img"], output_names=["z_masks", "y_logits", "x_boxes"], opset_version=17)
        paths[layout] = p
    return paths


# ------------------------------------------------------------------------------------------------------------------
# mapping by shape and meaning
# ------------------------------------------------------------------------------------------------------------------

def _fake(q=7, c=3, h=6, seed=0):
    rng = np.random.default_rng(seed)
    boxes = rng.uniform(0, 1, (1, q, 4)).astype(np.float32)
    logits = rng.normal(-3, 2, (1, q, c)).astype(np.float32)
    masks = rng.normal(0, 1, (1, q, h, h + 2)).astype(np.float32)
    return boxes, logits, masks


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (2, 0, 1)])
def test_outputs_mapped_by_shape_in_any_order(order):
    arrays = _fake()
    raw = canonical_outputs([arrays[i] for i in order])
    np.testing.assert_array_equal(raw.boxes, arrays[0][0])
    np.testing.assert_array_equal(raw.logits, arrays[1][0])
    np.testing.assert_array_equal(raw.masks, arrays[2][0])


def test_nhwc_masks_detected_by_query_axis():
    boxes, logits, masks = _fake(q=7, h=6)
    raw = canonical_outputs([np.transpose(masks, (0, 2, 3, 1)), logits, boxes])  # onnx2tf: [1,h,w,Q]
    np.testing.assert_array_equal(raw.masks, masks[0])


def test_four_logit_classes_told_apart_from_boxes_by_value_range():
    boxes, logits, masks = _fake(c=4)
    raw = canonical_outputs([logits, masks, boxes])
    np.testing.assert_array_equal(raw.boxes, boxes[0])
    np.testing.assert_array_equal(raw.logits, logits[0])


def test_selection_outputs_go_to_extra_and_detection_only_models():
    boxes, logits, _ = _fake()
    enc = np.random.default_rng(1).normal(size=(1, 300)).astype(np.float32)
    idx = np.arange(7, dtype=np.int32)[None]
    raw = canonical_outputs([idx, logits, enc, boxes])
    assert raw.masks is None
    np.testing.assert_array_equal(raw.extra["topk_indices"], idx)
    np.testing.assert_array_equal(raw.extra["enc_scores"], enc)


@pytest.mark.parametrize("bad,match", [
    ([np.zeros((1, 7, 4)), np.zeros((1, 6, 3))], "disagree on the number of queries"),
    ([np.zeros((1, 7, 5)), np.zeros((1, 7, 3))], r"no \[1,Q,4\] box output"),
    ([np.zeros((1, 7, 4))], "not rfdetr's"),
    ([np.zeros((2, 7, 4)), np.zeros((2, 7, 3))], "batch dimension of 1"),
    ([np.zeros((1, 7, 4)), np.zeros((1, 7, 3)), np.zeros((1, 5, 6, 6))], "no axis of Q=7"),
])
def test_unrecognisable_outputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        canonical_outputs([b.astype(np.float32) for b in bad])


# ------------------------------------------------------------------------------------------------------------------
# ONNX Runtime and TFLite on tiny models
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_onnx_runner_layouts_and_output_order(tiny_onnx, layout):
    import torch

    runner = OnnxRunner(tiny_onnx[layout], threads=1)
    assert (runner.resolution, runner.input_layout, runner.backend) == (R, layout, "onnxruntime")
    x = np.random.default_rng(0).normal(size=(1, 3, R, R)).astype(np.float32)
    raw = runner.run(x)  # always NCHW in; the runner transposes for NHWC models
    native = torch.from_numpy(x if layout == "NCHW" else x.transpose(0, 2, 3, 1).copy())
    masks, logits, boxes = (t.numpy() for t in _tiny_torch_module(layout == "NHWC")(native))
    assert np.allclose(raw.boxes, boxes[0], atol=1e-6) and np.allclose(raw.logits, logits[0], atol=1e-5)
    assert np.allclose(raw.masks, masks[0], atol=1e-5)
    assert runner.last_ms > 0
    with pytest.raises(ValueError, match="expected NCHW"):
        runner.run(x[:, :, :-1])
    runner.close()


def test_tflite_runner_nhwc_model_and_xnnpack_switch(tiny_tflite):
    from ai_edge_litert.interpreter import Interpreter

    path = tiny_tflite / "tiny_nhwc.tflite"
    x = np.random.default_rng(0).uniform(-2, 2, size=(1, 3, R, R)).astype(np.float32)
    fast = make_runner(path, threads=2)
    slow = make_runner(path, backend="tflite-noxnnpack", threads=1)
    assert isinstance(fast, TFLiteRunner) and fast.use_xnnpack and not slow.use_xnnpack
    from nailkit.portable import io_contract
    from nailkit.tflite import gate as tflite_gate

    # one TFLite runner: predict, the parity gates and the bundle all run io_contract.TFLiteModel
    assert isinstance(fast.model, io_contract.TFLiteModel) and tflite_gate.TFLiteModel is io_contract.TFLiteModel
    assert (fast.resolution, fast.input_layout) == (R, "NHWC")
    a, b = fast.run(x), slow.run(x)
    # oracle: the interpreter's outputs by their (test-only) names
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x.transpose(0, 2, 3, 1).copy())
    it.invoke()
    by_name = {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}
    named = {k.split("_")[-1] if "_" in k else k: v for k, v in by_name.items()}
    ref_masks = next(v for v in by_name.values() if v.ndim == 4)
    assert np.allclose(a.masks, ref_masks[0].transpose(2, 0, 1), atol=1e-6)
    assert a.masks.shape == (Q, R // 4, R // 4) and a.boxes.shape == (Q, 4) and a.logits.shape == (Q, 3)
    assert (a.boxes >= 0).all() and (a.boxes <= 1).all() and len(named) == 3
    for k in ("boxes", "logits", "masks"):
        assert np.allclose(getattr(a, k), getattr(b, k), atol=1e-5), k
    pred = fast.predict(np.zeros((30, 40, 3), np.uint8), threshold=0.0, num_select=3)
    assert len(pred) == 3 and pred.mask.shape == (3, 30, 40)


def test_wrong_input_shape_tflite_is_refused(tiny_tflite):
    with pytest.raises(ValueError, match=r"wrong_input.tflite.*not square|wrong_input.tflite.*does not match"):
        make_runner(tiny_tflite / "wrong_input.tflite")


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "zeroed"])
def test_corrupt_tflite_raises_valueerror_naming_file(tiny_tflite, tmp_path, kind):
    good = (tiny_tflite / "tiny_nhwc.tflite").read_bytes()
    data = {"random": np.random.default_rng(0).bytes(3000), "truncated": good[: len(good) // 2], "empty": b"",
            "zeroed": good[:8] + bytes(400) + good[408:]}[kind]
    p = tmp_path / f"{kind}.tflite"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=f"{kind}.tflite"):
        make_runner(p)


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_onnx_raises_valueerror_naming_file(tiny_onnx, tmp_path, kind):
    good = tiny_onnx["NCHW"].read_bytes()
    data = np.random.default_rng(0).bytes(3000) if kind == "random" else good[: len(good) // 2]
    p = tmp_path / f"{kind}.onnx"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=f"{kind}.onnx.*not a loadable ONNX model"):
        make_runner(p)


def test_make_runner_dispatch_errors(tmp_path, tiny_onnx):
    with pytest.raises(ValueError, match="unknown model type"):
        make_runner(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="cannot run a .onnx"):
        make_runner(tiny_onnx["NCHW"], backend="tflite")
    with pytest.raises(ValueError, match="unknown backend"):
        normalize_backend("tensorrt")
    with pytest.raises(FileNotFoundError):
        make_runner(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="cannot run a dict"):
        make_runner({})
    assert normalize_backend("onnx") == "onnxruntime" and normalize_backend(None) is None


# ------------------------------------------------------------------------------------------------------------------
# the demo model on every PyTorch/ONNX backend
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torch_eager_traced_and_onnxruntime_agree_on_demo(demo_model, demo_ckpt, outputs_dir):
    from nailkit.data.samples import sample_images
    from nailkit.export.onnx import ensure_onnx
    from nailkit.verify.parity import detection_parity
    from nailkit.portable.preprocess import preprocess

    eager = make_runner(demo_model)
    traced = make_runner(demo_model, backend="torch-traced")
    assert not demo_model._is_optimized_for_inference  # rf.predict() still runs the eager model
    onnx_path, _ = ensure_onnx(demo_ckpt, outputs_dir, rf=demo_model)  # "" is the trained model, not this one
    ort = make_runner(onnx_path, threads=2)
    assert ort.resolution == eager.resolution == 432 and ort.class_names == eager.class_names
    img = sample_images(kind="photos")[0]
    x, size = preprocess(img, eager.resolution)
    ref = eager.run(x)
    for runner, tol in ((traced, 1e-4), (ort, 1e-3)):
        raw = runner.run(x)
        assert isinstance(raw, RawOutputs)
        assert np.abs(raw.boxes - ref.boxes).max() < tol and np.abs(raw.logits - ref.logits).max() < tol
        assert np.abs(raw.masks - ref.masks).max() < 10 * tol
        par = detection_parity(ref, raw, size, top_k=10)
        assert par.agrees(min_mask_iou=0.99, max_box_l1_px=1.0, max_score_diff=1e-4), par.summary()


# ------------------------------------------------------------------------------------------------------------------
# python -m nailkit predict
# ------------------------------------------------------------------------------------------------------------------

def _cli(*argv, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([PY, "-m", "nailkit", "predict", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def test_check_writable_dir(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_writable_dir(f)
    with pytest.raises(PermissionError, match="not writable"):
        check_writable_dir(f / "sub")
    assert check_writable_dir(tmp_path / "new" / "dir").is_dir()


def test_unwritable_out_dir_refused_even_as_root(tmp_path):
    """Permission bits do not stop root; a name the file system refuses stops everyone."""
    with pytest.raises(PermissionError, match="not writable.*name too long"):
        check_writable_dir(tmp_path / ("x" * 300))


def test_cli_predict_bad_inputs_write_nothing(tmp_path, tiny_onnx):
    from nailkit.data.samples import sample_images

    photo = sample_images(kind="photos")[0]
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    r = _cli(tiny_onnx["NCHW"], photo, "--out", blocker / "out")
    assert r.returncode == 2 and "which is a file" in r.stderr and r.stderr.count("\n") == 1
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    r = _cli(tiny_onnx["NCHW"], photo, bad, "--out", out)
    assert r.returncode == 2 and "broken.png" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written for the good image either, not even the folder
    r = _cli(tmp_path / "garbage.tflite", photo, "--out", out)
    assert r.returncode == 2 and "garbage.tflite" in r.stderr and not out.exists()


def test_cli_predict_writes_overlays_and_json(tmp_path, tiny_onnx):
    from PIL import Image

    from nailkit.data.samples import sample_images

    imgs = sample_images(kind="photos")[:2]
    out = tmp_path / "pred"
    r = _cli(tiny_onnx["NHWC"], *imgs, "--threshold", "0.0", "--num-select", "4", "--out", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "detections.json").read_text())
    assert [Path(i["image"]).name for i in doc["images"]] == [p.name for p in imgs]
    for rec, p in zip(doc["images"], imgs):
        assert rec["count"] == 4 == len(rec["detections"])
        with Image.open(rec["overlay"]) as im, Image.open(p) as src:
            assert im.size == src.size and im.format == "PNG"
    assert sorted(f.name for f in out.iterdir()) == sorted([f"{p.stem}_overlay.png" for p in imgs]
                                                           + ["detections.json", ".nailkit-output.json"])


@pytest.mark.slow
def test_cli_predict_demo_checkpoint_on_real_photo(tmp_path, demo_ckpt):
    from PIL import Image

    from nailkit.data.samples import sample_images

    photo = sample_images(kind="photos")[0]
    out = tmp_path / "demo_pred"
    r = _cli(demo_ckpt, photo, "--threshold", "0.03", "--out", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "detections.json").read_text())
    rec = doc["images"][0]
    assert doc["runner"]["backend"] == "torch" and rec["count"] == len(rec["detections"]) > 0
    assert all(d["confidence"] > 0.03 for d in rec["detections"])
    with Image.open(out / f"{photo.stem}_overlay.png") as im:
        arr = np.asarray(im.convert("RGB"))
    with Image.open(photo) as src:
        assert arr.shape[:2] == (src.size[1], src.size[0])
        assert np.abs(arr.astype(int) - np.asarray(src.convert("RGB")).astype(int)).max() > 50  # something drawn
    assert str(out / f"{photo.stem}_overlay.png") in r.stdout


# ------------------------------------------------------------------------------------------------------------------
# notebook 05 helpers: artifact discovery, consistency rows, benchmark line
# ------------------------------------------------------------------------------------------------------------------

def test_find_tflite_artifacts_only_for_this_checkpoint(tiny_tflite, tmp_path):
    from nailkit.runtime.discovery import find_tflite_artifacts

    good = (tiny_tflite / "tiny_nhwc.tflite").read_bytes()
    mine = tmp_path / "tflite" / "litert_24_abc"
    mine.mkdir(parents=True)
    (mine / "model_fp16.tflite").write_bytes(good)
    (mine / "model_fp16.tflite.json").write_text(json.dumps({"checkpoint_sha256": "961a8854ca64", "route": "litert",
                                                             "precision": "fp16"}))
    (mine / "model_int8.tflite").write_bytes(good)  # precision from the key/name when the sidecar has none
    (mine / "model_int8.tflite.json").write_text(json.dumps({"key": {"checkpoint_sha256": "961a8854ca64"}}))
    (mine / "other_fp32.tflite").write_bytes(good)
    (mine / "other_fp32.tflite.json").write_text(json.dumps({"checkpoint_sha256": "deadbeef"}))
    (mine / "orphan.tflite").write_bytes(good)
    (mine / ".model_fp32.tflite.123.part").write_bytes(good[:10])
    found, notes = find_tflite_artifacts(tmp_path, "961a8854ca64" + "0" * 52)
    assert [(f["path"].name, f["precision"], f["label"]) for f in found] == [
        ("model_fp16.tflite", "fp16", "tflite:litert:fp16"), ("model_int8.tflite", "int8", "tflite:litert:int8")]
    assert sorted(n.split(": ", 1)[1] for n in notes) == ["skipped (another checkpoint)", "skipped (no sidecar)"]
    assert len(find_tflite_artifacts(tmp_path)[0]) == 4 and find_tflite_artifacts(tmp_path / "nope") == ([], [])


def _results_for(raws, size=(80, 60)):
    return {name: {"img.png": {"raw": raw, "size": size, "ms": 1.0}} for name, raw in raws.items()}


def test_consistency_rows_match_by_iou_and_apply_precision_gates():
    from nailkit.report.tables import format_rows
    from nailkit.runtime.compare import consistency_rows

    rng = np.random.default_rng(0)
    q = 40
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (q, 2)), rng.uniform(0.05, 0.3, (q, 2))], 1).astype(np.float32)
    logits = rng.normal(-3.5, 0.5, (q, 3)).astype(np.float32)
    masks = rng.normal(0, 1, (q, 12, 12)).astype(np.float32)
    ref = RawOutputs(boxes, logits, masks)
    perm = rng.permutation(q)
    permuted = RawOutputs(boxes[perm], logits[perm] + 1e-5, masks[perm])  # same detections, other query order
    flipped = RawOutputs(boxes, logits, -masks)  # same boxes/scores, opposite masks
    results = _results_for({"torch": ref, "perm": permuted, "flip": flipped, "flip8": flipped})
    rows = consistency_rows(results, {"perm": "fp32", "flip": "fp32", "flip8": "int8"}, threshold=0.03, top_k=10)
    by = {r["backend"]: r for r in rows}
    assert by["perm"]["gate"] == "pass" and by["perm"]["matched"] == 10 and by["perm"]["min_mask_iou"] == 1.0
    assert by["perm"]["count"] == by["perm"]["count_ref"] == by["perm"]["matched_at_threshold"]
    assert by["flip"]["gate"] == "FAIL" and by["flip"]["min_mask_iou"] < 0.5
    assert by["flip8"]["gate"] == "report"
    text = format_rows(rows, ["backend", "gate", "min_mask_iou"])
    assert text.splitlines()[0].split() == ["backend", "gate", "min_mask_iou"] and len(text.splitlines()) == 5


def test_benchmark_rows_and_time_runner(tiny_onnx):
    from nailkit.data.samples import sample_images
    from nailkit.runtime.compare import benchmark_rows

    runner = OnnxRunner(tiny_onnx["NCHW"], threads=1)
    rows = benchmark_rows({"onnxruntime": runner}, sample_images()[0], threshold=0.0, runs=2, warmup=0)
    assert len(rows) == 1 and rows[0]["inference_ms"] > 0 and rows[0]["fps"] > 0 and rows[0]["runs"] == 2
    assert rows[0]["detected"] == min(runner.num_select, Q * C)


# ------------------------------------------------------------------------------------------------------------------
# near-tied two-stage selections: compared against torch re-run on the backend's selection
# ------------------------------------------------------------------------------------------------------------------

def _with_selection(raw, idx, scores):
    out = RawOutputs(raw.boxes.copy(), raw.logits.copy(), raw.masks.copy())
    out.extra.update(topk_indices=np.asarray(idx, np.int64).reshape(1, -1),
                     enc_scores=np.asarray(scores, np.float32).reshape(1, -1))
    return out


def test_consistency_rows_compare_a_near_tie_on_the_backends_selection():
    from nailkit.runtime.compare import consistency_rows
    from nailkit.verify import gates

    rng = np.random.default_rng(0)
    q, s = 40, 60
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (q, 2)), rng.uniform(0.05, 0.3, (q, 2))], 1).astype(np.float32)
    logits = rng.normal(-3.5, 0.5, (q, 3)).astype(np.float32)
    logits[0] = 1.0  # query 0 is the best detection
    masks = rng.normal(0, 1, (q, 12, 12)).astype(np.float32)
    scores = np.linspace(2.0, -2.0, s)
    scores[1] = scores[0] - 2e-6  # the two best proposals: a near-tie
    idx = np.arange(q)
    swapped, outsider = idx.copy(), idx.copy()
    swapped[[0, 1]] = [1, 0]
    outsider[0] = s - 1
    ref = _with_selection(RawOutputs(boxes, logits, masks), idx, scores)
    # another content query at rank 0: its detection changes (no permutation pairs it)
    changed = RawOutputs(boxes, logits.copy(), masks.copy())
    changed.logits[0] += 0.3
    changed.masks[0] *= -1
    calls = []

    def rerun(indices):
        calls.append(np.asarray(indices).ravel().tolist())
        assert calls[-1] == swapped.tolist()
        return _with_selection(changed, swapped, scores)

    results = _results_for({"torch": ref, "tie": _with_selection(changed, swapped, scores),
                            "differs": _with_selection(changed, outsider, scores),
                            "none": RawOutputs(changed.boxes, changed.logits, changed.masks)})
    results["torch"]["img.png"]["rerun"] = rerun
    rows = consistency_rows(results, {"tie": "fp32", "differs": "fp32", "none": "fp32"}, threshold=0.03, top_k=10)
    by = {r["backend"]: r for r in rows}
    assert len(calls) == 1  # only the near-tie re-ran torch
    tie = by["tie"]
    assert tie["selection"] == "tie" and tie["forced"] and tie["gate"] == "pass"
    assert tie["max_score_diff"] == 0.0 and tie["min_mask_iou"] == 1.0 and tie["selection_gap"] < gates.TIE_EPS
    unforced = {k: tie[f"unforced_{k}"] for k in ("matched_frac", "same_class", "min_mask_iou", "max_score_diff")}
    assert gates.check("consistency_fp32", unforced)  # the unforced numbers stay in the row, and they would fail
    for name, sel in (("differs", "differs"), ("none", None)):
        row = by[name]
        assert row["selection"] == sel and not row["forced"] and row["gate"] == "FAIL"
        assert row["max_score_diff"] == row["unforced_max_score_diff"] == unforced["max_score_diff"]


@pytest.fixture(scope="module")
def demo_torch(demo_model):
    """The eager TorchRunner on the demo checkpoint, one photo run through ``run_all`` (preprocessed input kept)."""
    from nailkit.data.samples import sample_images
    from nailkit.portable.preprocess import preprocess
    from nailkit.runtime.compare import run_all
    from nailkit.runtime.torch_runner import TorchRunner

    runner = TorchRunner(demo_model)
    img = sample_images(kind="photos")[0]
    results = run_all({"torch": runner}, [img], progress=False)
    return runner, preprocess(img, runner.resolution)[0], results


def test_torch_runner_records_its_selection_and_forcing_it_is_exact(demo_torch):
    runner, x, results = demo_torch
    ref = results["torch"][next(iter(results["torch"]))]
    raw = ref["raw"]
    idx, scores = raw.extra["topk_indices"], raw.extra["enc_scores"]
    assert idx.shape == (1, runner.num_select) and idx.dtype == np.int64 and scores.shape[0] == 1
    assert np.array_equal(idx[0], np.argsort(-scores[0], kind="stable")[:idx.shape[1]])  # the top-Q, best first
    again = ref["rerun"](idx)  # run_all's rerun is run_selected on the same input
    for k in ("boxes", "logits", "masks"):
        assert np.array_equal(getattr(again, k), getattr(raw, k)), k
    assert np.array_equal(again.extra["topk_indices"], idx) and np.array_equal(runner.run(x).logits, raw.logits)


def test_demo_swap_of_the_two_best_proposals_is_a_tie_an_outsider_differs(demo_torch):
    from nailkit.runtime.compare import consistency_rows
    from nailkit.verify.parity import query_matched_diff

    runner, x, results = demo_torch
    img, ref = next(iter(results["torch"].items()))
    idx, scores = ref["raw"].extra["topk_indices"], ref["raw"].extra["enc_scores"]
    swapped, outsider = idx.copy(), idx.copy()
    swapped[0, [0, 1]] = idx[0, [1, 0]]
    outsider[0, 0] = int(np.argmin(scores[0]))  # far below the boundary
    tied = runner.run_selected(x, swapped)
    assert np.abs(tied.logits - ref["raw"].logits).max() > 1e-2
    assert query_matched_diff(ref["raw"], tied).logits_max_abs > 1e-2  # not a permutation of the outputs
    # a backend whose scores rank the second proposal first: off by the two's gap, so within 2 x its error
    theirs = scores.copy()
    theirs[0, idx[0, [0, 1]]] = scores[0, idx[0, [1, 0]]]
    tied.extra["enc_scores"] = theirs
    far = runner.run_selected(x, outsider)
    far.extra["enc_scores"] = theirs
    calls = []

    def rerun(indices):
        calls.append(indices)
        return ref["rerun"](indices)

    res = {"torch": {img: {**ref, "rerun": rerun}}, "tie": {img: {"raw": tied, "size": ref["size"]}},
           "outsider": {img: {"raw": far, "size": ref["size"]}}}
    by = {r["backend"]: r for r in consistency_rows(res, {"tie": "fp32", "outsider": "fp32"})}
    assert by["tie"]["selection"] == "tie" and by["tie"]["forced"] and by["tie"]["gate"] == "pass"
    assert by["tie"]["max_score_diff"] == 0.0 and by["tie"]["max_abs_logit"] == 0.0
    assert by["tie"]["unforced_max_score_diff"] > 0.0
    assert by["outsider"]["selection"] == "differs" and not by["outsider"]["forced"] and len(calls) == 1
    assert by["outsider"]["max_abs_logit"] > 1e-2
