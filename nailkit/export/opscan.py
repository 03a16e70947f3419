"""Op-by-op export inventory: which aten ops a model issues, from which submodule, and what each became in ONNX.

* ``op_inventory(model, x)``: every aten op of the TorchScript trace and of the ``torch.export`` graph, grouped by the
  top-level submodule that issued it (backbone, projector, transformer encoder/decoder, deformable attention, heads,
  segmentation head), with the legacy exporter's symbolic support at the target opset and the ONNX ops each one
  became (recorded from the legacy exporter's own symbolic dispatch, node by node: ``record_symbolic_dispatch``).
* ``trace_ops`` / ``export_graph_ops``: the aten ops of a ``torch.jit.trace`` / ``torch.export`` graph, each with the
  module path, group and Python source frame that issued it.
* ``onnx_op_histogram`` / ``onnx_ops_by_scope``: the op counts of an ONNX model, overall and per submodule group.

Exporting into memory: ``nailkit.export.exporters``; per-submodule bisection: ``nailkit.export.bisection``; the
reproduced failures of notebook 02: ``nailkit.export.repros``.
Everything works on any ``nn.Module`` whose forward takes tensors; the grouping rules know rfdetr's module names.
"""

from __future__ import annotations

import collections
import contextlib
import linecache
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from nailkit.export.exporters import legacy_export_bytes, legacy_symbolic

GROUPS = ("backbone", "position_encoding", "projector", "transformer_encoder", "decoder", "deformable_attention",
          "heads", "segmentation_head", "top_level")
_HEAD_NAMES = {"class_embed", "bbox_embed", "refpoint_embed", "query_feat"}
_DEFORMABLE_TYPES = {"MSDeformAttn"}


# ----------------------------------------------------------------------------------------------------------------
# grouping
# ----------------------------------------------------------------------------------------------------------------

def classify_path(path: str, type_names: Iterable[str] = ()) -> str:
    """Top-level group of a module path such as ``backbone.0.encoder.encoder.embeddings`` (any wrapper prefix).

    ``type_names``: class names of the modules along the path (innermost last); any MSDeformAttn among them makes
    the op 'deformable_attention'."""
    if set(type_names) & _DEFORMABLE_TYPES:
        return "deformable_attention"
    tokens = [t for t in re.split(r"[./]", path) if t]
    if "segmentation_head" in tokens:
        return "segmentation_head"
    if "backbone" in tokens:
        rest = tokens[tokens.index("backbone") + 1:]
        if rest[:1] == ["1"]:
            return "position_encoding"
        if "projector" in rest:
            return "projector"
        return "backbone"
    if "transformer" in tokens:
        rest = tokens[tokens.index("transformer") + 1:]
        if "cross_attn" in rest:
            return "deformable_attention"
        if rest[:1] == ["decoder"]:
            return "decoder"
        return "transformer_encoder"
    if _HEAD_NAMES & set(tokens):
        return "heads"
    return "top_level"


def _module_types(model) -> dict[str, str]:
    return {name: type(mod).__name__ for name, mod in model.named_modules()}


def _types_along(path: str, types: dict[str, str]) -> list[str]:
    parts = path.split(".") if path else []
    return [types.get(".".join(parts[:i]), "") for i in range(1, len(parts) + 1)]


def _scope_path(scope: str) -> str:
    """Innermost module path of a TorchScript scope name, in either of the two formats torch writes:
    trace graphs '__module.m/__module.m.backbone/__module.m.backbone.0' -> 'm.backbone.0';
    legacy-exporter graphs 'pkg.Wrapper::/pkg.LWDETR::model/pkg.Joiner::backbone/pkg.Backbone::backbone.0'
    -> 'model.backbone.0'."""
    if not scope:
        return ""
    parts = scope.split("/")
    if "::" not in scope:
        last = parts[-1]
        return last[len("__module."):] if last.startswith("__module.") else ("" if last == "__module" else last)
    names = [p.split("::", 1)[1] for p in parts if "::" in p]
    names = [n.split(".")[-1] for n in names if n]
    return ".".join(names)


