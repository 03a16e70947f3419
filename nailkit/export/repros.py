"""The four export failures of the earlier attempt, each reproduced, explained and fixed (notebook 02).

* ``repro_bicubic_legacy`` / ``dynamo_pos_embed_ops``: (a) ``aten::_upsample_bicubic2d_aa`` in the position embeddings.
* ``repro_torchscript_to_dynamo``: (b) a ``torch.jit.trace``d model handed to the dynamo exporter.
* ``repro_grid_sample``: (c) deformable attention is plain ``F.grid_sample`` (ONNX GridSample, opset >= 16).
* ``repro_seg_head``: (d) the segmentation head in export mode.

``raw_module(rf)``: the raw (non-export-mode) rfdetr network as a plain tensor -> tuple module.
"""

from __future__ import annotations

import collections
import re
import time
import warnings
from typing import Any, Callable, Optional, Sequence

from nailkit.export.exporters import _quiet, dynamo_export_bytes, legacy_export_bytes, legacy_symbolic
from nailkit.export.opscan import (
    _first_user_frame,
    export_graph_ops,
    onnx_op_histogram,
    onnx_ops_by_scope,
    record_symbolic_dispatch,
    source_line,
    trace_ops,
)
from nailkit.model.build import export_module, validate_resolution


# ----------------------------------------------------------------------------------------------------------------
# the raw (non-export-mode) rfdetr model as a plain tensor -> tuple module
# ----------------------------------------------------------------------------------------------------------------

def raw_module(rf, segmentation: bool = True):
    """The rfdetr network as trained/used by ``predict`` (NOT export mode: position embeddings not frozen), with
    forward(x normalised NCHW) -> (pred_boxes, pred_logits[, pred_masks]). A deep copy; ``rf`` is not modified."""
    import copy

    import torch

    net = copy.deepcopy(rf.model.model).cpu().eval()

    class RawModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

        def forward(self, x):
            out = self.model(x)
            res = (out["pred_boxes"], out["pred_logits"])
            return res + ((out["pred_masks"],) if segmentation and "pred_masks" in out else ())

    return RawModule().eval()


# ----------------------------------------------------------------------------------------------------------------
# reproductions of the earlier attempt's failures (notebook 02)
# ----------------------------------------------------------------------------------------------------------------

def _err(exc: BaseException) -> dict[str, str]:
    msg = str(exc).strip()
    return {"type": type(exc).__name__, "module": type(exc).__module__, "message": msg.splitlines()[0] if msg else ""}


def _failure(fn: Callable[[], Any]) -> Optional[dict[str, str]]:
    """Run ``fn``; None when it succeeds, else the exception as {type, module, message} (the failure we study)."""
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        return _err(exc)


def repro_bicubic_legacy(rf, resolution: Optional[int] = None, opset: int = 17) -> dict[str, Any]:
    """(a) Legacy export of the raw model fails on ``aten::_upsample_bicubic2d_aa``; the export-mode module (position
    embeddings frozen by rfdetr's ``prepare_export_graph``) exports, and contains no such op."""
    import torch

    res = validate_resolution(rf, resolution)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {"resolution": res, "opset": opset}
    out["raw_error"] = _failure(lambda: legacy_export_bytes(raw_module(rf), (x,), opset=opset))
    fixed = export_module(rf, res)
    out["fixed_trace_has_bicubic"] = any("bicubic" in t.op for t in trace_ops(fixed, (x,)))
    t0 = time.time()
    blob = legacy_export_bytes(fixed, (x,), opset=opset)
    out["fixed_export_seconds"] = round(time.time() - t0, 1)
    out["fixed_onnx_bytes"] = len(blob)
    return out


def _dinov2_embeddings(model):
    for _, mod in model.named_modules():
        if type(mod).__name__.endswith("Embeddings") and hasattr(mod, "interpolate_pos_encoding"):
            return mod
    raise RuntimeError("no DINOv2 embeddings module with interpolate_pos_encoding in this model")


def dynamo_pos_embed_ops(rf, resolutions: Sequence[int], *, onnx_export: bool = True) -> dict[int, dict[str, Any]]:
    """(a, continued) What the dynamo route sees in the raw model's DINOv2 embeddings, per resolution.

    ``torch.jit.is_tracing()`` is False under torch.export, so at the native size rfdetr returns the stored position
    embeddings unchanged (no interpolation op at all); at any other size it runs the antialiased bicubic
    interpolation. The legacy exporter has no symbolic for it; the dynamo exporter (onnxscript) lowers it to
    ``Resize(mode=cubic, antialias=1)``, an opset-18 op. With ``onnx_export`` the embeddings module alone is exported
    with dynamo at each size and run on onnxruntime (cheap: one small module)."""
    import numpy as np
    import torch

    emb = copy_module(_dinov2_embeddings(rf.model.model))
    out = {}
    for res in resolutions:
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
        ops = export_graph_ops(emb, (x,))
        interp = sorted({t.op for t in ops if "upsample" in t.op or "interp" in t.op})
        row: dict[str, Any] = {"interpolation_ops": interp,
                               "legacy_supported": {o: legacy_symbolic(o, 17)["supported"] for o in interp}}
        if onnx_export:
            import onnx
            import onnxruntime as ort

            blob = dynamo_export_bytes(emb, (x,), opset=18)
            m = onnx.load_from_string(blob)
            resizes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute
                        if a.name in ("mode", "antialias", "coordinate_transformation_mode")}
                       for n in m.graph.node if n.op_type == "Resize"]
            resizes = [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in r.items()} for r in resizes]
            sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            with torch.no_grad():
                ref = emb(x).numpy()
            row.update({"dynamo_onnx_resize": resizes, "dynamo_ort_max_abs": float(np.abs(got - ref).max())})
        out[int(res)] = row
    return out


