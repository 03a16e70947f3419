"""fp16 safety: the activations that feed LayerNorm / softmax, and a scale-invariant LayerNorm (SafeLayerNorm).

A phone's GPU delegate (Mali/Adreno) reduces in fp16 whatever the file's dtype; fp16's largest finite value is 65504.

* ``activation_maxima(module, inputs)`` records, in PyTorch, the largest |activation| that feeds each LayerNorm and
  softmax, and for LayerNorm the largest per-row sum of squared deviations in the domain where the reduction happens.
* ``safe_layernorm_class()`` / ``replace_layernorms(module)``: SafeLayerNorm reduces in a down-scaled domain (exact:
  LayerNorm is scale invariant); the GPU graphs use it (``nailkit.gpu.patches``).

The report over the GPU target's graphs A and B (before/after SafeLayerNorm) is ``nailkit.gpu.verify.fp16_safety``.
Imports without torch (torch is imported on first use).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

FP16_MAX = 65504.0


def _ln_stats(x, dim: int, domain_scale=None) -> dict[str, float]:
    """max|x| and the largest per-row Σ(x−μ)² in the reduction domain (x/S when ``domain_scale`` is given)."""
    x = x.detach().float()
    xr = x / domain_scale if domain_scale is not None else x
    d = xr - xr.mean(dim, keepdim=True)
    return {"max_abs_in": float(x.abs().max()), "max_abs_reduced": float(xr.abs().max()),
            "max_sumsq": float((d * d).sum(dim).max()), "max_sum_sq_raw": float((xr * xr).sum(dim).max()),
            "channels": int(x.shape[dim])}


class _Recorder:
    active: Optional["_Recorder"] = None

    def __init__(self) -> None:
        self.sites: dict[str, dict[str, Any]] = {}
        self.stack: list[str] = []

    def add(self, kind: str, stats: dict[str, float]) -> None:
        where = self.stack[-1] if self.stack else "<top>"
        key = f"{kind}@{where}"
        cur = self.sites.get(key)
        if cur is None:
            self.sites[key] = dict(stats, kind=kind, module=where, calls=1)
        else:
            cur["calls"] += 1
            for k, v in stats.items():
                if isinstance(v, float):
                    cur[k] = max(cur[k], v)


_SAFE_LN_CLASS = None


def _make_safe_ln_class():
    import torch
    from torch import nn

    class SafeLayerNorm(nn.Module):
        """LayerNorm over the last dim that reduces in a down-scaled domain: exact (LayerNorm is scale invariant).

        S = max(1, max|x| / 8) per row (the litert-samples' adaptive scale): a row of C values then has
        Σ(x/S)² ≤ 64·C (16384 for C=256), below fp16's 65504, and rows with small values are untouched (S = 1).
        """

        def __init__(self, ln: nn.Module, channels_first: bool = False) -> None:
            super().__init__()
            self.weight = ln.weight
            self.bias = ln.bias
            self.eps = float(ln.eps)
            self.channels_first = channels_first
            self.normalized_shape = tuple(ln.normalized_shape)

        def forward(self, x):
            dim = 1 if self.channels_first else -1
            amax = x.abs().amax(dim, keepdim=True)
            s = (amax * 0.125).clamp(min=1.0)
            xs = x / s
            if _Recorder.active is not None:
                _Recorder.active.add("layer_norm", _ln_stats(x, dim, s))
            mu = xs.mean(dim, keepdim=True)
            d = xs - mu
            var = (d * d).mean(dim, keepdim=True)
            y = d * torch.rsqrt(var + self.eps / (s * s))  # (x-μ)/S / sqrt(var/S² + eps/S²) == LayerNorm(x)
            if self.weight is not None:
                if self.channels_first:
                    y = y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)
                else:
                    y = y * self.weight + self.bias
            return y

    return SafeLayerNorm


def safe_layernorm_class():
    """The SafeLayerNorm nn.Module class (built on first use, so this module imports without torch)."""
    global _SAFE_LN_CLASS
    if _SAFE_LN_CLASS is None:
        _SAFE_LN_CLASS = _make_safe_ln_class()
    return _SAFE_LN_CLASS


def replace_layernorms(module) -> int:
    """Swap every nn.LayerNorm (and rfdetr's channels-first projector LayerNorm) for SafeLayerNorm, in place."""
    from torch import nn

    cls = safe_layernorm_class()
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, cls):
                continue
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, cls(child, channels_first=False))
                n += 1
            elif type(child).__name__ == "LayerNorm" and type(child).__module__.endswith("projector"):
                setattr(parent, name, cls(child, channels_first=True))
                n += 1
    return n


def activation_maxima(module, inputs: Sequence[Any]) -> dict[str, Any]:
    """Run ``module(*inputs)`` and record, per LayerNorm/softmax site, the largest activation feeding it.

    Returns {"sites": {site: stats}, "layer_norm_max_abs_in", "layer_norm_max_abs_reduced", "layer_norm_max_sumsq",
    "softmax_max_abs_in", "fp16_overflow_sites"}: for a plain LayerNorm the reduction domain is x itself; for
    SafeLayerNorm it is x/S. A site overflows fp16 when its Σ(x−μ)² (or Σx²) exceeds 65504.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    rec = _Recorder()

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.layer_norm:
                shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
                x = args[0]
                dims = tuple(range(x.dim() - len(shape), x.dim()))
                xx = x.detach().float().flatten(dims[0]) if len(dims) > 1 else x
                rec.add("layer_norm", _ln_stats(xx, -1))
            elif func in (torch.softmax, F.softmax, torch.Tensor.softmax):
                x = args[0]
                rec.add("softmax", {"max_abs_in": float(x.detach().abs().max())})
            return func(*args, **kwargs)

    def pre(mod, _inp):
        rec.stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod, _inp, _out):
        rec.stack.pop()

    names = {id(m): n for n, m in module.named_modules()}
    hooks = []
    for m in module.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    _Recorder.active = rec
    try:
        with torch.no_grad(), Mode():
            module(*inputs)
    finally:
        _Recorder.active = None
        for h in hooks:
            h.remove()
    ln = [v for v in rec.sites.values() if v["kind"] == "layer_norm"]
    sm = [v for v in rec.sites.values() if v["kind"] == "softmax"]
    over = sorted(k for k, v in rec.sites.items() if v["kind"] == "layer_norm" and
                  max(v["max_sumsq"], v["max_sum_sq_raw"]) > FP16_MAX)
    return {"sites": rec.sites,
            "layer_norm_sites": len(ln),
            "layer_norm_max_abs_in": max((v["max_abs_in"] for v in ln), default=0.0),
            "layer_norm_max_abs_reduced": max((v["max_abs_reduced"] for v in ln), default=0.0),
            "layer_norm_max_sumsq": max((max(v["max_sumsq"], v["max_sum_sq_raw"]) for v in ln), default=0.0),
            "softmax_sites": len(sm),
            "softmax_max_abs_in": max((v["max_abs_in"] for v in sm), default=0.0),
            "fp16_overflow_sites": over}