def _scope_types(scope: str) -> list[str]:
    """Class names along a legacy-exporter scope ('pkg.Type::name/...'); empty for trace scopes."""
    return [p.split("::", 1)[0].split(".")[-1] for p in scope.split("/") if "::" in p]


#: aten ops of a trace that have no symbolic of their own because the legacy exporter rewrites them before the
#: symbolic dispatch (alias normalisation, scalar-conversion elimination).
_HANDLED_BY_PASSES = {
    "aten::Int": "(removed: scalar conversion, folded by the exporter's passes)",
    "aten::ScalarImplicit": "(removed: scalar conversion)",
    "aten::concat": "(alias of aten::cat, normalised before conversion)",
    "aten::concatenate": "(alias of aten::cat, normalised before conversion)",
    "aten::absolute": "(alias of aten::abs)",
}


# ----------------------------------------------------------------------------------------------------------------
# traces
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TraceOp:
    op: str
    path: str  # innermost module path
    group: str
    source: str  # first non-torch Python frame, 'file(line): function'


def _first_user_frame(source_range: str) -> str:
    frames = [ln.strip() for ln in source_range.splitlines() if re.match(r".+\(\d+\): \w+", ln.strip())]
    for f in frames:
        if "/torch/" not in f:
            return f
    return frames[0] if frames else ""


def source_line(frame: str) -> str:
    """'path/file.py(400): fn' -> the text of that line (stripped), or '' when unknown."""
    m = re.match(r"(.+)\((\d+)\): \w+", frame)
    if not m:
        return ""
    return linecache.getline(m.group(1), int(m.group(2))).strip()


def trace_ops(model, args: Sequence[Any]) -> list[TraceOp]:
    """All aten ops of ``torch.jit.trace(model, args)`` with the module that issued each, in graph order."""
    import torch

    types = _module_types(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, tuple(args), check_trace=False, strict=False)
    out = []
    for node in traced.inlined_graph.nodes():
        kind = node.kind()
        if kind == "prim::PythonOp":  # a custom autograd.Function, opaque to TorchScript
            kind = f"prim::PythonOp[{node.pyname()}]"
        elif not kind.startswith("aten::"):
            continue
        path = _scope_path(node.scopeName())
        out.append(TraceOp(kind, path, classify_path(path, _types_along(path, types)),
                           _first_user_frame(node.sourceRange())))
    return out


