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
    if isinstance(arr, _FloatImage):  # np.ascontiguousarray would drop the marker subclass (and re-scale by 255)
        return np.ascontiguousarray(arr).view(_FloatImage)
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


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add ``a*b + c`` (one rounding), as PyTorch's x86/ARM kernels compute it.

    The float32 product is exact in float64, so rounding the float64 sum once to float32 equals a true FMA except in
    astronomically rare double-rounding ties.
    """
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _linear_taps(in_size: int, out_size: int, fused: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's ``upsample_bilinear2d`` (align_corners=False, no antialias).

    ``compute_source_index_and_lambda`` in ATen/native/UpSample.h, in float32: ratio = in/out;
    real = max(ratio*(i+0.5) - 0.5, 0) (fused multiply-add); i0 = min(floor(real), in-1); i1 = i0+1 clamped;
    w1 = clamp(real - i0, 0, 1); w0 = 1 - w1.
    """
    f32 = np.float32
    if in_size == out_size:
        idx = np.arange(out_size, dtype=np.int64)
        return idx, idx, np.ones(out_size, f32), np.zeros(out_size, f32)
    ratio = f32(in_size) / f32(out_size)
    centres = np.arange(out_size, dtype=f32) + f32(0.5)
    real = _fma32(ratio, centres, f32(-0.5)) if fused else (ratio * centres - f32(0.5)).astype(f32)
    real = np.where(real < 0, f32(0), real).astype(f32)
    i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    w1 = np.clip(real - i0.astype(f32), 0, 1).astype(f32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, (f32(1) - w1).astype(f32), w1


def bilinear_resize(src: np.ndarray, out_h: int, out_w: int, *, chunk: int = 8, fused: bool = True) -> np.ndarray:
    """Resize (..., H, W) float32 exactly like ``F.interpolate(mode="bilinear", align_corners=False)`` on CPU.

    Bilinear with half-pixel centres and **no antialias** (also what torchvision ``F.resize(antialias=False)``
    does). The arithmetic order follows PyTorch's generic CPU kernel so masks thresholded at 0 come out
    bit-identical: per output pixel ``fma(fma(a00, wx0, a01*wx1), wy0, fma(a10, wx0, a11*wx1)*wy1)``. A plain
    ``a*w0 + b*w1`` (``fused=False``: what PyTorch computes on CPUs without FMA, ``ATEN_CPU_CAPABILITY=default``)
    differs by at most 1 ulp. Leading dims are processed ``chunk`` planes at a time.
    """
    src = np.asarray(src, dtype=np.float32)
    lead = src.shape[:-2]
    src_h, src_w = src.shape[-2], src.shape[-1]
    flat = src.reshape((-1, src_h, src_w))
    y0, y1, wy0, wy1 = _linear_taps(src_h, out_h, fused)
    x0, x1, wx0, wx1 = _linear_taps(src_w, out_w, fused)
    wy0, wy1 = wy0[:, None], wy1[:, None]
    mad = _fma32 if fused else (lambda a, b, c: (a * b + c).astype(np.float32))
    out = np.empty((flat.shape[0], out_h, out_w), dtype=np.float32)
    for s in range(0, flat.shape[0], max(1, chunk)):
        part = flat[s:s + chunk]
        # width pass on every source row once (the same per-pixel operations, shared between output rows)
        rows = mad(part[..., x0], wx0, (part[..., x1] * wx1).astype(np.float32))
        out[s:s + chunk] = mad(rows[:, y0, :], wy0, (rows[:, y1, :] * wy1).astype(np.float32))
    return out.reshape(lead + (out_h, out_w))


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
