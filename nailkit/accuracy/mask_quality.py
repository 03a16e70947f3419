"""Boundary quality of masks (numpy only): boundary IoU and boundary F-score.

* ``boundary_iou(gt, pred)`` — Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation Evaluation"
  (CVPR 2021): the IoU of the two masks' inner boundary bands, each band being the mask pixels within ``d`` pixels of
  the mask's contour, ``d = dilation_ratio × image diagonal`` (0.02 by default, the paper's choice).
* ``boundary_f(gt, pred)`` — the DAVIS contour accuracy (Perazzi et al. 2016): precision/recall of one-pixel
  boundaries matched within a tolerance of ``bound_th`` (a fraction of the diagonal when < 1, else pixels).
* ``upsampling_quality(...)`` measures how much detail a ¼-resolution mask loses when brought back to full size by
  each of the post-processing's upsampling rules, against the full-resolution ground truth.

Everything works on bool arrays [H, W]; morphology is done with a 3×3 structuring element by array shifts.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np

from nailkit.data.coco_export import load_split
from nailkit.data.coco_masks import instance_masks
from nailkit.portable.postprocess import guided_refine, postprocess
from nailkit.portable.preprocess import bilinear_resize
from nailkit.verify.parity import mask_iou


def _shift_min(m: np.ndarray) -> np.ndarray:
    """One 3×3 erosion (pixels outside the image count as background)."""
    p = np.pad(m, 1, constant_values=False)
    out = p[1:-1, 1:-1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def _shift_max(m: np.ndarray) -> np.ndarray:
    """One 3×3 dilation."""
    p = np.pad(m, 1, constant_values=False)
    out = p[1:-1, 1:-1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    for _ in range(max(0, int(iterations))):
        m = _shift_min(m)
    return m


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    for _ in range(max(0, int(iterations))):
        m = _shift_max(m)
    return m


def band_width(shape: Sequence[int], dilation_ratio: float = 0.02) -> int:
    h, w = int(shape[0]), int(shape[1])
    return max(1, int(round(dilation_ratio * np.sqrt(h * h + w * w))))


def mask_to_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """The inner boundary band: mask pixels within ``d`` (3×3-erosion steps) of the contour."""
    m = np.asarray(mask, dtype=bool)
    return m & ~erode(m, d)


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two bool masks [H, W]. Two empty masks score 1.0; one empty mask scores 0.0."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"masks differ in shape: {gt.shape} vs {pred.shape}")
    d = band_width(gt.shape, dilation_ratio)
    gb, pb = mask_to_boundary(gt, d), mask_to_boundary(pred, d)
    union = np.logical_or(gb, pb).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(gb, pb).sum() / union)


def contour(mask: np.ndarray) -> np.ndarray:
    """One-pixel inner contour."""
    m = np.asarray(mask, dtype=bool)
    return m & ~_shift_min(m)


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> dict[str, float]:
    """DAVIS boundary F-measure: {"precision", "recall", "f"}; tolerance ``bound_th`` × diagonal (or pixels ≥ 1)."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"masks differ in shape: {gt.shape} vs {pred.shape}")
    tol = int(bound_th if bound_th >= 1 else np.ceil(bound_th * np.hypot(*gt.shape)))
    gb, pb = contour(gt), contour(pred)
    ng, npb = int(gb.sum()), int(pb.sum())
    if ng == 0 and npb == 0:
        return {"precision": 1.0, "recall": 1.0, "f": 1.0}
    if ng == 0 or npb == 0:
        return {"precision": 0.0 if npb else 1.0, "recall": 0.0 if ng else 1.0, "f": 0.0}
    precision = float((pb & dilate(gb, tol)).sum() / npb)
    recall = float((gb & dilate(pb, tol)).sum() / ng)
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f": float(f)}


def quarter_res_logits(gt: np.ndarray, size: int, scale: float = 8.0) -> np.ndarray:
    """A stand-in for a perfect model's ¼-resolution mask logits: the ground truth's coverage of each low-res cell
    (area average), mapped to logits ``scale × (2·coverage − 1)`` (cell half covered → logit 0)."""
    from PIL import Image

    g = np.asarray(gt, dtype=np.float32)
    cov = np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    return (scale * (2.0 * cov - 1.0)).astype(np.float32)


