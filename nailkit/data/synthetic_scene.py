"""One synthetic nail image with its instance map: the scene generator behind the labelled dataset.

``render_scene(rng)`` draws hands and loose fingers with 0-10 nails of varied shape (oval, square, almond), size, colour
(natural, painted, French tip), gloss highlight and orientation; occluders and neighbouring fingers that hide part of
a nail; touching nails; backgrounds from procedural textures and from crops of scikit-image's bundled photographs
(never the three photos in ``data/``, which stay unseen nail-free negatives); lighting changes, blur and noise; and
images with hands but no visible nail (palm side) or no hand at all (hard negatives).

Everything is drawn with numpy + Pillow from the generator it is given: the same generator state draws the same
image. ``nailkit.data.synthetic_dataset`` writes these images as a COCO dataset.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any

import numpy as np

#: scikit-image's bundled photographs used as background crops. astronaut, coffee and chelsea are *not* here: they are
#: the nail-free photos in data/ on which the quality bar demands no detection.
BACKGROUND_PHOTOS = ("rocket", "coins", "camera", "horse", "moon", "page", "text", "brick", "grass", "gravel",
                     "immunohistochemistry", "hubble_deep_field", "logo", "colorwheel", "motorcycle_left")
#: (skimage.data.cat is chelsea, one of the three held-out photos, so it is not in this list.)
SIZES = ((432, 432), (480, 640), (640, 480), (384, 512), (512, 384))
MIN_VISIBLE_FRACTION = 0.35  # a nail hidden more than this is not annotated (too little of it to call a nail)
MIN_AREA_PX = 24


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
    from PIL import ImageDraw

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
