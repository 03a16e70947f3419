"""Sample images for the notebooks and tests (``data/``).

* Synthetic hand/nail-like images with ground-truth nail masks, drawn deterministically from a seed.
* Real photographs bundled with scikit-image (public domain / CC0), copied and downscaled; each photo's source and
  licence are recorded in ``data/manifest.json``.

``python -m nailkit make-data`` regenerates ``data/``; the committed copies are what tests and notebooks read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nailkit.core.paths import REPO_ROOT
DATA_DIR = REPO_ROOT / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: scikit-image bundled photographs: (skimage.data function, file name, licence note).
REAL_PHOTOS = [
    ("astronaut", "photo_astronaut.jpg", "NASA, public domain (scikit-image data.astronaut)"),
    ("coffee", "photo_coffee.jpg", "Rachel Michetti, CC0 (scikit-image data.coffee)"),
    ("chelsea", "photo_chelsea.jpg", "Stefan van der Walt, CC0 (scikit-image data.chelsea)"),
]


def synthetic_hand(seed: int, size: tuple[int, int] = (480, 640)) -> tuple[np.ndarray, np.ndarray]:
    """A skin-toned hand-like shape with 5 glossy nails on a textured background.

    Returns (HxWx3 uint8 RGB image, HxW uint8 instance mask: 0 background, k = nail k).
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([np.full((h, w), c, np.float32) for c in rng.uniform(40, 200, 3)], -1)
    bg += 25 * np.sin(xx[..., None] / rng.uniform(15, 60) + rng.uniform(0, 6, 3)) * rng.uniform(0.3, 1.0)
    img = Image.fromarray(np.clip(bg + rng.normal(0, 6, bg.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    skin = tuple(int(v) for v in rng.uniform([170, 110, 90], [240, 190, 160]))
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.6, 0.75)
    palm_r = min(h, w) * rng.uniform(0.17, 0.22)
    draw.ellipse([cx - palm_r * 1.1, cy - palm_r, cx + palm_r * 1.1, cy + palm_r * 1.2], fill=skin)
    mask = Image.new("L", (w, h), 0)
    mdraw = ImageDraw.Draw(mask)
    angles = np.deg2rad(np.array([-150, -115, -90, -65, -35]) + rng.normal(0, 5, 5))
    lengths = palm_r * np.array([1.2, 1.9, 2.1, 1.95, 1.6]) * rng.uniform(0.9, 1.1, 5)
    nail_color = tuple(int(v) for v in rng.uniform([150, 20, 40], [255, 120, 200]))
    for k, (a, length) in enumerate(zip(angles, lengths), start=1):
        fw = palm_r * rng.uniform(0.32, 0.4)
        x0, y0 = cx + np.cos(a) * palm_r * 0.6, cy + np.sin(a) * palm_r * 0.6
        x1, y1 = cx + np.cos(a) * length, cy + np.sin(a) * length
        draw.line([(x0, y0), (x1, y1)], fill=skin, width=int(fw))
        draw.ellipse([x1 - fw / 2, y1 - fw / 2, x1 + fw / 2, y1 + fw / 2], fill=skin)
        nx, ny = x1 - np.cos(a) * fw * 0.35, y1 - np.sin(a) * fw * 0.35
        nr = fw * 0.36
        box = [nx - nr, ny - nr, nx + nr, ny + nr]
        draw.ellipse(box, fill=nail_color)
        draw.ellipse([nx - nr * 0.4, ny - nr * 0.6, nx - nr * 0.05, ny - nr * 0.2], fill=(255, 255, 255))
        mdraw.ellipse(box, fill=k)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(img), np.asarray(mask)


def make_data(out_dir: str | Path = DATA_DIR, n_synthetic: int = 3, max_side: int = 640) -> list[Path]:
    """(Re)write the sample images and their ground truth into ``out_dir``."""
    from PIL import Image

    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    meta = {"synthetic": {}, "photos": {}}
    for i in range(n_synthetic):
        img, mask = synthetic_hand(seed=i)
        p = out / f"synthetic_hand_{i}.png"
        Image.fromarray(img).save(p, optimize=True)
        Image.fromarray(mask).save(out / "masks" / f"synthetic_hand_{i}_mask.png")
        meta["synthetic"][p.name] = {"seed": i, "nails": int(mask.max()),
                                     "mask": f"masks/synthetic_hand_{i}_mask.png"}
        written.append(p)
    try:
        import skimage.data as skd
    except ImportError:  # pragma: no cover - scikit-image is in the project environment
        skd = None
    if skd is not None:
        for fn, name, lic in REAL_PHOTOS:
            arr = getattr(skd, fn)()
            im = Image.fromarray(arr).convert("RGB")
            im.thumbnail((max_side, max_side))
            p = out / name
            im.save(p, quality=88)
            meta["photos"][name] = {"source": f"skimage.data.{fn}", "licence": lic, "size": list(im.size)}
            written.append(p)
    (out / "manifest.json").write_text(json.dumps(meta, indent=2))
    return written


def sample_images(kind: str = "all", data_dir: str | Path = DATA_DIR) -> list[Path]:
    """Sample images in ``data_dir`` (sorted): kind 'all', 'photos' (real) or 'synthetic'."""
    if kind not in ("all", "photos", "synthetic"):
        raise ValueError(f"kind must be 'all', 'photos' or 'synthetic', got {kind!r}")
    d = Path(data_dir)
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
    if kind == "photos":
        files = [p for p in files if p.name.startswith("photo_")]
    elif kind == "synthetic":
        files = [p for p in files if p.name.startswith("synthetic_")]
    if not files:
        raise FileNotFoundError(f"{d}: no sample images ({kind}); run `python -m nailkit make-data`")
    return files


def ground_truth_mask(image_path: str | Path) -> np.ndarray | None:
    """Instance mask (0 = background, k = nail k) for a synthetic image, or None for photos."""
    from PIL import Image

    p = Path(image_path)
    m = p.parent / "masks" / f"{p.stem}_mask.png"
    return np.asarray(Image.open(m)) if m.exists() else None
