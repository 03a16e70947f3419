"""nailkit.tflite.convert and its gate, launch and static_int8 modules: refusal of corrupt files, content-keyed
caching, gate before publish, atomic artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nailkit.verify import gates
from nailkit.portable import io_contract
from nailkit.tflite import convert as tflite, gate as tflite_gate, launch, static_int8
from nailkit.core.artifacts import file_sha256
from nailkit.model.checkpoint import checkpoint_content


def _fake_tflite_bytes(tag: bytes = b"") -> bytes:
    return b"\x1c\x00\x00\x00TFL3" + tag.ljust(120, b"\x00")


def _fake_worker(calls: list, tag: bytes = b"converted"):
    """A conversion worker stand-in: writes a TFL3-looking file where the real worker would, counts its calls."""

    def worker(args, log_path, desc, timeout=0):
        work = Path(args[-1])
        out = work / "fp32.tflite"
        out.write_bytes(_fake_tflite_bytes(tag))
        calls.append(args)
        return {"files": {"fp32": str(out)}, "wall_s": 0.1, "peak_rss_mb": 1.0}

    return worker


@pytest.fixture()
def fake_embed(monkeypatch):
    """The fake workers write TFL3-looking bytes, not models: record the metadata step instead of parsing them."""
    calls: list = []
    for module in (tflite_gate, static_int8):  # the bindings gate_and_publish and ensure_static call
        monkeypatch.setattr(module, "embed_file_metadata", lambda path, *a, **k: calls.append(Path(path).name))
    return calls


def test_corrupt_tflite_is_refused(tmp_path: Path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 4 + b"NOPE" + b"\x00" * 200)
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        io_contract.check_tflite_file(bad)
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        io_contract.TFLiteModel(bad)
    with pytest.raises(FileNotFoundError):
        io_contract.check_tflite_file(tmp_path / "missing.tflite")


def test_truncated_tflite_is_refused(tmp_path: Path):
    """Right magic, but cut short: LiteRT must not load it and nailkit says which file."""
    p = tmp_path / "trunc.tflite"
    p.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 100)
    with pytest.raises(ValueError, match="trunc.tflite"):
        io_contract.TFLiteModel(p)


def test_failed_conversion_leaves_no_file_under_final_name(tmp_path: Path, demo_ckpt, monkeypatch, fake_embed):
    """The worker writes a partial file in its scratch dir and dies: nothing appears under the final name."""
    seen = {}

    def dying_worker(args, log_path, desc, timeout=0):
        work = Path(args[-1])
        (work / "fp32.tflite").write_bytes(b"\x00\x00\x00\x00TFL3 half written")
        seen["work"] = work
        raise launch.ConversionError("simulated crash")

    monkeypatch.setattr(launch, "run_worker", dying_worker)
    with pytest.raises(launch.ConversionError, match="simulated crash"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432)
    assert not seen["work"].exists()  # scratch dir removed
    assert list(tmp_path.rglob("*.tflite")) == []


def test_tflite_edited_in_place_is_rederived_not_reused(tmp_path: Path, demo_ckpt, monkeypatch, fake_embed):
    """Same size, other bytes: the sidecar's content hash no longer matches, so the file is converted again."""
    calls: list = []
    monkeypatch.setattr(launch, "run_worker", _fake_worker(calls))
    path, meta = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False)
    assert len(calls) == 1 and path.read_bytes() == _fake_tflite_bytes(b"converted")
    again, _ = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False)
    assert again == path and len(calls) == 1  # untouched: reused
    edited = _fake_tflite_bytes(b"EDITED!!!")
    assert len(edited) == path.stat().st_size
    path.write_bytes(edited)  # in place, same size
    third, meta3 = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False)
    assert len(calls) == 2, "an edited .tflite was reused"
    assert third == path and path.read_bytes() == _fake_tflite_bytes(b"converted")
    assert meta3["sha256"] == file_sha256(path, 64)


