"""Export-time rewrites that keep rfdetr's two-stage query selection and its sine embedding on XNNPACK.

With the tent sampler (``nailkit.model.sampling``) the deformable attention is gather-free, and what still falls off
XNNPACK in a route-B fp32 file is rfdetr's *two-stage query selection* and the decoder's *sine embedding*
(measured on the trained demo, tent: 38 of 1643 ops on the default kernels, 5 partitions):

* ``gen_encoder_output_proposals``: the proposal grid and its validity mask are built at run time from
  ``meshgrid`` / comparisons / bool logic (BROADCAST_TO, GREATER, LESS, LOGICAL_AND/NOT, REDUCE_ANY, SELECT_V2) — yet
  without a padding mask they depend only on the feature map's shape;
* the gathers of the selected proposals and encoder features: ``torch.gather`` lowers to GATHER_ND with int32 index
  arithmetic (LESS, ADD, SELECT_V2, RESHAPE, CONCATENATION on int32);
* ``gen_sineembed_for_position``: ``dim_t = 10000 ** (2 (i // 2) / d)`` at run time (FLOOR_DIV, POW) and the
  sin/cos interleave through stride-2 slices (STRIDED_SLICE).

``make_xnnpack_friendly(net, resolution)`` rewrites those, in place, on the export-mode copy (never on the rfdetr
model itself), with the same results (exact in fp32 for finite inputs, shown by the tests):

* proposals and validity are computed once, eagerly, by rfdetr's own function at the export resolution and kept as
  buffers (constants in the graph); the memory is masked by a float multiply only when some proposal is invalid;
* each gather becomes a one-hot matmul: the TopK indices are cast to float (the only op besides TOPK_V2 itself that
  stays on the default kernels) and ``onehot[k, j] = relu(1 - |j - idx_k|)`` is exactly 1 at ``j = idx_k`` and 0
  elsewhere, so ``onehot @ x`` picks rows exactly (one term x·1, all others 0·y);
* the sine embedding uses ``dim_t`` computed eagerly by the same torch expression (a buffer), and
  ``sin(a)·even + cos(a)·odd`` with constant 0/1 masks instead of slicing (x·1 + y·0 = x exactly);
* DINOv2's windowed embeddings repeat the [CLS] token per window with ``Tensor.repeat`` (a BROADCAST_TO that cut
  the first 11 ops off into their own partition): concatenated copies instead.

Measured on the trained demo (route B fp32, 432): 1598 of 1600 ops on XNNPACK in 2 partitions — only TOPK_V2 and the
CAST of its indices stay on the default kernels (tent alone: 1605/1643 in 5; grid_sample: 1592/1935 in 13).

Needs ``two_stage``, ``bbox_reparam`` (proposals not unsigmoided, so no ``inf`` enters the one-hot matmul) and one
feature level with no padding mask — rfdetr's segmentation models as exported. ``nailkit.model.build.export_module(...,
sampling="xnn")`` applies it together with the tent sampler.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Any, Iterator

import torch
from torch import Tensor

#: the rfdetr module whose free functions are swapped while the transformer runs
import rfdetr.models.transformer as _T  # noqa: E402


def onehot_rows(index: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[..., K] integer indices → [..., K, n] float one-hot rows, with float ops only after one cast:
    ``relu(1 - |j - idx|)`` (exact for |idx| < 2**24)."""
    f = index.to(dtype)
    pos = torch.arange(n, dtype=dtype, device=index.device)
    return torch.relu(1.0 - torch.abs(pos - f.unsqueeze(-1)))


