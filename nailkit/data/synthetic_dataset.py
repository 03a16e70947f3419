"""The labelled synthetic nail dataset, written in the layout rfdetr trains on and Roboflow exports.

``make_dataset(out, seed)`` writes ``train/``, ``valid/``, ``test/``, each with JPEG images and
``_annotations.coco.json`` (COCO instance segmentation, polygons). The class layout is the seed's: Roboflow's parent
category (id 0, ``nails``) plus ``Nail`` (id 1), which gives rfdetr's ``num_classes=2`` and a class head of [3, 256].
Each image is one ``render_scene`` (``nailkit.data.synthetic_scene``) from ``numpy.random.default_rng([seed, split,
index])``, saved at a random JPEG quality: the same seed writes byte-identical files. ``ensure_dataset`` generates it
only when absent or made with another seed, sizes or version.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from nailkit.data.coco_export import ANNOTATIONS, DatasetError
from nailkit.data.coco_masks import mask_to_polygons
from nailkit.data.synthetic_scene import render_scene

SPLITS = ("train", "valid", "test")
#: Roboflow's layout: a parent category (id 0) whose only child is the real class.
CATEGORIES = [
    {"id": 0, "name": "nails", "supercategory": "none"},
    {"id": 1, "name": "Nail", "supercategory": "nails"},
]
NAIL_CATEGORY_ID = 1
DEFAULT_SIZES = {"train": 400, "valid": 40, "test": 60}
#: v1 (commit 79e9e03) drew smaller hands and more occluders; v2 frames hands closer, as an AR camera sees them.
DATASET_VERSION = 2


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_split(out_dir: Path, split: str, n: int, seed: int, progress: bool = False) -> dict[str, Any]:
    split_idx = SPLITS.index(split) if split in SPLITS else 99
    out_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{split}", unit="img")
    for i in it:
        rng = np.random.default_rng([seed, split_idx, i])
        rgb, inst = render_scene(rng)
        name = f"{split}_{i:05d}.jpg"
        (out_dir / name).write_bytes(_encode_jpeg(rgb, int(rng.integers(45, 96))))
        h, w = inst.shape
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        for k in range(1, int(inst.max()) + 1):
            m = inst == k
            polys = mask_to_polygons(m)
            if not polys:
                continue
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": NAIL_CATEGORY_ID,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(m.sum()), "segmentation": polys,
                         "iscrowd": 0})
    coco = {"info": {"description": "nailkit synthetic nails", "seed": seed, "split": split},
            "licenses": [], "categories": CATEGORIES, "images": images, "annotations": anns}
    (out_dir / ANNOTATIONS).write_text(json.dumps(coco))
    return {"images": len(images), "instances": len(anns),
            "negatives": len(images) - len({a["image_id"] for a in anns})}


def make_dataset(out: str | os.PathLike[str], seed: int = 0, sizes: dict[str, int] | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Write the dataset atomically (a temporary folder renamed into place). Returns per-split counts."""
    out = Path(out)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: exists and is not empty; choose a new folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = {s: make_split(tmp / s, s, sizes[s], seed, progress) for s in SPLITS}
        summary["seed"] = seed
        summary["version"] = DATASET_VERSION
        (tmp / "dataset.json").write_text(json.dumps(summary, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def ensure_dataset(out: str | os.PathLike[str], seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """The dataset at ``out``, generated when absent (or when it was made with another seed or sizes). Every image
    depends only on (seed, split, index), so a folder with only ``test/`` holds the same test images as a full one."""
    out = Path(out)
    want = {**DEFAULT_SIZES, **(sizes or {})}
    info = out / "dataset.json"
    if info.exists():
        have = json.loads(info.read_text())
        if have.get("seed") == seed and have.get("version") == DATASET_VERSION and all(have.get(s, {}).get("images") == n for s, n in want.items()):
            return out
        shutil.rmtree(out)
    make_dataset(out, seed=seed, sizes=want)
    return out
