"""Boundary IoU / boundary F-score on known shapes, and the upsampling comparison on the synthetic ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from nailkit.accuracy import mask_quality as mq
from nailkit.verify.parity import mask_iou


def disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_identical_and_disjoint():
    a = disk(100, 100, 50, 50, 20)
    assert mq.boundary_iou(a, a) == 1.0 and mq.boundary_f(a, a)["f"] == 1.0
    b = disk(100, 100, 10, 10, 5)
    assert mq.boundary_iou(a, b) == 0.0 and mq.boundary_f(a, b)["f"] == 0.0
    empty = np.zeros_like(a)
    assert mq.boundary_iou(empty, empty) == 1.0 and mq.boundary_iou(a, empty) == 0.0
    with pytest.raises(ValueError, match="shape"):
        mq.boundary_iou(a, a[:50])


def test_boundary_iou_is_stricter_than_mask_iou_on_a_big_object():
    """A one-pixel shift of a large object barely moves mask IoU but costs boundary IoU (the metric's point)."""
    a = disk(400, 400, 200, 200, 150)
    b = np.roll(a, 3, axis=1)
    assert mask_iou(a, b) > 0.97
    assert mq.boundary_iou(a, b) < 0.85
    assert mq.boundary_iou(a, b) > mq.boundary_iou(a, np.roll(a, 8, axis=1))


def test_band_is_inner_and_width_follows_diagonal():
    a = np.zeros((50, 50), bool)
    a[10:40, 10:40] = True
    band = mq.mask_to_boundary(a, 2)
    assert band.sum() == 30 * 30 - 26 * 26 and not (band & ~a).any()
    assert mq.band_width((480, 640)) == 16  # 0.02 × 800


def test_boundary_f_tolerance():
    a = disk(200, 200, 100, 100, 60)
    b = np.roll(a, 2, axis=0)
    assert mq.boundary_f(a, b, bound_th=3)["f"] == 1.0
    assert mq.boundary_f(a, b, bound_th=1)["f"] < 1.0


def test_upsampling_quality_on_synthetic_ground_truth():
    """Bilinear-on-logits (the default) beats a nearest resize of the thresholded ¼-res mask on boundary IoU."""
    from nailkit.data.samples import ground_truth_mask, sample_images
    from nailkit.portable.preprocess import load_image

    items = [(load_image(p), ground_truth_mask(p)) for p in sample_images(kind="synthetic")]
    items = [(i, g) for i, g in items if g is not None]
    assert items, "synthetic sample images with ground truth are missing"
    q = mq.upsampling_quality(items, methods=("nearest", "bilinear", "guided"))
    assert q["bilinear"]["boundary_iou"] > q["nearest"]["boundary_iou"]
    for m in q.values():
        assert 0.5 < m["mask_iou"] <= 1.0 and 0.0 < m["boundary_iou"] <= 1.0 and m["n"] == len(items)


def test_prediction_quality_matching():
    g1, g2 = disk(80, 80, 20, 20, 10), disk(80, 80, 60, 60, 10)
    res = mq.prediction_quality(np.stack([g2, g1]), np.stack([g1, g2]))
    assert res["mask_iou"] == 1.0 and res["boundary_iou"] == 1.0 and res["n_gt"] == 2
    res = mq.prediction_quality(np.stack([g1]), np.stack([g1, g2]))
    assert res["mask_iou"] == 0.5


def test_split_boundary_quality_oracle_runner_matches_the_upsampling_ceiling(tmp_path):
    """A runner whose ¼-res mask logits are made from the ground truth scores what the upsampling alone scores."""
    from nailkit.data.coco_export import load_split
    from nailkit.data.coco_masks import instance_masks
    from nailkit.data.synthetic_dataset import make_split
    from nailkit.portable.postprocess import RawOutputs

    make_split(tmp_path, "test", 4, seed=3)
    sp = load_split(tmp_path, "test")
    by_name = {im["file_name"]: im for im in sp.coco["images"]}

    class Oracle:
        def predict_raw(self, path):
            im = by_name[path.name]
            gts = instance_masks(sp, im)
            q = len(gts) + 1
            masks = np.stack([mq.quarter_res_logits(g, 108) for g in gts] + [np.full((108, 108), -8.0, np.float32)])
            logits = np.full((q, 3), -9.0, np.float32)
            logits[:-1, 1] = 5.0  # every nail found, confidently
            boxes = np.tile(np.array([[0.5, 0.5, 0.2, 0.2]], np.float32), (q, 1))
            return RawOutputs(boxes=boxes, logits=logits, masks=masks), (im["width"], im["height"])

    q = mq.split_boundary_quality(tmp_path, Oracle(), threshold=0.5)
    assert q["nails"] > 0 and q["model"]["bilinear"]["images"] >= 1
    up, model = q["upsampling"], q["model"]
    assert model["bilinear"]["mask_iou"] == pytest.approx(up["bilinear"]["mask_iou"], abs=0.02)
    assert model["bilinear"]["boundary_iou"] == pytest.approx(up["bilinear"]["boundary_iou"], abs=0.03)
    assert up["bilinear"]["boundary_iou"] > up["nearest"]["boundary_iou"]