def test_same_weights_under_another_name_hit_the_cache(tmp_path: Path, demo_ckpt, monkeypatch, fake_embed):
    """torch.save writes the file name into the archive: other bytes, same content key, no second conversion."""
    import torch

    calls: list = []
    monkeypatch.setattr(launch, "run_worker", _fake_worker(calls))
    tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False)
    renamed = tmp_path / "checkpoint_best_total.pth"
    torch.save(torch.load(demo_ckpt, map_location="cpu", weights_only=False), renamed)
    assert file_sha256(renamed) != file_sha256(demo_ckpt)
    assert checkpoint_content(renamed) == checkpoint_content(demo_ckpt)
    tflite.ensure_tflite(renamed, tmp_path, "litert", "fp32", 432, verify=False)
    assert len(calls) == 1


def _failing_gate(seen: list, metrics: dict, failure: str):
    """A stand-in for the parity gate that refuses every file (records the paths it saw)."""

    def gate(self, p, precision):
        seen.append(p)
        return metrics, [failure]

    return gate


def test_unverified_artifact_is_not_served_to_a_verified_request(tmp_path: Path, demo_ckpt, monkeypatch, fake_embed):
    calls: list = []
    monkeypatch.setattr(launch, "run_worker", _fake_worker(calls))
    path, _ = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False)
    refused: list = []
    monkeypatch.setattr(tflite_gate.Gate, "__call__", _failing_gate(refused, {"pre_topk_max_abs": 1.0},
                                                                "pre-TopK max-abs 1.00e+00 > 1e-04"))
    with pytest.raises(launch.ConversionError, match="FAILED its parity gate and was not published"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432)
    assert len(calls) == 2 and refused and not refused[0].exists()  # converted again, gated, discarded
    assert not list((tmp_path / "tflite").rglob(".*.work"))  # staging removed


def test_sampling_and_mask_queries_have_their_own_cache_entries(tmp_path: Path, demo_ckpt, monkeypatch, fake_embed):
    """A tent or top-N file is never served for a default request (nor the other way round); "grid" is the default."""
    calls: list = []
    monkeypatch.setattr(launch, "run_worker", _fake_worker(calls))
    default, dmeta = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False)
    tent, tmeta = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False, sampling="tent")
    mq, mmeta = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False, mask_queries=20)
    both, _ = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False, sampling="tent",
                                   mask_queries=20)
    assert len(calls) == 4 and len({default, tent, mq, both}) == 4
    assert "params" in dmeta["key"] and "sampling" not in dmeta["key"]["params"]  # the default key is unchanged
    assert tmeta["key"]["params"]["sampling"] == "tent" and tmeta["sampling"] == "tent"
    assert mmeta["key"]["params"]["mask_queries"] == 20 and mmeta["mask_queries"] == 20
    assert "_tent_" in tent.parent.name and "_mq20_" in mq.parent.name
    # the worker is told the options, the work folder stays its last argument
    assert calls[0][3:5] == ["grid", "all"] and calls[1][3:5] == ["tent", "all"] and calls[2][3:5] == ["grid", "20"]
    again, _ = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, verify=False, sampling="grid")
    assert again == default and len(calls) == 4  # "grid" is the default: cache hit
    with pytest.raises(ValueError, match="sampling"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, sampling="nearest")


def test_a_refused_precision_is_remembered_not_reconverted(tmp_path: Path, demo_ckpt, monkeypatch, fake_embed):
    """A gate failure leaves a refusal record keyed like the file: the next request raises at once (no worker), force
    converts again, and a file that then passes supersedes the record."""
    calls: list = []
    monkeypatch.setattr(launch, "run_worker", _fake_worker(calls))
    gated: list = []
    monkeypatch.setattr(tflite_gate.Gate, "__call__", _failing_gate(gated, {"control_ratio_max": 2.1},
                                                                "converter error 2.10x the rounding control's (> 1.5x)"))
    with pytest.raises(launch.ConversionError, match="FAILED its parity gate and was not published"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432)
    assert len(calls) == 1 and len(gated) == 1
    records = list((tmp_path / "tflite").rglob("model_fp32.tflite.refused.json"))
    assert len(records) == 1 and not list((tmp_path / "tflite").rglob("*.tflite"))
    with pytest.raises(launch.ConversionError, match="2.10x.*not converted again"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432)
    assert len(calls) == 1 and len(gated) == 1  # raised from the record: no conversion, no gate
    # another key (here: the tent graph) is not refused by this record
    with pytest.raises(launch.ConversionError, match="FAILED its parity gate and was not published"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, sampling="tent")
    assert len(calls) == 2
    # force: converted and gated again; this time it passes, is published, and the record is gone
    monkeypatch.setattr(tflite_gate.Gate, "__call__", lambda self, p, precision: ({"images": 6}, []))
    path, meta = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432, force=True)
    assert len(calls) == 3 and path.is_file() and meta["parity"] == {"images": 6}
    assert not records[0].exists()
    assert tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "fp32", 432).path == path and len(calls) == 3


