"""Box and mask mAP for any backend, on any Roboflow-layout COCO split, by pycocotools' COCO definitions.

``evaluate(model, dataset_dir, split="test", backend=None, resolution=None, threshold=0.5)`` runs MODEL (a ``.pth``,
``.onnx``, ``.tflite`` or a loaded rfdetr object) through the same runners and post-processing as ``predict``, then
scores every image with pycocotools' ``COCOeval`` (``bbox`` and ``segm``, maxDets 100). At the operating threshold it
also reports recall (the fraction of ground-truth nails matched one-to-one, mask IoU > 0.5, by a detection scoring at
least the threshold) and false positives per image, plus one row per image.

Predicted class indices map to the dataset's categories the way rfdetr trains them: unannotated Roboflow parent
categories are dropped and the remaining categories are numbered 0, 1, … in id order; when the model carries class
names that the dataset also has, the names decide.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.core.errors import NailkitError
from nailkit.core.outdir import check_path
from nailkit.data.coco_export import CocoSplit, DatasetError, load_split
from nailkit.data.coco_masks import instance_masks
from nailkit.export.onnx import ensure_onnx
from nailkit.portable.preprocess import load_image
from nailkit.runtime.runners import make_runner
from nailkit.tflite.convert import ensure_tflite

#: Detections kept per image for mAP (COCO's maxDets).
MAX_DETS = 100
#: Mask IoU above which a detection counts as finding a ground-truth nail (recall / FP at the operating threshold).
MATCH_IOU = 0.5
#: Score thresholds of the operating curve (recall and false positives per image at each; the sliders' range).
OPERATING_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    per_image: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.metrics)


def _kept_categories(coco: dict[str, Any]) -> list[dict[str, Any]]:
    """rfdetr's label space: categories in id order, minus unannotated grouping (parent) categories."""
    from rfdetr.datasets.coco import filter_parent_categories

    annotated = {int(a["category_id"]) for a in coco["annotations"]}
    return list(filter_parent_categories(sorted(coco["categories"], key=lambda c: c["id"]), annotated))


def label_to_category(coco: dict[str, Any], class_names: Optional[Sequence[str]]) -> dict[int, int]:
    """Model class index → dataset category id (by name where both sides name it, else rfdetr's index order)."""
    kept = _kept_categories(coco)
    mapping = {i: int(c["id"]) for i, c in enumerate(kept)}
    by_name = {c["name"]: int(c["id"]) for c in coco["categories"]}
    for i, name in enumerate(class_names or []):
        if name in by_name:
            mapping[i] = by_name[name]
        elif i in mapping and name not in by_name and name.lower() in ("background", "__background__"):
            mapping.pop(i)
    return mapping


