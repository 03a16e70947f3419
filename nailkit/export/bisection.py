"""Per-submodule export bisection: which submodules of a model fail to export on their own, and why.

``bisect_export(model, x)``: forward hooks capture every submodule's real inputs (``capture_inputs``); each submodule
is then exported on its own (legacy or dynamo exporter, through ``call_wrapper``), recursing into the failing ones.
Reports the smallest failing submodules, the first unsupported op and the Python source line that issued it.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

from nailkit.export.exporters import dynamo_export_bytes, legacy_export_bytes, legacy_symbolic
from nailkit.export.opscan import _module_types, _types_along, classify_path, source_line, trace_ops


# ----------------------------------------------------------------------------------------------------------------
# input capture: any submodule, called as in the real forward, exportable on its own
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


# ----------------------------------------------------------------------------------------------------------------
# bisection
# ----------------------------------------------------------------------------------------------------------------

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
