"""Tiny probe ``.tflite`` files (hand-written flatbuffers) with a known GPU verdict: the op check, the delegate's
verdict and the flatbuffer passes demonstrated in seconds, no converter needed (tests only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nailkit.tflite.flatbuffer import pack_model, schema


def write_probe_model(path: str | os.PathLike[str], kind: str = "clean") -> Path:
    """Write a tiny ``.tflite`` with a known verdict.

    * "clean": x[1,8,8,4] → ADD(const) → MUL(self) → out. Every op GPU-clean (1 subgraph, 2 ops).
    * "blocked": x → RESHAPE to 5-D → RESHAPE back → GATHER(axis 3, [0, 3]) → CAST to int32 → CAST to float → out;
      a 5-D tensor, a GATHER and a CAST to int: the GPU delegate refuses all but the last CAST.
    * "rank2_const": x[24,32] → ADD(constant [24,32]) → out. Accepted and "fully accelerated" by the WebGPU
      delegate, and computed wrong (``nailkit.tflite.passes``).
    * "fc_const": x[2,8] → FULLY_CONNECTED(weights [4,8], bias [4]) → ADD(constant [1,4]) → out; weights and the
      ADD constant are not representable in fp16 (``nailkit.tflite.passes.fp16_gemm_weights``).
    """
    s = schema()
    B = s.BuiltinOperator
    f32, i32 = s.TensorType.FLOAT32, s.TensorType.INT32
    bufs = [s.BufferT()]
    tensors: list = []

    def tensor(name, shape, ttype=f32, data=None):
        t = s.TensorT()
        t.name, t.shape, t.type = name, list(shape), ttype
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            bufs.append(b)
            t.buffer = len(bufs) - 1
        else:
            t.buffer = 0
        tensors.append(t)
        return len(tensors) - 1

    codes: list[int] = []
    ops = []

    def op(code, ins, outs, opt_type=0, opt=None):
        if code not in codes:
            codes.append(code)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), list(ins), list(outs)
        o.builtinOptionsType, o.builtinOptions = opt_type, opt
        ops.append(o)

    x = tensor("input", {"rank2_const": [24, 32], "fc_const": [2, 8]}.get(kind, [1, 8, 8, 4]))
    if kind == "fc_const":
        rng = np.random.default_rng(0)
        w = tensor("weights", [4, 8], data=(rng.standard_normal((4, 8)) / 3).astype(np.float32))
        b = tensor("bias", [4], data=(rng.standard_normal(4) / 3).astype(np.float32))
        c = tensor("offset", [1, 4], data=np.array([[1 / 3, 2 / 3, 1e-4 / 3, 1000 / 3]], np.float32))
        y = tensor("fc", [2, 4])
        out = tensor("output", [2, 4])
        op(B.FULLY_CONNECTED, [x, w, b], [y], s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT())
        op(B.ADD, [y, c], [out], s.BuiltinOptions.AddOptions, s.AddOptionsT())
    elif kind == "rank2_const":
        c = tensor("table", [24, 32], data=np.linspace(-3, 3, 24 * 32, dtype=np.float32).reshape(24, 32))
        out = tensor("output", [24, 32])
        op(B.ADD, [x, c], [out], s.BuiltinOptions.AddOptions, s.AddOptionsT())
    elif kind == "clean":
        c = tensor("bias", [1, 1, 1, 4], data=np.arange(4, dtype=np.float32))
        y = tensor("sum", [1, 8, 8, 4])
        out = tensor("output", [1, 8, 8, 4])
        op(B.ADD, [x, c], [y], s.BuiltinOptions.AddOptions, s.AddOptionsT())
        op(B.MUL, [y, y], [out], s.BuiltinOptions.MulOptions, s.MulOptionsT())
    elif kind == "blocked":
        s5 = tensor("shape5", [5], i32, data=np.array([1, 2, 4, 8, 4], dtype=np.int32))
        s4 = tensor("shape4", [4], i32, data=np.array([1, 8, 8, 4], dtype=np.int32))
        r5 = tensor("r5", [1, 2, 4, 8, 4])
        r4 = tensor("r4", [1, 8, 8, 4])
        idx = tensor("indices", [2], i32, data=np.array([0, 3], dtype=np.int32))
        g = tensor("gathered", [1, 8, 8, 2])
        ci = tensor("as_int", [1, 8, 8, 2], i32)
        out = tensor("output", [1, 8, 8, 2])
        reshape = s.BuiltinOptions.ReshapeOptions
        op(B.RESHAPE, [x, s5], [r5], reshape, _opts(s.ReshapeOptionsT(), newShape=[1, 2, 4, 8, 4]))
        op(B.RESHAPE, [r5, s4], [r4], reshape, _opts(s.ReshapeOptionsT(), newShape=[1, 8, 8, 4]))
        op(B.GATHER, [r4, idx], [g], s.BuiltinOptions.GatherOptions, _opts(s.GatherOptionsT(), axis=3, batchDims=0))
        op(B.CAST, [g], [ci], s.BuiltinOptions.CastOptions, _opts(s.CastOptionsT(), inDataType=f32, outDataType=i32))
        op(B.CAST, [ci], [out], s.BuiltinOptions.CastOptions, _opts(s.CastOptionsT(), inDataType=i32, outDataType=f32))
    else:
        raise ValueError(f"kind must be 'clean', 'blocked', 'rank2_const' or 'fc_const', not {kind!r}")
    sg = s.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [x], [out], ops, "main"
    m = s.ModelT()
    m.version = 3
    m.description = f"nailkit probe model ({kind})"
    oc = []
    for code in codes:
        c_ = s.OperatorCodeT()
        c_.builtinCode, c_.deprecatedBuiltinCode, c_.version = code, min(code, 127), 1
        oc.append(c_)
    m.operatorCodes, m.subgraphs, m.buffers = oc, [sg], bufs
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    tin, tout = s.TensorMapT(), s.TensorMapT()
    tin.name, tin.tensorIndex = "input", x
    tout.name, tout.tensorIndex = "output", out
    sig.inputs, sig.outputs = [tin], [tout]
    m.signatureDefs = [sig]
    path = Path(path)
    path.write_bytes(pack_model(m))
    return path


def _opts(obj, **kw):
    for k, v in kw.items():
        setattr(obj, k, v)
    return obj