def sine_embedding(pos_tensor: Tensor, dim_t: Tensor, even: Tensor, odd: Tensor) -> Tensor:
    """rfdetr's ``gen_sineembed_for_position`` with ``dim_t`` and the sin/cos interleave as constants.

    Channel 2i is ``sin(p / dim_t[2i])``, channel 2i+1 ``cos(p / dim_t[2i+1])``: computed as
    ``sin(p / dim_t)·even + cos(p / dim_t)·odd`` (``even``/``odd`` 0/1 masks), the same numbers."""
    scale = 2 * math.pi

    def embed(c: Tensor) -> Tensor:
        a = (c * scale)[:, :, None] / dim_t
        return a.sin() * even + a.cos() * odd

    x, y = embed(pos_tensor[:, :, 0]), embed(pos_tensor[:, :, 1])
    if pos_tensor.size(-1) == 2:
        return torch.cat((y, x), dim=2)
    if pos_tensor.size(-1) == 4:
        return torch.cat((y, x, embed(pos_tensor[:, :, 2]), embed(pos_tensor[:, :, 3])), dim=2)
    raise ValueError(f"Unknown pos_tensor shape(-1):{pos_tensor.size(-1)}")


def sine_dim_t(dim: int) -> Tensor:
    """rfdetr's run-time ``dim_t``, evaluated eagerly by the same torch expression (bit-identical)."""
    dim_t = torch.arange(dim, dtype=torch.float32)
    return 10000 ** (2 * (dim_t // 2) / dim)


@contextlib.contextmanager
def _rewritten(tr: torch.nn.Module) -> Iterator[None]:
    """While the transformer runs: constant proposals, one-hot gathers after the (single) TopK, constant sine
    embedding. ``torch.topk`` is wrapped, not replaced, so ``nailkit.verify.parity.topk_probe`` (recording / forcing the
    selection) keeps working from outside."""
    orig_topk, orig_gather = torch.topk, torch.gather
    orig_props, orig_sine = _T.gen_encoder_output_proposals, _T.gen_sineembed_for_position
    state: dict[str, Any] = {}

    def topk(input, k, dim=-1, largest=True, sorted=True, *, out=None):  # noqa: A002
        res = orig_topk(input, k, dim=dim, largest=largest, sorted=sorted)
        state["indices"] = res[1]
        state.pop("onehot", None)
        return res

    def gather(input, dim, index, *args, **kw):  # noqa: A002
        idx = state.get("indices")
        if (idx is None or args or kw or dim != 1 or input.dim() != 3 or index.dim() != 3
                or tuple(index.shape[:2]) != tuple(idx.shape)):
            return orig_gather(input, dim, index, *args, **kw)
        n = input.shape[1]
        if state.get("onehot") is None or state["onehot"].shape[-1] != n:
            state["onehot"] = onehot_rows(idx, n, input.dtype)  # [B, K, n]
        return torch.matmul(state["onehot"], input)

    def proposals(memory, memory_padding_mask=None, spatial_shapes=None, unsigmoid=True):
        if memory_padding_mask is not None or unsigmoid or tr._xnn_proposals.shape[1] != memory.shape[1]:
            return orig_props(memory, memory_padding_mask, spatial_shapes, unsigmoid)
        out = memory if tr._xnn_all_valid else memory * tr._xnn_valid
        return out, tr._xnn_proposals.to(memory.dtype)

    def sine(pos_tensor, dim=128):
        if dim != tr._xnn_dim_t.shape[0]:
            return orig_sine(pos_tensor, dim)
        return sine_embedding(pos_tensor, tr._xnn_dim_t, tr._xnn_even, tr._xnn_odd)

    torch.topk, torch.gather = topk, gather
    _T.gen_encoder_output_proposals, _T.gen_sineembed_for_position = proposals, sine
    try:
        yield
    finally:
        torch.topk, torch.gather = orig_topk, orig_gather
        _T.gen_encoder_output_proposals, _T.gen_sineembed_for_position = orig_props, orig_sine


def _forward(self, *args, **kwargs):
    with _rewritten(self):
        return type(self).forward(self, *args, **kwargs)


@contextlib.contextmanager
def _repeat_as_concat() -> Iterator[None]:
    """``Tensor.repeat`` as concatenated copies (the same values): DINOv2's windowed embeddings repeat the
    [CLS]+position token once per window, which lowers to a BROADCAST_TO that XNNPACK does not take and that cuts the
    first partition off (a multiply by ones lowers to BROADCAST_TO too); CONCATENATION is delegated."""
    orig = torch.Tensor.repeat

    def repeat(self, *sizes):
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        if len(sizes) != self.dim() or any(int(r) < 1 for r in sizes):
            return orig(self, *sizes)
        out = self
        for d, r in enumerate(sizes):
            if int(r) > 1:
                out = torch.cat([out] * int(r), dim=d)
        return out

    torch.Tensor.repeat = repeat
    try:
        yield
    finally:
        torch.Tensor.repeat = orig


def _embeddings_forward(self, *args, **kwargs):
    with _repeat_as_concat():
        return type(self).forward(self, *args, **kwargs)


def make_xnnpack_friendly(net: torch.nn.Module, resolution: int) -> torch.nn.Module:
    """Rewrite the export-mode network ``net`` (an rfdetr ``LWDETR`` after ``prepare_export_graph``) in place; see
    the module docstring. Runs one eager forward at ``resolution`` to record the proposal grid. Returns ``net``."""
    tr = getattr(net, "transformer", None)
    if tr is None or not getattr(tr, "two_stage", False) or not getattr(tr, "bbox_reparam", False):
        raise ValueError("the XNNPACK-friendly selection needs a two-stage rfdetr transformer with bbox_reparam")
    seen: list[tuple[Tensor, Tensor]] = []
    orig = _T.gen_encoder_output_proposals

    def record(memory, memory_padding_mask=None, spatial_shapes=None, unsigmoid=True):
        if memory_padding_mask is not None or unsigmoid:
            raise ValueError("the XNNPACK-friendly selection needs proposals without a padding mask, not unsigmoided")
        if len(spatial_shapes) != 1:
            raise ValueError(f"the XNNPACK-friendly selection supports one feature level, got {len(spatial_shapes)}")
        out, props = orig(memory, memory_padding_mask, spatial_shapes, unsigmoid)
        ones = torch.ones_like(memory[..., :1])
        valid = orig(ones, None, spatial_shapes, unsigmoid)[0]  # 1 where valid, 0 where masked
        seen.append((props.detach().clone(), valid.detach().clone()))
        return out, props

    dev = next(net.parameters()).device
    _T.gen_encoder_output_proposals = record
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, int(resolution), int(resolution), device=dev))
    finally:
        _T.gen_encoder_output_proposals = orig
    if len(seen) != 1:
        raise ValueError(f"expected one two-stage selection per forward, saw {len(seen)}")
    props, valid = seen[0]
    dim = int(tr.d_model) // 2
    channel = torch.arange(dim)
    tr.register_buffer("_xnn_proposals", props, persistent=False)
    tr.register_buffer("_xnn_valid", valid, persistent=False)
    tr.register_buffer("_xnn_dim_t", sine_dim_t(dim).to(dev), persistent=False)
    tr.register_buffer("_xnn_even", (channel % 2 == 0).to(torch.float32).to(dev), persistent=False)
    tr.register_buffer("_xnn_odd", (channel % 2 == 1).to(torch.float32).to(dev), persistent=False)
    tr._xnn_all_valid = bool((valid == 1).all())
    tr.forward = types.MethodType(_forward, tr)
    for m in net.modules():  # DINOv2's windowed embeddings (the [CLS] token repeated per window)
        if type(m).__name__.endswith("Embeddings") and hasattr(m, "cls_token"):
            m.forward = types.MethodType(_embeddings_forward, m)
    return net


def is_xnnpack_friendly(net: torch.nn.Module) -> bool:
    tr = getattr(net, "transformer", None)
    return tr is not None and hasattr(tr, "_xnn_dim_t")
