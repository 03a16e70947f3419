"""Visual tools: overlays, side-by-side backend comparisons, mask-logit difference heatmaps, the threshold explorer.

* ``overlay(image, prediction)`` → RGB uint8 array with masks, boxes and "name score" labels (supervision annotators).
* ``side_by_side(image, {"torch": pred, "tflite:fp32": pred2, ...})`` → matplotlib figure, one panel per backend.
* ``show(image, title)``: one image on a matplotlib axis.
* ``mask_logit_diffs(raw_ref, raw_other, image_size)`` → for detections matched by box IoU (never by rank:
  random-weight scores are near-tied), the reference mask logits, the other backend's and their absolute difference;
  ``plot_mask_logit_diffs(items)`` draws them.
* ``detections_table(pred)`` / ``table_html(rows)``: the detections of one prediction as rows / an HTML table.
* ``ThresholdExplorer(runners, images)``: ipywidgets score/mask-threshold sliders, backend and image dropdowns and an
  optional upload; raw outputs are cached per (backend, image) so a slider move only re-runs post-processing.
  Works headless: set ``explorer.score.value = t`` and read ``explorer.count`` / ``explorer.prediction``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from nailkit.portable.postprocess import postprocess, Prediction, RawOutputs
from nailkit.portable.preprocess import ImageLike, load_image
from nailkit.verify.parity import match_detections


def _labels(pred: Prediction) -> list[str]:
    out = []
    for c, n, s in zip(pred.class_id, pred.class_name, pred.confidence):
        out.append(f"{n or c} {s:.3f}")
    return out


def overlay(image: ImageLike, pred: Prediction, *, masks: bool = True, boxes: bool = True, labels: bool = True,
            opacity: float = 0.45) -> np.ndarray:
    """RGB uint8 image with the prediction drawn on it (supervision's Mask/Box/Label annotators)."""
    import supervision as sv

    rgb = np.asarray(load_image(image))
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    scene = np.ascontiguousarray(rgb[:, :, ::-1])  # supervision draws numpy scenes as BGR (OpenCV)
    if len(pred):
        if masks and pred.has_masks:
            scene = _paint_masks(scene, pred, opacity)
        det = _boxes_only(pred)
        lookup = sv.ColorLookup.INDEX
        if boxes:
            scene = sv.BoxAnnotator(thickness=2, color_lookup=lookup).annotate(scene, det)
        if labels:
            scale = max(0.35, min(rgb.shape[:2]) / 900)
            scene = sv.LabelAnnotator(text_scale=scale, text_padding=3, color_lookup=lookup).annotate(
                scene, det, labels=_labels(pred))
    return np.ascontiguousarray(scene[:, :, ::-1])


def _boxes_only(pred: Prediction):
    """``pred`` as supervision Detections without masks (boxes and labels need no full-size mask array)."""
    import supervision as sv

    det = sv.Detections(xyxy=pred.xyxy.astype(np.float32), confidence=pred.confidence.astype(np.float32),
                        class_id=pred.class_id.astype(int))
    det.data["class_name"] = pred.class_name
    return det


def _paint_masks(scene: np.ndarray, pred: Prediction, opacity: float) -> np.ndarray:
    """Tint each detection's mask in its index colour (supervision's MaskAnnotator look: larger first, so small masks
    stay visible; blended once), reading one cropped mask at a time: no [N, H, W] array is made."""
    import cv2
    import supervision as sv

    boxes = pred.xyxy.astype(np.float64)
    order = np.argsort(-((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])), kind="stable")
    colored = scene.copy()
    palette = sv.ColorPalette.DEFAULT
    for i in order:
        c = pred.crop(int(i))
        if c is None or not c.mask.size:
            continue
        rows, cols = c.window()
        colored[rows, cols][c.mask] = palette.by_idx(int(i)).as_bgr()
    # outside the masks colored == scene, and the blend of a pixel with itself is that pixel
    return cv2.addWeighted(colored, opacity, scene, 1 - opacity, 0)


