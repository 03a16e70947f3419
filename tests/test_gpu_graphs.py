"""The GPU target (nailkit.gpu: split, export, convert, parity + gpu_chain): the three graphs of the trained demo,
converted once (cached under outputs/gpu/, shared with notebook 04 and the bundle test), op-clean, with named
signatures and embedded metadata; the chain on the CPU interpreter equals the PyTorch graphs and the one-graph model.
The GPU delegate's own run of these graphs is notebook 04's (minutes under SwiftShader); the delegate defect the pass
fixes is tested on a probe in test_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest

from nailkit.verify import gates
from nailkit.gpu.convert import ensure_gpu_graphs
from nailkit.gpu.export import HOST_STEPS
from nailkit.gpu.op_check import op_check
from nailkit.gpu.parity import _nhwc, forced_chain_parity
from nailkit.gpu.split import DEFAULT_MASK_SLOTS, build_gpu_graphs
from nailkit.gpu.verify import fp16_safety
from nailkit.tflite import metadata as tflite_metadata
from nailkit.portable.gpu_chain import GRAPH_INPUTS, GRAPH_NAMES, GRAPH_OUTPUTS, SplitModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def art(outputs_dir):
    return ensure_gpu_graphs("", outputs_dir)


def test_graphs_are_gpu_clean_with_named_io(art):
    from ai_edge_litert.interpreter import Interpreter

    for g in GRAPH_NAMES:
        oc = op_check(art["paths"][g])
        assert oc.ok and not oc.banned and not oc.over_4d and not oc.risky_constant_ops, oc.line()
        assert oc.int_tensors == 0 and "FLOOR_DIV" not in oc.histogram
        sig = Interpreter(model_path=str(art["paths"][g])).get_signature_list()["serving_default"]
        assert sorted(sig["inputs"]) == sorted(GRAPH_INPUTS[g]) and sorted(sig["outputs"]) == sorted(GRAPH_OUTPUTS[g])
    assert art["meta"]["cpu_parity"]["matched"] == art["meta"]["cpu_parity"]["of"] > 0
    assert not gates.check("gpu_target", art["meta"]["cpu_parity"])


def test_metadata_embedded_and_readable_without_nailkit(art):
    import json
    import zipfile

    for g in GRAPH_NAMES:
        md = tflite_metadata.read_metadata(art["paths"][g])
        assert md["class_names"] == art["meta"]["class_names"] and md["graph"]["name"] == g  # the checkpoint's
        assert [o["name"] for o in md["outputs"]] == list(GRAPH_OUTPUTS[g])
        with zipfile.ZipFile(art["paths"][g]) as z:  # the appended zip: any zip reader
            assert json.loads(z.read(tflite_metadata.ZIP_MEMBER))["graph"]["host_steps"] == HOST_STEPS
            assert z.read("labels.txt").decode().splitlines() == art["meta"]["class_names"]


@pytest.fixture(scope="module")
def torch_graphs(art):
    from nailkit.model.build import load_model

    return build_gpu_graphs(load_model(art["meta"]["checkpoint"]), 432)


# XNNPACK's AVX2 and AVX-512 paths sum in different orders, and so do the builtin and reference kernels: near-tied
# proposals may swap between them. The comparison must pass on every one of them, which only a selection-aware
# comparison (ties may swap, every forced output close) does; an exact one passes by luck of the ISA.
@pytest.mark.parametrize("kernels", ["xnnpack", "reference"])
def test_cpu_chain_equals_torch_chain_selection_aware(art, torch_graphs, kernels):
    from nailkit.data.samples import sample_images

    split = SplitModel(art["dir"], "cpu", cpu_kernels=kernels)
    assert (split.resolution, split.num_queries, split.mask_slots) == (432, 200, DEFAULT_MASK_SLOTS)
    x = _nhwc(sample_images("synthetic")[:1], 432)[0]
    got = split.run(x, threshold=-1.0)
    par = forced_chain_parity(torch_graphs, x, got, threshold=-1.0)
    assert gates.check("gpu_chain_forced", par) == [], par
    assert par["proposals"]["size"] == 200 and par["mask_queries"]["size"] == split.mask_slots
    assert got["pred_masks"].shape == (1, split.mask_slots, 108, 108) and len(got["mask_queries"]) == split.mask_slots


def test_chain_masks_only_the_queries_above_the_threshold(art):
    from nailkit.data.samples import sample_images

    split = SplitModel(art["dir"], "cpu")
    x = _nhwc(sample_images("synthetic")[:1], 432)[0]
    # at the app's threshold only the queries above it get a row; the rest of graph C's slots are zero input
    at = split.run(x, threshold=0.5)
    scores = 1 / (1 + np.exp(-at["pred_logits"][0]))
    above = {int(q) for q in np.argwhere(scores > 0.5)[:, 0]}
    assert set(at["mask_queries"].tolist()) <= above and len(at["mask_queries"]) == min(split.mask_slots, len(above))


def test_forced_chain_gate_fails_on_a_real_difference():
    """The gate the chain test uses can fail: a swap between scores far apart, or an output off by more than atol."""
    from nailkit.verify.parity import selection_difference

    scores = np.array([5.0, 4.0, 3.0, 2.99999, 1.0])
    tie = selection_difference(scores, [0, 1, 2, 3], [0, 1, 3, 2])
    real = selection_difference(scores, [0, 1, 2], [0, 1, 4])
    assert tie["differs"] and tie["swap_max_gap"] < gates.TIE_EPS and real["swap_max_gap"] == pytest.approx(2.0)
    ok = {"outputs": {"pred_boxes": {"max_abs": 1e-4, "excess": 1e-4}}, "proposals": tie, "mask_queries": tie}
    assert gates.check("gpu_chain_forced", ok) == []
    assert len(gates.check("gpu_chain_forced", {**ok, "proposals": real})) == 1
    off = {**ok, "outputs": {"pred_boxes": {"max_abs": 0.5, "excess": 0.5}}}
    assert "pred_boxes" in gates.check("gpu_chain_forced", off)[0]


def test_selection_lengths_that_differ_never_count_as_a_tie():
    from nailkit.verify.parity import selection_difference

    d = selection_difference(np.arange(5.0), [4, 3], [4])
    assert d["differs"] and d["swap_max_gap"] == float("inf")


def test_missing_graph_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="graph_a.tflite"):
        SplitModel(tmp_path)


def test_fp16_safety_reports_both_layernorms(art):
    from nailkit.data.samples import sample_images

    s = fp16_safety(art["meta"]["checkpoint"], images=sample_images("photos")[:1])
    for g in ("graph_a", "graph_b"):
        before, after = s["before"][g], s["after"][g]
        assert before["layer_norm_sites"] == after["layer_norm_sites"] > 0
        assert before["layer_norm_max_abs_in"] == pytest.approx(after["layer_norm_max_abs_in"], rel=1e-5)
        # SafeLayerNorm divides each row by S = max(1, max|x| / 8): its reduction domain never exceeds 8, a graph
        # whose largest LayerNorm input is above 8 reduces at exactly 8, and one below 8 is untouched. Untouched values
        # differ from "before" by upstream rounding only (graph B's input comes from graph A), hence rel=1e-5, as above.
        red_before, red_after = before["layer_norm_max_abs_reduced"], after["layer_norm_max_abs_reduced"]
        assert 0 < red_after <= 8.0 * (1 + 1e-6)
        assert red_after == pytest.approx(min(red_before, 8.0), rel=1e-5)
    assert s["before"]["graph_b"]["softmax_sites"] > 0  # the decoder's self-attention softmax


def _chain_case():
    """A one-graph reference with its selection, the same run forced onto a near-tied swap of its two best proposals
    (the best query's detection changes), and a ``rerun`` that gives the latter."""
    from nailkit.portable.postprocess import RawOutputs

    rng = np.random.default_rng(0)
    q, s = 40, 60
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (q, 2)), rng.uniform(0.05, 0.3, (q, 2))], 1).astype(np.float32)
    logits = rng.normal(-3.5, 0.5, (q, 3)).astype(np.float32)
    logits[0] = 1.0
    masks = rng.normal(0, 1, (q, 12, 12)).astype(np.float32)
    scores = np.linspace(2.0, -2.0, s).astype(np.float32)
    scores[1] = scores[0] - 2e-6

    def raw(idx, changed=False):
        r = RawOutputs(boxes, logits.copy(), masks.copy())
        if changed:
            r.logits[0] += 0.3
            r.masks[0] *= -1
        r.extra.update(topk_indices=np.asarray(idx, np.int64)[None], enc_scores=scores[None])
        return r

    idx = np.arange(q)
    swapped = idx.copy()
    swapped[[0, 1]] = [1, 0]
    calls = []

    def rerun(i, indices):
        calls.append((i, np.asarray(indices).ravel().tolist()))
        return raw(indices, changed=True)

    return raw, idx, swapped, s, rerun, calls


