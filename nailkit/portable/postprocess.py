"""Reference post-processing, numpy only (this file ships in the mobile bundle as is).

A line-by-line numpy re-implementation of rfdetr 1.11.2 ``RFDETR.predict()`` post-processing
(``rfdetr.models.postprocess.PostProcess`` + the threshold filter in ``predict``):

1. scores = sigmoid(logits) for every (query, class) pair — independent sigmoids, *not* softmax, *not* argmax;
2. take the top ``num_select`` pairs over the flattened Q×C grid (descending score, ties by ascending flat index);
   query = index // C, class = index % C;
3. boxes: normalised cxcywh → xyxy, times (W, H, W, H) of the *original* image, clamped to the image;
4. keep the pairs with score > ``threshold`` (strictly greater);
5. masks: the selected queries' mask logits (at 1/4 of the input resolution) are resized bilinearly
   (half-pixel centres, no antialias) to the original image size, *then* thresholded: logit > ``mask_threshold``.

Options beyond predict() (defaults reproduce it exactly):

* ``mask_upsample="guided"``: after the bilinear resize of the logits, an edge-aware refinement — He et al.'s guided
  filter (box filters via cumulative sums, numpy only) of the mask probability with the image's grey levels as the
  guide — then thresholded at the probability of ``mask_threshold``. Needs ``image=``.
* ``mask_format="crop"``: each detection's mask as a ``MaskCrop`` (its tight bounding window, bool, at an offset)
  instead of one [N, H, W] array, computed when read (``LazyCrops``: read them one at a time to hold one). Either way a mask is upsampled only where its low-resolution logits can exceed
  ``mask_threshold`` (bit-identical to resizing the whole image), a band of rows at a time, so memory follows the
  masks' extent, not the photo's size times the detection count. ``Prediction.crop(i)`` / ``full_mask(i)`` read
  either form.
* masks for selected queries only (``RawOutputs.mask_queries``): the GPU target's Graph C computes masks just for the
  rows the host picked (``select_mask_queries``); ``select_proposals`` is the host top-k between Graph A and B.

Class ids index ``class_names``; the extra logit slot (id == num_classes) is rfdetr's no-object slot, named
``"__background__"`` like rfdetr does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

try:  # inside nailkit
    from nailkit.portable.preprocess import _fma32, _linear_taps, bilinear_resize
except ImportError:  # in the standalone bundle, next to preprocess.py
    from preprocess import _fma32, _linear_taps, bilinear_resize  # type: ignore[no-redef]

BACKGROUND_NAME = "__background__"


@dataclass
class RawOutputs:
    """One image's raw model outputs in nailkit's canonical layout (batch dimension removed).

    boxes: [Q, 4] normalised cxcywh; logits: [Q, C] raw class logits; masks: [Q, h, w] mask logits or None.
    With ``mask_queries`` ([K] query indices), ``masks`` is [K, h, w]: row i belongs to query ``mask_queries[i]``
    (the GPU target computes masks for the selected queries only).
    """

    boxes: np.ndarray
    logits: np.ndarray
    masks: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)
    mask_queries: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        self.logits = np.asarray(self.logits, dtype=np.float32)
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=np.float32)
        q = self.logits.shape[0]
        if self.boxes.ndim != 2 or self.boxes.shape != (q, 4) or self.logits.ndim != 2:
            raise ValueError(f"expected boxes [Q,4] and logits [Q,C]; got {self.boxes.shape} and {self.logits.shape}")
        if self.mask_queries is not None:
            self.mask_queries = np.asarray(self.mask_queries, dtype=np.int64).reshape(-1)
            if self.masks is None or self.masks.ndim != 3 or self.masks.shape[0] < len(self.mask_queries):
                raise ValueError(f"mask_queries needs masks [K,h,w] with K >= {len(self.mask_queries)}; "
                                 f"got {None if self.masks is None else self.masks.shape}")
        elif self.masks is not None and (self.masks.ndim != 3 or self.masks.shape[0] != q):
            raise ValueError(f"expected masks [Q,h,w] with Q={q}; got {self.masks.shape}")


@dataclass
class MaskCrop:
    """One detection's mask cut to its tight bounding window: ``mask`` bool [h, w] at pixel (x0, y0) of the image
    (h = w = 0 for an empty mask)."""

    x0: int
    y0: int
    mask: np.ndarray

    def area(self) -> int:
        return int(self.mask.sum())

    def window(self) -> tuple[slice, slice]:
        """(rows, cols) of the image that ``mask`` covers."""
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)

    def paste(self, out: np.ndarray) -> np.ndarray:
        """Write the mask into ``out`` [H, W] bool (outside the window untouched); returns ``out``."""
        rows, cols = self.window()
        out[rows, cols] = self.mask
        return out

    @staticmethod
    def of(full: np.ndarray) -> "MaskCrop":
        """The crop of a full-size [H, W] bool mask."""
        full = np.asarray(full, dtype=bool)
        ys, xs = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
        if not len(ys):
            return MaskCrop(0, 0, np.zeros((0, 0), bool))
        return MaskCrop(int(xs[0]), int(ys[0]), full[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1].copy())


@dataclass
class Prediction:
    """Post-processed detections of one image, as plain numpy arrays (``to_detections`` gives supervision's).

    Masks come in one of two forms: ``mask`` [N, H, W] bool at the original image size (rfdetr's), or ``mask_crops``
    (one ``MaskCrop`` per detection, ``mask`` None: memory follows the masks' extent). ``crop(i)``, ``full_mask(i)``
    and ``mask_area(i)`` read either.
    """

    xyxy: np.ndarray  # [N, 4] float32 pixels in the original image
    confidence: np.ndarray  # [N] float32
    class_id: np.ndarray  # [N] int64
    query_index: np.ndarray  # [N] int64, which query each detection came from
    mask: Optional[np.ndarray]  # [N, H, W] bool at the original image size
    class_name: np.ndarray  # [N] object
    mask_crops: Optional[Any] = None  # [N] MaskCrop: a list, or LazyCrops (postprocess(mask_format="crop"))
    image_size: Optional[tuple] = None  # (width, height) of the original image
    #: detections above the threshold left out because the model's mask slots were full (the GPU target computes
    #: masks for at most ``mask_slots`` queries): the kept ones are always the best, a prefix of the full list
    dropped: int = 0

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    @property
    def has_masks(self) -> bool:
        return self.mask is not None or self.mask_crops is not None

    def crop(self, i: int) -> Optional[MaskCrop]:
        """Detection ``i``'s mask as a ``MaskCrop`` (None without masks)."""
        if self.mask_crops is not None:
            return self.mask_crops[i]
        return None if self.mask is None else MaskCrop.of(self.mask[i])

    def _hw(self) -> tuple[int, int]:
        if self.mask is not None:
            return int(self.mask.shape[1]), int(self.mask.shape[2])
        if self.image_size is None:
            raise ValueError("cropped masks without image_size cannot be drawn at full size")
        return int(self.image_size[1]), int(self.image_size[0])

    def full_mask(self, i: int) -> Optional[np.ndarray]:
        """Detection ``i``'s mask [H, W] bool at the original image size (None without masks)."""
        if self.mask is not None:
            return self.mask[i]
        if self.mask_crops is None:
            return None
        return self.mask_crops[i].paste(np.zeros(self._hw(), dtype=bool))

    def full_masks(self) -> Optional[np.ndarray]:
        """All masks [N, H, W] bool (N·H·W bytes: prefer ``crop``/``full_mask`` per detection for large photos)."""
        if self.mask is not None or self.mask_crops is None:
            return self.mask
        out = np.zeros((len(self),) + self._hw(), dtype=bool)
        for i, c in enumerate(self.mask_crops):
            c.paste(out[i])
        return out

    def mask_area(self, i: int) -> Optional[int]:
        if self.mask_crops is not None:
            return self.mask_crops.area(i) if hasattr(self.mask_crops, "area") else self.mask_crops[i].area()
        return None if self.mask is None else int(self.mask[i].sum())

    def subset(self, idx: Any) -> "Prediction":
        """The detections at ``idx`` (indices or a boolean array), masks in the same form."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Prediction(xyxy=self.xyxy[idx], confidence=self.confidence[idx], class_id=self.class_id[idx],
                          query_index=self.query_index[idx], mask=None if self.mask is None else self.mask[idx],
                          class_name=self.class_name[idx],
                          mask_crops=None if self.mask_crops is None else (
                              self.mask_crops.subset(idx) if hasattr(self.mask_crops, "subset")
                              else [self.mask_crops[int(i)] for i in idx]),
                          image_size=self.image_size, dropped=self.dropped)

    def to_detections(self):
        """As ``supervision.Detections`` (xyxy, confidence, class_id, mask, data['class_name']); cropped masks are
        pasted to full size."""
        import supervision as sv

        det = sv.Detections(xyxy=self.xyxy.astype(np.float32), confidence=self.confidence.astype(np.float32),
                            class_id=self.class_id.astype(int), mask=self.full_masks())
        det.data["class_name"] = self.class_name
        det.data["query_index"] = self.query_index
        return det

    def to_json(self) -> list[dict[str, Any]]:
        return [{"class_id": int(c), "class_name": str(n), "confidence": float(s),
                 "xyxy": [round(float(v), 2) for v in b], "query_index": int(q),
                 "mask_area": self.mask_area(i)}
                for i, (b, s, c, n, q) in enumerate(zip(self.xyxy, self.confidence, self.class_id, self.class_name,
                                                        self.query_index))]


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (1.0 / (1.0 + np.exp(-np.clip(x, -88.0, 88.0)))).astype(np.float32)


def select_topk(logits: np.ndarray, num_select: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``num_select`` (query, class) pairs: (scores, class ids, query indices), as ``PostProcess._select_topk``."""
    prob = sigmoid(logits)
    q, c = prob.shape
    flat = prob.reshape(-1)
    k = min(int(num_select), flat.size)
    order = np.argsort(-flat, kind="stable")[:k]  # descending, ties by ascending index (torch stable argsort)
    return flat[order], (order % c).astype(np.int64), (order // c).astype(np.int64)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.asarray(boxes, dtype=np.float32).T
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


MASK_UPSAMPLE = ("bilinear", "guided")
MASK_FORMATS = ("full", "crop")


def upsample_mask_crop(logits: np.ndarray, taps_y: tuple, taps_x: tuple, mask_threshold: float) -> MaskCrop:
    """One mask's logits [h, w] → bilinear upsample (taps of the full image size) > ``mask_threshold``, as a
    ``MaskCrop``: bit-identical to thresholding ``bilinear_resize`` of the whole image, at a fraction of the cost.

    An upsampled pixel is a convex combination of its (up to) four source logits (up to float32 rounding, far below
    ``tol``), all inside the 2×2 block of source cells that starts at its first tap. So where a block's minimum is
    above the threshold (+tol) its pixels are true, where its maximum is below (−tol) they are false, and only the
    pixels of the blocks in between (the mask's edge) are computed, with ``bilinear_resize``'s exact per-pixel
    arithmetic. Memory: the mask's bounding window, as bool.
    """
    lg = np.asarray(logits, dtype=np.float32)
    empty = MaskCrop(0, 0, np.zeros((0, 0), bool))
    t = float(mask_threshold)
    tol = 1e-5 * (1.0 + abs(t) + float(np.abs(lg).max(initial=0.0)))
    h, w = lg.shape
    down = np.minimum(np.arange(h) + 1, h - 1)
    right = np.minimum(np.arange(w) + 1, w - 1)
    hi, lo = np.maximum(lg, lg[down]), np.minimum(lg, lg[down])
    hi, lo = np.maximum(hi, hi[:, right]), np.minimum(lo, lo[:, right])
    sure = lo > t + tol  # blocks whose pixels are all true
    maybe = hi > t - tol  # blocks where a pixel can be true
    if not maybe.any():
        return empty
    y0, y1, wy0, wy1 = taps_y
    x0, x1, wx0, wx1 = taps_x
    rows_any, cols_any = maybe.any(1), maybe.any(0)
    ys, xs = np.flatnonzero(rows_any[y0]), np.flatnonzero(cols_any[x0])
    if not len(ys) or not len(xs):
        return empty
    ra, rb, ca, cb = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    win = np.zeros((rb - ra, cb - ca), dtype=bool)
    cx0, cx1, cwx0, cwx1 = x0[ca:cb], x1[ca:cb], wx0[ca:cb], wx1[ca:cb]
    yy = y0[ra:rb]
    starts = np.flatnonzero(np.r_[True, yy[1:] != yy[:-1]])
    f32 = np.float32
    for s_, e_ in zip(starts, np.r_[starts[1:], len(yy)]):
        i = int(yy[s_])  # output rows ra+s_ .. ra+e_ share their taps' rows (i, y1)
        if not rows_any[i]:
            continue
        band = win[s_:e_]
        band[:, sure[i][cx0]] = True
        unc = np.flatnonzero(maybe[i][cx0] & ~sure[i][cx0])
        if len(unc):
            j = int(y1[ra + s_])
            a0, a1, b0, b1 = cx0[unc], cx1[unc], cwx0[unc], cwx1[unc]
            top = _fma32(lg[i, a0], b0, (lg[i, a1] * b1).astype(f32))
            bot = _fma32(lg[j, a0], b0, (lg[j, a1] * b1).astype(f32))
            r0, r1 = wy0[ra + s_:ra + e_, None], wy1[ra + s_:ra + e_, None]
            band[:, unc] = _fma32(top[None, :], r0, (bot[None, :] * r1).astype(f32)) > mask_threshold
    ys, xs = np.flatnonzero(win.any(1)), np.flatnonzero(win.any(0))
    if not len(ys):
        return empty
    return MaskCrop(ca + int(xs[0]), ra + int(ys[0]), win[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1].copy())


class LazyCrops:
    """The cropped masks of one image's detections, computed on access from the low-resolution logits and not
    kept (so reading them one at a time holds one mask); areas are remembered once computed."""

    def __init__(self, logits: np.ndarray, taps_y: tuple, taps_x: tuple, mask_threshold: float) -> None:
        self.logits = np.asarray(logits, dtype=np.float32)  # [N, h, w]: model resolution
        self.taps_y, self.taps_x, self.mask_threshold = taps_y, taps_x, mask_threshold
        self._areas: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def __getitem__(self, i: int) -> MaskCrop:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        c = upsample_mask_crop(self.logits[i], self.taps_y, self.taps_x, self.mask_threshold)
        self._areas[i % len(self)] = c.area()
        return c

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def area(self, i: int) -> int:
        i = int(i) % len(self)
        return self._areas[i] if i in self._areas else self[i].area()

    def subset(self, idx: np.ndarray) -> "LazyCrops":
        return LazyCrops(self.logits[np.asarray(idx, dtype=np.int64)], self.taps_y, self.taps_x, self.mask_threshold)


def postprocess(raw: RawOutputs, image_size: tuple[int, int], *, threshold: float = 0.5,
                num_select: int = 200, mask_threshold: float = 0.0,
                class_names: Optional[Sequence[str]] = None, mask_upsample: str = "bilinear",
                image: Optional[np.ndarray] = None, guided_radius: Optional[int] = None,
                guided_eps: float = 1e-3, mask_format: str = "full") -> Prediction:
    """rfdetr ``predict()`` post-processing for one image. ``image_size`` is the original (width, height).

    ``mask_upsample``: "bilinear" (rfdetr's rule: logits resized bilinearly to the image, then thresholded) or
    "guided" (that, then a guided-filter refinement along the edges of ``image``, [H,W,3] uint8/float RGB; this one
    works on full-size float masks).
    ``mask_format``: "full" (``Prediction.mask`` [N, H, W] bool, as rfdetr) or "crop" (``Prediction.mask_crops``,
    one ``MaskCrop`` per detection: memory follows the masks, not the photo).
    """
    if mask_upsample not in MASK_UPSAMPLE:
        raise ValueError(f"mask_upsample must be one of {MASK_UPSAMPLE}, not {mask_upsample!r}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, not {mask_format!r}")
    width, height = int(image_size[0]), int(image_size[1])
    num_classes_plus_bg = raw.logits.shape[1]
    scores, labels, queries = select_topk(raw.logits, num_select)
    scale = np.array([width, height, width, height], dtype=np.float32)
    boxes = cxcywh_to_xyxy(raw.boxes)[queries] * scale
    boxes = np.minimum(np.maximum(boxes, 0.0), scale).astype(np.float32)
    keep = scores > threshold
    scores, labels, queries, boxes = scores[keep], labels[keep], queries[keep], boxes[keep]
    masks = None
    crops = None
    dropped = 0
    if raw.masks is not None:
        if len(queries):
            if raw.mask_queries is not None:
                row = {int(qi): i for i, qi in enumerate(raw.mask_queries)}
                n_keep = mask_slot_prefix(queries, row, slots=int(raw.masks.shape[0]))
                dropped = len(queries) - n_keep
                scores, labels, queries, boxes = (scores[:n_keep], labels[:n_keep], queries[:n_keep],
                                                  boxes[:n_keep])
                logits_sel = raw.masks[[row[int(qi)] for qi in queries]]
            else:
                logits_sel = raw.masks[queries]
            if mask_upsample == "guided":
                if image is None:
                    raise ValueError("mask_upsample='guided' needs image= (the original RGB image)")
                up = bilinear_resize(logits_sel, height, width)
                masks = guided_refine(up, image, mask_threshold=mask_threshold, radius=guided_radius,
                                      eps=guided_eps)
                del up
                if mask_format == "crop":
                    crops, masks = [MaskCrop.of(m) for m in masks], None
            else:
                src_h, src_w = logits_sel.shape[-2:]
                ty, tx = _linear_taps(src_h, height), _linear_taps(src_w, width)
                if mask_format == "crop":
                    crops = LazyCrops(logits_sel, ty, tx, mask_threshold)
                else:
                    masks = np.zeros((len(queries), height, width), dtype=bool)
                    for i, m in enumerate(logits_sel):
                        upsample_mask_crop(m, ty, tx, mask_threshold).paste(masks[i])
        elif mask_format == "crop":
            crops = []
        else:
            masks = np.zeros((0, height, width), dtype=bool)
    names = list(class_names) if class_names is not None else []
    bg_id = num_classes_plus_bg - 1 if names and len(names) == num_classes_plus_bg - 1 else None
    class_name = np.array([BACKGROUND_NAME if (bg_id is not None and c == bg_id) else
                           (names[c] if c < len(names) else "") for c in labels], dtype=object)
    return Prediction(xyxy=boxes, confidence=scores.astype(np.float32), class_id=labels, query_index=queries,
                      mask=masks, class_name=class_name, mask_crops=crops, image_size=(width, height),
                      dropped=dropped)


def mask_slot_prefix(queries: np.ndarray, row: dict, *, slots: int) -> int:
    """How many of the detections (their ``queries``, best first) have a mask row in ``row`` (query → row).

    A model that computes masks for at most ``slots`` queries (the GPU target's graph C) fills them with the best
    queries first, so when every slot is used the detections without a row are the tail: keep the prefix up to the
    first one without a row (the caller counts the rest as ``Prediction.dropped``). A detection without a row while
    a slot is still free means the mask queries were chosen for another threshold: ValueError."""
    for i, qi in enumerate(queries):
        if int(qi) not in row:
            if len(row) < int(slots):
                raise ValueError(f"no mask row for query {int(qi)} although only {len(row)} of {slots} mask slots "
                                 f"were used: the mask queries were selected at a higher threshold than this "
                                 f"post-processing's (run the chain and postprocess with the same threshold)")
            return i
    return len(queries)


# ----------------------------------------------------------------------------------------------------------------
# edge-aware mask refinement (numpy only)
# ----------------------------------------------------------------------------------------------------------------

def _box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)² window, clipped at the borders, over the last two axes (cumulative sums)."""
    h, w = x.shape[-2:]
    c = np.cumsum(np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]), axis=-2), axis=-1)
    y0 = np.clip(np.arange(h) - r, 0, h)
    y1 = np.clip(np.arange(h) + r + 1, 0, h)
    x0 = np.clip(np.arange(w) - r, 0, w)
    x1 = np.clip(np.arange(w) + r + 1, 0, w)
    s = (c[..., y1[:, None], x1[None, :]] - c[..., y0[:, None], x1[None, :]]
         - c[..., y1[:, None], x0[None, :]] + c[..., y0[:, None], x0[None, :]])
    n = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return s / n


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He, Sun & Tang's guided filter (grey guide [H,W] in 0–1, src [..., H, W]): edge-preserving smoothing of
    ``src`` that follows the edges of ``guide``."""
    g = np.asarray(guide, dtype=np.float64)
    p = np.asarray(src, dtype=np.float64)
    mg = _box_mean(g, radius)
    mp = _box_mean(p, radius)
    cov = _box_mean(g * p, radius) - mg * mp
    var = _box_mean(g * g, radius) - mg * mg
    a = cov / (var + eps)
    b = mp - a * mg
    return (_box_mean(a, radius) * g + _box_mean(b, radius)).astype(np.float32)


def guided_refine(up_logits: np.ndarray, image: np.ndarray, *, mask_threshold: float = 0.0,
                  radius: Optional[int] = None, eps: float = 1e-3) -> np.ndarray:
    """Refine full-size mask logits [N,H,W] along the image's edges; returns bool masks [N,H,W].

    The probability sigmoid(logit) is guided-filtered with the grey image as guide (radius default: 1/4-resolution
    cell size ≈ max(H,W)/108, at least 2) and thresholded at sigmoid(mask_threshold), so the decision rule is the
    default's where the image has no edge.
    """
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = img.astype(np.float32)
    if grey.max(initial=0) > 1.5:
        grey = grey / 255.0
    if grey.shape != up_logits.shape[-2:]:
        raise ValueError(f"guide image {grey.shape} and masks {up_logits.shape[-2:]} differ in size")
    r = int(radius) if radius else max(2, int(round(max(grey.shape) / 108)))
    prob = sigmoid(up_logits)
    ref = guided_filter(grey, prob, r, eps)
    return ref > float(sigmoid(np.float32(mask_threshold)))


# ----------------------------------------------------------------------------------------------------------------
# the GPU target's host steps (between Graph A → B and B → C), numpy only
# ----------------------------------------------------------------------------------------------------------------

def select_proposals(enc_logits: np.ndarray, enc_boxes: np.ndarray, num_queries: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """rfdetr's two-stage query selection: score = max over class logits per token; the top ``num_queries``
    tokens (descending score; ties by ascending index) and their proposal boxes.

    enc_logits [HW, C], enc_boxes [HW, 4] (Graph A, batch removed) → (ref_boxes [Q, 4] float32, indices [Q] int64).
    """
    scores = np.asarray(enc_logits, dtype=np.float32).max(-1)
    k = min(int(num_queries), scores.shape[0])
    idx = np.argsort(-scores, kind="stable")[:k].astype(np.int64)
    return np.ascontiguousarray(np.asarray(enc_boxes, dtype=np.float32)[idx]), idx


def select_mask_queries(logits: np.ndarray, query_features: np.ndarray, *, num_select: int = 200,
                        threshold: float = 0.5, slots: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Which queries need a mask: those that survive predict()'s selection (top ``num_select`` (query, class) pairs
    by sigmoid score, score > ``threshold``), each once, best first, at most ``slots``.

    Returns (rows [slots, D] float32: their query features, zero-padded — Graph C's input; query indices [K]).
    """
    scores, _, queries = select_topk(logits, num_select)
    seen: list[int] = []
    for s_, q_ in zip(scores, queries):
        if s_ <= threshold:
            break
        if int(q_) not in seen:
            seen.append(int(q_))
        if len(seen) == slots:
            break
    qf = np.asarray(query_features, dtype=np.float32)
    rows = np.zeros((int(slots), qf.shape[-1]), dtype=np.float32)
    if seen:
        rows[:len(seen)] = qf[seen]
    return rows, np.asarray(seen, dtype=np.int64)
