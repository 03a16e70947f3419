"""The numpy post-processing equals rfdetr's predict(): same boxes, scores, class ids, class names, identical masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nailkit.data.samples import sample_images
from nailkit.portable.postprocess import BACKGROUND_NAME, RawOutputs, postprocess, select_topk

from _ties import tie_order

#: PyTorch's AVX2/AVX512/ARM CPU kernels use fused multiply-add, as nailkit's resize does; the DEFAULT build does not,
#: and then a logit within 1 ulp of the threshold can flip a pixel.
EXACT_MASKS = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
THRESHOLDS = (0.0, 0.02, 0.03)  # random-weight demo: scores sit near 0.03
IMAGES = sample_images(kind="photos") + sample_images(kind="synthetic")[1:2]


def rfdetr_postprocess(raw: RawOutputs, size, threshold, num_select=200):
    """rfdetr's own PostProcess + the threshold filter of RFDETR.predict(), on the same raw outputs."""
    from rfdetr.models.postprocess import PostProcess

    w, h = size
    out = {"pred_boxes": torch.from_numpy(raw.boxes)[None], "pred_logits": torch.from_numpy(raw.logits)[None]}
    if raw.masks is not None:
        out["pred_masks"] = torch.from_numpy(raw.masks)[None]
    r = PostProcess(num_select=num_select)(out, torch.tensor([[h, w]]), score_threshold=threshold)[0]
    keep = (r["scores"] > threshold).nonzero(as_tuple=True)[0]
    res = {k: r[k][keep].numpy() for k in ("scores", "labels", "boxes")}
    if "masks" in r:
        res["masks"] = r["masks"][keep].squeeze(1).numpy()
    return res


def assert_same(pred, ref, box_tol=0.5, score_tol=1e-5):
    """numpy vs rfdetr's torch PostProcess: the same detections in the same order, except that near-tied scores
    (sigmoid's last bits differ between the two) may rank either way (``_ties.tie_order``)."""
    assert len(pred) == len(ref["scores"])
    o = tie_order(pred.confidence, pred.class_id, pred.xyxy, ref["scores"], ref["labels"], ref["boxes"])
    ref = {k: v[o] for k, v in ref.items()}
    np.testing.assert_array_equal(pred.class_id, ref["labels"])
    assert np.abs(pred.confidence - ref["scores"]).max(initial=0) <= score_tol
    assert np.abs(pred.xyxy - ref["boxes"]).max(initial=0) <= box_tol
    return o
    if "masks" in ref:
        assert pred.mask.shape == ref["masks"].shape
        assert_masks_equal(pred.mask, ref["masks"])


def assert_masks_equal(a, b):
    differ = int((a != b).sum())
    assert differ == 0 or (not EXACT_MASKS and differ <= 1e-5 * a.size), f"{differ} mask pixels differ"