def _coco_eval(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        cgt = COCO()
        cgt.dataset = json.loads(json.dumps(gt))
        cgt.createIndex()
        cdt = cgt.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(cgt, cdt, iou_type)
        ev.params.maxDets = [1, 10, MAX_DETS]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = float(ev.stats[0]), float(ev.stats[1])
    return max(ap, 0.0), max(ap50, 0.0)  # COCOeval writes -1 where there is no ground truth


def _rle_crop(crop: Any, height: int, width: int) -> dict[str, Any]:
    """RLE of one cropped mask (``postprocess.MaskCrop``) at the full image size: pasted straight into one
    column-major uint8 plane (what pycocotools encodes), so no full-size transpose is made."""
    from pycocotools import mask as mask_utils

    full = np.zeros((height, width), dtype=np.uint8, order="F")
    rows, cols = crop.window()
    full[rows, cols] = crop.mask
    r = mask_utils.encode(full)
    r["counts"] = r["counts"].decode("ascii")
    return r


def _crop_iou(gt_masks: np.ndarray, crops: Sequence[Any], g_area: Optional[np.ndarray] = None) -> np.ndarray:
    """[G, P] mask IoU of full-size ground truths and cropped predictions, counted inside each crop's window."""
    if g_area is None:
        g_area = gt_masks.sum((1, 2)).astype(np.float64)
    out = np.zeros((len(gt_masks), len(crops)), dtype=np.float64)
    for j, c in enumerate(crops):
        rows, cols = c.window()
        inter = (gt_masks[:, rows, cols] & c.mask[None]).sum((1, 2))
        union = g_area + c.area() - inter
        out[:, j] = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return out


def match_at_threshold(gt_masks: np.ndarray, pred_masks: Any, scores: np.ndarray, threshold: float,
                       iou: float = MATCH_IOU) -> tuple[int, int]:
    """(matched ground truths, false positives) among detections scoring ≥ threshold; greedy by score, one-to-one.

    ``pred_masks``: [P, H, W] bool, or a list of P ``postprocess.MaskCrop`` (cropped masks)."""
    import supervision as sv

    keep = scores >= threshold
    cropped = isinstance(pred_masks, list)
    pm = [c for c, k in zip(pred_masks, keep) if k] if cropped else pred_masks[keep]
    order = np.argsort(-scores[keep], kind="stable")
    if len(gt_masks) == 0 or len(pm) == 0:
        return 0, int(len(pm))
    ious = _crop_iou(gt_masks, pm) if cropped else sv.mask_iou_batch(gt_masks, pm)  # [G, P]
    return _greedy_match(ious, order, iou)


def _greedy_match(ious: np.ndarray, order: np.ndarray, iou: float = MATCH_IOU) -> tuple[int, int]:
    """(matched, false positives): predictions (columns of ``ious`` [G, P]) in ``order`` take the best free match."""
    taken = np.zeros(ious.shape[0], bool)
    matched = fp = 0
    for p in order:
        cand = np.where(~taken & (ious[:, p] > iou))[0]
        if len(cand):
            taken[cand[np.argmax(ious[cand, p])]] = True
            matched += 1
        else:
            fp += 1
    return matched, fp


def evaluate(model: Any, dataset_dir: str | os.PathLike[str], *, split: str = "test", backend: Optional[str] = None,
             resolution: Optional[int] = None, threshold: float = 0.5, threads: Optional[int] = None,
             max_images: Optional[int] = None, trusted: bool = False, progress: bool = True,
             runner: Any = None) -> EvalResult:
    """Score MODEL on ``dataset_dir/<split>``. Returns metrics (fractions in [0, 1]) and per-image rows."""
    data: CocoSplit = load_split(dataset_dir, split)
    images = sorted(data.coco["images"], key=lambda im: im["id"])
    if not images:
        raise DatasetError(f"{data.annotation_file}: the {split!r} split has no images; nothing to evaluate")
    if max_images:
        images = images[: int(max_images)]
    own = runner is None
    run = runner or make_runner(model, backend=backend, threads=threads, resolution=resolution, trusted=trusted)
    crop_ok = "mask_format" in inspect.signature(run.predict).parameters
    try:
        mapping = label_to_category(data.coco, run.class_names)
        gt = _ground_truth(data, images)
        box_dets: list[dict[str, Any]] = []
        seg_dets: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        it = images
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(images, desc=f"evaluate {run.name}", unit="img")
        for im in it:
            rows.append(_score_image(run, data, im, mapping, threshold, crop_ok, box_dets, seg_dets))
        box = _coco_eval(gt, box_dets, "bbox")
        seg = _coco_eval(gt, seg_dets, "segm")
        n_inst = sum(r["instances"] for r in rows)
        metrics = {"mask_map50_95": seg[0], "mask_map50": seg[1], "box_map50_95": box[0], "box_map50": box[1],
                   "recall": (sum(r["matched"] for r in rows) / n_inst) if n_inst else 0.0,
                   "fp_per_image": sum(r["false_positives"] for r in rows) / max(len(rows), 1),
                   "operating_points": operating_points(rows, n_inst),
                   "threshold": float(threshold), "images": len(rows), "instances": n_inst,
                   "model": str(getattr(run, "path", None) or model), "backend": run.backend,
                   "resolution": int(run.resolution), "split": split, "dataset": str(dataset_dir),
                   "mean_forward_ms": float(np.mean([r["forward_ms"] for r in rows])) if rows else None}
        return EvalResult(metrics, rows)
    finally:
        if own:
            run.close()


def operating_points(rows: Sequence[dict[str, Any]], n_inst: int) -> list[dict[str, float]]:
    """Recall and false positives per image at each of ``OPERATING_THRESHOLDS``, from the per-image rows
    (``matched_at`` / ``fp_at``): where a slider finds the nails, and what it costs in false positives."""
    return [{"threshold": t, "recall": (sum(r["matched_at"][i] for r in rows) / n_inst) if n_inst else 0.0,
             "fp_per_image": sum(r["fp_at"][i] for r in rows) / max(len(rows), 1)}
            for i, t in enumerate(OPERATING_THRESHOLDS)]


def _ground_truth(data: CocoSplit, images: list[dict[str, Any]]) -> dict[str, Any]:
    """The COCO ground truth of ``images`` for ``COCOeval``: their annotations, crowd flag and area filled in."""
    ids = {im["id"] for im in images}
    return {"images": images, "categories": data.coco["categories"],
            # ids renumbered from 1: COCOeval takes a match with annotation id 0 for "unmatched" (it tests dtm > 0),
            # and Roboflow exports number annotations from 0.
            "annotations": [dict(a, id=n, iscrowd=a.get("iscrowd", 0),
                                 area=a.get("area", a["bbox"][2] * a["bbox"][3]))
                            for n, a in enumerate((a for a in data.coco["annotations"] if a["image_id"] in ids),
                                                  start=1)]}


def _score_image(run: Any, data: CocoSplit, im: dict[str, Any], mapping: dict[int, int], threshold: float,
                 crop_ok: bool, box_dets: list[dict[str, Any]], seg_dets: list[dict[str, Any]]) -> dict[str, Any]:
    """One image: its detections (every score, at most ``MAX_DETS``) appended to ``box_dets`` / ``seg_dets`` for
    COCOeval, and its row (instances, matched / false positives at ``threshold``, forward time) returned."""
    path = data.image_path(im)
    try:
        rgb = load_image(path)
    except Exception as exc:  # noqa: BLE001 - unreadable image: name it
        raise DatasetError(f"{path}: cannot read image named in {data.annotation_file} ({exc})") from None
    if rgb.shape[:2] != (im["height"], im["width"]):
        raise DatasetError(f"{data.annotation_file}: image {im['file_name']} is {rgb.shape[1]}x{rgb.shape[0]}"
                           f" but the annotation says {im['width']}x{im['height']}")
    # cropped masks: memory follows the masks, not 100 detections × the photo's size
    pred = (run.predict(rgb, threshold=0.0, num_select=MAX_DETS, mask_format="crop") if crop_ok
            else run.predict(rgb, threshold=0.0, num_select=MAX_DETS))
    del rgb
    cats = np.array([mapping.get(int(c), -1) for c in pred.class_id])
    valid = cats >= 0
    pred = pred.subset(valid)
    cats = cats[valid]
    h, w = int(im["height"]), int(im["width"])
    gtm = instance_masks(data, im)
    g_area = gtm.sum((1, 2)).astype(np.float64)
    floor = min(threshold, min(OPERATING_THRESHOLDS))
    kept = pred.confidence >= floor  # IoUs for every detection some operating point counts
    iou_cols = []
    for i, (b, s, c) in enumerate(zip(pred.xyxy, pred.confidence, cats)):
        crop = pred.crop(i)  # one detection's mask at a time
        x0, y0, x1, y1 = (float(v) for v in b)
        box_dets.append({"image_id": im["id"], "category_id": int(c), "score": float(s),
                         "bbox": [x0, y0, x1 - x0, y1 - y0]})
        seg_dets.append({"image_id": im["id"], "category_id": int(c), "score": float(s),
                         "segmentation": _rle_crop(crop, h, w)})
        if kept[i] and len(gtm):
            iou_cols.append(_crop_iou(gtm, [crop], g_area)[:, 0])
        del crop
    ious = np.stack(iou_cols, 1) if iou_cols else None
    kept_scores = pred.confidence[kept]

    def at(t: float) -> tuple[int, int]:
        sel = np.where(kept_scores >= t)[0]
        if ious is None:
            return 0, int(len(sel))
        return _greedy_match(ious[:, sel], np.argsort(-kept_scores[sel], kind="stable"))

    matched, fp = at(threshold)
    curve = [at(t) for t in OPERATING_THRESHOLDS]
    n_gt = len(gtm)
    del gtm
    return {"file_name": im["file_name"], "instances": int(n_gt), "matched": matched,
            "false_positives": fp, "matched_at": [m for m, _ in curve], "fp_at": [f for _, f in curve],
            "detections": int((pred.confidence >= threshold).sum()),
            "max_score": float(pred.confidence.max()) if len(pred) else 0.0,
            "forward_ms": round(float(run.last_ms), 2)}


def negatives_max_score(model: Any, images: Sequence[str | os.PathLike[str]], *, backend: Optional[str] = None,
                        resolution: Optional[int] = None, runner: Any = None) -> dict[str, float]:
    """Highest detection score on each image that holds no nail (the quality bar: none may reach 0.5)."""
    run = runner or make_runner(model, backend=backend, resolution=resolution)
    try:
        out = {}
        for p in images:
            pred = run.predict(p, threshold=0.0, num_select=10)
            out[Path(p).name] = float(pred.confidence.max()) if len(pred) else 0.0
        return out
    finally:
        if runner is None:
            run.close()


def cli_evaluate(args) -> int:
    if args.rows:  # a bad --rows path fails now, not after the whole evaluation

        rows_path = check_path(args.rows, "--rows", kind="file")
        if rows_path.is_dir():
            raise NailkitError(f"{rows_path}: --rows is a folder; expected a .json file name")
    res = evaluate(args.model, args.dataset, split=args.split, backend=args.backend, resolution=args.resolution,
                   threshold=args.threshold, threads=args.threads, max_images=args.max_images, trusted=args.trusted,
                   progress=not args.json)
    if args.rows:
        out = Path(args.rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"metrics": res.metrics, "images": res.per_image}, indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(res.metrics, allow_nan=False))  # valid JSON: metrics are never NaN
    else:
        m = res.metrics
        print(f"{m['model']} [{m['backend']} @ {m['resolution']}] on {m['dataset']}/{m['split']}: "
              f"{m['images']} images, {m['instances']} nails")
        print(f"  mask mAP50-95 {m['mask_map50_95']:.3f}  mask mAP50 {m['mask_map50']:.3f}  "
              f"box mAP50-95 {m['box_map50_95']:.3f}  box mAP50 {m['box_map50']:.3f}")
        print(f"  at score ≥ {m['threshold']}: recall {m['recall']:.3f}, false positives/image "
              f"{m['fp_per_image']:.2f}; forward {m['mean_forward_ms']:.0f} ms/img")
        print("  recall / false positives per image by score: " + ", ".join(
            f"≥{p['threshold']:g} {p['recall']:.2f}/{p['fp_per_image']:.2f}" for p in m["operating_points"]))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# The accuracy table: one row per backend × precision × resolution
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RowSpec:
    """One model to score: ``backend`` torch / onnxruntime / tflite-<route>; ``model`` an rfdetr object or a file."""

    backend: str
    precision: str
    resolution: int
    model: Any
    file: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision} @{self.resolution}"


