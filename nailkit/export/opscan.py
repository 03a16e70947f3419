"""Op-by-op export debugging: which aten ops a model issues, from which submodule, and which of them block an export.

* ``op_inventory(model, x)``: every aten op of the TorchScript trace and of the ``torch.export`` graph, grouped by the
  top-level submodule that issued it (backbone, projector, transformer encoder/decoder, deformable attention, heads,
  segmentation head), with the legacy exporter's symbolic support at the target opset and the ONNX ops each one
  became (recorded from the legacy exporter's own symbolic dispatch, node by node).
* ``bisect_export(model, x)``: forward hooks capture every submodule's real inputs; each submodule is then exported on
  its own (legacy or dynamo exporter), recursing into the failing ones. Reports the smallest failing submodules, the
  first unsupported op and the Python source line that issued it.
* ``repro_*``: the four failure stories of the earlier attempt, each reproduced, explained and fixed (notebook 02).

Everything works on any ``nn.Module`` whose forward takes tensors; the grouping rules know rfdetr's module names.
"""

from __future__ import annotations

import collections
import contextlib
import io
import linecache
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence
from nailkit.model.build import export_module, validate_resolution

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


# ----------------------------------------------------------------------------------------------------------------
# bisection
# ----------------------------------------------------------------------------------------------------------------

def _flatten_tensors(obj, out: list) -> Any:
    """Replace every tensor in a nested structure by a placeholder index; returns the template."""
    import torch

    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return ("__t__", len(out) - 1)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_flatten_tensors(o, out) for o in obj) if not hasattr(obj, "_fields") else \
            type(obj)(*[_flatten_tensors(o, out) for o in obj])
    if isinstance(obj, dict):
        return {k: _flatten_tensors(v, out) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and any(isinstance(v, torch.Tensor) for v in vars(obj).values()):
        new = object.__new__(type(obj))
        new.__dict__.update({k: _flatten_tensors(v, out) for k, v in vars(obj).items()})
        return new
    return obj


def _fill(template, tensors) -> Any:
    if isinstance(template, tuple) and len(template) == 2 and template[0] == "__t__":
        return tensors[template[1]]
    if isinstance(template, (list, tuple)):
        vals = [_fill(o, tensors) for o in template]
        return type(template)(*vals) if hasattr(template, "_fields") else type(template)(vals)
    if isinstance(template, dict):
        return {k: _fill(v, tensors) for k, v in template.items()}
    if hasattr(template, "__dict__") and not isinstance(template, type):
        d = vars(template)
        if any(isinstance(v, (tuple, list, dict)) or hasattr(v, "__dict__") for v in d.values()):
            new = object.__new__(type(template))
            new.__dict__.update({k: _fill(v, tensors) for k, v in d.items()})
            return new
    return template


def _tensor_leaves(obj) -> list:
    out: list = []
    _flatten_tensors(obj, out)
    return out


def call_wrapper(module, args: tuple, kwargs: dict):
    """An ``nn.Module`` whose forward takes only the tensors found in (args, kwargs) and returns a flat tuple of the
    output tensors: any submodule, called as it was in the real forward, becomes exportable on its own."""
    import torch

    tensors: list = []
    template = _flatten_tensors((tuple(args), dict(kwargs)), tensors)

    class Call(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *ts):
            a, k = _fill(template, list(ts))
            return tuple(_tensor_leaves(self.inner(*a, **k)))

    return Call().eval(), tuple(tensors)


def capture_inputs(model, args: Sequence[Any]) -> dict[str, tuple[tuple, dict]]:
    """Run ``model(*args)`` once with forward pre-hooks on every submodule; returns {path: (args, kwargs)} of each
    submodule's FIRST call (modules never called are absent)."""
    import torch

    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    patched = []
    for name, mod in model.named_modules():
        def hook(m, a, k, _name=name):
            captured.setdefault(_name, (a, k))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        # some code calls ``sub.forward(...)`` directly (rfdetr's seg head), which bypasses hooks: wrap the bound
        # forward as an instance attribute too, restored afterwards
        own = mod.__dict__.get("forward")
        fwd = mod.forward

        def wrapped(*a, _name=name, _fwd=fwd, **k):
            captured.setdefault(_name, (a, k))
            return _fwd(*a, **k)
        patched.append((mod, own))
        mod.forward = wrapped
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for mod, own in patched:
            if own is None:
                del mod.forward
            else:
                mod.forward = own
    return captured


@dataclass
class Attempt:
    path: str
    type: str
    ok: bool
    seconds: float
    error_type: str = ""
    error: str = ""
    unsupported_op: str = ""


@dataclass
class Culprit:
    path: str
    type: str
    group: str
    error_type: str
    error: str
    unsupported_op: str
    source: str  # 'file(line): function' of the first unsupported node
    source_line: str  # the text of that line

    @property
    def function(self) -> str:
        m = re.search(r"\): (\w+)$", self.source)
        return m.group(1) if m else ""


@dataclass
class BisectReport:
    exporter: str
    opset: int
    root_ok: bool
    culprits: list[Culprit]
    attempts: list[Attempt] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"exporter": self.exporter, "opset": self.opset, "root_ok": self.root_ok,
                "num_attempts": len(self.attempts), "seconds": round(self.seconds, 1),
                "culprits": [asdict(c) for c in self.culprits]}

    def markdown(self) -> str:
        lines = ["| submodule | type | ok | s | error |", "|---|---|---|---|---|"]
        for a in self.attempts:
            lines.append(f"| `{a.path or '(root)'}` | {a.type} | {'✓' if a.ok else '✗'} | {a.seconds:.1f} | "
                         f"{a.error_type}: {a.error[:90]} |" if not a.ok else
                         f"| `{a.path or '(root)'}` | {a.type} | ✓ | {a.seconds:.1f} | |")
        return "\n".join(lines)