def random_raw(seed, q=50, c=3, mh=27, ties=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(-3, 1, (q, c)).astype(np.float32)
    if ties:  # many exactly equal scores: the tie rule (ascending flat index) decides the order
        logits = np.round(logits * 2) / 2
    boxes = rng.uniform(0, 1, (q, 4)).astype(np.float32)
    boxes[:, 2:] *= 1.3  # some boxes stick out of the image: clamping is tested too
    masks = rng.normal(0, 2, (q, mh, mh)).astype(np.float32)
    return RawOutputs(boxes, logits, masks)


@pytest.mark.parametrize("seed,size,threshold,num_select,ties", [
    (0, (640, 480), 0.0, 200, False), (1, (480, 640), 0.05, 20, False), (2, (333, 517), 0.03, 100, True),
    (3, (100, 100), 0.0, 7, True), (4, (1024, 77), 0.9, 200, False)])
def test_equals_rfdetr_postprocess_on_random_outputs(seed, size, threshold, num_select, ties):
    raw = random_raw(seed, ties=ties)
    pred = postprocess(raw, size, threshold=threshold, num_select=num_select)
    assert_same(pred, rfdetr_postprocess(raw, size, threshold, num_select), box_tol=1e-3)


def test_topk_over_queries_times_classes_not_argmax():
    logits = np.full((3, 3), -9.0, np.float32)
    logits[0] = [2.0, 1.0, -9]  # query 0 holds the two best pairs
    logits[1, 2] = 0.5
    scores, labels, queries = select_topk(logits, 3)
    assert queries.tolist() == [0, 0, 1] and labels.tolist() == [0, 1, 2]
    assert np.allclose(scores, 1 / (1 + np.exp(-np.array([2.0, 1.0, 0.5]))))


def test_masks_are_upsampled_before_thresholding():
    raw = RawOutputs(np.array([[0.5, 0.5, 1.0, 1.0]], np.float32), np.array([[5.0, -5.0]], np.float32),
                     np.array([[[-1.0, 1.0], [1.0, -1.0]]], np.float32))
    pred = postprocess(raw, (8, 8), threshold=0.5)
    # thresholding first then upsampling would give 2x2 blocks; upsampling first gives a smooth diagonal band
    assert pred.mask.shape == (1, 8, 8) and 0 < pred.mask.sum() < 64
    assert pred.mask[0, 0, 7] and not pred.mask[0, 0, 0] and not pred.mask[0, 3, 3]


def test_mask_threshold_and_empty_result():
    raw = random_raw(5)
    lo = postprocess(raw, (64, 48), threshold=0.0, mask_threshold=-1.0)
    hi = postprocess(raw, (64, 48), threshold=0.0, mask_threshold=1.0)
    assert (lo.mask >= hi.mask).all() and lo.mask.sum() > hi.mask.sum()
    none = postprocess(raw, (64, 48), threshold=1.0)
    assert len(none) == 0 and none.mask.shape == (0, 48, 64)
    det = none.to_detections()
    assert len(det) == 0


def test_class_names_and_background_slot():
    logits = np.full((2, 3), -9.0, np.float32)
    logits[0, 1], logits[1, 2] = 3.0, 2.0
    raw = RawOutputs(np.full((2, 4), 0.5, np.float32), logits)
    pred = postprocess(raw, (10, 10), threshold=0.5, class_names=["background", "Nail"])
    assert pred.class_id.tolist() == [1, 2]
    assert pred.class_name.tolist() == ["Nail", BACKGROUND_NAME]
    det = pred.to_detections()
    assert det.data["class_name"].tolist() == ["Nail", BACKGROUND_NAME] and det.mask is None


@pytest.fixture(scope="module")
def demo_raw(demo_model):
    """Run the demo model once per image in PyTorch (rfdetr's own preprocessing, its own network)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    rf = demo_model
    res = {}
    for p in IMAGES:
        with Image.open(p) as im:
            rgb = np.array(im.convert("RGB"))
        t = torch.from_numpy(rgb.transpose(2, 0, 1)).float() / torch.tensor(255.0)
        t = TF.normalize(TF.resize(t, [rf.model.resolution] * 2, antialias=False)[None], rf.means, rf.stds)
        with torch.inference_mode():
            out = rf.model.model(t)
        res[p.name] = (RawOutputs(out["pred_boxes"][0].numpy(), out["pred_logits"][0].numpy(),
                                  out["pred_masks"][0].numpy()), (rgb.shape[1], rgb.shape[0]))
    return res


@pytest.mark.slow
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_equals_rfdetr_on_demo_model_same_raw_outputs(demo_model, demo_raw, threshold):
    """Same raw outputs in, rfdetr's PostProcess vs numpy: identical detections and masks."""
    num_select = demo_model.model.postprocess.num_select
    for name, (raw, size) in demo_raw.items():
        pred = postprocess(raw, size, threshold=threshold, num_select=num_select, class_names=demo_model.class_names)
        assert_same(pred, rfdetr_postprocess(raw, size, threshold, num_select), box_tol=1e-4, score_tol=1e-6)
        top = np.sort(1.0 / (1.0 + np.exp(-raw.logits.astype(np.float64).ravel())))[::-1][:num_select]
        assert len(pred) == int((top > threshold).sum()), f"{name}: threshold {threshold} kept {len(pred)}"


@pytest.mark.slow
def test_equals_rf_predict_end_to_end(demo_model):
    """nailkit's numpy pipeline (preprocess + eager export-mode model + numpy postprocess) vs rf.predict()."""
    from nailkit.runtime.torch_runner import TorchRunner

    rf = demo_model
    runner = TorchRunner(rf)
    checked = 0
    for p in IMAGES:
        raw, size = runner.predict_raw(p)
        for t in THRESHOLDS:
            ref = rf.predict(str(p), threshold=t)
            pred = runner.postprocess(raw, size, threshold=t)
            assert len(pred) == len(ref), f"{p.name} @ {t}"
            ref = ref[tie_order(pred.confidence, pred.class_id, pred.xyxy, ref.confidence, ref.class_id, ref.xyxy)]
            np.testing.assert_array_equal(pred.class_id, ref.class_id)
            assert np.abs(pred.confidence - ref.confidence).max(initial=0) <= 1e-5
            assert np.abs(pred.xyxy - ref.xyxy).max(initial=0) <= 0.5
            assert_masks_equal(pred.mask, ref.mask)
            assert pred.class_name.tolist() == ref.data["class_name"].tolist()
            checked += len(pred)
    assert checked > 0


# ---------------------------------------------------------------------------------------------------------------
# issue 12: the GPU target's host steps, masks for selected queries only, the guided upsampling option
# ---------------------------------------------------------------------------------------------------------------

def test_select_proposals_is_rfdetr_two_stage_topk():
    from nailkit.portable.postprocess import select_proposals

    rng = np.random.default_rng(3)
    enc_logits = rng.normal(0, 1, (1296, 3)).astype(np.float32)
    enc_boxes = rng.uniform(0, 1, (1296, 4)).astype(np.float32)
    ref, idx = select_proposals(enc_logits, enc_boxes, 200)
    t_idx = torch.topk(torch.from_numpy(enc_logits).max(-1)[0], 200).indices.numpy()
    np.testing.assert_array_equal(idx, t_idx)  # same order as torch.topk (sorted, descending)
    np.testing.assert_array_equal(ref, enc_boxes[t_idx])
    assert ref.dtype == np.float32 and ref.flags["C_CONTIGUOUS"]


def test_masks_for_selected_queries_only_equal_full_masks():
    from nailkit.portable.postprocess import select_mask_queries

    raw = random_raw(11, q=60, c=3, mh=27)
    qf = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    for thr in (0.01, 0.05, 0.2):
        rows, qsel = select_mask_queries(raw.logits, qf, num_select=60, threshold=thr, slots=60)
        assert len(set(qsel.tolist())) == len(qsel) and rows.shape == (60, 8)
        np.testing.assert_array_equal(rows[:len(qsel)], qf[qsel])
        assert not rows[len(qsel):].any()  # zero padding
        full = postprocess(raw, (100, 80), threshold=thr, num_select=60)
        assert set(full.query_index.tolist()) == set(qsel.tolist())
        sel = RawOutputs(raw.boxes, raw.logits, np.concatenate([raw.masks[qsel], np.zeros((3, 27, 27), np.float32)]),
                         mask_queries=qsel)
        part = postprocess(sel, (100, 80), threshold=thr, num_select=60)
        np.testing.assert_array_equal(part.mask, full.mask)
        np.testing.assert_array_equal(part.query_index, full.query_index)


def test_full_mask_slots_keep_the_best_detections_and_count_the_rest():
    """The GPU target computes masks for at most ``slots`` queries: with every slot used, post-processing keeps the
    full post-processing's first detections (same boxes, scores and masks) and counts the others as dropped."""
    from nailkit.portable.postprocess import select_mask_queries

    raw = random_raw(12, q=40, c=3, mh=9)
    full = postprocess(raw, (50, 50), threshold=0.01, num_select=40)
    for slots in (2, 5):
        _, qsel = select_mask_queries(raw.logits, np.zeros((40, 4), np.float32), num_select=40, threshold=0.01,
                                      slots=slots)
        assert len(qsel) == slots < len(set(full.query_index.tolist()))
        sel = RawOutputs(raw.boxes, raw.logits, raw.masks[qsel], mask_queries=qsel)
        part = postprocess(sel, (50, 50), threshold=0.01, num_select=40)
        n = len(part)
        assert 0 < n < len(full) and part.dropped == len(full) - n
        np.testing.assert_array_equal(part.query_index, full.query_index[:n])
        np.testing.assert_array_equal(part.confidence, full.confidence[:n])
        np.testing.assert_array_equal(part.xyxy, full.xyxy[:n])
        np.testing.assert_array_equal(part.mask, full.mask[:n])
        assert set(part.query_index.tolist()) <= set(qsel.tolist())
        # the first detection left out is the first whose query got no slot
        assert int(full.query_index[n]) not in set(qsel.tolist())
        assert part.subset(np.arange(n)).dropped == part.dropped
    assert full.dropped == 0


def test_a_missing_mask_row_with_a_free_slot_is_an_error_not_a_wrong_mask():
    from nailkit.portable.postprocess import select_mask_queries

    raw = random_raw(12, q=40, c=3, mh=9)
    # queries chosen at a higher threshold than the post-processing's: a slot is free, yet a detection has no row
    _, qsel = select_mask_queries(raw.logits, np.zeros((40, 4), np.float32), num_select=40, threshold=0.3, slots=40)
    assert 0 < len(qsel) < 40
    masks = np.concatenate([raw.masks[qsel], np.zeros((40 - len(qsel), 9, 9), np.float32)])
    sel = RawOutputs(raw.boxes, raw.logits, masks, mask_queries=qsel)
    with pytest.raises(ValueError, match="no mask row.*same threshold"):
        postprocess(sel, (50, 50), threshold=0.01, num_select=40)


def test_guided_upsampling_option_default_unchanged_and_follows_edges():
    from nailkit.portable.postprocess import guided_refine

    raw = random_raw(5, q=20, c=3, mh=27)
    default = postprocess(raw, (108, 108), threshold=0.01)
    explicit = postprocess(raw, (108, 108), threshold=0.01, mask_upsample="bilinear")
    np.testing.assert_array_equal(default.mask, explicit.mask)
    with pytest.raises(ValueError, match="needs image"):
        postprocess(raw, (108, 108), threshold=0.01, mask_upsample="guided")
    with pytest.raises(ValueError, match="mask_upsample"):
        postprocess(raw, (108, 108), threshold=0.01, mask_upsample="lanczos")
    # an image with a sharp vertical edge at x=50 and a blurry logit ramp crossing zero at x=46: the guided
    # refinement moves the mask boundary towards the image edge
    img = np.zeros((64, 100, 3), np.uint8)
    img[:, 50:] = 255
    logits = np.tile((np.arange(100, dtype=np.float32) - 46.0) / 10.0, (64, 1))[None]
    plain = (logits > 0)[0]
    guided = guided_refine(logits, img, radius=8, eps=1e-3)[0]
    edge_plain = int(np.argmax(plain[32])); edge_guided = int(np.argmax(guided[32]))
    assert edge_plain == 47 and abs(edge_guided - 50) < abs(edge_plain - 50)