def accuracy_specs(checkpoint: str | os.PathLike[str], rf, out_dir: str | os.PathLike[str], *,
                   resolutions: Sequence[int], onnx: bool = True,
                   tflite: Optional[dict[str, Sequence[str]]] = None,
                   tflite_resolutions: Optional[Sequence[int]] = None,
                   variants: Optional[dict[str, dict[str, Sequence[str]]]] = None) -> list[RowSpec]:
    """The rows to score, making (or reusing from the cache) each ONNX / TFLite file through the verified stages.

    PyTorch runs at every resolution; ONNX Runtime too (``onnx``); ``tflite`` maps a route to its precisions
    (default: both routes × fp32/fp16/int8), converted at ``tflite_resolutions`` (default: the model's own resolution
    only — each extra one is a conversion). ``variants`` maps an export option ``sampling`` value (e.g. ``"xnn"``) to
    ``{route: precisions}``: those files too, as backend ``tflite-<route>-<sampling>``."""
    base = int(rf.model.resolution)
    specs = [RowSpec("torch", "fp32", int(r), rf) for r in resolutions]
    if onnx:
        for r in resolutions:
            path, _meta = ensure_onnx(checkpoint, out_dir, resolution=int(r), rf=rf)
            specs.append(RowSpec("onnxruntime", "fp32", int(r), str(path), str(path)))
    if tflite is None:
        tflite = {"onnx2tf": ("fp32", "fp16", "int8"), "litert": ("fp32", "fp16", "int8")}
    for r in (tflite_resolutions or [base]):
        for route, precisions in tflite.items():
            for prec in precisions:
                path, _meta = ensure_tflite(checkpoint, out_dir, route=route, precision=prec, resolution=int(r))
                specs.append(RowSpec(f"tflite-{route}", prec, int(r), str(path), str(path)))
        for sampling, routes in (variants or {}).items():
            for route, precisions in routes.items():
                for prec in precisions:
                    path, _meta = ensure_tflite(checkpoint, out_dir, route=route, precision=prec, resolution=int(r),
                                                sampling=sampling)
                    specs.append(RowSpec(f"tflite-{route}-{sampling}", prec, int(r), str(path), str(path)))
    return specs


