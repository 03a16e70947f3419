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
# The most pixels nailkit decodes for one photo (40 MP, e.g. 7728×5152). Larger photos are refused with a one-line error,
# or, with ``load_image(..., downscale=True)`` (what ``predict`` does), shrunk by Pillow to fit before the full decode.
# Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, about 179 MP for an error) still applies first.
MAX_PIXELS = 40_000_000
# Pillow's default decompression-bomb error threshold (2 × Image.MAX_IMAGE_PIXELS), enforced by nailkit itself:
# importing rfdetr's datasets raises Pillow's process-wide limit to 2 gigapixels.
BOMB_PIXELS = 2 * 89_478_485
_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}

ImageLike = Union[str, Path, np.ndarray, Any]  # Any: PIL.Image.Image


class ImageError(ValueError):
    """An image that cannot be used, with a message naming it and what was expected."""


def _fit(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The largest (w, h) with the aspect ratio of ``size`` and at most ``max_pixels`` pixels."""
    w, h = size
    f = (max_pixels / float(w * h)) ** 0.5
    return max(1, int(w * f)), max(1, int(h * f))


def load_image(image: ImageLike, *, max_pixels: int | None = MAX_PIXELS, downscale: bool = False) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array from a path, a PIL image or a numpy array.

    Conversions are explicit: RGBA/LA/PA drop alpha (as PIL's ``convert("RGB")``, which rfdetr uses), L/P/CMYK
    become RGB. 16-bit and float PIL modes are refused. numpy input must be HxW, HxWx1, HxWx3 or HxWx4, either uint8
    or float in [0, 1].

    A file with more than ``max_pixels`` pixels (default ``MAX_PIXELS``) is refused, or with ``downscale=True``
    shrunk to fit (JPEG: decoded at a reduced scale, so the full-size pixels never exist in memory). Pillow's
    decompression-bomb guard stays on; its refusal becomes an ``ImageError``.
    """
    from PIL import Image, UnidentifiedImageError

    name = "image"
    if isinstance(image, (str, Path)):
        name = str(image)
        if not name:
            raise ImageError("an empty path was given; expected an image file")
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{name}: no such image file")
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > BOMB_PIXELS:
                    raise ImageError(f"{name}: {w}x{h} = {w * h} pixels; refused as a possible decompression bomb "
                                     f"(more than {BOMB_PIXELS} pixels)")
                if max_pixels and w * h > max_pixels:
                    if not downscale:
                        raise ImageError(f"{name}: {w}x{h} is {w * h / 1e6:.1f} MP, more than nailkit's limit of "
                                         f"{max_pixels / 1e6:.0f} MP per image; downscale it first")
                    target = _fit((w, h), max_pixels)
                    im.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale (no-op for other formats)
                    im.load()
                    image = im.copy()
                    if image.size[0] * image.size[1] > max_pixels:
                        image = image.resize(_fit(image.size, max_pixels), Image.BILINEAR, reducing_gap=2.0)
                else:
                    im.load()
                    image = im.copy()
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name}: refused as a possible decompression bomb ({exc})") from None
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
    ty = _linear_taps(src_h, out_h, fused)
    tx = _linear_taps(src_w, out_w, fused)
    out = np.empty((flat.shape[0], out_h, out_w), dtype=np.float32)
    for s in range(0, flat.shape[0], max(1, chunk)):
        out[s:s + chunk] = resize_window(flat[s:s + chunk], ty, tx, fused=fused)
    return out.reshape(lead + (out_h, out_w))


def resize_window(src: np.ndarray, taps_y: tuple, taps_x: tuple, rows: slice = slice(None),
                  cols: slice = slice(None), *, fused: bool = True) -> np.ndarray:
    """Rows ``rows`` × columns ``cols`` of ``bilinear_resize`` of (..., H, W) ``src``, computed alone.

    ``taps_y`` / ``taps_x`` are ``_linear_taps(H, out_h)`` / ``_linear_taps(W, out_w)`` of the full output size; each
    output pixel gets the same operations as in the full resize, so a window is bit-identical to the same window
    cut out of the full result (memory: the window only).
    """
    y0, y1, wy0, wy1 = (t[rows] for t in taps_y)
    x0, x1, wx0, wx1 = (t[cols] for t in taps_x)
    wy0, wy1 = wy0[:, None], wy1[:, None]
    mad = _fma32 if fused else (lambda a, b, c: (a * b + c).astype(np.float32))
    part = np.asarray(src, dtype=np.float32)
    # width pass on every source row once (the same per-pixel operations, shared between output rows)
    r = mad(part[..., x0], wx0, (part[..., x1] * wx1).astype(np.float32))
    return mad(r[..., y0, :], wy0, (r[..., y1, :] * wy1).astype(np.float32))


def preprocess(image: ImageLike, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (float32 NCHW [1,3,R,R] normalised input, (width, height) of the original image)."""
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    # one colour plane at a time: a float copy of one plane (4 bytes per pixel) is the largest temporary
    planes = []
    for c in range(3):
        if isinstance(rgb, _FloatImage):
            plane = np.asarray(rgb[:, :, c], dtype=np.float32)
        else:
            plane = rgb[:, :, c].astype(np.float32)
            plane /= np.float32(255.0)
        planes.append(bilinear_resize(plane, resolution, resolution))
        del plane
    resized = np.stack(planes)
    norm = (resized - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return norm[None].astype(np.float32), (w, h)


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
