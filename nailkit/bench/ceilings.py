"""This CPU's GEMM ceilings through XNNPACK: the one probe the benchmark holds every backend against.

``gemm_ceilings(threads=(1, 2))`` times one large FULLY_CONNECTED layer through LiteRT's XNNPACK delegate — the very
kernels a .tflite model's linears/convs run on — at fp32, at dynamic-range int8 (float activations, int8 weights:
XNNPACK's qd8 kernels, what dynamic int8 .tflite files use) and at full int8 (int8 activations and weights: qs8
kernels, what static int8 uses). The tiny .tflite files are written with the one flatbuffer writer
(``nailkit.tflite.flatbuffer``: no TensorFlow, no torch), so the probe is cheap to import and to run.
``measure_ceilings`` is what the benchmark records; ``ceiling_precision`` says which ceiling a backend is held against
(PyTorch, ORT and TorchScript run fp32 GEMMs, so they meet the fp32 one).

Sizing and statistics: the default GEMM is M=256, K=N=1024 (0.54 GFLOP per run: a few ms at fp32, well under a
scheduler slice, yet 256×1024 output tiles for 2 threads to share). ``best_gflops`` (the ceiling) is the fastest of
many runs; ``median_gflops`` shows how much a busy machine takes away. Measured on a 2-CPU Sapphire Rapids VM with
another process on both cores: single fp32 runs of 1.2 ms were stretched to 20–37 ms by preemption while the 0.06 ms
int8 runs were not, so long runs and medians under-measure fp32 there; a probe on a busy machine measures what is
left, not the silicon.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from nailkit.tflite.flatbuffer import pack_model, schema

#: the XNNPACK kernel families probed: fp32, qd8 (dynamic-range int8) and qs8 (full int8)
PRECISIONS = ("fp32", "dynamic_int8", "int8")

#: a TFLite precision → the XNNPACK kernel family its linears/convs run on (``PRECISIONS``): fp16 weights are widened
#: to fp32 on x86; dynamic-range int8 = qd8 kernels; static int8 (w8a8) = qs8 kernels; w8a16 has no int8×int8
#: kernel, so the int8 ceiling is only an upper bound for it
CEILING_OF_PRECISION = {"fp32": "fp32", "fp16": "fp32", "int8": "dynamic_int8", "full_int8": "int8",
                        "w8a8": "int8", "w8a16": "int8"}


def ceiling_precision(spec: Any) -> str:
    """Which GEMM ceiling a backend (``.kind``, ``.meta["precision"]``) is held against (PyTorch / ORT / TorchScript
    run fp32)."""
    if spec.kind.startswith("tflite"):
        return CEILING_OF_PRECISION.get(str(spec.meta.get("precision", "fp32")), "fp32")
    return "fp32"


def probe_weights(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The probe layer's float weights [n, k] and bias [n] (before any quantisation)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    return w, bias


def fully_connected_tflite(m: int, k: int, n: int, precision: str = "fp32", seed: int = 0) -> bytes:
    """A .tflite holding one FULLY_CONNECTED layer: input [m, k] → output [m, n], constant weights [n, k].

    precision: ``fp32`` (float32 everything), ``dynamic_int8`` (float32 activations, int8 per-channel weights:
    XNNPACK's qd8-f32-qc8w kernels, like a dynamic-range int8 model), ``int8`` (int8 activations and weights, int32
    bias: XNNPACK's qs8 kernels, like a static full-int8 model).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fb = schema()
    buffers = [fb.BufferT()]  # buffer 0: empty (required)

    def buffer(arr: np.ndarray | None) -> int:
        b = fb.BufferT()
        if arr is not None:
            b.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8)
        buffers.append(b)
        return len(buffers) - 1

    def quant(scale, zero_point, axis: int = 0):
        q = fb.QuantizationParametersT()
        q.scale = [float(s) for s in np.atleast_1d(scale)]
        q.zeroPoint = [int(z) for z in np.atleast_1d(zero_point)]
        q.quantizedDimension = axis
        return q

    def tensor(name: str, shape, ttype: int, buf: int, q=None):
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), ttype, buf
        if q is not None:
            t.quantization = q
        return t

    w, bias = probe_weights(k, n, seed)
    if precision == "fp32":
        tensors = [tensor("input", (m, k), fb.TensorType.FLOAT32, buffer(None)),
                   tensor("weights", (n, k), fb.TensorType.FLOAT32, buffer(w)),
                   tensor("bias", (n,), fb.TensorType.FLOAT32, buffer(bias)),
                   tensor("output", (m, n), fb.TensorType.FLOAT32, buffer(None))]
    elif precision == "dynamic_int8":
        ws = np.abs(w).max(axis=1) / 127.0
        wq = np.clip(np.round(w / ws[:, None]), -127, 127).astype(np.int8)
        tensors = [tensor("input", (m, k), fb.TensorType.FLOAT32, buffer(None)),
                   tensor("weights", (n, k), fb.TensorType.INT8, buffer(wq), quant(ws, np.zeros(n), 0)),
                   tensor("bias", (n,), fb.TensorType.FLOAT32, buffer(bias)),
                   tensor("output", (m, n), fb.TensorType.FLOAT32, buffer(None))]
    else:
        in_scale, out_scale = 4.0 / 127.0, 8.0 / 127.0
        ws = float(np.abs(w).max() / 127.0)
        wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
        bq = np.round(bias / (in_scale * ws)).astype(np.int32)
        tensors = [tensor("input", (m, k), fb.TensorType.INT8, buffer(None), quant(in_scale, 0)),
                   tensor("weights", (n, k), fb.TensorType.INT8, buffer(wq), quant(ws, 0)),
                   tensor("bias", (n,), fb.TensorType.INT32, buffer(bq), quant(in_scale * ws, 0)),
                   tensor("output", (m, n), fb.TensorType.INT8, buffer(None), quant(out_scale, 0))]

    opts = fb.FullyConnectedOptionsT()
    opts.fusedActivationFunction = fb.ActivationFunctionType.NONE
    opts.keepNumDims = False
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = fb.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = opts
    code = fb.OperatorCodeT()
    code.builtinCode = fb.BuiltinOperator.FULLY_CONNECTED
    code.deprecatedBuiltinCode = fb.BuiltinOperator.FULLY_CONNECTED
    code.version = 1 if precision == "fp32" else (5 if precision == "dynamic_int8" else 4)
    sg = fb.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [0], [3], [op], "main"
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sg], buffers
    model.description = f"nailkit GEMM probe {precision} {m}x{k}x{n}"
    return pack_model(model)


