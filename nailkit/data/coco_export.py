"""Reading a Roboflow-layout COCO instance-segmentation export (``<split>/_annotations.coco.json`` + images),
validated for what pycocotools and evaluation take for granted: ``load_split``, ``validate_coco``, ``CocoSplit``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANNOTATIONS = "_annotations.coco.json"


class DatasetError(ValueError):
    """A dataset folder or annotation file that cannot be used (message names the file and what was expected)."""


@dataclass
class CocoSplit:
    """A COCO instance-segmentation split, validated: the annotation file, its image folder and its content."""

    folder: Path
    coco: dict[str, Any]

    @property
    def annotation_file(self) -> Path:
        return self.folder / ANNOTATIONS

    def image_path(self, image: dict[str, Any]) -> Path:
        return self.folder / image["file_name"]

    def class_names(self) -> list[str]:
        """Names of the trainable classes (a Roboflow parent category, supercategory 'none', is dropped)."""
        cats = sorted(self.coco["categories"], key=lambda c: c["id"])
        used = {a["category_id"] for a in self.coco["annotations"]}
        return [c["name"] for c in cats if c["id"] in used or c.get("supercategory") != "none"]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_coco(coco: dict[str, Any], where: Any = "annotations") -> None:
    """What pycocotools' loader and COCOeval take for granted, checked with errors that name the file and item:
    unique image/category/annotation ids; images with a file name and positive integer size; annotations whose image
    and category exist, whose bbox is [x, y, w, h] numbers with w, h > 0, and whose segmentation is polygons of at
    least 3 points (6 numbers, an even count) or an RLE {size, counts}."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"{where}: '{key}' is {type(coco.get(key)).__name__}; expected a list")
    image_ids: set = set()
    for im in coco["images"]:
        if not isinstance(im, dict) or "id" not in im:
            raise DatasetError(f"{where}: an image entry without an id ({str(im)[:60]}); expected {{id, file_name, "
                               f"width, height}}")
        if im["id"] in image_ids:
            raise DatasetError(f"{where}: image id {im['id']!r} appears twice; image ids must be unique")
        image_ids.add(im["id"])
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise DatasetError(f"{where}: image {im['id']!r} has no file_name")
        for k in ("width", "height"):
            v = im.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise DatasetError(f"{where}: image {im['id']!r} ({im['file_name']}) has {k} {v!r}; expected a "
                                   f"positive integer")
    cat_ids: set = set()
    for c in coco["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{where}: a category without id/name ({str(c)[:60]})")
        if c["id"] in cat_ids:
            raise DatasetError(f"{where}: category id {c['id']!r} appears twice; category ids must be unique")
        cat_ids.add(c["id"])
    ann_ids: set = set()
    for a in coco["annotations"]:
        if not isinstance(a, dict):
            raise DatasetError(f"{where}: an annotation is {type(a).__name__}; expected an object")
        aid = a.get("id", "?")
        if "bbox" not in a or "image_id" not in a or "category_id" not in a:
            raise DatasetError(f"{where}: annotation {aid} lacks bbox/image_id/category_id")
        if "id" in a:
            if a["id"] in ann_ids:
                raise DatasetError(f"{where}: annotation id {a['id']!r} appears twice; annotation ids must be unique")
            ann_ids.add(a["id"])
        if a["image_id"] not in image_ids:
            raise DatasetError(f"{where}: annotation {aid} names image_id {a['image_id']!r}, which is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise DatasetError(f"{where}: annotation {aid} names category_id {a['category_id']!r}, which is not in "
                               f"'categories'")
        b = a["bbox"]
        if not isinstance(b, list) or len(b) != 4 or not all(_is_num(v) for v in b):
            raise DatasetError(f"{where}: annotation {aid} has bbox {str(b)[:60]}; expected [x, y, width, height] "
                               f"numbers")
        if b[2] <= 0 or b[3] <= 0:
            raise DatasetError(f"{where}: annotation {aid} has bbox {b}; expected a positive width and height")
        seg = a.get("segmentation")
        if seg is None:
            continue
        if isinstance(seg, list):
            if not seg:
                raise DatasetError(f"{where}: annotation {aid} has an empty segmentation; expected polygons of at least "
                                   f"3 points")
            for poly in seg:
                if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                        or not all(_is_num(v) for v in poly)):
                    n = len(poly) // 2 if isinstance(poly, list) else "?"
                    raise DatasetError(f"{where}: annotation {aid} has a polygon of {n} points ({str(poly)[:40]}); "
                                       f"expected at least 3 (x, y) points as numbers")
        elif isinstance(seg, dict):
            if "size" not in seg or "counts" not in seg:
                raise DatasetError(f"{where}: annotation {aid} has an RLE segmentation without size/counts")
        else:
            raise DatasetError(f"{where}: annotation {aid} has segmentation of type {type(seg).__name__}; expected "
                               f"polygons (a list) or RLE (an object)")


def load_split(dataset_dir: str | os.PathLike[str], split: str = "test") -> CocoSplit:
    """Read ``DIR/<split>/_annotations.coco.json`` (or ``DIR/_annotations.coco.json``), checked for what evaluation
    needs. Errors name the file and what was expected."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; expected a Roboflow COCO export with {split}/{ANNOTATIONS}")
    folder = root / split if (root / split / ANNOTATIONS).exists() else root
    ann = folder / ANNOTATIONS
    if not ann.exists():
        raise DatasetError(f"{root}: no {split}/{ANNOTATIONS} (nor {ANNOTATIONS}); expected a Roboflow COCO export")
    try:
        coco = json.loads(ann.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann}: not JSON ({exc.__class__.__name__}); expected COCO annotations") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco, dict) or k not in coco]
    if missing:
        raise DatasetError(f"{ann}: not COCO annotations (missing {', '.join(missing)})")
    validate_coco(coco, ann)
    absent = [im["file_name"] for im in coco["images"] if not (folder / im["file_name"]).exists()]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise DatasetError(f"{ann}: names image {absent[0]!r}{more}, not found in {folder}")
    return CocoSplit(folder, coco)
