"""nailkit.portable.preprocess equals rfdetr's own preprocessing (torchvision resize without antialias + ImageNet norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from nailkit.data.samples import sample_images
from nailkit.portable.preprocess import (IMAGENET_MEAN, IMAGENET_STD, ImageError, bilinear_resize, load_image, preprocess,
                                to_nhwc)

R = 432
#: PyTorch's CPU kernels are compiled with fused multiply-add for AVX2/AVX512 (and ARM); the DEFAULT build is not.
TORCH_USES_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def rfdetr_reference(img: Image.Image, resolution: int = R) -> np.ndarray:
    """What rfdetr 1.11.2 RFDETR.predict() feeds the network for a PIL image (detr.py predict):
    convert('RGB') → uint8 CHW → /255 → F.resize(antialias=False) → F.normalize(ImageNet)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    t = torch.from_numpy(np.array(img, dtype=np.uint8).transpose(2, 0, 1)).to(torch.float32) / torch.tensor(255.0)
    t = TF.resize(t, [resolution, resolution], antialias=False)
    t = TF.normalize(t[None], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return t.numpy()


@pytest.mark.parametrize("path", sample_images(), ids=lambda p: p.name)
def test_preprocess_equals_rfdetr_on_sample_images(path):
    x, size = preprocess(path, R)
    with Image.open(path) as im:
        ref = rfdetr_reference(im)
        assert size == im.size
    assert x.shape == (1, 3, R, R) and x.dtype == np.float32
    assert np.abs(x - ref).max() <= 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_mode_conversions_match_pil_convert_rgb(mode):
    """RGBA/LA drop alpha, L/P/CMYK become RGB, exactly as rfdetr's img.convert('RGB')."""
    with Image.open(sample_images(kind="photos")[0]) as im:
        base = im.convert("RGB")
    if mode == "RGBA":
        arr = np.array(base)
        alpha = np.linspace(0, 255, arr.shape[1], dtype=np.uint8)[None, :].repeat(arr.shape[0], 0)
        img = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    else:
        img = base.convert(mode)
    x, size = preprocess(img, 240)
    assert size == img.size
    assert np.abs(x - rfdetr_reference(img, 240)).max() <= 1e-5
    expected = _rgb_oracle(img)  # computed from the pixel data, not with PIL's convert (load_image's own tool)
    if expected is not None:
        assert np.array_equal(load_image(img), expected)


def _rgb_oracle(img):
    """What RGB must come out of ``img``, from its raw bands: alpha dropped, gray repeated, palette looked up."""
    a = np.array(img)
    if img.mode == "RGBA":
        return a[..., :3]
    if img.mode == "L":
        return np.stack([a] * 3, -1)
    if img.mode == "LA":
        return np.stack([a[..., 0]] * 3, -1)
    if img.mode == "P":
        return np.array(img.getpalette(), np.uint8).reshape(-1, 3)[a]
    return None  # CMYK: PIL's own colour conversion is the definition; preprocess is checked against rfdetr above


def test_numpy_inputs_grayscale_rgba_and_float():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    assert np.array_equal(load_image(gray), np.stack([gray] * 3, -1))
    assert np.array_equal(load_image(gray[:, :, None]), np.stack([gray] * 3, -1))
    rgba = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    assert np.array_equal(load_image(rgba), rgba[:, :, :3])
    f = rng.random((50, 70, 3)).astype(np.float32)
    # float images in [0,1] are fed straight through, as rfdetr does (F.to_tensor keeps float arrays as they are)
    x, size = preprocess(f, 48)
    ref = TF.normalize(TF.resize(torch.from_numpy(f.transpose(2, 0, 1)), [48, 48], antialias=False),
                       IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist()).numpy()[None]
    assert size == (70, 50) and np.abs(x - ref).max() <= 1e-5


def test_bilinear_resize_is_bit_exact_with_torch_interpolate():
    """Mask upsampling must agree bit for bit, so thresholding at 0 gives identical masks (same FMA use as torch)."""
    g = torch.Generator().manual_seed(0)
    for (h, w, oh, ow) in [(108, 108, 480, 640), (108, 108, 427, 640), (108, 108, 108, 108), (27, 27, 300, 301)]:
        src = torch.randn(6, h, w, generator=g)
        ref = torch.nn.functional.interpolate(src[:, None], size=(oh, ow), mode="bilinear",
                                              align_corners=False)[:, 0].numpy()
        out = bilinear_resize(src.numpy(), oh, ow, fused=TORCH_USES_FMA)
        assert out.shape == ref.shape
        assert np.array_equal(out, ref), f"{(h, w, oh, ow)}: {(out != ref).mean():.3%} pixels differ"


def test_bilinear_resize_downscale_close_to_torch():
    src = torch.randn(3, 480, 640, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.interpolate(src[None], size=(R, R), mode="bilinear", align_corners=False)[0].numpy()
    assert np.abs(bilinear_resize(src.numpy(), R, R) - ref).max() <= 1e-5


def test_to_nhwc():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    y = to_nhwc(x)
    assert y.shape == (2, 4, 5, 3) and y.flags.c_contiguous and y[1, 2, 3, 0] == x[1, 0, 2, 3]


def test_unreadable_and_bad_images_raise_clear_errors(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg.*not a readable image"):
        load_image(bad)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="float image values must lie in"):
        load_image(np.full((20, 20, 3), 2.0, np.float32))
    with pytest.raises(ImageError, match="not an image"):
        load_image(np.zeros((20, 20, 5), np.uint8))
    with pytest.raises(ImageError, match="outside the supported range"):
        load_image(np.zeros((4, 20, 3), np.uint8))
    with pytest.raises(ImageError, match="16-bit|not supported"):
        load_image(Image.new("I;16", (20, 20)))