@dataclass
class GemmProbe:
    precision: str
    threads: int
    m: int
    k: int
    n: int
    runs: int
    best_gflops: float
    median_gflops: float
    xnnpack: bool  # whether the layer ran inside the XNNPACK delegate

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _delegated(interp) -> bool:
    try:
        return any(o["op_name"] == "DELEGATE" for o in interp._get_ops_details())
    except Exception:  # noqa: BLE001
        return False


def gemm_probe(precision: str = "fp32", threads: int = 1, *, m: int = 256, k: int = 1024, n: int = 1024,
               seconds: float = 1.0, min_runs: int = 20, max_runs: int = 2000) -> GemmProbe:
    """Time one FULLY_CONNECTED [m,k]×[k,n] through LiteRT + XNNPACK; GFLOP/s (2·m·k·n per run; int8: GOP/s)."""
    from ai_edge_litert.interpreter import Interpreter

    data = fully_connected_tflite(m, k, n, precision)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"gemm_{precision}.tflite"
        path.write_bytes(data)
        interp = Interpreter(model_path=str(path), num_threads=int(threads))
        interp.allocate_tensors()
        delegated = _delegated(interp)
        inp = interp.get_input_details()[0]
        rng = np.random.default_rng(1)
        if precision == "int8":
            x = rng.integers(-100, 100, size=(m, k), dtype=np.int8)
        else:
            x = rng.standard_normal((m, k)).astype(np.float32)
        interp.set_tensor(inp["index"], x)
        interp.invoke()  # warm-up (packs weights)
        times: list[float] = []
        t_end = time.perf_counter() + seconds
        while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < max_runs):
            t0 = time.perf_counter()
            interp.invoke()
            times.append(time.perf_counter() - t0)
    flop = 2.0 * m * k * n
    return GemmProbe(precision=precision, threads=int(threads), m=m, k=k, n=n, runs=len(times),
                     best_gflops=flop / min(times) / 1e9, median_gflops=flop / float(np.median(times)) / 1e9,
                     xnnpack=delegated)


def gemm_ceilings(threads: Iterable[int] = (1, 2), precisions: Iterable[str] = PRECISIONS, **kw: Any
                  ) -> list[GemmProbe]:
    """``gemm_probe`` for every (precision, threads) pair, interleaved by thread count."""
    precisions = tuple(precisions)
    return [gemm_probe(p, t, **kw) for t in threads for p in precisions]


def measure_ceilings(threads: Sequence[int], *, seconds: float = 1.0) -> tuple[dict[int, dict[str, float]],
                                                                               list[dict[str, Any]]]:
    """XNNPACK GEMM ceilings per thread count (``gemm_ceilings``: one large FULLY_CONNECTED at fp32 / dynamic int8 /
    int8, best of many runs). A count above 1 is floored at the 1-thread ceiling: a second thread can only add
    throughput, so a lower reading is the probe under-measuring (a busy or SMT-sibling core), which is what made
    "of GEMM peak" exceed 100 % before. Returns ({threads: {precision: GFLOP/s}}, raw probes)."""
    ts = sorted({1, *[int(t) for t in threads]})
    probes = gemm_ceilings(ts, seconds=seconds)
    best = {t: {p.precision: p.best_gflops for p in probes if p.threads == t} for t in ts}
    out = {t: {k: max(v, best[1][k]) for k, v in best[t].items()} for t in ts if t in set(threads)}
    return out, [p.to_json() for p in probes]
