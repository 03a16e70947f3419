"""Between binary masks and COCO segmentations: a mask's polygons (writing) and an image's ground-truth masks from
its polygons or RLE (reading)."""

from __future__ import annotations

from typing import Any

import numpy as np

from nailkit.data.coco_export import CocoSplit


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (outer contours) of a binary mask."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= 3 and cv2.contourArea(c) >= 1:
            polys.append([float(v) for v in c.reshape(-1)])
    return polys


def instance_masks(split: CocoSplit, image: dict[str, Any]) -> np.ndarray:
    """[N, H, W] bool ground-truth masks of one image (polygons or RLE), in annotation order."""
    from pycocotools import mask as mask_utils

    h, w = image["height"], image["width"]
    out = []
    for a in split.coco["annotations"]:
        if a["image_id"] != image["id"]:
            continue
        seg = a.get("segmentation")
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if seg else None
        elif isinstance(seg, dict):
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
        else:
            rle = None
        out.append(mask_utils.decode(rle).astype(bool) if rle is not None else np.zeros((h, w), bool))
    return np.stack(out) if out else np.zeros((0, h, w), bool)
