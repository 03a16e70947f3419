"""nailkit.export.variants: lower resolution (position embeddings), detection-only, TorchScript, ExecuTorch status."""

from __future__ import annotations

import numpy as np
import pytest


def test_interpolate_pos_embed_identity_and_shape():
    import torch

    from nailkit.export.variants import interpolate_pos_embed

    t = torch.randn(1, 1 + 6 * 6, 8)
    same = interpolate_pos_embed(t, 6)
    assert torch.allclose(same, t, atol=1e-5)  # same grid: bicubic at integer positions reproduces the table
    small = interpolate_pos_embed(t, 4)
    assert small.shape == (1, 1 + 16, 8)
    assert torch.equal(small[:, 0], t[:, 0])  # the cls token is never interpolated
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 10, 8), 4)


def test_pos_embeds_frozen_exactly_as_rfdetr_interpolates(demo_model):
    """At 336 the frozen table equals bicubic+antialias interpolation of the 432 table, differs from the
    non-antialiased one (so the check can tell them apart), and export-mode outputs equal the eager network's."""
    from nailkit.export.variants import pos_embed_check

    r = pos_embed_check(demo_model, 336)
    assert r["grid"] == 28 and r["native_grid"] == 36
    assert r["frozen_vs_bicubic_antialias_max_abs"] == 0.0
    assert r["frozen_vs_bicubic_no_antialias_max_abs"] > 1e-3
    assert max(r["export_vs_eager_max_abs"].values()) < 1e-4


def test_invalid_resolution_is_refused(demo_model):
    from nailkit.export.variants import resolution_drift

    with pytest.raises(ValueError, match="multiple of"):
        resolution_drift(demo_model, [320], [])


@pytest.mark.slow
def test_detection_only_drops_the_head_and_keeps_boxes_and_logits(demo_model):
    import torch

    from nailkit.export.variants import detection_only_module, detection_only_parity
    from nailkit.bench.flops import count_flops
    from nailkit.data.samples import sample_images
    from nailkit.model.build import export_module

    r = 240  # a small valid size keeps this test cheap; the head is the same at every size
    mod = detection_only_module(demo_model, r)
    assert mod.inner.segmentation_head is None and demo_model.model.model.segmentation_head is not None
    with torch.no_grad():
        out = mod(torch.zeros(1, 3, r, r))
    assert len(out) == 2 and out[0].shape == (1, 200, 4) and out[1].shape == (1, 200, 3)
    p = detection_only_parity(demo_model, sample_images("photos")[:1], resolution=r)
    assert p["boxes_max_abs"] == 0.0 and p["logits_max_abs"] == 0.0
    assert 0 < p["seg_head_params"] < p["all_params"]
    # the head's FLOPs are really gone (export_module(segmentation=False) alone only trims outputs)
    full = count_flops(export_module(demo_model, r), r).flops
    trimmed = count_flops(export_module(demo_model, r, segmentation=False), r).flops
    det = count_flops(mod, r).flops
    assert trimmed == full and det < full


@pytest.mark.slow
def test_torchscript_saved_and_checked_in_fresh_process(demo_model, demo_ckpt, outputs_dir):
    from nailkit.export.variants import check_torchscript, ensure_torchscript

    path, meta = ensure_torchscript(demo_model, demo_ckpt, outputs_dir / "variants")
    assert path.is_file() and meta["resolution"] == 432
    again, _ = ensure_torchscript(demo_model, demo_ckpt, outputs_dir / "variants")
    assert again == path  # cached by checkpoint hash
    assert not getattr(demo_model, "_is_optimized_for_inference", False)  # rf left as it was
    r = check_torchscript(demo_model, path)
    assert r["fresh_process_imported"] == "modules: []"  # the child imported neither rfdetr nor nailkit
    assert max(r["max_abs"].values()) < 1e-4


def test_plain_depthwise_conv_is_numerically_identical():
    import torch
    from rfdetr.models.heads.segmentation import DepthwiseConvBlock

    from nailkit.export.variants import plain_depthwise_conv

    torch.manual_seed(0)
    blk = DepthwiseConvBlock(8).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        a = blk(x)
        with plain_depthwise_conv():
            b = blk(x)
        c = blk(x)  # restored afterwards
    assert torch.equal(a, b) and torch.equal(a, c)
    assert DepthwiseConvBlock._depthwise_conv.__name__ == "_depthwise_conv"


def test_executorch_status_says_why(monkeypatch):
    import importlib.util

    from nailkit.export.variants import executorch_status

    s = executorch_status()
    assert s["rfdetr_has_executorch_exporter"] is True and "ExecuTorch" in s["note"]
    real = importlib.util.find_spec
    for installed, reason in ((False, "not installed"), (True, "not wired into nailkit")):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, inst=installed: (object() if inst else None) if name == "executorch"
                            else real(name, *a))
        s = executorch_status()
        assert s["executorch_installed"] is installed and reason in s["why"], s


def test_resolution_drift_measures_other_resolutions_only(demo_model):
    from nailkit.export.variants import resolution_drift
    from nailkit.data.samples import sample_images

    d = resolution_drift(demo_model, [432, 408], sample_images("photos")[:1])
    assert list(d) == [408]  # the reference against itself is not reported as a result
    assert 0 <= d[408]["matched"] <= d[408]["of"] == 10
    assert d[408]["max_logit_abs"] > 0 and np.isfinite(d[408]["max_box_l1_px"])
