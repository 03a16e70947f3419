"""Gather-free deformable-attention sampling, as an export-time module swap.

rfdetr's decoder cross-attention (``MSDeformAttn``) samples its value map with ``F.grid_sample`` (bilinear, zeros
padding, align_corners=False). Converters lower that to index math — GATHER/GATHER_ND, SELECT, LESS, LOGICAL_AND,
CAST — which XNNPACK does not take, so every decoder layer cuts the delegated region in pieces.

The "tent" formulation computes the same bilinear sample as a weighted sum over *all* pixels, with weights that are
products of two 1-D tent (hat) functions:

    w_x(x) = max(0, 1 - |x - ix|),   w_y(y) = max(0, 1 - |y - iy|),   sample = Σ_y Σ_x w_y(y) w_x(x) V[y, x]

with ``ix = ((gx + 1)·W - 1)/2`` the pixel coordinate of the grid point (align_corners=False). The tent is non-zero
only at the two integer neighbours ``floor(ix)`` and ``floor(ix)+1``, where it equals the bilinear weights; a
neighbour outside ``[0, W-1]`` simply has no pixel to weight, which *is* zeros padding. So the result is exact up to
float rounding, and uses only SUB, ABS, RELU/MAXIMUM, MUL and (BATCH_)MATMUL — all float ops XNNPACK delegates. In the
deformable core, the attention weights are folded into the weight map first (one small matmul over the sampling
points), so each head does one [Q, H·W] × [H·W, d] matmul. For rfdetr SegPreview (1 level of 36×36, 16 heads × 16
dims, 2 points, 200 queries) that is 0.13 GFLOP per decoder layer.

``swap_deformable_sampling(module, "tent")`` switches every ``MSDeformAttn`` in a module tree to ``TentMSDeformAttn``
in place (same parameters, same ``_export`` flag; only the sampling differs). ``nailkit.model.build.export_module(...,
sampling="tent")`` applies it to the export-mode copy; the rfdetr model itself is never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from rfdetr.models.ops.modules.ms_deform_attn import MSDeformAttn
from torch import Tensor

#: Sampling formulations ``swap_deformable_sampling`` knows: rfdetr's own, and the gather-free tent matmul.
SAMPLERS = ("grid_sample", "tent")


def _tent(coord: Tensor, size: int) -> Tensor:
    """1-D bilinear (tent) weights of pixel coordinates ``coord`` [...] over the pixels 0..size-1 → [..., size]."""
    pix = torch.arange(size, dtype=coord.dtype, device=coord.device)
    return torch.relu(1.0 - torch.abs(coord.unsqueeze(-1) - pix))


def _unnormalize(g: Tensor, size: int) -> Tensor:
    """grid_sample's unnormalisation for align_corners=False: [-1, 1] → pixel coordinate (same formula as ATen)."""
    return ((g + 1.0) * size - 1.0) / 2.0


def tent_grid_sample(value: Tensor, grid: Tensor) -> Tensor:
    """Gather-free ``F.grid_sample(value, grid, mode='bilinear', padding_mode='zeros', align_corners=False)``.

    value: [N, C, H, W]; grid: [N, Hg, Wg, 2] (x, y in [-1, 1], any finite value allowed) → [N, C, Hg, Wg].
    """
    n, c, h, w = value.shape
    _, hg, wg, _ = grid.shape
    ix = _unnormalize(grid[..., 0], w).reshape(n, hg * wg)
    iy = _unnormalize(grid[..., 1], h).reshape(n, hg * wg)
    wx = _tent(ix, w)  # [N, G, W]
    wy = _tent(iy, h)  # [N, G, H]
    weights = (wy.unsqueeze(-1) * wx.unsqueeze(-2)).reshape(n, hg * wg, h * w)  # [N, G, H*W]
    out = torch.matmul(weights, value.reshape(n, c, h * w).transpose(1, 2))  # [N, G, C]
    return out.transpose(1, 2).reshape(n, c, hg, wg)


