"""Overlays, side-by-side panels, mask-logit differences and the headless threshold explorer."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nailkit.portable.postprocess import RawOutputs, postprocess  # noqa: E402
from nailkit.runtime.base import Runner  # noqa: E402
from nailkit.report.viz import (ThresholdExplorer, detections_table, mask_logit_diffs, overlay,  # noqa: E402
                         plot_mask_logit_diffs, side_by_side, table_html)

Q = 30


def fake_raw(seed=0, q=Q, shift=0.0):
    rng = np.random.default_rng(seed)
    cxcy = rng.uniform(0.2, 0.8, (q, 2))
    wh = rng.uniform(0.05, 0.3, (q, 2))
    boxes = np.concatenate([cxcy, wh], 1).astype(np.float32)
    logits = rng.normal(-3.5, 0.6, (q, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:12, 0:12] / 12.0
    masks = np.stack([4 * (0.15 - np.hypot(xx - b[0], yy - b[1])) for b in boxes]).astype(np.float32) + shift
    return RawOutputs(boxes, logits, masks)


class FakeRunner(Runner):
    """A Runner whose 'model' returns fixed outputs (depending on the image mean), counting its calls."""

    def __init__(self, name="fake", shift=0.0):
        self.name = self.backend = name
        self.resolution = 24
        self.class_names = ["background", "Nail"]
        self.calls = 0
        self.shift = shift

    def _forward(self, x):
        self.calls += 1
        raw = fake_raw(int(abs(float(x.mean())) * 1000) % 7, shift=self.shift)
        return [raw.masks[None], raw.logits[None], raw.boxes[None]]


def image(seed=0, h=60, w=80):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_overlay_draws_masks_boxes_and_labels():
    img = image()
    pred = postprocess(fake_raw(), (80, 60), threshold=0.0, num_select=5, class_names=["background", "Nail"])
    out = overlay(img, pred)
    assert out.shape == img.shape and out.dtype == np.uint8
    changed = np.any(out != img, axis=-1)
    assert changed[pred.mask.any(0)].mean() > 0.9  # mask pixels are tinted
    x0, y0, x1, y1 = pred.xyxy[0].round().astype(int)
    assert changed[y0:y1 + 1, x0:x1 + 1].any()
    empty = postprocess(fake_raw(), (80, 60), threshold=0.999)
    assert np.array_equal(overlay(img, empty), img)  # nothing to draw: image unchanged
    assert not np.array_equal(overlay(img, pred, masks=False), out)


def test_side_by_side_one_panel_per_backend():
    img = image()
    preds = {n: postprocess(fake_raw(i), (80, 60), threshold=0.0, num_select=3 + i)
             for i, n in enumerate(["torch", "onnxruntime", "tflite:fp32", "tflite:int8"])}
    fig = side_by_side(img, preds, cols=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"{n}: {len(p)} detections" for n, p in preds.items()]
    fig.savefig(io.BytesIO(), format="png")


def test_mask_logit_diffs_matched_by_iou_not_rank():
    ref = fake_raw(1)
    same = mask_logit_diffs(ref, ref, (80, 60), num_select=10, top_k=3)
    assert len(same) == 3 and all(it["max_abs"] == 0 for it in same)
    # permute the queries of the other run: matching by IoU still pairs the same detections
    perm = np.random.default_rng(0).permutation(Q)
    other = RawOutputs(ref.boxes[perm], ref.logits[perm], ref.masks[perm] + 0.25)
    items = mask_logit_diffs(ref, other, (80, 60), num_select=10, top_k=3)
    assert len(items) == 3
    for it in items:
        assert perm[it["query_other"]] == it["query_ref"]
        assert np.allclose(it["diff"], 0.25, atol=1e-5) and it["box_iou"] > 0.999
    fig = plot_mask_logit_diffs(items, ("torch", "shifted"))
    fig.savefig(io.BytesIO(), format="png")
    plot_mask_logit_diffs([])


def test_detections_table_html():
    pred = postprocess(fake_raw(), (80, 60), threshold=0.0, num_select=20, class_names=["background", "Nail"])
    rows = detections_table(pred, max_rows=5)
    assert len(rows) == 5 and rows[0]["score"] >= rows[-1]["score"]
    html = table_html(rows, total=len(pred))
    assert html.count("<tr>") == 6 and "15 more" in html
    assert "no detections" in table_html([])


def test_explorer_headless_monotonic_and_cached():
    torch_like, other = FakeRunner("torch"), FakeRunner("tflite:fp32", shift=0.5)
    imgs = {"a.png": image(0), "b.png": image(1, 50, 50)}
    ex = ThresholdExplorer([torch_like, other], imgs, score_threshold=0.0, num_select=40)
    assert ex.count == 40 and torch_like.calls == 1
    thresholds = np.linspace(0.0, 0.2, 21)
    counts = ex.sweep(thresholds)
    assert counts[0] == 40 and counts[-1] < counts[0]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert torch_like.calls == 1 and ex.forward_calls == 1  # slider moves re-run post-processing only
    raw, size = ex.raw()
    for t in (0.0, 0.031, 0.05, 0.2):  # the sliced cached prediction equals a fresh post-processing
        ex.score.value = t
        ref = postprocess(raw, size, threshold=t, num_select=40, class_names=["background", "Nail"])
        assert ex.count == len(ref) and np.array_equal(ex.prediction.mask, ref.mask)
        assert np.array_equal(ex.prediction.xyxy, ref.xyxy) and np.array_equal(ex.prediction.query_index,
                                                                               ref.query_index)
    ex.score.value = 0.0
    area_lo = ex.prediction.mask.sum()
    ex.mask.value = 2.0
    assert ex.prediction.mask.sum() < area_lo and torch_like.calls == 1
    ex.backend.value = "tflite:fp32"
    assert other.calls == 1 and ex.forward_calls == 2
    ex.image.value = "b.png"
    ex.backend.value = "torch"
    assert torch_like.calls == 2 and ex.forward_calls == 4
    ex.image.value = "a.png"
    assert torch_like.calls == 2  # cached per (backend, image)
    assert "detections" in ex.status.value and ex.view.value[:4] == b"\x89PNG"
    assert ex.history[-1][:2] == ("torch", "a.png")


def test_explorer_upload_adds_and_selects_image():
    from PIL import Image

    ex = ThresholdExplorer({"torch": FakeRunner()}, [image(0)], score_threshold=0.0)
    buf = io.BytesIO()
    Image.fromarray(image(3, 40, 30)).convert("RGBA").save(buf, format="PNG")
    ex._on_upload({"new": ({"name": "hand.png", "content": memoryview(buf.getvalue())},)})
    assert ex.image.value == "upload: hand.png" and ex.rgb().shape == (40, 30, 3)
    assert ex.prediction.mask.shape[1:] == (40, 30)


def test_explorer_needs_runners_and_images():
    with pytest.raises(ValueError, match="runner"):
        ThresholdExplorer({}, [image()])
    with pytest.raises(ValueError, match="image"):
        ThresholdExplorer({"f": FakeRunner()}, [])


def test_explorer_seeded_cache_runs_no_model():
    runner = FakeRunner()
    raw = fake_raw(2)
    ex = ThresholdExplorer({"torch": runner}, {"a.png": image(0), "b.png": image(1)}, score_threshold=0.0,
                           cache={("torch", "b.png"): (raw, (80, 60))}, image="b.png")
    assert runner.calls == 0 and ex.forward_calls == 0 and ex.count == min(200, raw.logits.size)
    assert ex.prediction.mask.shape[1:] == (60, 80)
