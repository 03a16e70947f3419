"""Accuracy drift of a backend against a reference over several images, at the detection level (one summary used
by the benchmark, the lower-resolution variants, the GPU chain and the bundle's check)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nailkit.portable.postprocess import RawOutputs
from nailkit.verify.parity import detection_parity, query_matched_diff


def drift_summary(ref_raws: Sequence[Any], raws: Sequence[Any], sizes: Sequence[tuple[int, int]], *,
                  top_k: int = 10) -> dict[str, Any]:
    """Accuracy drift of one backend vs the reference over several images (nailkit.verify.parity).

    Detection level: both post-processed to the *original* image size (so different input resolutions compare),
    reference top-k matched by IoU. ``max_logit_abs`` is the query-matched logit max-abs (same query count only).
    """
    if not (len(ref_raws) == len(raws) == len(sizes)) or not sizes:
        raise ValueError("drift_summary needs equally many (>= 1) reference runs, runs and image sizes")
    matched = total = 0
    mask_ious: list[float] = []
    l1 = score = 0.0
    logit = 0.0
    for a, b, sz in zip(ref_raws, raws, sizes):
        p = detection_parity(a, b, sz, top_k=top_k)
        matched += p.num_matched
        total += p.num_a
        if p.min_mask_iou is not None:
            mask_ious.append(p.min_mask_iou)
        l1 = max(l1, p.max_box_l1_px)
        score = max(score, p.max_score_diff)
        if a.logits.shape == b.logits.shape:
            logit = max(logit, query_matched_diff(without_masks(a), without_masks(b)).logits_max_abs)
    return {"images": len(sizes), "matched": matched, "of": total, "matched_top10": f"{matched}/{total}",
            "min_mask_iou": min(mask_ious) if mask_ious else None,
            "mean_min_mask_iou": float(np.mean(mask_ious)) if mask_ious else None,
            "max_box_l1_px": l1, "max_score_diff": score, "max_logit_abs": logit}


def without_masks(raw: RawOutputs) -> RawOutputs:
    """The same raw outputs without masks (so query matching works across mask resolutions)."""
    return RawOutputs(boxes=raw.boxes, logits=raw.logits, masks=None)
