"""Rewrites of a converted ``.tflite`` flatbuffer (the TFLite counterpart of ``onnx_passes``), and the one way nailkit
re-serialises a model.

* ``inline_buffers`` moves tensor data that ai-edge-quantizer wrote after the flatbuffer into it, so such files can
  be re-serialised (``nailkit.tflite.flatbuffer.pack_model``).
* ``lift_constant_binary_ops(path)`` — the GPU target's fix for a LiteRT WebGPU delegate defect found here: an
  elementwise binary op (ADD, SUB, MUL, DIV, …) between a **rank-2 runtime tensor** and a **non-broadcast constant**
  (not a scalar, not per-channel) runs, compiles as "fully accelerated", and returns wrong numbers. Measured under
  SwiftShader on a one-op model: ``x[200,256] + C[200,256]`` off by up to 6.27, ``x[200,256] + C[1,200,256]`` by
  0.88, while ``x[1,200,256] + C[1,200,256]`` is exact (the decoder's first self-attention residual, where rfdetr's
  learned query embedding is a constant, moved graph B's query features by 0.068). litert-torch squeezes fully
  connected outputs to 2-D, so the pattern cannot be avoided from PyTorch (the converter folds any trick). The pass
  gives the op rank-3 operands — RESHAPE of the runtime input to ``[1, …]``, the constant's tensor re-declared with
  a leading 1 over the same buffer — and RESHAPEs the result back, so the graph computes the same values.
  ``risky_constant_binary_ops(path)`` lists the ops that match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nailkit.core.artifacts import atomic_write
from nailkit.tflite.flatbuffer import pack_model, read_bytes, schema, unpack

BINARY_OPS = ("ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE", "POW")


def inline_buffers(model: bytes) -> bytes:
    """The same .tflite with every buffer stored inside the flatbuffer. ai-edge-quantizer writes the tensor data of
    its output after the flatbuffer (``Buffer.offset``/``size``); re-serialising through the schema's object API
    (``pack_model``: the metadata embedding, the passes here) cannot keep such data. Models under 2 GB only."""
    m = unpack(model)
    moved = 0
    for b in m.buffers or []:
        if (b.offset or 0) > 1:
            b.data = np.frombuffer(model[b.offset:b.offset + b.size], dtype=np.uint8)
            b.offset, b.size = 0, 0
            moved += 1
    return pack_model(m) if moved else model


def load_model_t(path: str | os.PathLike[str]) -> Any:
    return unpack(read_bytes(path))


def _op_names() -> dict[int, str]:
    s = schema()
    return {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}


def _is_const(model: Any, t: Any) -> bool:
    b = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
    return b is not None and b.data is not None and len(b.data) > 0


def _risky(model: Any, sg: Any, op: Any, names: dict[int, str]) -> bool:
    code = model.operatorCodes[op.opcodeIndex]
    name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
    if name not in BINARY_OPS or len(op.inputs) != 2:
        return False
    t = [sg.tensors[i] for i in op.inputs]
    const = [_is_const(model, x) for x in t]
    if const[0] == const[1]:
        return False
    c, v = (t[0], t[1]) if const[0] else (t[1], t[0])
    cs, vs = list(c.shape if c.shape is not None else []), list(v.shape if v.shape is not None else [])
    if int(np.prod(cs or [1])) <= 1 or all(d == 1 for d in cs[:-1]):
        return False  # scalar or per-channel constant: handled right
    return len(vs) < 3 or len(vs) != len(cs)


def risky_constant_binary_ops(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ops ``lift_constant_binary_ops`` rewrites: [{index, op, runtime_shape, constant_shape}]."""
    model = load_model_t(path)
    names = _op_names()
    out = []
    for sg in model.subgraphs:
        for i, op in enumerate(sg.operators):
            if _risky(model, sg, op, names):
                shapes = [list(sg.tensors[j].shape) for j in op.inputs]
                const = [_is_const(model, sg.tensors[j]) for j in op.inputs]
                code = model.operatorCodes[op.opcodeIndex]
                out.append({"index": i, "op": names.get(max(code.builtinCode, code.deprecatedBuiltinCode)),
                            "runtime_shape": [int(d) for d in shapes[const.index(False)]],
                            "constant_shape": [int(d) for d in shapes[const.index(True)]]})
    return out