def _export_path(stack: dict | None) -> tuple[str, list[str]]:
    if not stack:
        return "", []
    entries = list(stack.values())
    path = str(entries[-1][0])
    path = re.sub(r"L\['self'\]\.?", "", path)
    path = re.sub(r"getattr\(([^,]+), '([^']+)'\)", r"\1.\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).strip(".")
    types = [getattr(t, "__name__", str(t)).split(".")[-1] for _, t in entries]
    return path, types


def export_graph_ops(model, args: Sequence[Any]) -> list[TraceOp]:
    """All aten ops of ``torch.export.export(model, args)`` (non-strict), grouped by ``nn_module_stack``."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, tuple(args), strict=False)
    out = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        name = getattr(target, "name", None)
        name = name() if callable(name) else str(target)
        if not name.startswith("aten::"):
            continue
        op = name.split(".")[0]
        path, types = _export_path(node.meta.get("nn_module_stack"))
        frame = ""
        st = node.meta.get("stack_trace") or ""
        lines = [ln.strip() for ln in st.splitlines() if ln.strip().startswith("File ")]
        user = [ln for ln in lines if "/torch/" not in ln]
        if user:
            m = re.match(r'File "(.+)", line (\d+), in (\w+)', user[-1])
            frame = f"{m.group(1)}({m.group(2)}): {m.group(3)}" if m else user[-1]
        out.append(TraceOp(op, path, classify_path(path, types), frame))
    return out


# ----------------------------------------------------------------------------------------------------------------
# recording which ONNX ops each aten op became (legacy exporter)
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def record_symbolic_dispatch(records: list[dict[str, Any]]):
    """While active, every aten node the legacy exporter converts appends
    ``{op, path, onnx: [ONNX op types], supported}`` to ``records``."""
    from torch.onnx._internal.torchscript_exporter import jit_utils
    from torch.onnx._internal.torchscript_exporter import utils as ts_utils

    orig_run, orig_create = ts_utils._run_symbolic_function, jit_utils._create_node
    current: list[list[str]] = []

    def create(*a, **k):
        node = orig_create(*a, **k)
        if current:
            current[-1].append(node.kind())
        return node

    def run(graph, block, node, inputs, env, values_in_env, new_nodes, operator_export_type=None, **kw):
        kind = node.kind()
        current.append([])
        scope = node.scopeName()
        rec = {"op": kind, "path": _scope_path(scope), "types": _scope_types(scope), "onnx": current[-1],
               "supported": True}
        try:
            if operator_export_type is None:
                return orig_run(graph, block, node, inputs, env, values_in_env, new_nodes, **kw)
            return orig_run(graph, block, node, inputs, env, values_in_env, new_nodes, operator_export_type, **kw)
        except Exception:
            rec["supported"] = False
            raise
        finally:
            current.pop()
            rec["onnx"] = [k.split("::")[-1] for k in rec["onnx"] if k != "onnx::Constant"] or (
                ["Constant"] if rec["onnx"] else [])
            records.append(rec)

    ts_utils._run_symbolic_function, jit_utils._create_node = run, create
    try:
        yield records
    finally:
        ts_utils._run_symbolic_function, jit_utils._create_node = orig_run, orig_create


# ----------------------------------------------------------------------------------------------------------------
# inventory
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class OpInventory:
    rows: list[dict[str, Any]]  # one per (group, op)
    opset: int
    trace_ops: list[TraceOp]
    export_ops: Optional[list[TraceOp]]
    export_error: Optional[str] = None
    legacy_error: Optional[str] = None

    @property
    def unsupported(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["legacy_supported"] is False]

    def by_group(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            g = out.setdefault(r["group"], {"trace_ops": 0, "export_ops": 0, "distinct": 0, "unsupported": 0})
            g["trace_ops"] += r["trace_count"]
            g["export_ops"] += r["export_count"]
            g["distinct"] += 1
            g["unsupported"] += int(r["legacy_supported"] is False)
        return {k: out[k] for k in GROUPS if k in out}

    def markdown(self, group: Optional[str] = None, only_unsupported: bool = False) -> str:
        cols = ["group", "op", "trace_count", "export_count", "legacy_supported", "min_opset", "onnx_ops"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            if (group and r["group"] != group) or (only_unsupported and r["legacy_supported"] is not False):
                continue
            lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
        return "\n".join(lines)

    def plot(self, ax=None):
        """Horizontal bars: traced aten ops per submodule group. A group holding any op without a legacy symbolic
        is drawn red and labelled with those ops (a single unsupported op is enough to block the export)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 3.6))
        groups = list(self.by_group())
        totals = [sum(r["trace_count"] for r in self.rows if r["group"] == g) for g in groups]
        bad = {g: sorted({f"{r['op'].split('::')[-1]} ×{r['trace_count']}" for r in self.rows
                          if r["group"] == g and r["legacy_supported"] is False}) for g in groups}
        colors = ["tab:red" if bad[g] else "tab:blue" for g in groups]
        ax.barh(groups, totals, color=colors)
        for i, g in enumerate(groups):
            if bad[g]:
                ax.text(totals[i] * 0.02, i, "unsupported: " + ", ".join(bad[g]), va="center", color="white",
                        fontsize=8, fontweight="bold")
        ax.invert_yaxis()
        ax.set_xlabel("aten ops in the TorchScript trace")
        n_bad = sum(1 for g in groups if bad[g])
        ax.set_title(f"ops per submodule — red: holds an op with no legacy symbolic at opset {self.opset} "
                     f"({n_bad} group{'s' if n_bad != 1 else ''})", fontsize=9)
        return ax


