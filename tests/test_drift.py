"""nailkit.verify.drift: detection-level drift of a backend against a reference over several images."""

import numpy as np
import pytest

from nailkit.portable.postprocess import RawOutputs
from nailkit.verify.drift import drift_summary, without_masks


def test_drift_summary_identical_runs_match_fully():
    rng = np.random.default_rng(0)
    q = 20
    boxes = np.column_stack([rng.uniform(0.2, 0.8, (q, 2)), rng.uniform(0.05, 0.2, (q, 2))])
    raw = RawOutputs(boxes=boxes, logits=rng.normal(size=(q, 3)), masks=rng.normal(size=(q, 8, 8)))
    d = drift_summary([raw, raw], [raw, raw], [(64, 48), (64, 48)])
    assert d["matched"] == d["of"] == 20 and d["matched_top10"] == "20/20"
    assert d["min_mask_iou"] == 1.0 and d["max_logit_abs"] == 0.0
    other = RawOutputs(boxes=boxes[::-1], logits=raw.logits[::-1] + 0.5, masks=raw.masks[::-1])
    d2 = drift_summary([raw], [other], [(64, 48)])
    assert d2["max_logit_abs"] == pytest.approx(0.5, abs=1e-6)  # query matching undoes the permutation
    with pytest.raises(ValueError):
        drift_summary([raw], [], [])


def test_without_masks_keeps_boxes_and_logits():
    raw = RawOutputs(boxes=np.zeros((2, 4)), logits=np.ones((2, 3)), masks=np.zeros((2, 4, 4)))
    bare = without_masks(raw)
    assert bare.masks is None and bare.boxes is raw.boxes and bare.logits is raw.logits