def test_chain_parity_compares_a_near_tie_on_the_chains_selection_and_fails_a_real_difference():
    from nailkit.gpu.parity import chain_parity

    raw, idx, swapped, s, rerun, calls = _chain_case()
    ref, tied, size = raw(idx), raw(swapped, changed=True), (80, 60)
    par = chain_parity([ref, ref], [raw(idx), tied], [size, size], rerun=rerun)
    assert par["selection"] == ["same", "tie"] and par["forced_images"] == 1 and calls == [(1, swapped.tolist())]
    assert gates.check("gpu_target", par) == [] and par["max_score_diff"] == 0.0
    assert gates.check("gpu_target", chain_parity([ref], [tied], [size]))  # without the re-run: unforced, fails
    outsider = idx.copy()
    outsider[0] = s - 1  # a proposal far below the boundary: a real difference
    real = chain_parity([ref], [raw(outsider, changed=True)], [size], rerun=rerun)
    assert real["selection"] == ["differs"] and real["forced_images"] == 0 and len(calls) == 1
    assert gates.check("gpu_target", real)
    broken = raw(swapped, changed=True)
    broken.masks[0] *= -1  # on the tie, an output that differs from PyTorch forced onto the same selection
    assert gates.check("gpu_target", chain_parity([ref], [broken], [size], rerun=rerun))


def test_chain_raw_exposes_the_host_selection():
    from nailkit.gpu.parity import chain_raw
    from nailkit.portable.postprocess import RawOutputs, select_proposals

    rng = np.random.default_rng(1)
    enc = rng.normal(size=(1, 30, 3)).astype(np.float32)
    _, idx = select_proposals(enc[0], np.zeros((30, 4), np.float32), 5)
    r = chain_raw({"raw": RawOutputs(np.zeros((5, 4)), np.zeros((5, 3))), "topk_indices": idx, "enc_logits": enc})
    assert r.extra["topk_indices"].tolist() == [idx.tolist()] and r.extra["enc_scores"].shape == (1, 30)
    assert np.array_equal(r.extra["enc_scores"][0][idx], np.sort(enc[0].max(-1))[::-1][:5])