def op_inventory(model, args: Sequence[Any], *, opset: int = 17, with_export: bool = True,
                 with_onnx_mapping: bool = True) -> OpInventory:
    """Inventory of ``model(*args)``: aten ops per submodule group, legacy symbolic support at ``opset`` and the
    ONNX ops each became (from a legacy export of the model; a failing export still maps the ops before the failure).
    """
    tops = trace_ops(model, args)
    eops, eerr = None, None
    if with_export:
        try:
            eops = export_graph_ops(model, args)
        except Exception as exc:  # noqa: BLE001 - reported in the inventory
            eerr = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    onnx_map: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    dispatched: dict[str, bool] = {}
    lerr = None
    if with_onnx_mapping:
        types = _module_types(model)
        records: list[dict[str, Any]] = []
        try:
            with record_symbolic_dispatch(records):
                legacy_export_bytes(model, args, opset=opset)
        except Exception as exc:  # noqa: BLE001
            lerr = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for r in records:
            if not r["op"].startswith("aten::"):
                continue
            g = classify_path(r["path"], r["types"] or _types_along(r["path"], types))
            key = "+".join(r["onnx"]) if r["onnx"] else "(no node)"
            onnx_map[(g, r["op"])].update([key])
            onnx_map[("*", r["op"])].update([key])
            dispatched[r["op"]] = dispatched.get(r["op"], True) and r["supported"]
    counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for t in tops:
        counts[(t.group, t.op)][0] += 1
    for t in eops or []:
        counts[(t.group, t.op)][1] += 1
    rows = []
    for (g, op), (nt, ne) in counts.items():
        sup = legacy_symbolic(op, opset)
        mapping = onnx_map.get((g, op)) or onnx_map.get(("*", op))
        supported: Optional[bool] = sup["supported"]
        note = ", ".join(k for k, _ in mapping.most_common(3)) if mapping else ""
        if op in dispatched:
            supported = dispatched[op]
        elif not supported and op in _HANDLED_BY_PASSES:
            supported, note = True, _HANDLED_BY_PASSES[op]
        elif op.startswith("prim::PythonOp"):
            supported, note = True, ("(autograd.Function: the legacy exporter inlines its forward when it traces "
                                     "eager code; opaque inside a ScriptModule)")
        elif nt == 0:
            supported, note = None, note or "torch.export only (decomposition artefact)"
        rows.append({"group": g, "op": op, "trace_count": nt, "export_count": ne,
                     "legacy_supported": supported, "min_opset": sup["min_opset"], "onnx_ops": note})
    rows.sort(key=lambda r: (GROUPS.index(r["group"]), -r["trace_count"], r["op"]))
    return OpInventory(rows=rows, opset=opset, trace_ops=tops, export_ops=eops, export_error=eerr,
                       legacy_error=lerr)


def onnx_op_histogram(model_or_bytes) -> dict[str, int]:
    """{op_type: count} of an ONNX model (ModelProto, bytes or path), sorted by count."""
    import onnx

    if isinstance(model_or_bytes, (bytes, bytearray)):
        m = onnx.load_from_string(bytes(model_or_bytes))
    elif isinstance(model_or_bytes, onnx.ModelProto):
        m = model_or_bytes
    else:
        m = onnx.load(str(model_or_bytes), load_external_data=False)
    c = collections.Counter(n.op_type for n in m.graph.node)
    return dict(c.most_common())


def onnx_ops_by_scope(model_or_path, groups: bool = True) -> dict[str, dict[str, int]]:
    """{group: {op_type: count}} from the legacy exporter's node names ('/backbone/backbone.0/.../MatMul')."""
    import onnx

    m = model_or_path if isinstance(model_or_path, onnx.ModelProto) else (
        onnx.load_from_string(bytes(model_or_path)) if isinstance(model_or_path, (bytes, bytearray))
        else onnx.load(str(model_or_path), load_external_data=False))
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for n in m.graph.node:
        scope = "/".join(n.name.split("/")[:-1])
        key = classify_path(scope) if groups else scope
        out[key][n.op_type] += 1
    return {k: dict(v.most_common()) for k, v in out.items()}