def upsampling_quality(items: Iterable[tuple[np.ndarray, np.ndarray]], *, size: int = 108,
                       methods: Sequence[str] = ("nearest", "bilinear", "guided"),
                       dilation_ratio: float = 0.02) -> dict[str, dict[str, float]]:
    """For each (image RGB [H,W,3], ground-truth bool mask [H,W]): make ¼-resolution logits from the ground truth
    (``quarter_res_logits``), bring them back to H×W with each method, and score against the ground truth.

    Methods: "nearest" (a naive resize of the thresholded low-res mask: the jagged baseline), "bilinear" (the default
    post-processing: logits resized bilinearly, then thresholded), "guided" (bilinear + guided-filter refinement).
    Returns {method: {"boundary_iou", "boundary_f", "mask_iou", "n"}} (means).
    """
    acc: dict[str, dict[str, list[float]]] = {m: {"boundary_iou": [], "boundary_f": [], "mask_iou": []}
                                              for m in methods}
    for image, gt in items:
        gt = np.asarray(gt, dtype=bool)
        h, w = gt.shape
        lo = quarter_res_logits(gt, size)
        for m in methods:
            if m == "nearest":
                yi = np.minimum((np.arange(h) * size) // h, size - 1)
                xi = np.minimum((np.arange(w) * size) // w, size - 1)
                pred = (lo > 0)[yi[:, None], xi[None, :]]
            elif m == "bilinear":
                pred = bilinear_resize(lo[None], h, w)[0] > 0
            elif m == "guided":
                pred = guided_refine(bilinear_resize(lo[None], h, w), image)[0]
            else:
                raise ValueError(f"unknown method {m!r}")
            acc[m]["boundary_iou"].append(boundary_iou(gt, pred, dilation_ratio))
            acc[m]["boundary_f"].append(boundary_f(gt, pred)["f"])
            acc[m]["mask_iou"].append(mask_iou(gt, pred))
    return {m: {k: float(np.mean(v)) if v else float("nan") for k, v in d.items()} | {"n": len(d["mask_iou"])}
            for m, d in acc.items()}


def prediction_quality(pred_masks: np.ndarray, gt_masks: np.ndarray, dilation_ratio: float = 0.02
                       ) -> dict[str, Any]:
    """Greedy best-IoU matching of predicted to ground-truth instance masks, then mean boundary IoU / F / mask IoU
    over the ground-truth instances (an unmatched ground truth scores 0)."""
    pred_masks = np.asarray(pred_masks, dtype=bool).reshape(-1, *np.asarray(gt_masks).shape[-2:])
    gt_masks = np.asarray(gt_masks, dtype=bool).reshape(-1, *pred_masks.shape[-2:])
    used: set[int] = set()
    rows = []
    for g in gt_masks:
        best, bi = -1.0, None
        for i, p in enumerate(pred_masks):
            if i in used:
                continue
            v = mask_iou(g, p)
            if v > best:
                best, bi = v, i
        if bi is None or best <= 0:
            rows.append((0.0, 0.0, 0.0))
            continue
        used.add(bi)
        p = pred_masks[bi]
        rows.append((boundary_iou(g, p, dilation_ratio), boundary_f(g, p)["f"], best))
    arr = np.asarray(rows, dtype=np.float64) if rows else np.zeros((0, 3))
    return {"boundary_iou": float(arr[:, 0].mean()) if len(arr) else float("nan"),
            "boundary_f": float(arr[:, 1].mean()) if len(arr) else float("nan"),
            "mask_iou": float(arr[:, 2].mean()) if len(arr) else float("nan"), "n_gt": len(gt_masks),
            "n_pred": len(pred_masks)}


def split_boundary_quality(dataset_dir: str | Any, runner: Any = None, *, split: str = "test",
                           max_images: Optional[int] = None, threshold: float = 0.2,
                           methods: Sequence[str] = ("nearest", "bilinear", "guided"),
                           dilation_ratio: float = 0.02) -> dict[str, Any]:
    """Boundary quality on a labelled COCO split (``nailkit.data.coco_export``), two ways:

    * ``"upsampling"``: ``upsampling_quality`` over every ground-truth nail — what each upsampling rule alone loses
      from a perfect ¼-resolution mask (model-independent: the ceiling of the post-processing);
    * ``"model"`` (when ``runner`` — any ``nailkit.runtime.runners`` runner — is given): the runner's own masks at
      ``threshold``, post-processed with "bilinear" and "guided", matched to the ground truth
      (``prediction_quality``; an unmatched nail scores 0), means over images with nails.
    """
    from PIL import Image

    sp = load_split(dataset_dir, split)
    images = sp.coco["images"][:max_images] if max_images else sp.coco["images"]
    items = []
    model_rows: dict[str, list[dict[str, Any]]] = {m: [] for m in ("bilinear", "guided")}
    for im in images:
        gts = instance_masks(sp, im)
        if not len(gts):
            continue
        rgb = np.asarray(Image.open(sp.folder / im["file_name"]).convert("RGB"))
        items += [(rgb, g) for g in gts]
        if runner is not None:
            raw, size = runner.predict_raw(sp.folder / im["file_name"])
            for m in model_rows:
                pred = postprocess(raw, size, threshold=threshold, mask_upsample=m, image=rgb)
                masks = pred.mask if pred.mask is not None and len(pred.mask) else np.zeros((0, *gts.shape[1:]), bool)
                model_rows[m].append(prediction_quality(masks, gts, dilation_ratio))
    out: dict[str, Any] = {"split": split, "images": len(images), "nails": len(items), "threshold": threshold,
                           "upsampling": upsampling_quality(items, methods=methods, dilation_ratio=dilation_ratio)}
    if runner is not None:
        out["model"] = {m: {k: float(np.mean([r[k] for r in rows])) if rows else float("nan")
                            for k in ("boundary_iou", "boundary_f", "mask_iou")} | {"images": len(rows)}
                        for m, rows in model_rows.items()}
    return out
