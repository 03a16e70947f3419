"""nailkit.export.onnx: verified export, cache, clear errors, the gate that refuses a silently wrong export, CLI."""

from __future__ import annotations

import json
import types

import pytest

from nailkit.core import artifacts
from nailkit.verify import gates
from nailkit.export import onnx as onnx_export
from nailkit.data.samples import sample_images

from _ties import tie_order


def test_invalid_resolution_is_refused_with_nearest_valid_values(demo_model, tmp_path):
    with pytest.raises(ValueError) as err:
        onnx_export.export_onnx(demo_model, tmp_path / "m.onnx", resolution=400)
    msg = str(err.value)
    assert "400" in msg and "24" in msg and "384" in msg and "408" in msg
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_too_old_opset_and_unknown_exporter_are_refused(demo_model, tmp_path):
    with pytest.raises(ValueError, match="GridSample"):
        onnx_export.export_onnx(demo_model, tmp_path / "m.onnx", opset=15)
    with pytest.raises(ValueError, match="exporter"):
        onnx_export.default_opset("tensorrt")


def test_segmentation_requested_on_detection_only_model_is_refused(demo_model, tmp_path):
    fake = types.SimpleNamespace(model=demo_model.model, class_names=demo_model.class_names,
                                 model_config=demo_model.model_config.model_copy(update={"segmentation_head": False}))
    with pytest.raises(ValueError, match="no segmentation head"):
        onnx_export.export_onnx(fake, tmp_path / "m.onnx", segmentation=True)


@pytest.fixture(scope="session")
def verified_432(demo_ckpt, demo_model, outputs_dir):
    return onnx_export.ensure_onnx(demo_ckpt, outputs_dir, rf=demo_model)


@pytest.mark.slow
def test_ensure_onnx_432_shapes_parity_and_cache(verified_432, demo_ckpt, demo_model, outputs_dir):
    path, meta = verified_432
    p = meta["parity"]
    assert p["output_shapes"] == {"pred_boxes": [1, 200, 4], "pred_logits": [1, 200, 3],
                                  "pred_masks": [1, 200, 108, 108]}
    g = gates.GATES["onnx"]
    assert p["passed"] and all(v <= g["max_abs"] for v in p["max_abs"].values())
    assert p["detections_matched"] == p["detections_expected"] == gates.TOP_K * p["num_images"]
    assert p["min_mask_iou"] >= g["min_mask_iou"]
    side = json.loads(artifacts.sidecar_path(path).read_text())
    assert side["key"]["checkpoint_content"] and side["key"]["params"]["resolution"] == 432 and side["opset"] == 17
    assert side["sha256"] == artifacts.file_sha256(path, 64) and side["verified"]
    again, meta2 = onnx_export.ensure_onnx(demo_ckpt, outputs_dir, rf=demo_model)
    assert again == path and meta2["cached"]


@pytest.mark.slow
def test_gate_refuses_a_corrupted_initializer(verified_432, demo_model, tmp_path):
    import onnx
    from onnx import numpy_helper

    path, _ = verified_432
    model = onnx.load(str(path))
    # one decoder weight, slightly scaled: the file still loads and runs, the outputs are silently wrong
    init = next(i for i in model.graph.initializer if i.name.endswith("decoder.layers.3.self_attn.out_proj.weight"))
    arr = numpy_helper.to_array(init).copy()
    arr *= 1.05
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "corrupt.onnx"
    onnx.save(model, str(bad))
    photo = sample_images("photos")[:1]
    good_report = onnx_export.verify_onnx(demo_model, path, photo)
    bad_report = onnx_export.verify_onnx(demo_model, bad, photo)
    assert good_report.passed and not good_report.failures
    assert not bad_report.passed
    assert any("pred_logits" in f or "pred_masks" in f for f in bad_report.failures), bad_report.failures
    assert max(bad_report.max_abs().values()) > gates.GATES["onnx"]["max_abs"]


@pytest.mark.slow
def test_cli_export_onnx_prints_path_and_parity(verified_432, demo_ckpt, outputs_dir, capsys):
    from nailkit.cli import main

    rc = main(["export-onnx", str(demo_ckpt), "--out", str(outputs_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    assert str(verified_432.path) in out and "PASS" in out and "pred_masks" in out


def test_cli_export_onnx_bad_resolution_exits_2(demo_ckpt, tmp_path, capsys):
    from nailkit.cli import main

    rc = main(["export-onnx", str(demo_ckpt), "--out", str(tmp_path), "--resolution", "400"])
    assert rc == 2
    assert "24" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists() or not list((tmp_path / "onnx").glob("*.onnx"))


@pytest.fixture(scope="session")
def tent_top20(demo_ckpt, demo_model, outputs_dir):
    return onnx_export.ensure_onnx(demo_ckpt, outputs_dir, rf=demo_model, sampling="tent", mask_queries=20)


@pytest.mark.slow
def test_tent_top20_onnx_passes_the_same_gate_and_predicts_like_the_full_model(verified_432, tent_top20, demo_ckpt,
                                                                              demo_model, outputs_dir, capsys):
    """One export exercises both options: the gate (unchanged tolerances; the reference is the grid_sample module
    restricted to the same 20 rows), its own cache entry, and — through the runtime — the same first 20 detections as
    the full-model ONNX."""
    import numpy as np

    from nailkit.cli import main
    from nailkit.runtime.onnx_runner import OnnxRunner

    path, meta = tent_top20
    assert path != verified_432.path and "_tent_mq20" in path.name
    assert meta["key"]["params"]["sampling"] == "tent" and meta["key"]["params"]["mask_queries"] == 20
    p = meta["parity"]
    assert p["passed"] and p["output_shapes"] == {"pred_boxes": [1, 20, 4], "pred_logits": [1, 20, 3],
                                                  "pred_masks": [1, 20, 108, 108]}
    assert all(v <= gates.GATES["onnx"]["max_abs"] for v in p["max_abs"].values())
    full, top = OnnxRunner(verified_432.path), OnnxRunner(path)
    assert top.class_names == full.class_names
    for img in sample_images("photos")[:2]:
        a = full.predict(img, threshold=0.0, num_select=20)
        b = top.predict(img, threshold=0.0, num_select=20)
        assert len(a) == len(b) == 20
        b = b.subset(tie_order(a.confidence, a.class_id, a.xyxy, b.confidence, b.class_id, b.xyxy))  # near-ties swap
        assert np.array_equal(a.class_id, b.class_id)
        assert np.abs(a.confidence - b.confidence).max() <= gates.DETECTIONS["max_score_diff"]
        assert np.abs(a.xyxy - b.xyxy).max() <= gates.DETECTIONS["max_box_l1_px"]
        inter = np.logical_and(a.mask, b.mask).sum((1, 2))
        union = np.logical_or(a.mask, b.mask).sum((1, 2))
        assert np.all(inter >= gates.DETECTIONS["min_mask_iou"] * union)
    # the CLI names the options and reuses the cached file
    assert main(["export-onnx", str(demo_ckpt), "--out", str(outputs_dir), "--sampling", "tent",
                 "--mask-queries", "20"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "sampling tent" in out and "top 20" in out and "(cached)" in out
