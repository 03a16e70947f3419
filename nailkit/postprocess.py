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

Class ids index ``class_names``; the extra logit slot (id == num_classes) is rfdetr's no-object slot, named
``"__background__"`` like rfdetr does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

try:  # inside nailkit
    from nailkit.preprocess import bilinear_resize
except ImportError:  # in the standalone bundle, next to preprocess.py
    from preprocess import bilinear_resize  # type: ignore[no-redef]

BACKGROUND_NAME = "__background__"


@dataclass
class RawOutputs:
    """One image's raw model outputs in nailkit's canonical layout (batch dimension removed).

    boxes: [Q, 4] normalised cxcywh; logits: [Q, C] raw class logits; masks: [Q, h, w] mask logits or None.
    """

    boxes: np.ndarray
    logits: np.ndarray
    masks: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        self.logits = np.asarray(self.logits, dtype=np.float32)
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=np.float32)
        q = self.logits.shape[0]
        if self.boxes.ndim != 2 or self.boxes.shape != (q, 4) or self.logits.ndim != 2:
            raise ValueError(f"expected boxes [Q,4] and logits [Q,C]; got {self.boxes.shape} and {self.logits.shape}")
        if self.masks is not None and (self.masks.ndim != 3 or self.masks.shape[0] != q):
            raise ValueError(f"expected masks [Q,h,w] with Q={q}; got {self.masks.shape}")


@dataclass
class Prediction:
    """Post-processed detections of one image, as plain numpy arrays (``to_detections`` gives supervision's)."""

    xyxy: np.ndarray  # [N, 4] float32 pixels in the original image
    confidence: np.ndarray  # [N] float32
    class_id: np.ndarray  # [N] int64
    query_index: np.ndarray  # [N] int64, which query each detection came from
    mask: Optional[np.ndarray]  # [N, H, W] bool at the original image size
    class_name: np.ndarray  # [N] object

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def to_detections(self):
        """As ``supervision.Detections`` (xyxy, confidence, class_id, mask, data['class_name'])."""
        import supervision as sv

        det = sv.Detections(xyxy=self.xyxy.astype(np.float32), confidence=self.confidence.astype(np.float32),
                            class_id=self.class_id.astype(int), mask=self.mask)
        det.data["class_name"] = self.class_name
        det.data["query_index"] = self.query_index
        return det

    def to_json(self) -> list[dict[str, Any]]:
        return [{"class_id": int(c), "class_name": str(n), "confidence": float(s),
                 "xyxy": [round(float(v), 2) for v in b], "query_index": int(q),
                 "mask_area": int(m.sum()) if m is not None else None}
                for b, s, c, n, q, m in zip(self.xyxy, self.confidence, self.class_id, self.class_name,
                                            self.query_index,
                                            self.mask if self.mask is not None else [None] * len(self))]


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


def postprocess(raw: RawOutputs, image_size: tuple[int, int], *, threshold: float = 0.5,
                num_select: int = 200, mask_threshold: float = 0.0,
                class_names: Optional[Sequence[str]] = None) -> Prediction:
    """rfdetr ``predict()`` post-processing for one image. ``image_size`` is the original (width, height)."""
    width, height = int(image_size[0]), int(image_size[1])
    num_classes_plus_bg = raw.logits.shape[1]
    scores, labels, queries = select_topk(raw.logits, num_select)
    scale = np.array([width, height, width, height], dtype=np.float32)
    boxes = cxcywh_to_xyxy(raw.boxes)[queries] * scale
    boxes = np.minimum(np.maximum(boxes, 0.0), scale).astype(np.float32)
    keep = scores > threshold
    scores, labels, queries, boxes = scores[keep], labels[keep], queries[keep], boxes[keep]
    masks = None
    if raw.masks is not None:
        if len(queries):
            masks = bilinear_resize(raw.masks[queries], height, width) > mask_threshold
        else:
            masks = np.zeros((0, height, width), dtype=bool)
    names = list(class_names) if class_names is not None else []
    bg_id = num_classes_plus_bg - 1 if names and len(names) == num_classes_plus_bg - 1 else None
    class_name = np.array([BACKGROUND_NAME if (bg_id is not None and c == bg_id) else
                           (names[c] if c < len(names) else "") for c in labels], dtype=object)
    return Prediction(xyxy=boxes, confidence=scores.astype(np.float32), class_id=labels, query_index=queries,
                      mask=masks, class_name=class_name)
