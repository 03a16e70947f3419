"""FLOPs of one forward pass, and the fraction of a GEMM ceiling a measured latency achieves.

``count_flops`` runs ``torch.utils.flop_counter.FlopCounterMode`` on the export-mode module at one resolution. It
counts matmul/conv/attention only (mm, addmm, bmm, baddbmm, convolution, SDPA); every other aten op that ran
(grid_sample of the deformable attention, softmax, GELU, layer norm, interpolation, top-k, ...) is listed with its
call count under ``uncounted_ops``, so the count is a lower bound and says exactly what it left out. CPU attention
runs as ``_scaled_dot_product_flash_attention_for_cpu``, which torch's registry lacks: it is counted here with the
same formula as the other SDPA kernels (``_sdpa_cpu_flop``). ``flop_key`` names one counted graph (resolution,
detection-only, export options) in a benchmark result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from nailkit.model.build import export_suffix


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one scaled-dot-product attention: Q·Kᵀ (2·B·H·L·S·E) plus P·V (2·B·H·L·S·Ev)."""
    b, h, s_q, d_q = query_shape
    _b2, _h2, s_k, _d2 = key_shape
    _b3, _h3, _s3, d_v = value_shape
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


@dataclass
class FlopCount:
    resolution: int
    flops: int  # counted FLOPs (1 multiply-add = 2 FLOPs)
    by_op: dict[str, int]
    uncounted_ops: dict[str, int]  # aten ops that ran but carry no FLOP formula -> call count

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def summary(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "gflops": self.gflops, "gmacs": self.macs / 1e9,
                "by_op_gflops": {k: v / 1e9 for k, v in sorted(self.by_op.items(), key=lambda kv: -kv[1])},
                "uncounted_ops": dict(sorted(self.uncounted_ops.items(), key=lambda kv: -kv[1]))}


#: aten ops that move/reshape data or are free; left out of ``uncounted_ops`` to keep that list about arithmetic.
_VIEW_LIKE = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
              "slice", "select", "clone", "contiguous", "detach", "alias", "split", "split_with_sizes", "unbind",
              "as_strided", "empty", "zeros", "ones", "full", "arange", "_to_copy", "copy_", "lift_fresh",
              "new_zeros", "new_empty", "new_ones", "view_as", "flatten", "cat", "stack", "index", "gather",
              "chunk", "sym_size", "sym_numel", "scalar_tensor", "zeros_like", "ones_like", "empty_like",
              "fill_", "_local_scalar_dense", "item", "expand_as", "unfold", "narrow", "repeat", "tile"}


def count_flops(module, resolution: int, *, x=None) -> FlopCount:
    """Count the FLOPs of one forward of ``module`` (an export-mode module) on a [1,3,R,R] input.

    Only ops with a FLOP formula in ``torch.utils.flop_counter`` are counted, plus CPU flash attention
    (``_scaled_dot_product_flash_attention_for_cpu``, registered here). Every other arithmetic op is reported in
    ``uncounted_ops`` with its call count.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    counted_names = {str(k).split(".")[1] if "." in str(k) else str(k) for k in list(flop_registry) + list(extra)}

    seen: dict[str, int] = {}

    class _Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            seen[name] = seen.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    if x is None:
        x = torch.zeros(1, 3, int(resolution), int(resolution))
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    # FlopCounterMode's module tracker trips over parameters that require grad under no_grad, so switch
    # requires_grad off instead (and restore it).
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with counter, _Census():
            module(x)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op).replace("aten.", "")] = int(n)
    uncounted = {k: v for k, v in seen.items()
                 if k not in counted_names and k.rstrip("_") not in _VIEW_LIKE and k not in _VIEW_LIKE}
    return FlopCount(resolution=int(resolution), flops=int(counter.get_total_flops()), by_op=by_op,
                     uncounted_ops=uncounted)


def flop_key(resolution: int, segmentation: bool, options: Optional[Mapping[str, Any]] = None) -> int | str:
    """The key of one counted graph: the resolution (negative: detection-only); with export options a string, e.g.
    ``"432_tent"``, ``"432_mq20"`` (``nailkit.model.build.export_suffix``)."""
    base = int(resolution) if segmentation else -int(resolution)
    tag = export_suffix(**(options or {}))
    return f"{base}{tag}" if tag else base


def achieved_fraction(flops: float, latency_ms: float, peak_gflops: float) -> float:
    """Fraction of a GEMM ceiling a run achieves: (flops / latency) / peak."""
    if latency_ms <= 0 or peak_gflops <= 0:
        raise ValueError(f"latency and peak must be positive; got {latency_ms} ms, {peak_gflops} GFLOP/s")
    return float(flops) / (latency_ms / 1000.0) / (peak_gflops * 1e9)