def accuracy_table(specs: Sequence[RowSpec], dataset_dir: str | os.PathLike[str], *, split: str = "test",
                   threshold: float = 0.5, max_images: Optional[int] = None, threads: Optional[int] = None,
                   latency: Optional[dict[str, float]] = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every spec on the same images. Δ columns are against the first torch fp32 row at the highest
    resolution (PyTorch fp32 at the model's resolution), in mAP points (×100). ``latency`` maps a file path (or
    'torch@R') to a latency ratio measured by the benchmark; rows without one get None."""
    rows: list[dict[str, Any]] = []
    for spec in specs:
        runner = make_runner(spec.model, threads=threads, resolution=spec.resolution)
        try:
            res = evaluate(spec.model, dataset_dir, split=split, threshold=threshold, max_images=max_images,
                           runner=runner, progress=progress)
        finally:
            runner.close()
        m = res.metrics
        size = Path(spec.file).stat().st_size / 1e6 if spec.file else None
        key = spec.file if spec.file else f"torch@{spec.resolution}"
        rows.append({"backend": spec.backend, "precision": spec.precision, "resolution": spec.resolution,
                     "file": spec.file, "size_mb": round(size, 2) if size else None,
                     **{k: m[k] for k in ("mask_map50_95", "mask_map50", "box_map50_95", "box_map50", "recall",
                                          "fp_per_image", "images", "instances", "mean_forward_ms")},
                     "latency_ratio": (latency or {}).get(key)})
    refs = [r for r in rows if r["backend"] == "torch" and r["precision"] == "fp32"]
    if refs:
        ref = max(refs, key=lambda r: r["resolution"])
        for r in rows:
            for k in ("mask_map50_95", "mask_map50", "box_map50_95"):
                r[f"d_{k}_pt"] = round(100.0 * (r[k] - ref[k]), 3)
    return rows


#: route B's static selective int8 precisions are int8 files: the same accuracy bar as dynamic int8
STATIC_INT8_PRECISIONS = ("w8a8", "w8a16")


def accuracy_stage(precision: str) -> str:
    """The ``nailkit.verify.gates`` stage a file of ``precision`` is held to: ``accuracy_<precision>``; the static int8
    precisions (``w8a8``, ``w8a16``) to ``accuracy_int8``."""
    return "accuracy_int8" if precision in STATIC_INT8_PRECISIONS else f"accuracy_{precision}"


def latency_ratios_from_benchmark(summary: dict[str, Any], threads: Optional[int] = None) -> dict[str, float]:
    """Latency ratio to ONNX Runtime fp32 per model file (PyTorch eager as 'torch@R'), from notebook 06's summary,
    at ``threads`` (default: the fewest threads it measured)."""
    rows_by_t = summary.get("rows") or {}
    if not rows_by_t:
        return {}
    t = str(threads) if threads is not None else min(rows_by_t, key=int)
    specs = summary.get("specs", {})
    out: dict[str, float] = {}
    for row in rows_by_t.get(t, []):
        ratio = row.get("x_ort_fp32")
        spec = specs.get(row["backend"], {})
        if ratio is None or not spec:
            continue
        if spec.get("kind") == "torch":
            out[f"torch@{spec['resolution']}"] = float(ratio)
        elif spec.get("kind") not in ("torch-traced", "torchscript") and spec.get("segmentation", True):
            out[str(spec["path"])] = float(ratio)
    return out


def read_model_card_metrics(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The metrics a model card beside ``checkpoint`` (``<stem>.card.json``) claims, or {} when there is none."""
    card = Path(checkpoint).with_suffix(".card.json")
    if not card.exists():
        return {}
    return json.loads(card.read_text()).get("metrics", {})
