"""Name the hardware behind a number: CPU model, the ISA flags that decide int8 speed, and GEMM ceilings via XNNPACK.

int8 speed is a property of the CPU's int8 dot-product instructions (x86: AVX-512 VNNI / AVX-VNNI / AMX-INT8; ARM:
dotprod / i8mm), so every benchmark row should carry ``cpu_info()`` and be read against ``gemm_ceilings()``.

* ``cpu_info(text=None)`` parses ``/proc/cpuinfo`` (x86 or ARM) into the model name, vendor, logical CPUs, the raw
  flag set and a small ``isa`` dict (avx2, avx512f, avx512_vnni, avx_vnni, amx_int8, dotprod, i8mm, sve, …).
* ``gemm_ceilings(threads=(1, 2))`` times one large FULLY_CONNECTED layer through LiteRT's XNNPACK delegate — the
  very kernels a .tflite model's linears/convs run on — at fp32, at dynamic-range int8 (float activations, int8
  weights: XNNPACK's qd8 kernels, what dynamic int8 .tflite files use) and at full int8 (int8 activations and
  weights: qs8 kernels, what static int8 uses). The tiny .tflite files are written directly with the TFLite
  flatbuffer schema (no TensorFlow, no torch), so the probe is cheap to import and to run.

Sizing and statistics: the default GEMM is M=256, K=N=1024 (0.54 GFLOP per run: a few ms at fp32, well under a
scheduler slice, yet 256×1024 output tiles for 2 threads to share). ``best_gflops`` (the ceiling) is the fastest of
many runs; ``median_gflops`` shows how much a busy machine takes away. Measured on a 2-CPU Sapphire Rapids VM with
another process on both cores: single fp32 runs of 1.2 ms were stretched to 20–37 ms by preemption while the 0.06 ms
int8 runs were not, so long runs and medians under-measure fp32 there; a probe on a busy machine measures what is
left, not the silicon.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

#: ISA features worth naming in a benchmark row; key → flag spellings in /proc/cpuinfo (x86 ``flags`` / ARM
#: ``Features``).
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "sse4_2": ("sse4_2",),
    "avx": ("avx",),
    "fma": ("fma",),
    "avx2": ("avx2",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512vl": ("avx512vl",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_fp16": ("avx512_fp16",),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "avx_vnni_int8": ("avx_vnni_int8",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "neon": ("asimd", "neon"),
    "dotprod": ("asimddp",),
    "i8mm": ("i8mm",),
    "fp16_arith": ("asimdhp",),
    "bf16": ("bf16",),
    "sve": ("sve",),
    "sve2": ("sve2",),
    "sme": ("sme",),
}

#: Which of the above give int8 dot products (the ones that make int8 faster than fp32).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "dotprod", "i8mm")

_ARM_IMPLEMENTERS = {"0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu", "0x48": "HiSilicon",
                     "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x53": "Samsung", "0x61": "Apple", "0xc0": "Ampere"}


@dataclass
class CpuInfo:
    model_name: str
    vendor: str
    arch: str
    logical_cpus: int
    flags: list[str] = field(default_factory=list)
    isa: dict[str, bool] = field(default_factory=dict)

    @property
    def int8_dot(self) -> list[str]:
        """The int8 dot-product extensions present (empty: int8 GEMM has no instruction-level edge over fp32)."""
        return [k for k in INT8_DOT_FLAGS if self.isa.get(k)]

    def summary(self) -> str:
        """One line for a benchmark table, e.g. ``Intel Xeon … (2 CPUs; AVX2, AVX-512, VNNI: avx512_vnni+avx_vnni)``."""
        parts = []
        if self.isa.get("avx2"):
            parts.append("AVX2")
        if self.isa.get("avx512f"):
            parts.append("AVX-512")
        if self.isa.get("neon"):
            parts.append("NEON")
        if self.isa.get("sve"):
            parts.append("SVE")
        dot = self.int8_dot
        parts.append("int8 dot: " + ("+".join(dot) if dot else "none"))
        return f"{self.model_name} ({self.logical_cpus} CPUs; {', '.join(parts)})"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["int8_dot"] = self.int8_dot
        d["summary"] = self.summary()
        d.pop("flags")
        return d


def _blocks(text: str) -> list[dict[str, str]]:
    out, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
                cur = {}
            continue
        if ":" in line:
            k, v = line.split(":", 1)
            cur.setdefault(k.strip().lower(), v.strip())
    if cur:
        out.append(cur)
    return out


def parse_cpuinfo(text: str, arch: str | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` text (x86 or ARM/aarch64)."""
    blocks = _blocks(text)
    procs = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    first = procs[0] if procs else (blocks[0] if blocks else {})
    flag_text = first.get("flags") or first.get("features") or ""
    if not flag_text:
        for b in blocks:
            flag_text = b.get("flags") or b.get("features") or ""
            if flag_text:
                break
    flags = sorted(set(flag_text.split()))
    fs = set(flags)
    isa = {k: any(s in fs for s in spellings) for k, spellings in ISA_FLAGS.items()}
    if arch is None:
        arch = "aarch64" if ("asimd" in fs or "CPU implementer".lower() in first) else \
            ("x86_64" if ("sse2" in fs or "lm" in fs) else platform.machine())
    model = first.get("model name") or ""
    vendor = first.get("vendor_id") or ""
    if not vendor and "cpu implementer" in first:
        vendor = _ARM_IMPLEMENTERS.get(first["cpu implementer"].lower(), first["cpu implementer"])
    if not model:
        hw = next((b.get("hardware") for b in blocks if b.get("hardware")), None)
        part = first.get("cpu part")
        model = hw or (f"{vendor} part {part}" if part else "") or platform.processor() or "unknown CPU"
    n = len(procs) or (os.cpu_count() or 1)
    return CpuInfo(model_name=" ".join(model.split()), vendor=vendor, arch=arch, logical_cpus=n, flags=flags,
                   isa=isa)


def cpu_info(text: str | None = None) -> CpuInfo:
    """This machine's CPU (or the given ``/proc/cpuinfo`` text)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        info = parse_cpuinfo(text, arch=platform.machine())
        if hasattr(os, "sched_getaffinity"):
            info.logical_cpus = len(os.sched_getaffinity(0))
        return info
    return parse_cpuinfo(text)


# ----------------------------------------------------------------------------------------------------------------
# GEMM ceilings through XNNPACK: one FULLY_CONNECTED layer in a tiny .tflite
# ----------------------------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "dynamic_int8", "int8")


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
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
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
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


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
    return [gemm_probe(p, t, **kw) for t in threads for p in precisions]


def hardware_report(threads: Iterable[int] = (1, 2), **kw: Any) -> dict[str, Any]:
    """CPU + GEMM ceilings as one JSON-able dict (for bench.json / notebook 06)."""
    probes = gemm_ceilings(threads, **kw)
    return {"cpu": cpu_info().to_json(), "gemm": [p.to_json() for p in probes],
            "ceilings_gflops": {f"{p.precision}@{p.threads}t": round(p.best_gflops, 1) for p in probes}}


if __name__ == "__main__":  # python -m nailkit.hardware
    import json

    print(json.dumps(hardware_report(), indent=1))
