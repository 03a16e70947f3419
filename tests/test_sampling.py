"""The gather-free (tent) deformable sampling is exact against grid_sample / rfdetr's core, and swapping it into the
export module leaves the model's outputs unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from nailkit.model.sampling import (
    SAMPLERS,
    TentMSDeformAttn,
    count_samplers,
    swap_deformable_sampling,
    tent_grid_sample,
    tent_ms_deform_attn_core,
)


@pytest.mark.parametrize("shape,grid_hw,spread", [((2, 3, 7, 9), (4, 5), 1.0), ((3, 16, 36, 36), (200, 2), 1.3),
                                                  ((1, 1, 1, 1), (3, 3), 1.5), ((2, 4, 5, 1), (6, 1), 2.5)])
def test_tent_grid_sample_equals_grid_sample(shape, grid_hw, spread):
    g = torch.Generator().manual_seed(hash((shape, grid_hw)) % 2 ** 31)
    value = torch.randn(*shape, generator=g)
    # points inside, on the border band and well outside the map (zeros padding must hold everywhere)
    grid = (torch.rand(shape[0], *grid_hw, 2, generator=g) * 2 - 1) * spread
    ref = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = tent_grid_sample(value, grid)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


def test_tent_grid_sample_exact_at_pixel_centres_and_zero_outside():
    value = torch.arange(12.0).view(1, 1, 3, 4)
    # pixel centre (x=1, y=2) -> value 9; far outside -> 0; half a pixel beyond the border -> half of the edge pixel
    xs = torch.tensor([(2 * 1 + 1) / 4 - 1, 5.0, (2 * 3 + 2) / 4 - 1])
    ys = torch.tensor([(2 * 2 + 1) / 3 - 1, 0.0, (2 * 0 + 1) / 3 - 1])
    grid = torch.stack([xs, ys], -1).view(1, 1, 3, 2)
    out = tent_grid_sample(value, grid).flatten()
    ref = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False).flatten()
    assert out.tolist() == pytest.approx([9.0, 0.0, 1.5], abs=1e-6)
    assert out.tolist() == pytest.approx(ref.tolist(), abs=1e-6)


@pytest.mark.parametrize("rank6", [False, True])
def test_tent_core_equals_rfdetr_core(rank6):
    from rfdetr.models.ops.functions import ms_deform_attn_core_pytorch

    g = torch.Generator().manual_seed(1 + rank6)
    b, q, heads, d, pts = 2, 13, 4, 8, 3
    shapes = [(6, 7), (3, 4), (2, 2)]
    value = torch.randn(b, heads, d, sum(h * w for h, w in shapes), generator=g)
    loc = torch.rand(b, q, heads, len(shapes) * pts, 2, generator=g) * 1.4 - 0.2
    att = torch.softmax(torch.randn(b, q, heads, len(shapes) * pts, generator=g), -1)
    if rank6:
        loc = loc.view(b, q, heads, len(shapes), pts, 2)
    ref = ms_deform_attn_core_pytorch(value, torch.tensor(shapes), loc, att, value_spatial_shapes_hw=shapes)
    out = tent_ms_deform_attn_core(value, shapes, loc, att)
    assert out.shape == ref.shape == (b, q, heads * d)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("export", [False, True])
@pytest.mark.parametrize("ref_dim,ref_levels", [(2, 2), (4, 2), (4, 1)])
def test_tent_module_equals_msdeformattn(export, ref_dim, ref_levels):
    from rfdetr.models.ops.modules import MSDeformAttn

    torch.manual_seed(3)
    attn = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2).eval()
    with torch.no_grad():  # non-trivial offsets/attention (rfdetr initialises them to constants)
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    if export:
        attn.export()
    shapes_hw = [(5, 6), (3, 3)]
    spatial = torch.tensor(shapes_hw)
    start = torch.tensor([0, 30])
    query = torch.randn(2, 7, 64)
    src = torch.randn(2, 39, 64)
    ref_pts = torch.rand(2, 7, ref_levels, ref_dim) * 0.8 + 0.1
    tent = copy.deepcopy(attn)
    assert swap_deformable_sampling(tent, "tent") == 1
    assert isinstance(tent, TentMSDeformAttn) and tent._export == export
    with torch.no_grad():
        a = attn(query, ref_pts, src, spatial, start, input_spatial_shapes_hw=shapes_hw)
        b = tent(query, ref_pts, src, spatial, start, input_spatial_shapes_hw=shapes_hw)
    assert (a - b).abs().max().item() <= 1e-5


def test_swap_is_in_place_reversible_and_validated():
    from rfdetr.models.ops.modules import MSDeformAttn

    net = torch.nn.Sequential(MSDeformAttn(32, 1, 4, 2), torch.nn.Linear(2, 2), MSDeformAttn(32, 1, 4, 2))
    params = [p.data_ptr() for p in net.parameters()]
    assert count_samplers(net) == {"grid_sample": 2, "tent": 0}
    assert swap_deformable_sampling(net, "tent") == 2
    assert swap_deformable_sampling(net, "tent") == 0
    assert count_samplers(net) == {"grid_sample": 0, "tent": 2}
    assert [p.data_ptr() for p in net.parameters()] == params  # same tensors, no copy
    assert swap_deformable_sampling(net, "grid_sample") == 2
    assert type(net[0]) is MSDeformAttn
    assert set(SAMPLERS) == {"grid_sample", "tent"}
    with pytest.raises(ValueError, match="unknown deformable sampling"):
        swap_deformable_sampling(net, "gather")


def test_export_module_with_tent_sampling_matches(demo_model):
    from nailkit.model.build import export_module

    base = export_module(demo_model)
    tent = export_module(demo_model, sampling="tent")
    assert count_samplers(base) == {"grid_sample": 4, "tent": 0}
    assert count_samplers(tent) == {"grid_sample": 0, "tent": 4}
    assert count_samplers(demo_model.model.model)["tent"] == 0  # the loaded model is untouched
    x = torch.randn(1, 3, base.resolution, base.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(x)
        out = tent(x)
    assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in ref]
    for name, a, b in zip(base.output_names, ref, out):
        assert (a - b).abs().max().item() <= 1e-4, name
