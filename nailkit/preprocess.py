"""Image loading and preprocessing, numpy + Pillow only (this file ships in the mobile bundle as is).

Exactly rfdetr 1.11.2 ``RFDETR.predict()``:
1. convert to 8-bit RGB (PIL ``convert("RGB")`` for RGBA/LA/L/P/CMYK images), scale to float32 [0, 1];
2. resize to (R, R) with bilinear interpolation, half-pixel centres, **no antialias** (torchvision
   ``F.resize(..., antialias=False)`` == ``F.interpolate(mode="bilinear", align_corners=False)``);
3. normalise with ImageNet mean/std.
Output: float32 NCHW [1, 3, R, R] (use ``to_nhwc`` for TFLite files that take NHWC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MIN_SIDE = 8
MAX_SIDE = 16384
_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}

ImageLike = Union[str, Path, np.ndarray, Any]  # Any: PIL.Image.Image


class ImageError(ValueError):
    """An image that cannot be used, with a message naming it and what was expected."""


def load_image(image: ImageLike) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array from a path, a PIL image or a numpy array.

    Conversions are explicit: RGBA/LA/PA drop alpha (as PIL's ``convert("RGB")``, which rfdetr uses), L/P/CMYK
    become RGB. 16-bit and float PIL modes are refused. numpy input must be HxW, HxWx1, HxWx3 or HxWx4, either uint8
    or float in [0, 1].
    """
    from PIL import Image, UnidentifiedImageError

    name = "image"
    if isinstance(image, (str, Path)):
        name = str(image)
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{name}: no such image file")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageError(f"{name}: not a readable image ({exc}); expected a JPEG/PNG/BMP/WebP file") from None
    if isinstance(image, Image.Image):
        if image.mode not in _CONVERTIBLE_MODES:
            raise ImageError(f"{name}: PIL mode {image.mode!r} is not supported; expected an 8-bit image "
                             f"(RGB, RGBA, L, LA, P, CMYK). Convert it first, e.g. scale 16-bit to 8-bit.")
        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    elif isinstance(image, np.ndarray):
        arr = _array_to_rgb_uint8(image, name)
    else:
        raise ImageError(f"{name}: unsupported image type {type(image).__name__}; expected a path, PIL image or "
                         f"numpy array")
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise ImageError(f"{name}: size {w}x{h} is outside the supported range ({MIN_SIDE}..{MAX_SIDE} px per side)")
    return np.ascontiguousarray(arr)


def _array_to_rgb_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"{name}: array shape {arr.shape} is not an image; expected HxW, HxWx1, HxWx3 (RGB) or "
                         f"HxWx4 (RGBA)")
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1 or np.isnan(arr).any()):
            raise ImageError(f"{name}: float image values must lie in [0, 1]; got "
                             f"[{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]")
        # rfdetr feeds float arrays straight through, so keep the exact values instead of quantising to uint8.
        return _FloatImage(arr)
    raise ImageError(f"{name}: dtype {arr.dtype} not supported; expected uint8 or float in [0, 1]")


class _FloatImage(np.ndarray):
    """Marker subclass: an RGB float image in [0, 1] (kept exact instead of quantising to uint8)."""

    def __new__(cls, arr: np.ndarray) -> "_FloatImage":
        return np.asarray(arr, dtype=np.float32).view(cls)


def bilinear_resize(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize (..., H, W) float32 like ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``."""
    src = np.asarray(src, dtype=np.float32)
    src_h, src_w = src.shape[-2], src.shape[-1]
    ys = np.clip((np.arange(out_h, dtype=np.float32) + 0.5) * np.float32(src_h / out_h) - 0.5, 0, src_h - 1)
    xs = np.clip((np.arange(out_w, dtype=np.float32) + 0.5) * np.float32(src_w / out_w) - 0.5, 0, src_w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, src_h - 1)
    x1 = np.minimum(x0 + 1, src_w - 1)
    dy = (ys - y0).astype(np.float32)[:, None]
    dx = (xs - x0).astype(np.float32)[None, :]
    rows0 = src[..., y0, :]
    rows1 = src[..., y1, :]
    top = rows0[..., x0] * (1 - dx) + rows0[..., x1] * dx
    bot = rows1[..., x0] * (1 - dx) + rows1[..., x1] * dx
    return (top * (1 - dy) + bot * dy).astype(np.float32)


def preprocess(image: ImageLike, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (float32 NCHW [1,3,R,R] normalised input, (width, height) of the original image)."""
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    if isinstance(rgb, _FloatImage):
        chw = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    else:
        chw = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    resized = bilinear_resize(chw, resolution, resolution)
    norm = (resized - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return norm[None].astype(np.float32), (w, h)


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
