"""The labelled synthetic nail dataset, and reading any Roboflow-layout COCO segmentation export.

``make_dataset(out, seed)`` writes ``train/``, ``valid/``, ``test/``, each with JPEG images and
``_annotations.coco.json`` (COCO instance segmentation, polygons), in the layout rfdetr trains on and Roboflow
exports. The class layout is the seed's: Roboflow's parent category (id 0, ``nails``) plus ``Nail`` (id 1), which gives
rfdetr's ``num_classes=2`` and a class head of [3, 256].

Scenes: hands and loose fingers with 0-10 nails of varied shape (oval, square, almond), size, colour (natural,
painted, French tip), gloss highlight and orientation; occluders and neighbouring fingers that hide part of a nail;
touching nails; backgrounds from procedural textures and from crops of scikit-image's bundled photographs (never the
three photos in ``data/``, which stay unseen nail-free negatives); lighting changes, blur, noise and JPEG artefacts;
and images with hands but no visible nail (palm side) or no hand at all (hard negatives).

Everything is drawn with numpy + Pillow from ``numpy.random.default_rng([seed, split, index])``: the same seed writes
byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ANNOTATIONS = "_annotations.coco.json"
SPLITS = ("train", "valid", "test")
#: Roboflow's layout: a parent category (id 0) whose only child is the real class.
CATEGORIES = [
    {"id": 0, "name": "nails", "supercategory": "none"},
    {"id": 1, "name": "Nail", "supercategory": "nails"},
]
NAIL_CATEGORY_ID = 1
#: scikit-image's bundled photographs used as background crops. astronaut, coffee and chelsea are *not* here: they are
#: the nail-free photos in data/ on which the quality bar demands no detection.
BACKGROUND_PHOTOS = ("rocket", "coins", "camera", "horse", "moon", "page", "text", "brick", "grass", "gravel",
                     "immunohistochemistry", "hubble_deep_field", "logo", "colorwheel", "motorcycle_left")
#: (skimage.data.cat is chelsea, one of the three held-out photos, so it is not in this list.)
DEFAULT_SIZES = {"train": 400, "valid": 40, "test": 60}
SIZES = ((432, 432), (480, 640), (640, 480), (384, 512), (512, 384))
MIN_VISIBLE_FRACTION = 0.35  # a nail hidden more than this is not annotated (too little of it to call a nail)
MIN_AREA_PX = 24
#: v1 (commit 79e9e03) drew smaller hands and more occluders; v2 frames hands closer, as an AR camera sees them.
DATASET_VERSION = 2


class DatasetError(ValueError):
    """A dataset folder or annotation file that cannot be used (message names the file and what was expected)."""


# --------------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------------
_BACKGROUNDS: list[np.ndarray] | None = None


def _background_photos() -> list[np.ndarray]:
    global _BACKGROUNDS
    if _BACKGROUNDS is None:
        import skimage.data as skd

        photos = []
        for name in BACKGROUND_PHOTOS:
            fn = getattr(skd, name, None)
            if fn is None:
                continue
            try:
                arr = np.asarray(fn())
            except Exception:  # noqa: BLE001 - a photo that needs a download is simply not used
                continue
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, -1)
            arr = arr[..., :3]
            if arr.dtype != np.uint8:
                arr = arr.astype(np.float32)
                arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-6)).astype(np.uint8)
            photos.append(arr)
        if not photos:
            raise RuntimeError("scikit-image ships no bundled photographs here; cannot draw photo backgrounds")
        _BACKGROUNDS = photos
    return _BACKGROUNDS


def _procedural_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(20, 235, 3).astype(np.float32)
    grad = rng.uniform(-60, 60, 3) * (xx / w)[..., None] + rng.uniform(-60, 60, 3) * (yy / h)[..., None]
    img = base + grad
    for _ in range(rng.integers(1, 4)):
        period = rng.uniform(6, 80)
        ang = rng.uniform(0, np.pi)
        phase = xx * np.cos(ang) + yy * np.sin(ang)
        img += rng.uniform(5, 35) * np.sin(phase[..., None] / period + rng.uniform(0, 6, 3))
    img += rng.normal(0, rng.uniform(2, 10), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _photo_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    from PIL import Image

    photos = _background_photos()
    src = photos[rng.integers(len(photos))]
    sh, sw = src.shape[:2]
    scale = rng.uniform(0.35, 1.0)
    ch, cw = max(16, int(sh * scale)), max(16, int(sw * scale))
    y0, x0 = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
    crop = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BILINEAR)
    arr = np.asarray(crop).astype(np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr * rng.uniform(0.6, 1.2, 3) + rng.uniform(-30, 30, 3)  # colour cast
    return np.clip(arr, 0, 255).astype(np.uint8)


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    dark = rng.uniform(0, 1)
    light = np.array([236, 196, 170])
    deep = np.array([96, 62, 44])
    c = light * (1 - dark) + deep * dark + rng.normal(0, 8, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _nail_colour(rng: np.random.Generator, skin: tuple[int, int, int]) -> tuple[tuple[int, int, int], bool]:
    """(colour, french_tip). Natural nails are a pinker, lighter shade of the skin; painted ones anything."""
    r = rng.random()
    if r < 0.35:  # natural
        c = np.array(skin) * 0.7 + np.array([250, 170, 175]) * 0.3 + rng.normal(0, 6, 3)
        return tuple(int(v) for v in np.clip(c + 18, 0, 255)), rng.random() < 0.3
    if r < 0.5:  # nude / pastel
        c = rng.uniform([200, 150, 150], [255, 215, 220])
    else:  # painted
        hue = rng.uniform(0, 1)
        import colorsys

        c = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.4, 1.0), rng.uniform(0.25, 0.95)))
    return tuple(int(v) for v in np.clip(c, 0, 255)), False


def _rot(pts: np.ndarray, ang: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = np.cos(ang), np.sin(ang)
    out = pts @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])
    return [tuple(p) for p in out]


def _nail_polygon(rng: np.random.Generator, length: float, width: float, shape: str) -> np.ndarray:
    """Outline of a nail in its own frame: x along the finger (0 = cuticle, +length = free edge), y across."""
    t = np.linspace(-np.pi / 2, np.pi / 2, 24)
    half = width / 2
    if shape == "square":
        tip = np.stack([length - 0.12 * length + 0.12 * length * np.cos(t) ** 0.3, half * np.sin(t)], 1)
    elif shape == "almond":
        tip = np.stack([length * 0.55 + length * 0.45 * np.cos(t), half * np.sin(t) * (0.7 + 0.3 * np.cos(t))], 1)
    else:  # oval
        tip = np.stack([length * 0.6 + length * 0.4 * np.cos(t), half * np.sin(t)], 1)
    base = np.stack([length * 0.08 * (1 - np.cos(t[::-1])), half * np.sin(t[::-1]) * 0.98], 1)  # curved cuticle
    return np.concatenate([tip, base], 0)


@dataclass
class _Scene:
    rgb: Any  # PIL image
    ids: Any  # PIL "I" image: 0 background / occluder, k = nail k
    full_area: dict[int, int]
    next_id: int = 1


def _draw_finger(scene: _Scene, rng: np.random.Generator, x0: float, y0: float, ang: float, length: float,
                 width: float, skin, nail: bool) -> None:
    from PIL import Image, ImageDraw

    d = ImageDraw.Draw(scene.rgb)
    di = ImageDraw.Draw(scene.ids)
    x1, y1 = x0 + np.cos(ang) * length, y0 + np.sin(ang) * length
    shade = tuple(int(v * rng.uniform(0.85, 1.0)) for v in skin)
    d.line([(x0, y0), (x1, y1)], fill=shade, width=max(2, int(width)))
    d.ellipse([x1 - width / 2, y1 - width / 2, x1 + width / 2, y1 + width / 2], fill=shade)
    di.line([(x0, y0), (x1, y1)], fill=0, width=max(2, int(width)))  # a finger hides what is under it
    di.ellipse([x1 - width / 2, y1 - width / 2, x1 + width / 2, y1 + width / 2], fill=0)
    # knuckle creases
    for f in (0.45, 0.75):
        kx, ky = x0 + np.cos(ang) * length * f, y0 + np.sin(ang) * length * f
        nx, ny = -np.sin(ang) * width * 0.3, np.cos(ang) * width * 0.3
        d.line([(kx - nx, ky - ny), (kx + nx, ky + ny)], fill=tuple(int(v * 0.8) for v in skin), width=1)
    if nail:
        _draw_nail(scene, rng, x0, y0, ang, length, width, skin)


def _draw_nail(scene: _Scene, rng: np.random.Generator, x0: float, y0: float, ang: float, length: float,
               width: float, skin) -> None:
    from PIL import Image, ImageDraw

    d = ImageDraw.Draw(scene.rgb)
    nw = width * rng.uniform(0.68, 0.86)
    nl = nw * rng.uniform(0.9, 1.5)
    shape = str(rng.choice(["oval", "square", "almond"]))
    poly = _nail_polygon(rng, nl, nw, shape)
    # cuticle sits nl*0.85 back from the fingertip; long nails overhang the tip
    start = length + width / 2 - nl * rng.uniform(0.75, 1.0)
    cx, cy = x0 + np.cos(ang) * start, y0 + np.sin(ang) * start
    pts = _rot(poly, ang, cx, cy)
    colour, french = _nail_colour(rng, skin)
    d.polygon(pts, fill=colour, outline=tuple(int(v * 0.75) for v in colour))
    if french:
        tip = poly.copy()
        tip[:, 0] = np.maximum(tip[:, 0], nl * 0.78)
        d.polygon(_rot(tip, ang, cx, cy), fill=(245, 242, 236))
    if rng.random() < 0.85:  # gloss highlight, drawn on a separate layer and alpha-composited
        hl = Image.new("L", scene.rgb.size, 0)
        hd = ImageDraw.Draw(hl)
        off = rng.uniform(-0.25, 0.25) * nw
        hx = np.array([[nl * 0.3, off - nw * 0.08], [nl * 0.75, off - nw * 0.05], [nl * 0.75, off + nw * 0.03],
                       [nl * 0.3, off + nw * 0.05]])
        hd.polygon(_rot(hx, ang, cx, cy), fill=int(rng.uniform(90, 220)))
        scene.rgb.paste((255, 255, 255), mask=hl)
    nid = scene.next_id
    scene.next_id += 1
    ImageDraw.Draw(scene.ids).polygon(pts, fill=nid)
    scene.full_area[nid] = int((np.asarray(scene.ids) == nid).sum())


def _draw_hand(scene: _Scene, rng: np.random.Generator, h: int, w: int, max_nails: int, nails_visible: bool) -> int:
    from PIL import ImageDraw

    scale = min(h, w) * rng.uniform(0.2, 0.38)
    rot = rng.uniform(-np.pi, np.pi) if rng.random() < 0.3 else -np.pi / 2 + rng.normal(0, 0.5)
    # aim the fingertips at a point inside the frame; the palm may leave it
    tx, ty = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
    cx, cy = tx - np.cos(rot) * 1.6 * scale, ty - np.sin(rot) * 1.6 * scale
    skin = _skin(rng)
    d = ImageDraw.Draw(scene.rgb)
    di = ImageDraw.Draw(scene.ids)
    palm = [cx - scale, cy - scale * 0.9, cx + scale, cy + scale * 1.1]
    d.ellipse(palm, fill=skin)
    di.ellipse(palm, fill=0)
    n_fingers = int(rng.integers(2, 6))
    spread = rng.uniform(0.12, 0.45)  # small spread -> touching fingers and nails
    drawn = 0
    fingers: list[tuple[float, float, float, float, float]] = []
    for k in range(n_fingers):
        a = rot + (k - (n_fingers - 1) / 2) * spread
        width = scale * rng.uniform(0.32, 0.45) * (0.85 if k in (0, n_fingers - 1) else 1.0)
        length = scale * rng.uniform(1.2, 2.2)
        x0, y0 = cx + np.cos(a) * scale * 0.5, cy + np.sin(a) * scale * 0.5
        has_nail = nails_visible and drawn < max_nails and rng.random() < 0.95
        _draw_finger(scene, rng, x0, y0, a, length, width, skin, False)
        if has_nail:
            fingers.append((x0, y0, a, length, width))
        drawn += int(has_nail)
    for f in fingers:  # nails last, so that a neighbouring finger of the same hand does not hide them
        _draw_nail(scene, rng, *f, skin)
    return drawn


def _draw_occluders(scene: _Scene, rng: np.random.Generator, h: int, w: int) -> None:
    from PIL import ImageDraw

    d = ImageDraw.Draw(scene.rgb)
    di = ImageDraw.Draw(scene.ids)
    for _ in range(int(rng.integers(0, 2))):
        kind = rng.random()
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if kind < 0.5:  # a pen/stick
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            a = rng.uniform(0, np.pi)
            ln = rng.uniform(0.3, 0.9) * max(h, w)
            wd = int(rng.uniform(0.015, 0.05) * min(h, w))
            pts = [(x0, y0), (x0 + np.cos(a) * ln, y0 + np.sin(a) * ln)]
            d.line(pts, fill=colour, width=max(2, wd))
            di.line(pts, fill=0, width=max(2, wd))
        else:  # a round distractor: button / candy, nail-coloured on purpose sometimes
            r = rng.uniform(0.02, 0.07) * min(h, w)
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            box = [x - r, y - r * rng.uniform(0.6, 1.0), x + r, y + r]
            d.ellipse(box, fill=colour, outline=tuple(int(c * 0.6) for c in colour))
            if rng.random() < 0.5:
                d.ellipse([x - r * 0.15, y - r * 0.15, x + r * 0.15, y + r * 0.15], fill=(20, 20, 20))
            di.ellipse(box, fill=0)


def _photometric(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageFilter

    a = img.astype(np.float32) / 255.0
    a = a ** rng.uniform(0.7, 1.4)  # gamma
    a = a * rng.uniform(0.6, 1.3) * rng.uniform(0.9, 1.1, 3)  # exposure + white balance
    if rng.random() < 0.4:  # uneven lighting
        h, w = a.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        gx, gy = rng.uniform(0, w), rng.uniform(0, h)
        fall = np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (rng.uniform(0.4, 1.2) * max(h, w)) ** 2))
        a = a * (0.55 + 0.6 * fall[..., None])
    out = Image.fromarray(np.clip(a * 255, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.8)))
    arr = np.asarray(out).astype(np.float32)
    if rng.random() < 0.6:
        arr = arr + rng.normal(0, rng.uniform(1, 9), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image: (HxWx3 uint8 RGB before JPEG, HxW int32 instance map: 0 = none, k = nail k)."""
    from PIL import Image

    h, w = size or SIZES[rng.integers(len(SIZES))]
    bg = _photo_background(rng, h, w) if rng.random() < 0.5 else _procedural_background(rng, h, w)
    scene = _Scene(Image.fromarray(bg), Image.new("I", (w, h), 0), {})
    kind = rng.random()
    if kind < 0.08:  # hard negative: nothing but background and distractors
        pass
    elif kind < 0.15:  # hard negative: hands seen from the palm side, no nail visible
        for _ in range(int(rng.integers(1, 3))):
            _draw_hand(scene, rng, h, w, 0, nails_visible=False)
    else:
        budget = int(rng.integers(3, 11))
        for _ in range(int(rng.integers(1, 3))):
            if budget <= 0:
                break
            if rng.random() < 0.25:  # a loose finger coming in from an edge
                skin = _skin(rng)
                wd = min(h, w) * rng.uniform(0.09, 0.18)
                a = rng.uniform(-np.pi, np.pi)
                x0, y0 = w / 2 - np.cos(a) * w * 0.7, h / 2 - np.sin(a) * h * 0.7
                _draw_finger(scene, rng, x0, y0, a, rng.uniform(0.5, 0.85) * max(h, w), wd, skin, True)
                budget -= 1
            else:
                budget -= _draw_hand(scene, rng, h, w, budget, nails_visible=True)
    _draw_occluders(scene, rng, h, w)
    rgb = _photometric(rng, np.asarray(scene.rgb))
    ids = np.asarray(scene.ids).astype(np.int32)
    keep = np.zeros(scene.next_id, np.int32)
    new = 0
    for nid, full in scene.full_area.items():
        vis = int((ids == nid).sum())
        if vis >= MIN_AREA_PX and vis >= MIN_VISIBLE_FRACTION * full:
            new += 1
            keep[nid] = new
    return rgb, keep[ids]


# --------------------------------------------------------------------------------------------------------------------
# COCO writing and reading
# --------------------------------------------------------------------------------------------------------------------
def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (outer contours) of a binary mask."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= 3 and cv2.contourArea(c) >= 1:
            polys.append([float(v) for v in c.reshape(-1)])
    return polys


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
