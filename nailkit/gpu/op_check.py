"""The GPU op check over a ``.tflite`` flatbuffer: what the GPU recipe forbids, from the file alone (no delegate).

``op_check(path)`` → ``OpCheck``: no TOPK/GATHER/GATHER_ND/CAST-to-int (and no sort), no tensor above 4-D, no rank-2 ×
constant binary op (the WebGPU delegate computes those wrong: ``nailkit.tflite.passes``); it lists every op type that
remains (histogram) and the ops the litert-samples recipe avoids (advisory). The delegate's own verdict is
``nailkit.gpu.delegate``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nailkit.tflite.flatbuffer import read_model, schema
from nailkit.tflite.passes import risky_constant_binary_ops

# Never on a mobile GPU delegate: the selection ops, and index math.
BANNED_OPS = frozenset({"TOPK_V2", "GATHER", "GATHER_ND", "STABLEHLO_SORT", "STABLEHLO_GATHER", "SCATTER_ND",
                        "STABLEHLO_SCATTER"})
INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"})
# Not banned, but listed: ops the litert-samples recipe avoids for the Mali/Adreno delegates.
ADVISORY_OPS = frozenset({"SELECT", "SELECT_V2", "WHERE", "BROADCAST_TO", "POW", "GELU", "ERF", "CUMSUM",
                          "EMBEDDING_LOOKUP", "FLOOR_DIV", "FLOOR_MOD", "CUSTOM", "ARG_MAX", "ARG_MIN"})


@dataclass
class OpCheck:
    path: str
    n_ops: int  # operators of the main subgraph (what the delegate counts)
    histogram: dict[str, int]  # op type → count (all subgraphs)
    banned: dict[str, int]  # TOPK/GATHER/... and "CAST→INT32" style entries
    over_4d: list[tuple[str, list[int]]]  # tensors above 4-D (name, shape)
    advisory: dict[str, int]
    int_tensors: int  # non-constant integer/bool activation tensors
    n_subgraphs: int = 1
    #: binary ops of a rank-2 runtime tensor and a non-broadcast constant: the WebGPU delegate computes them wrong
    #: (``nailkit.tflite.passes``; ``lift_constant_binary_ops`` rewrites them)
    risky_constant_ops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.banned and not self.over_4d and not self.risky_constant_ops

    def line(self) -> str:
        s = f"{Path(self.path).name}: {self.n_ops} ops, {'GPU-clean' if self.ok else 'BLOCKERS'}"
        if self.banned:
            s += "; banned " + ", ".join(f"{k}×{v}" for k, v in self.banned.items())
        if self.over_4d:
            s += f"; {len(self.over_4d)} tensors above 4-D (max rank {max(len(t[1]) for t in self.over_4d)})"
        if self.risky_constant_ops:
            s += f"; {len(self.risky_constant_ops)} rank-2 × constant binary ops (wrong on WebGPU)"
        return s

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["over_4d_count"] = len(self.over_4d)
        d["over_4d"] = [list(t) for t in self.over_4d[:20]]
        d["ok"] = self.ok
        return d


def _enum_names(cls) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def op_check(path: str | os.PathLike[str]) -> OpCheck:
    """Op histogram, banned ops (incl. CAST to an integer type), tensors above 4-D and rank-2 × constant binary ops
    (``tflite_passes``), from the flatbuffer alone."""
    s = schema()
    model, _ = read_model(path)
    op_names = _enum_names(s.BuiltinOperator)
    type_names = _enum_names(s.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = op_names.get(code, f"OP_{code}")
        if name == "CUSTOM" and oc.CustomCode():
            name = "CUSTOM:" + oc.CustomCode().decode()
        codes.append(name)
    hist: dict[str, int] = {}
    banned: dict[str, int] = {}
    over: list[tuple[str, list[int]]] = []
    n_main = 0
    int_tensors = 0
    for g in range(model.SubgraphsLength()):
        sg = model.Subgraphs(g)
        const = set()
        for t in range(sg.TensorsLength()):
            ten = sg.Tensors(t)
            if ten.Buffer() > 0 and model.Buffers(ten.Buffer()) is not None and \
                    (model.Buffers(ten.Buffer()).DataLength() > 0 or model.Buffers(ten.Buffer()).Size() > 0):
                const.add(t)
            shape = [int(x) for x in ten.ShapeAsNumpy()] if ten.ShapeLength() else []
            if len(shape) > 4:
                over.append(((ten.Name() or b"").decode(errors="replace"), shape))
            if t not in const and type_names.get(ten.Type(), "") in INT_TYPES:
                int_tensors += 1
        if g == 0:
            n_main = sg.OperatorsLength()
        for o in range(sg.OperatorsLength()):
            op = sg.Operators(o)
            name = codes[op.OpcodeIndex()]
            hist[name] = hist.get(name, 0) + 1
            if name in BANNED_OPS:
                banned[name] = banned.get(name, 0) + 1
            if name == "CAST" and op.OutputsLength():
                out_t = type_names.get(sg.Tensors(op.Outputs(0)).Type(), "?")
                if out_t in INT_TYPES:
                    key = f"CAST→{out_t}"
                    banned[key] = banned.get(key, 0) + 1
    advisory = {k: v for k, v in hist.items() if k in ADVISORY_OPS or k.startswith(("CUSTOM", "STABLEHLO_"))}

    return OpCheck(path=str(path), n_ops=n_main, histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])),
                   banned=banned, over_4d=over, advisory=advisory, int_tensors=int_tensors,
                   n_subgraphs=model.SubgraphsLength(), risky_constant_ops=risky_constant_binary_ops(path))