def test_bad_route_and_precision_are_refused(demo_ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown route"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "coreml", "fp32", 432)
    with pytest.raises(ValueError, match="unknown precision"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "int4", 432)
    with pytest.raises(ValueError, match="full_int8"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "full_int8", 432)


def test_failing_onnx_gate_stops_convert_and_bundle(tmp_path, demo_ckpt, monkeypatch, capsys):
    """The ONNX gate fails: `convert` and `bundle` exit 2 with one line naming the file; nothing is published and no
    conversion worker runs (there is no fallback to an unverified export)."""
    from nailkit.export import onnx as onnx_export
    from nailkit.cli import main

    def fake_export(rf, out_path, **kw):
        Path(out_path).write_bytes(b"not really onnx")
        return Path(out_path), {"resolution": 432, "opset": 17, "exporter": "legacy", "simplify": False,
                                "segmentation": True, "output_names": []}

    def failing_verify(rf, path, images=None, **kw):
        return onnx_export.OnnxParityReport(onnx_path=str(path), resolution=432, images=[], output_shapes={},
                                            node_histogram={}, file_bytes=0,
                                            failures=["photo.jpg: pred_logits max-abs 0.5 > 0.001"])

    def no_worker(*a, **k):
        raise AssertionError("a conversion ran on an unverified ONNX")

    monkeypatch.setattr(onnx_export, "export_onnx_with_meta", fake_export)
    monkeypatch.setattr(onnx_export, "verify_onnx", failing_verify)
    monkeypatch.setattr(launch, "run_worker", no_worker)
    import nailkit.bundle
    import nailkit.model.build

    # bundle keeps its artifacts in the default outputs/ folder: point that at this test's folder, so an ONNX that
    # another test verified and cached there cannot stand in for the failing export
    monkeypatch.setattr(nailkit.model.build, "DEFAULT_OUTPUT_DIR", tmp_path / "out")
    monkeypatch.setattr(nailkit.bundle, "DEFAULT_OUTPUT_DIR", tmp_path / "out")  # the bundle's binding
    out = tmp_path / "out"
    for argv in (["convert", str(demo_ckpt), "--out", str(out), "--route", "onnx2tf", "--precision", "fp32"],
                 ["bundle", str(demo_ckpt), "--out", str(out / "bundle"), "--route", "onnx2tf"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "FAILED verification" in err and "pred_logits max-abs" in err, err
        assert ".onnx" in err
    published = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".log")]
    assert published == [], published
    assert not (out / "bundle").exists()


def test_artifact_parity_passes_the_gates_tie_eps(monkeypatch):
    """``tie_eps`` reaches the parity function: the gate's number, not a default of its own."""
    from nailkit.verify import gates

    seen = {}

    class FakeModel:
        layout = "NHWC"

        def __init__(self, path):
            pass

        def run(self, x):
            return {}

        def close(self):
            pass

    def fake_sap(module, x, ref, be, size, *, top_k, tie_eps):
        seen["tie_eps"], seen["top_k"] = tie_eps, top_k
        return {"pre_topk_max_abs": 0.0, "forced_max_abs": 0.0, "forced_min_mask_iou": 1.0, "tensor": {},
                "selection_same": True, "selection_order_same": True, "detect_agrees": True, "tie": False,
                "detect": {"min_mask_iou": 1.0}}

    monkeypatch.setattr(tflite_gate, "TFLiteModel", FakeModel)
    monkeypatch.setattr(tflite_gate, "selection_aware_parity", fake_sap)  # the gate's bindings
    monkeypatch.setattr(tflite_gate, "error_summary", lambda a, b: {"pre_topk_max_abs": 0.0})
    monkeypatch.setattr(gates, "TIE_EPS", 0.123)
    refs = [{"image": "a.jpg", "x": np.zeros((1, 3, 4, 4), np.float32), "size": (4, 4), "ref": {}}]
    tflite_gate.artifact_parity("unused.tflite", None, refs, "fp32")
    assert seen == {"tie_eps": 0.123, "top_k": gates.TOP_K}


# ------------------------------------------------------------------------------------------------------------------
# heavy: real conversions (cached in outputs/ — shared with notebook 04 and the CLI)
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_ckpt():
    """The default (trained) model: notebook 04 converts it earlier in the same run, so these tests reuse its files."""
    from nailkit.model.build import resolve_checkpoint

    return resolve_checkpoint("")


@pytest.mark.slow
@pytest.mark.parametrize("route", ["litert", "onnx2tf"])
def test_fp32_gates_and_cache(route, trained_ckpt, outputs_dir):
    from nailkit.data.samples import sample_images

    refs6 = [{"image": p.name} for p in sample_images()]
    path, meta = tflite.ensure_tflite(trained_ckpt, outputs_dir, route, "fp32", 432)
    mtime = path.stat().st_mtime
    path2, meta2 = tflite.ensure_tflite(trained_ckpt, outputs_dir, route, "fp32", 432)  # cache hit: no conversion
    assert path2 == path and meta2 == meta and path.stat().st_mtime == mtime
    assert meta["conversion_wall_s"] > 0 and meta["conversion_peak_rss_mb"] > 100
    assert io_contract.TFLiteModel(path).input_shape == (1, 432, 432, 3)
    assert meta["parity"]["images"] == 6  # gated before it was published, on these 6 images, and passed
    assert gates.check("tflite_fp32", meta["parity"]) == [], meta["parity"]
    assert [r["image"] for r in meta["parity_rows"]] == [r["image"] for r in refs6]
    assert tflite_gate.published_parity(meta, refs6)["aggregate"] == meta["parity"]  # notebook 04 shows these rows
    # nailkit's metadata is inside the published file (read back with the zip reader alone), and the sidecar's
    # sha256 is that of the file with it
    import json
    import zipfile

    from nailkit.tflite import metadata as tflite_metadata

    with zipfile.ZipFile(path) as z:
        doc = json.loads(z.read(tflite_metadata.ZIP_MEMBER))
        assert z.read(tflite_metadata.LABELS_MEMBER).decode().splitlines() == meta["class_names"]
    assert doc["input"]["shape"] == [1, 432, 432, 3] and doc["extra"]["route"] == route
    assert {o["meaning"] for o in doc["outputs"]} >= {"pred_boxes", "pred_logits", "pred_masks"}
    assert tflite_metadata.read_metadata_flatbuffer(path) == doc
    assert meta["sha256"] == file_sha256(path, len(meta["sha256"]))


@pytest.mark.slow
def test_delegation_report_counts_ops(trained_ckpt, outputs_dir):
    path, _ = tflite.ensure_tflite(trained_ckpt, outputs_dir, "litert", "fp32", 432)
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
def test_cli_convert_litert_fp32_passes_gates(trained_ckpt, outputs_dir, capsys):
    """checkpoint → TFLite in one call, verified; reuses the cached artifact in outputs/."""
    from nailkit.cli import main

    rc = main(["convert", str(trained_ckpt), "--out", str(outputs_dir), "--route", "litert", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "litert fp32" in out and "ok" in out


# ------------------------------------------------------------------------------------------------------------------
# selection-aware parity helpers and rounding controls (nailkit.verify.parity, issue-4 section)
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
    from nailkit.verify.parity import run_torch_with_selection

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

    from nailkit.verify.parity import int8_fake_quant_weights, rounding_control, score_gap_at

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


def _fake_static_worker(calls: list):
    """Stand-in for both route-B workers: fp32 conversion, and ``quantize-static`` (writes each precision asked)."""

    def worker(args, log_path, desc, timeout=0):
        calls.append(args)
        work = Path(args[-1]) if args[0] != "quantize-static" else Path(args[3])
        files = {}
        precs = args[4].split(",") if args[0] == "quantize-static" else ["fp32"]
        for p in precs:
            out = work / f"{p}.tflite"
            out.write_bytes(_fake_tflite_bytes(p.encode()))
            files[p] = str(out)
        return {"files": files, "wall_s": 0.1, "peak_rss_mb": 1.0}

    return worker


def _split(tmp_path, n=3, seed=0):
    from PIL import Image

    d = tmp_path / f"calib{seed}"
    d.mkdir()
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size=(50, 60, 3), dtype=np.uint8)).save(d / f"c{i}.jpg")
        images.append({"id": i, "file_name": f"c{i}.jpg", "width": 60, "height": 50})
    import json

    (d / "_annotations.coco.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return d


def test_static_precisions_are_keyed_by_their_calibration_set(tmp_path: Path, demo_ckpt, monkeypatch, fake_embed):
    """w8a8/w8a16 come from the cached fp32 file; the calibration images' content is in their key (new images →
    re-quantised, fp32 reused); they are reported, not gated; route A has no static precision."""
    calls: list = []
    monkeypatch.setattr(launch, "run_worker", _fake_static_worker(calls))
    gated = []

    def gate(self, p, precision):
        gated.append(precision)
        return {"images": 6, "control_ratio_max": 9.9}, []

    monkeypatch.setattr(tflite_gate.Gate, "__call__", gate)
    a = _split(tmp_path, 3, seed=0)
    w8, meta = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "w8a8", 432, calibration=2, calibration_dir=a,
                                    also=("w8a16",))
    assert [c[0] for c in calls] == ["route-b", "quantize-static"] and calls[1][4] == "w8a8,w8a16"
    assert w8.name == "model_w8a8.tflite" and (w8.parent / "model_fp32.tflite").is_file()
    assert (w8.parent / "model_w8a16.tflite").is_file()  # made together from one calibration
    assert meta["precision"] == "w8a8" and meta["gated"] is False and meta["parity"]["control_ratio_max"] == 9.9
    cal = meta["key"]["static"]["calibration"]
    assert cal["n"] == 2 and len(cal["images"]) == 2 and len(cal["inputs_sha256"]) == 64
    assert meta["key"]["static"]["recipe"] == "backbone_w8a8"
    # cached: same calibration set → no worker; w8a16 was made in the same run
    assert tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "w8a8", 432, calibration=2,
                                calibration_dir=a).path == w8
    assert tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "w8a16", 432, calibration=2,
                                calibration_dir=a).meta["precision"] == "w8a16"
    assert len(calls) == 2
    # other images → a new key: quantised again from the cached fp32 file (no second fp32 conversion)
    b = _split(tmp_path, 3, seed=1)
    _, meta_b = tflite.ensure_tflite(demo_ckpt, tmp_path, "litert", "w8a8", 432, calibration=2, calibration_dir=b)
    assert [c[0] for c in calls] == ["route-b", "quantize-static", "quantize-static"] and calls[2][4] == "w8a8"
    assert meta_b["key"]["static"]["calibration"]["inputs_sha256"] != cal["inputs_sha256"]
    assert set(gated) == {"fp32", "w8a8", "w8a16"}
    with pytest.raises(ValueError, match="unknown precision"):
        tflite.ensure_tflite(demo_ckpt, tmp_path, "onnx2tf", "w8a8", 432)


def test_calibration_set_is_predict_preprocessing(tmp_path: Path):
    from nailkit.portable.preprocess import preprocess, to_nhwc

    d = _split(tmp_path, 3)
    xs, ident = static_int8.calibration_set(d, 48, n=3)
    assert xs.shape == (3, 48, 48, 3) and xs.dtype == np.float32
    assert np.array_equal(xs[0], to_nhwc(preprocess(d / "c0.jpg", 48)[0])[0])
    assert ident["images"] == ["c0.jpg", "c1.jpg", "c2.jpg"]