_UNSUPPORTED_RE = re.compile(r"operator '([\w:.]+)'|(aten::\w+|aten\.\w+)")


def _unsupported_op(msg: str) -> str:
    m = _UNSUPPORTED_RE.search(msg)
    if not m:
        return ""
    op = m.group(1) or m.group(2)
    return op.replace("aten.", "aten::").split(".")[0] if op.startswith("aten.") else op


def bisect_export(model, args: Sequence[Any], *, exporter: str = "legacy", opset: Optional[int] = None,
                  max_depth: int = 12, on_attempt: Optional[Callable[[Attempt], None]] = None) -> BisectReport:
    """Find the smallest submodules of ``model`` that fail to export on their own.

    Each submodule is exported alone with the inputs it really received (captured by forward hooks). Starting at
    the root, the children of a failing module are tried; a failing module none of whose children fails is a
    culprit. For each culprit, the first op without a legacy symbolic at ``opset`` (or the op named in the error) is
    located in the submodule's own trace, with the Python source line that issued it.
    """
    opset = opset or (17 if exporter == "legacy" else 18)
    export = legacy_export_bytes if exporter == "legacy" else dynamo_export_bytes
    t_start = time.time()
    inputs = capture_inputs(model, args)
    inputs[""] = (tuple(args), {})
    modules = dict(model.named_modules())
    types = _module_types(model)
    attempts: list[Attempt] = []
    culprits: list[Culprit] = []

    def attempt(path: str) -> Attempt:
        a, k = inputs[path]
        wrapper, tensors = call_wrapper(modules[path], a, k)
        t0 = time.time()
        try:
            export(wrapper, tensors, opset=opset)
            res = Attempt(path, types[path], True, time.time() - t0)
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            res = Attempt(path, types[path], False, time.time() - t0, type(exc).__name__, msg, _unsupported_op(msg))
        attempts.append(res)
        if on_attempt:
            on_attempt(res)
        return res

    def children(path: str) -> list[str]:
        prefix = path + "." if path else ""
        return [prefix + n for n, _ in modules[path].named_children() if prefix + n in inputs]

    def visit(path: str, depth: int, failed: Attempt) -> None:
        failing = []
        if depth < max_depth:
            for child in children(path):
                res = attempt(child)
                if not res.ok:
                    failing.append((child, res))
        if failing:
            for child, res in failing:
                visit(child, depth + 1, res)
        else:
            culprits.append(_locate(path, modules[path], inputs[path], failed, opset, types))

    root = attempt("")
    if not root.ok:
        visit("", 0, root)
    return BisectReport(exporter=exporter, opset=opset, root_ok=root.ok, culprits=culprits, attempts=attempts,
                        seconds=time.time() - t_start)


def _locate(path: str, module, inp, failed: Attempt, opset: int, types: dict[str, str]) -> Culprit:
    """First unsupported (or error-named) op in the culprit's own trace, with its source line."""
    wrapper, tensors = call_wrapper(module, *inp)
    op, source = failed.unsupported_op, ""
    try:
        ops = trace_ops(wrapper, tensors)
    except Exception:  # noqa: BLE001 - not traceable: keep the exporter's message only
        ops = []
    target = None
    for t in ops:
        if (op and t.op == op) or (not op and not legacy_symbolic(t.op, opset)["supported"]):
            target = t
            break
    if target is not None:
        op, source = target.op, target.source
    return Culprit(path=path, type=types.get(path, ""), group=classify_path(path, _types_along(path, types)),
                   error_type=failed.error_type, error=failed.error, unsupported_op=op, source=source,
                   source_line=source_line(source))


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
