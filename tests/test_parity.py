"""Unit tests of nailkit.verify.parity (numpy only, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from nailkit.verify.parity import (box_iou, detection_parity, mask_iou, match_detections, match_queries,
                            query_matched_diff, raw_from_outputs, tensor_diff)
from nailkit.portable.postprocess import RawOutputs, postprocess

import _ties


def _raw(seed=0, q=20, c=3, hw=8):
    rng = np.random.default_rng(seed)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (q, 2)), rng.uniform(0.05, 0.3, (q, 2))], 1)
    return RawOutputs(boxes=boxes, logits=rng.normal(0, 2, (q, c)), masks=rng.normal(0, 1, (q, hw, hw)))


def test_tensor_diff_values_and_errors():
    ref = {"a": np.zeros((2, 3)), "b": np.ones(4)}
    d = tensor_diff(ref, [np.full((2, 3), 0.5), np.ones(4)])
    assert d["a"] == {"max_abs": 0.5, "mean_abs": 0.5} and d["b"]["max_abs"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        tensor_diff(ref, {"a": np.zeros((3, 2)), "b": np.ones(4)})
    with pytest.raises(KeyError):
        tensor_diff(ref, {"a": np.zeros((2, 3))})


def test_match_queries_recovers_a_permutation():
    raw = _raw()
    perm = np.random.default_rng(1).permutation(20)
    ri, oi = match_queries(raw.boxes, raw.boxes[perm])
    assert np.array_equal(perm[oi], ri)


def test_query_matched_diff_is_zero_for_permuted_copy_and_sees_real_changes():
    raw = _raw()
    perm = np.arange(20)
    perm[[3, 7]] = perm[[7, 3]]
    other = RawOutputs(raw.boxes[perm], raw.logits[perm], raw.masks[perm])
    plain = tensor_diff({"l": raw.logits}, [other.logits])["l"]["max_abs"]
    qm = query_matched_diff(raw, other)
    assert plain > 0.1  # rank-wise comparison sees a big difference
    assert qm.num_permuted == 2 and qm.logits_max_abs == 0 and qm.masks_max_abs == 0
    other.masks[perm.tolist().index(5), 0, 0] += 0.25
    qm2 = query_matched_diff(raw, other)
    assert qm2.masks_max_abs == pytest.approx(0.25, abs=1e-6) and qm2.per_query_mask_abs.argmax() == 5


def test_box_and_mask_iou():
    assert box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
                   ) == pytest.approx(np.array([[1.0, 1 / 3, 0.0]]))
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:1] = True
    assert mask_iou(a, b) == 0.5 and mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_match_detections_by_iou_not_rank():
    raw = _raw()
    pa = postprocess(raw, (64, 48), threshold=0.0, num_select=10)
    idx = np.arange(len(pa))[::-1]  # reversed rank
    pb = pa.subset(idx)
    res = match_detections(pa, pb)
    assert res.num_matched == len(pa) and res.agrees()
    assert all(idx[m.b_idx] == m.a_idx for m in res.matches if m.box_iou == 1.0)


def test_detection_parity_agrees_on_copy_and_fails_on_moved_box():
    raw = _raw()
    same = detection_parity(raw, RawOutputs(raw.boxes.copy(), raw.logits.copy(), raw.masks.copy()), (64, 48))
    assert same.agrees() and same.num_matched == 10 and same.min_mask_iou == 1.0
    moved = RawOutputs(raw.boxes + np.array([0.3, 0, 0, 0], np.float32), raw.logits, -raw.masks)
    bad = detection_parity(raw, moved, (64, 48))
    assert not bad.agrees()


def test_raw_from_outputs_drops_batch():
    r = raw_from_outputs([np.zeros((1, 5, 4)), np.zeros((1, 5, 3))])
    assert r.boxes.shape == (5, 4) and r.masks is None


def test_tie_order_allows_only_near_ties_to_swap():
    xy = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10]], float)
    conf = np.array([0.9, 0.70001, 0.7])
    assert _ties.tie_order(conf, [0, 1, 0], xy, conf, [0, 1, 0], xy).tolist() == [0, 1, 2]
    swapped = _ties.tie_order(conf, [0, 1, 0], xy, conf[[0, 2, 1]], [0, 0, 1], xy[[0, 2, 1]])
    assert swapped.tolist() == [0, 2, 1]
    with pytest.raises(AssertionError, match="no counterpart"):  # a swap of scores 0.4 apart is no near-tie
        _ties.tie_order([0.9, 0.5], [0, 1], xy[:2], [0.5, 0.9], [1, 0], xy[[1, 0]])


# ------------------------------------------------------------------------------------------------------------------
# near-tied two-stage selections (selection_tie, tie_resolved_reference)
# ------------------------------------------------------------------------------------------------------------------

SCORES = np.array([5.0, 4.0, 3.0, 3.0 - 1e-6, 1.0])


def test_selection_tie_same_tie_differs_and_the_two_error_bound():
    from nailkit.verify.gates import TIE_EPS
    from nailkit.verify.parity import selection_tie

    assert selection_tie(SCORES, [0, 1, 2, 3], [0, 1, 2, 3])["selection"] == "same"
    tie = selection_tie(SCORES, [0, 1, 2, 3], [0, 1, 3, 2])
    assert tie["selection"] == "tie" and tie["gap"] == pytest.approx(1e-6) and tie["bound"] == TIE_EPS
    assert selection_tie(SCORES, [0, 1, 2], [0, 1, 4])["selection"] == "differs"  # an outsider 2.0 below
    # scores 1.0 apart swap only when the backend's scores are off by more than half of that (2 x error > gap)
    assert selection_tie(SCORES, [0, 1], [1, 0], score_error=0.4)["selection"] == "differs"
    assert selection_tie(SCORES, [0, 1], [1, 0], score_error=0.5)["selection"] == "differs"  # bound 1.0, not < 1.0
    wide = selection_tie(SCORES, [0, 1], [1, 0], score_error=0.51)
    assert wide["selection"] == "tie" and wide["bound"] == pytest.approx(1.02)
    assert selection_tie(SCORES, [0, 1], [1, 0], tie_eps=1.5)["selection"] == "tie"
    assert selection_tie(SCORES, [0, 1], [0], score_error=1e9)["selection"] == "differs"  # another length


def _sel_raw(idx, scores=SCORES, seed=0):
    raw = _raw(seed, q=len(idx))
    raw.extra.update(topk_indices=np.asarray(idx, np.int64)[None], enc_scores=np.asarray(scores, np.float32)[None])
    return raw


def test_tie_resolved_reference_reruns_only_on_a_near_tie():
    from nailkit.verify.parity import raw_selection_tie, tie_resolved_reference

    ref = _sel_raw([0, 1, 2, 3])
    forced = _sel_raw([0, 1, 3, 2], seed=1)
    calls = []

    def rerun(idx):
        calls.append(np.asarray(idx).tolist())
        return forced

    for other, want in ((_sel_raw([0, 1, 2, 3]), "same"), (_sel_raw([0, 1, 2, 4]), "differs")):
        got, tie = tie_resolved_reference(ref, other, rerun)
        assert got is ref and tie["selection"] == want and not calls
    got, tie = tie_resolved_reference(ref, _sel_raw([0, 1, 3, 2]), rerun)
    assert got is forced and tie["selection"] == "tie" and calls == [[[0, 1, 3, 2]]]
    assert tie_resolved_reference(ref, _sel_raw([0, 1, 3, 2]), None)[0] is ref  # nothing to re-run: unforced
    bare = _sel_raw([0, 1, 3, 2])
    bare.extra.clear()
    assert tie_resolved_reference(ref, bare, rerun) == (ref, None) and len(calls) == 1
    # the backend's own scores measure its error: 1 and 0 swapped with scores off by 0.6 is a tie
    off = _sel_raw([1, 0, 2, 3], scores=SCORES + np.array([-0.6, 0.6, 0, 0, 0]))
    t = raw_selection_tie(ref, off)
    assert t["selection"] == "tie" and t["score_error"] == pytest.approx(0.6, abs=1e-6)
    assert raw_selection_tie(ref, _sel_raw([1, 0, 2, 3]))["selection"] == "differs"
    assert raw_selection_tie(ref, _sel_raw([0, 1, 3, 2], scores=np.zeros(7))) is None  # another token grid
