"""Boundary IoU / boundary F-score on known shapes, and the upsampling comparison on the synthetic ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from nailkit import mask_quality as mq


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
    assert mq.mask_iou(a, b) > 0.97
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
    from nailkit.data import ground_truth_mask, sample_images
    from nailkit.preprocess import load_image

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