def lift_constant_binary_ops(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None) -> int:
    """Rewrite every risky constant binary op of ``src`` (see the module doc) with rank-≥3 operands; write to
    ``dst`` (default: in place, via a temporary file). Returns how many ops were rewritten (0: file untouched)."""
    s = schema()
    model = load_model_t(src)
    names = _op_names()
    reshape_code = s.BuiltinOperator.RESHAPE
    idx = next((i for i, c in enumerate(model.operatorCodes)
                if max(c.builtinCode, c.deprecatedBuiltinCode) == reshape_code), None)
    n = 0

    def new_tensor(sg, like, shape, buffer=0, name=""):
        t = s.TensorT()
        t.name = (like.name.decode() if isinstance(like.name, bytes) else like.name or "") + name
        t.type, t.shape, t.buffer = like.type, list(shape), buffer
        t.quantization = like.quantization
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def shape_const(sg, shape):
        b = s.BufferT()
        b.data = np.frombuffer(np.asarray(shape, dtype=np.int32).tobytes(), dtype=np.uint8)
        model.buffers.append(b)
        t = s.TensorT()
        t.name, t.type, t.shape, t.buffer = f"nailkit_lift_shape_{len(sg.tensors)}", s.TensorType.INT32, [len(shape)], \
            len(model.buffers) - 1
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def reshape_op(sg, src_t, dst_t, shape):
        o = s.OperatorT()
        o.opcodeIndex = idx
        o.inputs, o.outputs = [src_t, shape_const(sg, shape)], [dst_t]
        o.builtinOptionsType = s.BuiltinOptions.ReshapeOptions
        opt = s.ReshapeOptionsT()
        opt.newShape = list(shape)
        o.builtinOptions = opt
        return o

    for sg in model.subgraphs:
        ops = []
        for op in sg.operators:
            if not _risky(model, sg, op, names):
                ops.append(op)
                continue
            if idx is None:
                c = s.OperatorCodeT()
                c.builtinCode, c.deprecatedBuiltinCode, c.version = reshape_code, min(reshape_code, 127), 1
                model.operatorCodes.append(c)
                idx = len(model.operatorCodes) - 1
            t = [sg.tensors[j] for j in op.inputs]
            const = [_is_const(model, x) for x in t]
            ci = const.index(True)
            vi = 1 - ci
            cs, vs = list(t[ci].shape), list(t[vi].shape)
            rank = max(3, len(cs), len(vs))
            vs_l = [1] * (rank - len(vs)) + vs
            cs_l = [1] * (rank - len(cs)) + cs
            out_t = sg.tensors[op.outputs[0]]
            os_ = list(out_t.shape)
            os_l = [1] * (rank - len(os_)) + os_
            v_new = new_tensor(sg, t[vi], vs_l, name="_lifted")
            c_new = new_tensor(sg, t[ci], cs_l, buffer=t[ci].buffer, name="_lifted")
            o_new = new_tensor(sg, out_t, os_l, name="_lifted")
            ops.append(reshape_op(sg, op.inputs[vi], v_new, vs_l))
            ins = list(op.inputs)
            ins[vi], ins[ci] = v_new, c_new
            op.inputs = ins
            orig_out = op.outputs[0]
            op.outputs = [o_new]
            ops.append(op)
            ops.append(reshape_op(sg, o_new, orig_out, os_))
            n += 1
        sg.operators = ops
    if n:
        data = pack_model(model)
        atomic_write(Path(dst or src), lambda p: p.write_bytes(data))
    elif dst is not None and Path(dst) != Path(src):
        Path(dst).write_bytes(Path(src).read_bytes())
    return n


