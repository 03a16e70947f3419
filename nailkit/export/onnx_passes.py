"""Named ONNX graph passes applied before a TFLite conversion.

Each pass is a function ``ModelProto -> ModelProto`` registered under a name in ``PASSES``; tests/test_onnx_passes.py
shows each is *harmless* (onnxruntime outputs unchanged). The conversion applies ``DEFAULT_PASSES``, which holds only
passes shown to be *needed* with the installed converter (see the comment there: today, none).

The GridSample rewrite is pluggable: ``GRIDSAMPLE_FORMULATIONS`` maps a name to a function ``(node, graph, index)``
that replaces one ``gs.Node`` in an onnx_graphsurgeon graph. ``"gather"`` is rfdetr's own rewrite (four
``Gather(axis=0)`` lookups on a padded, flattened image — exact in ORT); register another formulation (e.g. separable
bilinear weights as small matmuls, which XNNPACK can take whole) with ``register_gridsample_formulation``.

These functions import onnx / onnx_graphsurgeon only; none imports tensorflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PassFn = Callable[[Any], Any]
PASSES: dict[str, PassFn] = {}
GRIDSAMPLE_FORMULATIONS: dict[str, Callable[[Any, Any, int], None]] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def deco(fn: PassFn) -> PassFn:
        PASSES[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def register_gridsample_formulation(name: str, fn: Callable[[Any, Any, int], None]) -> None:
    """Make ``fn(node, graph, index)`` available as ``rewrite_gridsample(model, formulation=name)``."""
    GRIDSAMPLE_FORMULATIONS[name] = fn


def _gather_formulation(node: Any, graph: Any, index: int) -> None:
    # rfdetr's own exact rewrite (bilinear, zeros padding, align_corners=0).
    from rfdetr.export._tflite.exporter import _replace_single_gridsample

    _replace_single_gridsample(node, graph, index=index)


register_gridsample_formulation("gather", _gather_formulation)


def op_counts(model: Any) -> dict[str, int]:
    """Histogram of node op types in the main graph."""
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def rewrite_gridsample(model: Any, formulation: str = "gather") -> Any:
    """Replace every GridSample node with the named formulation (see ``GRIDSAMPLE_FORMULATIONS``)."""
    import onnx
    import onnx_graphsurgeon as gs

    if formulation not in GRIDSAMPLE_FORMULATIONS:
        raise ValueError(f"unknown GridSample formulation {formulation!r}; registered: "
                         f"{sorted(GRIDSAMPLE_FORMULATIONS)}")
    model = onnx.shape_inference.infer_shapes(model)
    graph = gs.import_onnx(model)
    nodes = [n for n in graph.nodes if n.op == "GridSample"]
    if not nodes:
        return model
    fn = GRIDSAMPLE_FORMULATIONS[formulation]
    for i, node in enumerate(nodes):
        fn(node, graph, i)
    graph.cleanup().toposort()
    out = onnx.shape_inference.infer_shapes(gs.export_onnx(graph))
    onnx.checker.check_model(out)
    return out


@register_pass("gridsample")
def gridsample_pass(model: Any) -> Any:
    """GridSample → Gather-based bilinear subgraph (onnx2tf's own lowering is numerically wrong)."""
    return rewrite_gridsample(model, "gather")


#: Passes the route-A conversion applies, in order — none, as measured with onnx2tf 2.6.9 + onnxsim 0.6.5 + TF 2.21
#: on the demo model (notebook 04, ``ablate_passes``): with no pass at all the conversion goes through, meets every
#: fp32 gate (pre-TopK 1.0e-5, forced 1.3e-4) and fp16 stays within 1.14x of its rounding control. onnx2tf 2.6.9 now
#: lowers GridSample itself to flat GATHERs, exact here, and its graph delegates better (XNNPACK 1826/1903 ops vs
#: 1810/1991 with rfdetr's rewrite, 9 partitions both). The four fixes reported for an earlier stack (typed TopK
#: indices, dropping a constant all-False Where, Constant nodes → initializers, scalar constants → [1]-tensors) were
#: not needed either, so they are not kept. The GridSample rewrite stays registered and pluggable
#: (``rewrite_gridsample(model, formulation)``): the XNNPACK-friendly separable-matmul formulation goes in there.
DEFAULT_PASSES: tuple[str, ...] = ()


def apply_passes(model: Any, names: tuple[str, ...] | list[str] = DEFAULT_PASSES) -> Any:
    for name in names:
        if name not in PASSES:
            raise ValueError(f"unknown ONNX pass {name!r}; registered: {sorted(PASSES)}")
        model = PASSES[name](model)
    return model


def expose_selection(model: Any, names: tuple[str, str] = ("enc_scores", "topk_indices")) -> Any:
    """Add the two-stage selection as extra graph outputs: the single TopK's input scores and its indices.

    Not a fix: it lets parity compare the pre-TopK encoder scores and force the backend's selection in PyTorch.
    The tensors are computed anyway, so this costs nothing at run time.
    """
    import onnx
    from onnx import helper

    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    if len(topk) != 1:
        raise ValueError(f"expected exactly one TopK (the two-stage query selection), found {len(topk)}")
    if any(o.name in names for o in model.graph.output):
        return model
    model = onnx.shape_inference.infer_shapes(model)
    node = topk[0]
    vi = {v.name: v for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for src, dst in ((node.input[0], names[0]), (node.output[1], names[1])):
        new.graph.node.append(helper.make_node("Identity", [src], [dst], name=f"expose_{dst}"))
        t = vi.get(src)
        elem = t.type.tensor_type.elem_type if t is not None else onnx.TensorProto.FLOAT
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.type.tensor_type.shape.dim] \
            if t is not None else None
        new.graph.output.append(helper.make_tensor_value_info(dst, elem, shape))
    onnx.checker.check_model(new)
    return new
