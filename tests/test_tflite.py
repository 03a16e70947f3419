"""nailkit.tflite: output identification, refusal of corrupt files, caching, atomic artifacts, gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nailkit import tflite


def _d(name, shape, dtype=np.float32):
    return {"name": name, "shape": np.array(shape), "dtype": dtype}


def test_outputs_identified_by_shape_not_position():
    canonical = [_d("pred_boxes", [1, 200, 4]), _d("pred_logits", [1, 200, 3]), _d("pred_masks", [1, 200, 108, 108]),
                 _d("enc_scores", [1, 1296]), _d("topk_indices", [1, 200], np.int32)]
    names = ["StatefulPartitionedCall:0", "x", "y", "z", "w"]
    rng = np.random.default_rng(0)
    for _ in range(5):
        order = rng.permutation(len(canonical))
        details = [dict(canonical[i], name=names[j]) for j, i in enumerate(order)]  # names carry no meaning
        idx = tflite.identify_outputs(details)
        assert {k: canonical[order[v]]["name"] for k, v in idx.items()} == {c["name"]: c["name"] for c in canonical}


def test_boxes_vs_logits_with_four_columns_uses_names_or_refuses():
    details = [_d("out_logits", [1, 10, 4]), _d("out_pred_boxes", [1, 10, 4]), _d("m", [1, 10, 8, 8])]
    idx = tflite.identify_outputs(details)
    assert idx["pred_boxes"] == 1 and idx["pred_logits"] == 0
    with pytest.raises(ValueError, match="cannot tell boxes from logits"):
        tflite.identify_outputs([_d("a", [1, 10, 4]), _d("b", [1, 10, 4]), _d("m", [1, 10, 8, 8])])
    with pytest.raises(ValueError, match="two outputs look like pred_masks"):
        tflite.identify_outputs([_d("a", [1, 10, 4]), _d("b", [1, 10, 3]), _d("m", [1, 10, 8, 8]),
                                 _d("n", [1, 10, 8, 8])])


def test_corrupt_tflite_is_refused(tmp_path: Path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 4 + b"NOPE" + b"\x00" * 200)
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        tflite.check_tflite_file(bad)
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        tflite.load_runner(bad)
    with pytest.raises(FileNotFoundError):
        tflite.check_tflite_file(tmp_path / "missing.tflite")


def test_truncated_tflite_is_refused(tmp_path: Path):
    """Right magic, but cut short: LiteRT must not load it and nailkit says which file."""
    p = tmp_path / "trunc.tflite"
    p.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 100)
    with pytest.raises(ValueError, match="trunc.tflite"):
        tflite.load_runner(p)


def test_cache_sidecar_must_match(tmp_path: Path):
    f = tmp_path / "model_fp32.tflite"
    f.write_bytes(b"x" * 100)
    key = {"a": 1}
    assert tflite._cached(f, key) is None  # no sidecar
    tflite._sidecar(f).write_text(json.dumps({"key": key, "bytes": 100}))
    assert tflite._cached(f, key) == {"key": key, "bytes": 100}
    assert tflite._cached(f, {"a": 2}) is None  # other checkpoint / parameters
    f.write_bytes(b"x" * 50)  # file changed after the sidecar was written
    assert tflite._cached(f, key) is None


def test_failed_conversion_leaves_no_file_under_final_name(tmp_path: Path, demo_ckpt, monkeypatch):
    """The worker writes a partial file in its scratch dir and dies: nothing appears under the final name."""
    seen = {}

    def dying_worker(args, log_path, desc, timeout=0):
        work = Path(args[-1])
        (work / "fp32.tflite").write_bytes(b"\x00\x00\x00\x00TFL3 half written")
        seen["work"] = work
        raise tflite.ConversionError("simulated crash")

    monkeypatch.setattr(tflite, "run_worker", dying_worker)
    with pytest.raises(tflite.ConversionError, match="simulated crash"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432)
    assert not seen["work"].exists()  # scratch dir removed
    assert list(tmp_path.rglob("*.tflite")) == []


def test_bad_route_and_precision_are_refused(demo_ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown route"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "coreml", "fp32", 432)
    with pytest.raises(ValueError, match="unknown precision"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "int4", 432)
    with pytest.raises(ValueError, match="full_int8"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "full_int8", 432)


def test_gate_failures_reads_the_gates():
    ok = {"pre_topk_max_abs": 1e-6, "forced_max_abs": 1e-5, "forced_min_mask_iou": 1.0, "unforced_agree_untied": True}
    assert tflite.gate_failures("fp32", ok) == []
    assert tflite.gate_failures("fp32", dict(ok, pre_topk_max_abs=1e-3))
    assert tflite.gate_failures("fp32", dict(ok, unforced_agree_untied=False))
    assert tflite.gate_failures("fp16", {"control_ratio_max": 1.2, "control_ratio": {}}) == []
    assert tflite.gate_failures("int8", {"control_ratio_max": 2.0, "control_ratio": {}})


# ------------------------------------------------------------------------------------------------------------------
# heavy: real conversions (cached in outputs/ — shared with notebook 04 and the CLI)
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refs2(demo_model):
    from nailkit.data import sample_images
    from nailkit.model import export_module

    module = export_module(demo_model, 432)
    imgs = sample_images("photos")[:1] + sample_images("synthetic")[:1]
    return module, tflite.reference_outputs(module, imgs, 432)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["litert", "onnx2tf"])
def test_fp32_gates_and_cache(route, demo_ckpt, outputs_dir, refs2):
    module, refs = refs2
    path, meta = tflite.ensure_tflite(demo_ckpt, outputs_dir, route, "fp32", 432)
    mtime = path.stat().st_mtime
    path2, meta2 = tflite.ensure_tflite(demo_ckpt, outputs_dir, route, "fp32", 432)  # cache hit: no conversion
    assert path2 == path and meta2 == meta and path.stat().st_mtime == mtime
    assert meta["conversion_wall_s"] > 0 and meta["conversion_peak_rss_mb"] > 100
    runner = tflite.load_runner(path)
    assert runner.input_shape == (1, 432, 432, 3)
    agg = tflite.artifact_parity(path, module, refs, "fp32")["aggregate"]
    assert tflite.gate_failures("fp32", agg) == [], agg


@pytest.mark.slow
def test_delegation_report_counts_ops(demo_ckpt, outputs_dir):
    path, _ = tflite.ensure_tflite(demo_ckpt, outputs_dir, "litert", "fp32", 432)
    rep = tflite.delegation_report(path, outputs_dir)
    assert rep["ops"] == sum(rep["histogram"].values()) > 100
    assert 0 < rep["xnnpack_nodes"] <= rep["xnnpack_total"] and rep["xnnpack_partitions"] >= 1
    assert rep["undelegated"]  # TopK/gathers stay on default kernels


def test_cli_convert_refuses_missing_checkpoint(tmp_path, capsys):
    from nailkit.cli import main

    rc = main(["convert", str(tmp_path / "nope.pth"), "--out", str(tmp_path), "--route", "litert",
               "--precision", "fp32"])
    assert rc == 2
    assert "nope.pth" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.tflite"))


@pytest.mark.slow
def test_cli_convert_litert_fp32_passes_gates(demo_ckpt, outputs_dir, capsys):
    """checkpoint → TFLite in one call, verified; reuses the cached artifact in outputs/."""
    from nailkit.cli import main

    rc = main(["convert", str(demo_ckpt), "--out", str(outputs_dir), "--route", "litert", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "litert fp32" in out and "ok" in out


# ------------------------------------------------------------------------------------------------------------------
# selection-aware parity helpers and rounding controls (nailkit.parity, issue-4 section)
# ------------------------------------------------------------------------------------------------------------------

def _tiny_two_stage():
    import torch

    class Tiny(torch.nn.Module):
        output_names = ("pred_boxes", "pred_logits")

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.score = torch.nn.Linear(8, 1)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):  # x [1, S, 8]
            idx = torch.topk(self.score(x)[..., 0], 4, dim=1)[1]
            sel = torch.gather(x, 1, idx[..., None].expand(-1, -1, 8))
            return torch.sigmoid(sel[..., :4]), self.head(sel)

    return Tiny().eval()


def test_topk_probe_records_and_forces_the_selection():
    from nailkit.parity import run_torch_with_selection

    m = _tiny_two_stage()
    x = np.random.default_rng(0).normal(size=(1, 12, 8)).astype(np.float32)
    ref = run_torch_with_selection(m, x)
    assert ref["enc_scores"].shape == (1, 12) and ref["topk_indices"].shape == (1, 4)
    np.testing.assert_array_equal(ref["topk_indices"][0], np.argsort(-ref["enc_scores"][0])[:4])
    forced_idx = np.array([[0, 1, 2, 3]])
    forced = run_torch_with_selection(m, x, forced_indices=forced_idx)
    np.testing.assert_array_equal(forced["topk_indices"], forced_idx)
    np.testing.assert_allclose(forced["pred_logits"][0], m.head(__import__("torch").as_tensor(x[0, :4])).detach(),
                               atol=1e-6)


def test_score_gap_and_rounding_controls():
    import torch

    from nailkit.parity import int8_fake_quant_weights, rounding_control, score_gap_at

    assert score_gap_at(np.array([3.0, 1.0, 2.0, 2.5]), 2) == pytest.approx(0.5)
    assert score_gap_at(np.array([1.0]), 1) == float("inf")
    m = _tiny_two_stage()
    assert rounding_control(m, "fp32") is m
    h = rounding_control(m, "fp16")
    assert torch.equal(h.head.weight, m.head.weight.half().float())
    q = int8_fake_quant_weights(m)
    w = q.head.weight.detach().numpy()
    for row, orig in zip(w, m.head.weight.detach().numpy()):
        scale = np.abs(orig).max() / 127
        np.testing.assert_allclose(row / scale, np.round(row / scale), atol=1e-3)  # on the int8 grid
    x = torch.randn(1, 12, 8)
    with torch.no_grad():  # the dynamic control also quantizes Linear inputs: differs from weights-only
        assert not torch.allclose(rounding_control(m, "int8")(x)[1], rounding_control(m, "int8_weights")(x)[1])
    with pytest.raises(ValueError, match="no rounding control"):
        rounding_control(m, "int4")
