"""The numpy post-processing equals rfdetr's predict(): same boxes, scores, class ids, class names, identical masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nailkit.data import sample_images
from nailkit.postprocess import BACKGROUND_NAME, RawOutputs, postprocess, select_topk
from nailkit.preprocess import preprocess

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
    assert len(pred) == len(ref["scores"])
    np.testing.assert_array_equal(pred.class_id, ref["labels"])
    assert np.abs(pred.confidence - ref["scores"]).max(initial=0) <= score_tol
    assert np.abs(pred.xyxy - ref["boxes"]).max(initial=0) <= box_tol
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
        if threshold == 0.03:
            assert 0 <= len(pred) < num_select
        else:
            assert len(pred) > 0, f"{name}: threshold {threshold} should keep detections of the random demo"


@pytest.mark.slow
def test_equals_rf_predict_end_to_end(demo_model):
    """nailkit's numpy pipeline (preprocess + eager export-mode model + numpy postprocess) vs rf.predict()."""
    from nailkit.runtime import TorchRunner

    rf = demo_model
    runner = TorchRunner(rf)
    checked = 0
    for p in IMAGES:
        raw, size = runner.predict_raw(p)
        for t in THRESHOLDS:
            ref = rf.predict(str(p), threshold=t)
            pred = runner.postprocess(raw, size, threshold=t)
            assert len(pred) == len(ref), f"{p.name} @ {t}"
            np.testing.assert_array_equal(pred.class_id, ref.class_id)
            assert np.abs(pred.confidence - ref.confidence).max(initial=0) <= 1e-5
            assert np.abs(pred.xyxy - ref.xyxy).max(initial=0) <= 0.5
            assert_masks_equal(pred.mask, ref.mask)
            assert pred.class_name.tolist() == ref.data["class_name"].tolist()
            checked += len(pred)
    assert checked > 0