def copy_module(module):
    import copy

    return copy.deepcopy(module).cpu().eval()


def _exception_summary(exc: BaseException) -> str:
    """The root cause line of a dynamo-exporter error ('## Exception summary' section), else the first line."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"## Exception summary\s+(.+)", msg)
    if m:
        return m.group(1).strip()
    return msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__


def repro_torchscript_to_dynamo(rf, resolution: Optional[int] = None, opset: int = 18,
                                try_converter: bool = True) -> dict[str, Any]:
    """(b) A ``torch.jit.trace``d model (what ``inference(compile=True)`` produces) handed to the dynamo exporter.

    The dynamo exporter captures the model with ``torch.export``, which traces *Python* code; a ScriptModule's
    forward is a frozen TorchScript graph, so capture is refused ("Exporting a ScriptModule is not supported").
    torch's suggested converter (``TS2EPConverter``) and the legacy exporter both have to re-read that graph, which
    holds opaque ``prim::PythonOp`` nodes — rfdetr's seg head runs its depthwise convs through a custom
    ``autograd.Function`` (``_DepthwiseConvWithoutCuDNN``) that a trace records as a Python call. Fix: export the
    eager export-mode module (``nailkit.model.build.export_module``), never the traced one."""
    import torch

    mod = export_module(rf, resolution)
    x = torch.randn(1, 3, mod.resolution, mod.resolution)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(mod, (x,), check_trace=False)
    python_ops = collections.Counter()
    for n in traced.inlined_graph.nodes():
        if n.kind() == "prim::PythonOp":
            python_ops[f"{n.pyname()} @ {_first_user_frame(n.sourceRange()).split('/')[-1]}"] += 1
    out: dict[str, Any] = {"traced_type": type(traced).__name__, "python_ops": dict(python_ops)}
    try:
        dynamo_export_bytes(traced, (x,), opset=opset)
        out["dynamo_on_traced_error"] = None
    except Exception as exc:  # noqa: BLE001 - this failure is what we reproduce
        out["dynamo_on_traced_error"] = {**_err(exc), "cause": _exception_summary(exc)}
    if try_converter:
        def convert() -> None:
            from torch._export.converter import TS2EPConverter

            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                TS2EPConverter(traced, (x,)).convert()
        out["ts2ep_error"] = _failure(convert)
    out["legacy_on_traced_error"] = _failure(lambda: legacy_export_bytes(traced, (x,), opset=17))
    return out


def repro_grid_sample(rf, resolution: Optional[int] = None, opset: int = 17) -> dict[str, Any]:
    """(c) MSDeformAttn is plain ``F.grid_sample`` (``aten::grid_sampler``), one call per feature level per decoder
    layer: the ONNX file has one GridSample per decoder layer (this model has one feature level). GridSample needs
    opset >= 16; opset 15 is refused by the legacy exporter."""
    import torch

    mod = export_module(rf, resolution)
    x = torch.randn(1, 3, mod.resolution, mod.resolution)
    ops = trace_ops(mod, (x,))
    gs = [t for t in ops if t.op == "aten::grid_sampler"]
    records: list[dict[str, Any]] = []
    with record_symbolic_dispatch(records):
        blob = legacy_export_bytes(mod, (x,), opset=opset)
    became = sorted({"+".join(r["onnx"]) for r in records if r["op"] == "aten::grid_sampler"})
    hist = onnx_op_histogram(blob)
    out = {"trace_grid_sampler": len(gs), "groups": sorted({t.group for t in gs}),
           "sources": sorted({t.source for t in gs}), "source_lines": sorted({source_line(t.source) for t in gs}),
           "onnx_gridsample": hist.get("GridSample", 0), "became": became,
           "legacy_symbolic_opset15": legacy_symbolic("aten::grid_sampler", 15),
           "legacy_symbolic_opset16": legacy_symbolic("aten::grid_sampler", 16),
           "dec_layers": int(getattr(rf.model_config, "dec_layers", 0))}
    out["opset15_error"] = _failure(lambda: legacy_export_bytes(mod, (x,), opset=15))
    return out


def repro_seg_head(rf, resolution: Optional[int] = None, opset: int = 17) -> dict[str, Any]:
    """(d) The segmentation head in export mode runs ``forward_export``: bilinear resize of the backbone feature to
    R/4, depthwise-conv blocks, 1x1 projections and a MatMul of query features with the spatial features. This
    exports as plain Resize/Conv/MatMul; the ONNX ops under the seg head scope are returned."""
    import torch

    mod = export_module(rf, resolution)
    x = torch.randn(1, 3, mod.resolution, mod.resolution)
    seg = None
    for m in mod.modules():
        if type(m).__name__ == "SegmentationHead":
            seg = m
    ops = trace_ops(mod, (x,))
    seg_ops = collections.Counter(t.op for t in ops if t.group == "segmentation_head")
    blob = legacy_export_bytes(mod, (x,), opset=opset, input_names=["input"],
                               output_names=list(mod.output_names))
    by_scope = onnx_ops_by_scope(blob)
    import onnx

    m = onnx.load_from_string(blob)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    return {"export_mode_flag": bool(getattr(seg, "_export", False)) if seg is not None else None,
            "forward_is_forward_export": bool(seg is not None and seg.forward.__func__.__name__ == "forward_export"),
            "trace_ops": dict(seg_ops.most_common()), "onnx_ops": by_scope.get("segmentation_head", {}),
            "output_shapes": shapes}
