"""ONNX passes: each is harmless (onnxruntime outputs unchanged) and needed (conversion or parity breaks without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnx
from onnx import TensorProto, helper, numpy_helper

from nailkit.export import onnx_passes as P


def ort_outputs(model_or_path: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """Run a ModelProto (or path) in onnxruntime, graph optimisations off; returns {output name: array}."""
    import onnxruntime as ort

    data = model_or_path if isinstance(model_or_path, (str, bytes)) else model_or_path.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _gridsample_model(seed: int = 0) -> onnx.ModelProto:
    """A tiny graph shaped like rfdetr's deformable attention: features reshaped to (batch x heads) images, then one
    GridSample (bilinear, zeros padding, align_corners=0) with several images in its batch (N = 4)."""
    rng = np.random.default_rng(seed)
    grid = rng.uniform(-1.1, 1.1, size=(4, 10, 6, 2)).astype(np.float32)  # some samples fall outside
    w = rng.normal(size=(16, 3, 1, 1)).astype(np.float32)
    shape = np.array([4, 4, 16, 16], np.int64)
    nodes = [helper.make_node("Conv", ["input", "w"], ["feat"]),
             helper.make_node("Reshape", ["feat", "shape"], ["heads"]),
             helper.make_node("GridSample", ["heads", "grid"], ["out"], mode="bilinear", padding_mode="zeros",
                              align_corners=0)]
    g = helper.make_graph(nodes, "gs", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 4, 10, 6])],
                          [numpy_helper.from_array(grid, "grid"), numpy_helper.from_array(w, "w"),
                           numpy_helper.from_array(shape, "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _feed(seed: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).normal(size=(1, 3, 16, 16)).astype(np.float32)}


def test_gridsample_pass_is_harmless_and_removes_gridsample():
    m = _gridsample_model()
    ref = ort_outputs(m, _feed())["out"]
    out = P.apply_passes(m, ["gridsample"])
    assert "GridSample" not in P.op_counts(out)
    assert P.op_counts(out).get("Gather", 0) >= 4  # 4 bilinear corners (+ shape lookups)
    np.testing.assert_allclose(ort_outputs(out, _feed())["out"], ref, atol=1e-5, rtol=0)


def test_gridsample_formulations_are_pluggable():
    calls = []

    def fake(node, graph, index):
        calls.append(index)
        P.GRIDSAMPLE_FORMULATIONS["gather"](node, graph, index)

    P.register_gridsample_formulation("test_fake", fake)
    try:
        out = P.rewrite_gridsample(_gridsample_model(), "test_fake")
    finally:
        P.GRIDSAMPLE_FORMULATIONS.pop("test_fake")
    assert calls == [0] and "GridSample" not in P.op_counts(out)
    with pytest.raises(ValueError, match="unknown GridSample formulation"):
        P.rewrite_gridsample(_gridsample_model(), "nope")


def test_unknown_pass_is_refused():
    with pytest.raises(ValueError, match="unknown ONNX pass"):
        P.apply_passes(_gridsample_model(), ["nope"])


def test_expose_selection_adds_topk_tensors():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 50])
    k = numpy_helper.from_array(np.array([5], np.int64), "k")
    nodes = [helper.make_node("TopK", ["input", "k"], ["v", "i"]),
             helper.make_node("Mul", ["v", "v"], ["out"])]
    g = helper.make_graph(nodes, "t", [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])], [k])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out = P.expose_selection(m)
    feed = {"input": np.random.default_rng(0).normal(size=(1, 50)).astype(np.float32)}
    res = ort_outputs(out, feed)
    np.testing.assert_array_equal(res["enc_scores"], feed["input"])
    np.testing.assert_array_equal(res["topk_indices"][0], np.argsort(-feed["input"][0])[:5])
    np.testing.assert_array_equal(res["out"], ort_outputs(m, feed)["out"])


@pytest.mark.slow
def test_gridsample_rewrite_is_exact_through_onnx2tf(tmp_path: Path):
    """The rewritten subgraph converts with onnx2tf and matches ORT in TFLite (as does onnx2tf 2.6.9's own lowering
    on this small graph: it already emits flat GATHERs — see the report on which passes the full model needs)."""
    from ai_edge_litert.interpreter import Interpreter

    from nailkit.tflite.route_onnx2tf import convert_onnx_file

    m = _gridsample_model()
    ref = ort_outputs(m, _feed())["out"]
    x_nhwc = np.transpose(_feed()["input"], (0, 2, 3, 1))
    errs = {}
    for name, model in (("raw", m), ("pass", P.apply_passes(m, ["gridsample"]))):
        src = tmp_path / f"gs_{name}.onnx"
        onnx.save(model, str(src))
        paths = convert_onnx_file(src, tmp_path / name, ("fp32",))
        it = Interpreter(model_path=str(paths["fp32"]))
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x_nhwc)
        it.invoke()
        y = it.get_tensor(it.get_output_details()[0]["index"])
        if y.shape != ref.shape:  # onnx2tf may keep NHWC at the output
            y = np.transpose(y, (0, 3, 1, 2))
        errs[name] = float(np.abs(y - ref).max()) if y.shape == ref.shape else float("inf")
    assert errs["pass"] < 1e-4, errs


@pytest.mark.slow
def test_passes_are_harmless_on_the_real_model(demo_ckpt, outputs_dir):
    """On the exported demo model, every registered pass (and exposing the selection) leaves ORT outputs unchanged."""
    from nailkit.data.samples import sample_images
    from nailkit.export.onnx import ensure_onnx
    from nailkit.portable.preprocess import preprocess

    path, _ = ensure_onnx(demo_ckpt, outputs_dir, resolution=432)
    base = onnx.load(str(path))
    feed = {"input": preprocess(sample_images("photos")[0], 432)[0]}
    ref = ort_outputs(base, feed)
    out = ort_outputs(P.expose_selection(P.apply_passes(base, sorted(P.PASSES))), feed)
    for name, want in ref.items():
        np.testing.assert_allclose(out[name], want, atol=1e-5, rtol=0, err_msg=name)
    assert out["enc_scores"].shape == (1, (432 // 12) ** 2) and out["topk_indices"].shape == (1, 200)


def test_selection_view_is_the_same_graph_with_the_selection_exposed_and_cached(tmp_path):
    from nailkit.core import artifacts
    from nailkit.export.onnx import ensure_selection_view

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 50])
    k = numpy_helper.from_array(np.array([5], np.int64), "k")
    nodes = [helper.make_node("TopK", ["input", "k"], ["v", "i"]), helper.make_node("Mul", ["v", "v"], ["out"])]
    g = helper.make_graph(nodes, "t", [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])], [k])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "model.onnx"
    onnx.save(m, str(src))
    artifacts.write_sidecar(src, {"class_names": ["Nail"], "verified": True, "parity": {"x": 1}})
    path, meta = ensure_selection_view(src)
    assert path == tmp_path / "model_selection.onnx" and meta["source_onnx"] == str(src)
    assert meta["class_names"] == ["Nail"] and meta["verified"] is True and "parity" not in meta
    view = onnx.load(str(path))
    assert [o.name for o in view.graph.output] == ["out", "enc_scores", "topk_indices"]
    assert [n.op_type for n in view.graph.node] == [n.op_type for n in m.graph.node] + ["Identity", "Identity"]
    feed = {"input": np.random.default_rng(1).normal(size=(1, 50)).astype(np.float32)}
    np.testing.assert_array_equal(ort_outputs(view, feed)["out"], ort_outputs(m, feed)["out"])
    mtime = path.stat().st_mtime_ns
    assert ensure_selection_view(src).path.stat().st_mtime_ns == mtime  # cached: not rewritten
    m.graph.node[1].op_type = "Add"  # another source file: a new view
    onnx.save(m, str(src))
    path2, _ = ensure_selection_view(src)
    assert [n.op_type for n in onnx.load(str(path2)).graph.node][1] == "Add"
    bare = tmp_path / "det.onnx"
    g2 = helper.make_graph([helper.make_node("Relu", ["input"], ["out"])], "t", [x],
                           [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 50])])
    onnx.save(helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)]), str(bare))
    with pytest.raises(ValueError, match="det.onnx: cannot expose the two-stage selection"):
        ensure_selection_view(bare)
    assert not (tmp_path / "det_selection.onnx").exists()
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        ensure_selection_view(tmp_path / "nope.onnx")