# --------------------------------------------------------------------------------------------------------------------
# fp16 weights only where the rounding control rounds them: the route A fp16 file
# --------------------------------------------------------------------------------------------------------------------
#: ops whose constant operand (input 1: the weights / filter; any constant input of BATCH_MATMUL) is stored as fp16
GEMM_WEIGHT_OPS = {"FULLY_CONNECTED": (1,), "CONV_2D": (1,), "DEPTHWISE_CONV_2D": (1,), "TRANSPOSE_CONV": (1,),
                   "BATCH_MATMUL": (0, 1)}
#: DEQUANTIZE's op version for a float16 input (TFLite's op version registry)
DEQUANTIZE_FP16_VERSION = 3


def fp16_gemm_weights(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, int]:
    """An fp16 ``.tflite`` from an fp32 one: every constant GEMM operand (``GEMM_WEIGHT_OPS``) stored as fp16 behind a
    DEQUANTIZE, as TFLite's fp16 post-training quantization stores weights (XNNPACK packs them at load time); every
    other float constant stays fp32.

    Why (route A fp16 diagnosis, 2026-12-03, the demo model): TFLite's converter rounds *every* float constant, and
    onnx2tf's graph holds constants that are no parameter of the PyTorch model — its pseudo-Erf (GELU) polynomial
    coefficients, the encoder's proposal anchors and the interpolated position embedding, folded. Rounding those put
    the file at 3.41× the fp16 rounding control (pre-TopK scores 2.94×, masks 3.41×); the GEMM weights alone at 0.97×.
    Returns ``{"fp16_tensors": n, "fp16_bytes": b}``."""
    s = schema()
    model = load_model_t(src)
    names = _op_names()
    dq_code = s.BuiltinOperator.DEQUANTIZE
    dq_idx = next((i for i, c in enumerate(model.operatorCodes)
                   if max(c.builtinCode, c.deprecatedBuiltinCode) == dq_code and c.version == DEQUANTIZE_FP16_VERSION),
                  None)
    if dq_idx is None:
        c = s.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = dq_code, min(dq_code, 127), DEQUANTIZE_FP16_VERSION
        model.operatorCodes.append(c)
        dq_idx = len(model.operatorCodes) - 1
    users = {}  # buffer index -> how many tensors read it
    for sg in model.subgraphs:
        for t in sg.tensors:
            users[t.buffer] = users.get(t.buffer, 0) + 1
    n = nbytes = 0
    for sg in model.subgraphs:
        weights: list[int] = []
        for op in sg.operators:
            code = model.operatorCodes[op.opcodeIndex]
            for j in GEMM_WEIGHT_OPS.get(names.get(max(code.builtinCode, code.deprecatedBuiltinCode)), ()):
                if j < len(op.inputs) and op.inputs[j] >= 0:
                    t = sg.tensors[op.inputs[j]]
                    if t.type == s.TensorType.FLOAT32 and _is_const(model, t) and op.inputs[j] not in weights:
                        weights.append(op.inputs[j])
        dequantize = []
        for ti in weights:
            t = sg.tensors[ti]
            old = model.buffers[t.buffer]
            half = np.frombuffer(bytes(bytearray(old.data)), np.float32).astype(np.float16)
            b = s.BufferT()
            b.data = np.frombuffer(half.tobytes(), np.uint8)
            model.buffers.append(b)
            t16 = s.TensorT()
            t16.name = (t.name.decode() if isinstance(t.name, bytes) else t.name or "") + "_fp16"
            t16.type, t16.shape, t16.buffer = s.TensorType.FLOAT16, list(t.shape), len(model.buffers) - 1
            sg.tensors.append(t16)
            if users.get(t.buffer, 0) == 1:
                old.data = None  # no fp32 copy left in the file
            t.buffer = 0  # the fp32 tensor becomes DEQUANTIZE's output: every consumer reads it as before
            op = s.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = dq_idx, [len(sg.tensors) - 1], [ti]
            dequantize.append(op)
            n, nbytes = n + 1, nbytes + half.nbytes
        sg.operators = dequantize + list(sg.operators)
    data = pack_model(model)
    atomic_write(Path(dst), lambda p: p.write_bytes(data))
    return {"fp16_tensors": n, "fp16_bytes": nbytes}