def tent_ms_deform_attn_core(value: Tensor, shapes_hw: list[tuple[int, int]], sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """Drop-in for rfdetr's ``ms_deform_attn_core_pytorch`` with the tent sampler.

    value: [B, heads, d, ΣHW]; sampling_locations in [0, 1]: [B, Q, heads, L·P, 2] (export layout) or
    [B, Q, heads, L, P, 2]; attention_weights: [B, Q, heads, L·P] (softmaxed). Returns [B, Q, heads·d].
    """
    b, n_heads, d, _ = value.shape
    q = sampling_locations.shape[1]
    n_levels = len(shapes_hw)
    if sampling_locations.ndim == 6:
        sampling_locations = sampling_locations.flatten(3, 4)
    n_points = sampling_locations.shape[3] // n_levels
    # [B, Q, heads, L*P, 2] -> [B, heads, Q, L*P, 2];  weights [B, Q, heads, L*P] -> [B, heads, Q, L*P]
    loc = sampling_locations.transpose(1, 2)
    att = attention_weights.transpose(1, 2)
    out = None
    start = 0
    for lvl, (h, w) in enumerate(shapes_hw):
        h, w = int(h), int(w)
        sl = slice(lvl * n_points, (lvl + 1) * n_points)
        # grid = 2·loc - 1 as rfdetr does, then grid_sample's own unnormalisation (keeps the rounding identical).
        ix = _unnormalize(2.0 * loc[..., sl, 0] - 1.0, w)  # [B, heads, Q, P]
        iy = _unnormalize(2.0 * loc[..., sl, 1] - 1.0, h)
        wx = _tent(ix, w)  # [B, heads, Q, P, W]
        wy = _tent(iy, h) * att[..., sl].unsqueeze(-1)  # [B, heads, Q, P, H], attention folded in
        weights = torch.matmul(wy.transpose(-1, -2), wx)  # [B, heads, Q, H, W] = Σ_p a_p wy_p ⊗ wx_p
        v = value[..., start:start + h * w]  # [B, heads, d, HW]
        part = torch.matmul(weights.reshape(b, n_heads, q, h * w), v.transpose(-1, -2))  # [B, heads, Q, d]
        out = part if out is None else out + part
        start += h * w
    assert out is not None
    return out.transpose(1, 2).reshape(b, q, n_heads * d)


class TentMSDeformAttn(MSDeformAttn):
    """``MSDeformAttn`` with the gather-free tent sampler; same parameters and the same math otherwise.

    Made by ``swap_deformable_sampling`` (a class swap in place), never constructed directly for a checkpoint.
    """

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: Tensor,
                input_level_start_index: Tensor, input_padding_mask: Tensor | None = None,
                input_spatial_shapes_hw: list[tuple[int, int]] | None = None) -> Tensor:
        batch_size, len_query, _ = query.shape
        _, len_input, _ = input_flatten.shape
        if input_spatial_shapes_hw is None:  # eager callers without the Python pairs: read them once
            input_spatial_shapes_hw = [(int(h), int(w)) for h, w in input_spatial_shapes.tolist()]
        if sum(h * w for h, w in input_spatial_shapes_hw) != len_input:
            raise ValueError("input_spatial_shapes must match the flattened input length")
        n_ref_levels = reference_points.shape[2]
        if n_ref_levels not in (1, self.n_levels):
            raise ValueError(f"reference_points level dim must be 1 or n_levels={self.n_levels}, got {n_ref_levels}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        lp = self.n_levels * self.n_points
        attention_weights = F.softmax(self.attention_weights(query).view(batch_size, len_query, self.n_heads, lp), -1)
        # rfdetr's eager (rank-6) formula: broadcasting adds instead of repeat_interleave'd copies (no TILE /
        # BROADCAST_TO in the graph), the same elementwise operations in the same order, so the same values.
        offsets = self.sampling_offsets(query).view(batch_size, len_query, self.n_heads, self.n_levels,
                                                    self.n_points, 2)
        ref = reference_points[:, :, None, :, None, :]  # [B, Q, 1, L|1, 1, 2|4]
        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor([[float(w), float(h)] for h, w in input_spatial_shapes_hw],
                                      dtype=offsets.dtype, device=offsets.device)  # [L, 2] = (W, H) per level
            sampling_locations = ref + offsets / normalizer[:, None, :]
        elif reference_points.shape[-1] == 4:
            sampling_locations = ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} "
                             f"instead.")
        value = value.transpose(1, 2).contiguous().view(batch_size, self.n_heads, self.d_model // self.n_heads,
                                                        len_input)
        output = tent_ms_deform_attn_core(value, input_spatial_shapes_hw, sampling_locations, attention_weights)
        return self.output_proj(output)


_CLASSES = {"grid_sample": MSDeformAttn, "tent": TentMSDeformAttn}


def swap_deformable_sampling(module: torch.nn.Module, method: str = "tent") -> int:
    """Switch every ``MSDeformAttn`` under ``module`` to the named sampler, in place. Returns how many were switched.

    ``"tent"``: gather-free matmul sampler (``TentMSDeformAttn``); ``"grid_sample"``: back to rfdetr's own class.
    Parameters, buffers and the export flag are kept (a class swap), so the same weights serve both.
    """
    if method not in _CLASSES:
        raise ValueError(f"unknown deformable sampling {method!r}; known: {list(SAMPLERS)}")
    cls = _CLASSES[method]
    n = 0
    for m in module.modules():
        if isinstance(m, MSDeformAttn) and type(m) is not cls:
            m.__class__ = cls
            n += 1
    return n


def count_samplers(module: torch.nn.Module) -> dict[str, int]:
    """How many deformable-attention modules use each sampler (``{"grid_sample": n, "tent": m}``)."""
    out = {k: 0 for k in SAMPLERS}
    for m in module.modules():
        if isinstance(m, TentMSDeformAttn):
            out["tent"] += 1
        elif isinstance(m, MSDeformAttn):
            out["grid_sample"] += 1
    return out