def show(image: np.ndarray, title: str = "", ax=None, figsize: tuple[float, float] = (6, 5)):
    """imshow an RGB array without axes; returns the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    ax.imshow(image)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return fig


def side_by_side(image: ImageLike, predictions: Mapping[str, Prediction], *, cols: int = 3,
                 panel_size: float = 4.0):
    """One overlay panel per backend (e.g. ``{"torch": p0, "onnxruntime": p1, "tflite:fp32": p2}``)."""
    import matplotlib.pyplot as plt

    rgb = load_image(image)
    names = list(predictions)
    n = max(1, len(names))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    aspect = rgb.shape[0] / rgb.shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size * cols, panel_size * aspect * rows + 0.4),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        pred = predictions[name]
        show(overlay(rgb, pred), f"{name}: {len(pred)} detections", ax=ax)
    fig.tight_layout()
    return fig


def mask_logit_diffs(raw_ref: RawOutputs, raw_other: RawOutputs, image_size: tuple[int, int], *,
                     threshold: float = 0.0, num_select: int = 200, top_k: int = 4,
                     iou_thr: float = 0.5) -> list[dict[str, Any]]:
    """Mask logits of the reference's top-``top_k`` detections and their IoU-matched partners in ``raw_other``.

    Each item: ``{"ref_index", "other_index", "query_ref", "query_other", "box_iou", "ref", "other", "diff",
    "max_abs", "mean_abs"}`` with the logits at the model's mask resolution ([h, w]); unmatched reference
    detections are skipped.
    """
    a = postprocess(raw_ref, image_size, threshold=threshold, num_select=num_select)
    b = postprocess(raw_other, image_size, threshold=threshold, num_select=num_select)
    if raw_ref.masks is None or raw_other.masks is None:
        return []
    res = match_detections(a, b, iou_thr=iou_thr)
    items = []
    for m in sorted(res.matches, key=lambda m: m.a_idx)[:top_k]:
        qa, qb = int(a.query_index[m.a_idx]), int(b.query_index[m.b_idx])
        ref, other = raw_ref.masks[qa], raw_other.masks[qb]
        if ref.shape != other.shape:
            continue
        diff = np.abs(ref.astype(np.float64) - other.astype(np.float64))
        items.append({"ref_index": m.a_idx, "other_index": m.b_idx, "query_ref": qa, "query_other": qb,
                      "box_iou": m.box_iou, "ref": ref, "other": other, "diff": diff,
                      "max_abs": float(diff.max()), "mean_abs": float(diff.mean())})
    return items


def plot_mask_logit_diffs(items: Sequence[Mapping[str, Any]], names: tuple[str, str] = ("torch", "backend")):
    """Rows of (reference logits, other logits, |difference| heatmap) for ``mask_logit_diffs`` items."""
    import matplotlib.pyplot as plt

    n = max(1, len(items))
    fig, axes = plt.subplots(n, 3, figsize=(10, 3.0 * n), squeeze=False)
    if not items:
        axes[0, 0].text(0.5, 0.5, "no matched detections", ha="center", va="center")
        for ax in axes.ravel():
            ax.axis("off")
        return fig
    for row, it in zip(axes, items):
        lim = float(max(np.abs(it["ref"]).max(), np.abs(it["other"]).max()))
        for ax, key, title in ((row[0], "ref", names[0]), (row[1], "other", names[1])):
            im = ax.imshow(it[key], cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"{title} mask logits (query {it['query_' + ('ref' if key == 'ref' else 'other')]})",
                         fontsize=8)
            ax.axis("off")
        im = row[2].imshow(it["diff"], cmap="magma")
        row[2].set_title(f"|diff| max {it['max_abs']:.2e} (box IoU {it['box_iou']:.3f})", fontsize=8)
        row[2].axis("off")
        fig.colorbar(im, ax=row[2], fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def detections_table(pred: Prediction, max_rows: int = 12) -> list[dict[str, Any]]:
    """Rows for a small table: rank, class, score, box, mask area, query."""
    rows = []
    for i in range(min(len(pred), max_rows)):
        rows.append({"#": i, "class": str(pred.class_name[i] or pred.class_id[i]),
                     "score": round(float(pred.confidence[i]), 4),
                     "box (x0,y0,x1,y1)": ", ".join(f"{v:.0f}" for v in pred.xyxy[i]),
                     "mask px": pred.mask_area(i),
                     "query": int(pred.query_index[i])})
    return rows


def table_html(rows: Sequence[Mapping[str, Any]], total: Optional[int] = None) -> str:
    import html

    if not rows:
        return "<p><i>no detections above the threshold</i></p>"
    cols = list(rows[0])
    head = "".join(f"<th style='padding:2px 6px'>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td style='padding:2px 6px'>{html.escape(str(r[c]))}</td>" for c in cols)
                   + "</tr>" for r in rows)
    more = f"<p>… {total - len(rows)} more</p>" if total is not None and total > len(rows) else ""
    return f"<table style='font-size:11px'><tr>{head}</tr>{body}</table>{more}"


def _png_bytes(rgb: np.ndarray, max_side: int = 720) -> bytes:
    import io

    from PIL import Image

    im = Image.fromarray(rgb)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class ThresholdExplorer:
    """Drag a score threshold and watch which detections survive (ipywidgets).

    ``runners``: ``{name: Runner}`` (or a list of runners, keyed by ``runner.name``); ``images``: paths or
    ``{name: image}``. Raw outputs are cached per (backend, image), so moving a slider only re-runs the numpy
    post-processing. Headless use (papermill, tests): ``ex.score.value = 0.03; ex.count`` — every control change
    redraws synchronously; ``ex.sweep([...])`` returns the counts for several thresholds; ``ex.forward_calls``
    counts model runs (cache misses).
    """

    def __init__(self, runners: Mapping[str, Any] | Sequence[Any], images: Mapping[str, ImageLike] | Sequence[Any],
                 *, score_threshold: float = 0.5, mask_threshold: float = 0.0, num_select: Optional[int] = None,
                 upload: bool = True, max_rows: int = 10, score_max: float = 1.0, score_step: float = 0.001,
                 cache: Optional[Mapping[tuple[str, str], tuple[RawOutputs, tuple[int, int]]]] = None,
                 image: Optional[str] = None) -> None:
        import ipywidgets as w

        self.runners = dict(runners) if isinstance(runners, Mapping) else {r.name: r for r in runners}
        if not self.runners:
            raise ValueError("ThresholdExplorer needs at least one runner")
        if isinstance(images, Mapping):
            self.images: dict[str, Any] = dict(images)
        else:
            self.images = {Path(p).name if isinstance(p, (str, Path)) else f"image {i}": p
                           for i, p in enumerate(images)}
        if not self.images:
            raise ValueError("ThresholdExplorer needs at least one image")
        self.num_select = num_select
        self.max_rows = max_rows
        # raw outputs already computed elsewhere (e.g. by runtime.run_all) can seed the cache
        self._cache: dict[tuple[str, str], tuple[RawOutputs, tuple[int, int]]] = dict(cache or {})
        self._rgb: dict[str, np.ndarray] = {}
        self._full: dict[tuple[str, str, float], Prediction] = {}
        self.forward_calls = 0
        self.prediction: Optional[Prediction] = None
        self.history: list[tuple[str, str, float, float, int]] = []
        self.score = w.FloatSlider(value=float(score_threshold), min=0.0, max=float(score_max), step=score_step,
                                   readout_format=".3f", description="score >", continuous_update=True)
        self.mask = w.FloatSlider(value=float(mask_threshold), min=-10.0, max=10.0, step=0.1, readout_format=".1f",
                                  description="mask logit >", continuous_update=True)
        self.backend = w.Dropdown(options=list(self.runners), description="backend")
        self.image = w.Dropdown(options=list(self.images), value=image or next(iter(self.images)),
                                description="image")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload") if upload else None
        self.view = w.Image(format="png")
        self.table = w.HTML()
        self.status = w.HTML()
        for c in (self.score, self.mask, self.backend, self.image):
            c.observe(self._on_change, names="value")
        if self.upload is not None:
            self.upload.observe(self._on_upload, names="value")
        controls = [self.score, self.mask, self.backend, self.image] + ([self.upload] if self.upload else [])
        self.widget = w.VBox([w.HBox(controls[:2]), w.HBox(controls[2:]), self.status,
                              w.HBox([self.view, self.table])])
        self.refresh()

    # -- data ------------------------------------------------------------------------------------------------------
    def rgb(self, image: Optional[str] = None) -> np.ndarray:
        name = image or self.image.value
        if name not in self._rgb:
            self._rgb[name] = np.asarray(load_image(self.images[name]))
        return self._rgb[name]

    def raw(self, backend: Optional[str] = None, image: Optional[str] = None) -> tuple[RawOutputs, tuple[int, int]]:
        """Raw outputs for (backend, image), computed once and cached."""
        key = (backend or self.backend.value, image or self.image.value)
        if key not in self._cache:
            runner = self.runners[key[0]]
            self._cache[key] = runner.predict_raw(self.rgb(key[1]))
            self.forward_calls += 1
        return self._cache[key]

    def predict(self, backend: Optional[str] = None, image: Optional[str] = None,
                score: Optional[float] = None, mask: Optional[float] = None) -> Prediction:
        """``postprocess`` of the cached raw outputs at these thresholds (default: the sliders' values).

        The top-k detections come sorted by score, so those above a score threshold are a prefix of the full
        top-k list: the full list (masks upsampled once) is kept per (backend, image, mask threshold) and a score
        slider move only slices it — the same result as ``postprocess(raw, size, threshold=score, ...)``.
        """
        b = backend or self.backend.value
        img = image or self.image.value
        m = float(self.mask.value if mask is None else mask)
        t = float(self.score.value if score is None else score)
        key = (b, img, m)
        full = self._full.pop(key, None)
        if full is None:
            raw, size = self.raw(b, img)
            runner = self.runners[b]
            full = postprocess(raw, size, threshold=-1.0, num_select=self.num_select or getattr(runner, "num_select",
                                                                                               200),
                               mask_threshold=m, class_names=getattr(runner, "class_names", None))
        self._full[key] = full  # most recently used last
        while len(self._full) > 4:  # full-resolution masks are large: keep a few
            self._full.pop(next(iter(self._full)))
        n = int((full.confidence > t).sum())
        return Prediction(xyxy=full.xyxy[:n], confidence=full.confidence[:n], class_id=full.class_id[:n],
                          query_index=full.query_index[:n], mask=None if full.mask is None else full.mask[:n],
                          class_name=full.class_name[:n])

    # -- display ---------------------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Detections shown now (after the last control change)."""
        return 0 if self.prediction is None else len(self.prediction)

    def refresh(self) -> None:
        import time

        t0 = time.perf_counter()
        misses = self.forward_calls
        pred = self.predict()
        post_ms = (time.perf_counter() - t0) * 1000
        self.prediction = pred
        self.view.value = _png_bytes(overlay(self.rgb(), pred))
        self.table.value = table_html(detections_table(pred, self.max_rows), total=len(pred))
        cached = "cached raw outputs" if misses == self.forward_calls else "ran the model"
        self.status.value = (f"<b>{len(pred)}</b> detections with score &gt; {self.score.value:.3f} "
                             f"({self.backend.value}, {self.image.value}; {cached}, {post_ms:.0f} ms)")
        self.history.append((self.backend.value, self.image.value, float(self.score.value), float(self.mask.value),
                             len(pred)))

    def _on_change(self, change: Any) -> None:
        self.refresh()

    def _on_upload(self, change: Any) -> None:
        import io

        from PIL import Image

        value = change["new"]
        files = list(value.values()) if isinstance(value, dict) else list(value)
        if not files:
            return
        f = files[-1]
        name = f.get("name", "upload") if isinstance(f, dict) else "upload"
        content = f["content"] if isinstance(f, dict) else f.content
        self.add_image(f"upload: {name}", Image.open(io.BytesIO(bytes(content))))

    def add_image(self, name: str, image: ImageLike, select: bool = True) -> None:
        """Add an image (e.g. an upload) to the dropdown and show it."""
        self.images[name] = image
        self._rgb.pop(name, None)
        for key in [k for k in self._cache if k[1] == name]:
            del self._cache[key]
        for key in [k for k in self._full if k[1] == name]:
            del self._full[key]
        self.image.options = list(self.images)
        if select:
            self.image.value = name

    def sweep(self, thresholds: Sequence[float]) -> list[int]:
        """Set the score slider to each threshold in turn; return the detection counts (drives the real widget)."""
        counts = []
        for t in thresholds:
            self.score.value = float(t)
            counts.append(self.count)
        return counts

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
