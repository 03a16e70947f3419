"""torch's two ONNX exporters, driven into memory: the legacy (TorchScript) exporter's symbolic registry
(``legacy_symbolic``: is there a symbolic for this aten op at this opset?) and ``legacy_export_bytes`` /
``dynamo_export_bytes`` (export a module to ONNX bytes, quietly; raise what the exporter raises)."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Sequence


# ----------------------------------------------------------------------------------------------------------------
# legacy exporter registry
# ----------------------------------------------------------------------------------------------------------------

def _legacy_registry():
    """The legacy exporter's symbolic registry, with every opset's symbolic module imported (they register on
    import; ``torch.onnx.export`` imports them lazily, so a fresh process would see an incomplete registry)."""
    import importlib

    from torch.onnx._internal.torchscript_exporter import registration

    for v in range(7, 30):
        try:
            importlib.import_module(f"torch.onnx._internal.torchscript_exporter.symbolic_opset{v}")
        except ImportError:
            continue
    return registration.registry


def legacy_symbolic(op: str, opset: int) -> dict[str, Any]:
    """Does the legacy (TorchScript) exporter have a symbolic for ``op`` (e.g. 'aten::grid_sampler') at ``opset``?

    In-place variants ('aten::silu_') are looked up without the trailing underscore, as the exporter does."""
    reg = _legacy_registry()
    name = op[:-1] if op.endswith("_") else op
    group = reg.get_function_group(name)
    min_opset = group.get_min_supported() if group is not None else None
    return {"supported": bool(reg.is_registered_op(name, opset)), "min_opset": min_opset}


# ----------------------------------------------------------------------------------------------------------------
# export into memory
# ----------------------------------------------------------------------------------------------------------------

def legacy_export_bytes(model, args: Sequence[Any], opset: int = 17, **kwargs) -> bytes:
    """Export with the legacy TorchScript exporter into memory (raises what the exporter raises)."""
    import torch

    buf = io.BytesIO()
    log = torch._C._jit_onnx_log  # on failure the exporter dumps the whole IR graph to stderr: keep output readable
    torch._C._jit_onnx_log = lambda *a, **k: None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(args), buf, opset_version=opset, dynamo=False, do_constant_folding=False,
                              **kwargs)
    finally:
        torch._C._jit_onnx_log = log
    return buf.getvalue()


def dynamo_export_bytes(model, args: Sequence[Any], opset: int = 18, **kwargs) -> bytes:
    """Export with the torch.export-based (dynamo) exporter into memory."""
    import torch

    with torch.no_grad(), warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, tuple(args), None, opset_version=opset, dynamo=True, verbose=False,
                                 optimize=False, **kwargs)
    return prog.model_proto.SerializeToString()


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
