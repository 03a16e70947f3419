"""Benchmark every backend side by side: latency, peak memory, size, load time, FLOPs and the CPU's GEMM ceiling.

How the numbers are made (and why):

* **Interleaved latency** (``interleaved_latency``): all backends live in one process; after a warm-up, each round
  runs every backend once, in an order rotated by one per round, so a burst of machine noise hits every backend
  alike instead of whichever happened to run then. Per backend: median and p90 (linear interpolation) of the rounds.
  The input is the preprocessed tensor; preprocessing and post-processing are not timed (they are identical numpy
  code for every backend).
* **Thread counts**: each thread count is a separate interleaved pass; runners are (re)made with that many threads
  (ORT ``intra_op_num_threads``, TFLite ``num_threads``, ``torch.set_num_threads``). More threads than cores
  oversubscribes the CPU: the table records ``os.cpu_count()`` next to it.
* **Peak RSS / load time** (``measure_in_fresh_process``): peak RSS is per process, so each backend is loaded and run
  in its own fresh ``python`` process that reports ``ru_maxrss`` after importing its runtime and after load + runs.
* **FLOPs** (``count_flops``): ``torch.utils.flop_counter.FlopCounterMode`` on the export-mode module at that
  resolution. It counts matmul/conv/attention only (mm, addmm, bmm, baddbmm, convolution, SDPA); every other aten op
  that ran (grid_sample of the deformable attention, softmax, GELU, layer norm, interpolation, top-k, ...) is listed
  with its call count under ``uncounted_ops``, so the count is a lower bound and says exactly what it left out.
  CPU attention runs as ``_scaled_dot_product_flash_attention_for_cpu``, which the registry lacks: it is counted here
  with the same formula as the other SDPA kernels (4·B·H·L·S·E).
* **GEMM ceiling**: a 1536² fp32 ``torch.matmul`` (MKL/oneDNN) timed as one more entry of the interleaved rounds
  (``gemm_callable``), so it sees the same machine noise as the backends (``gemm_peak`` is the standalone version);
  achieved fraction = model FLOPs / latency / ceiling. int8 kernels can exceed 100 % of this fp32 ceiling.
* **Headline = ratios**: latency ÷ ORT fp32 latency and ÷ PyTorch eager latency (< 1 = faster), ms as context.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from nailkit.report import table
from nailkit.runtime import BACKENDS

# ----------------------------------------------------------------------------------------------------------------
# 1. interleaved latency
# ----------------------------------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation between order statistics (numpy's default 'linear' method)."""
    if not len(samples):
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must lie in [0, 100]; got {q}")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


@dataclass
class LatencyStats:
    """Latencies of one backend, milliseconds."""

    name: str
    samples_ms: list[float]

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError(f"{self.name}: no latency samples")
        bad = [s for s in self.samples_ms if not (math.isfinite(s) and s >= 0)]
        if bad:
            raise ValueError(f"{self.name}: invalid latency samples {bad[:3]}")

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 90)

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    def summary(self) -> dict[str, float]:
        return {"n": self.n, "median_ms": self.median_ms, "p90_ms": self.p90_ms, "min_ms": self.min_ms,
                "mean_ms": self.mean_ms}


def rotated_order(names: Sequence[str], round_index: int) -> list[str]:
    """Order of round ``round_index``: the list rotated left by ``round_index`` (every backend leads in turn)."""
    n = len(names)
    return [names[(round_index + i) % n] for i in range(n)] if n else []


def interleaved_latency(fns: Mapping[str, Callable[[], Any]], *, runs: int = 10, warmup: int = 2,
                        clock: Callable[[], float] = time.perf_counter,
                        order_log: Optional[list[list[str]]] = None,
                        progress: Optional[Callable[[int, int], None]] = None) -> dict[str, LatencyStats]:
    """Time every callable ``runs`` times, interleaved: round r runs all of them in ``rotated_order(names, r)``.

    ``warmup`` untimed rounds (same rotation) come first. ``order_log`` (if given) receives each timed round's order.
    Returns ``{name: LatencyStats}``. A callable that raises aborts the whole measurement with its name.
    """
    if not fns:
        raise ValueError("interleaved_latency: no backends given")
    if int(runs) != runs or runs < 1:
        raise ValueError(f"runs must be a positive integer; got {runs!r}")
    if int(warmup) != warmup or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer; got {warmup!r}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"backend {name!r} is not callable ({type(fn).__name__})")
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for w in range(int(warmup)):
        for name in rotated_order(names, w):
            _call(name, fns[name])
    for r in range(int(runs)):
        order = rotated_order(names, r)
        if order_log is not None:
            order_log.append(order)
        for name in order:
            t0 = clock()
            _call(name, fns[name])
            samples[name].append((clock() - t0) * 1000.0)
        if progress is not None:
            progress(r + 1, int(runs))
    return {n: LatencyStats(n, s) for n, s in samples.items()}


def _call(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - name the backend that failed
        raise RuntimeError(f"backend {name!r} failed during the benchmark: {type(exc).__name__}: {exc}") from exc


def ratios(values: Mapping[str, float], reference: str) -> dict[str, float]:
    """``values[name] / values[reference]`` for every name (latency ratio: < 1 means faster than the reference)."""
    if reference not in values:
        raise KeyError(f"reference {reference!r} not among the measured backends {sorted(values)}")
    ref = float(values[reference])
    if not (math.isfinite(ref) and ref > 0):
        raise ValueError(f"reference {reference!r} has no positive value ({ref})")
    return {k: float(v) / ref for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------------------
# 2. the CPU's GEMM ceiling and FLOPs
# ----------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), falling back to ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["sched_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        pass
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        pass
    return info


def gemm_peak(threads: int = 1, *, n: int = 1024, seconds: float = 1.0) -> dict[str, float]:
    """Sustained fp32 GEMM throughput of this CPU with ``threads`` torch threads: an n×n @ n×n matmul repeated for
    ``seconds``; returns the median and best GFLOP/s over the repetitions (2·n³ FLOPs each)."""
    import torch

    if threads < 1 or n < 8 or seconds <= 0:
        raise ValueError(f"gemm_peak needs threads >= 1, n >= 8, seconds > 0; got {threads}, {n}, {seconds}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        for _ in range(2):
            torch.matmul(a, b, out=out)
        times = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 3:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    flop = 2.0 * n ** 3
    return {"threads": int(threads), "n": int(n), "reps": len(times),
            "median_gflops": flop / float(np.median(times)) / 1e9, "best_gflops": flop / min(times) / 1e9}


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d_q = query_shape
    _b2, _h2, s_k, _d2 = key_shape
    _b3, _h3, _s3, d_v = value_shape
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


@dataclass
class FlopCount:
    resolution: int
    flops: int  # counted FLOPs (1 multiply-add = 2 FLOPs)
    by_op: dict[str, int]
    uncounted_ops: dict[str, int]  # aten ops that ran but carry no FLOP formula -> call count

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def summary(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "gflops": self.gflops, "gmacs": self.macs / 1e9,
                "by_op_gflops": {k: v / 1e9 for k, v in sorted(self.by_op.items(), key=lambda kv: -kv[1])},
                "uncounted_ops": dict(sorted(self.uncounted_ops.items(), key=lambda kv: -kv[1]))}


#: aten ops that move/reshape data or are free; left out of ``uncounted_ops`` to keep that list about arithmetic.
_VIEW_LIKE = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
              "slice", "select", "clone", "contiguous", "detach", "alias", "split", "split_with_sizes", "unbind",
              "as_strided", "empty", "zeros", "ones", "full", "arange", "_to_copy", "copy_", "lift_fresh",
              "new_zeros", "new_empty", "new_ones", "view_as", "flatten", "cat", "stack", "index", "gather",
              "chunk", "sym_size", "sym_numel", "scalar_tensor", "zeros_like", "ones_like", "empty_like",
              "fill_", "_local_scalar_dense", "item", "expand_as", "unfold", "narrow", "repeat", "tile"}


def count_flops(module, resolution: int, *, x=None) -> FlopCount:
    """Count the FLOPs of one forward of ``module`` (an export-mode module) on a [1,3,R,R] input.

    Only ops with a FLOP formula in ``torch.utils.flop_counter`` are counted, plus CPU flash attention
    (``_scaled_dot_product_flash_attention_for_cpu``, registered here). Every other arithmetic op is reported in
    ``uncounted_ops`` with its call count.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    counted_names = {str(k).split(".")[1] if "." in str(k) else str(k) for k in list(flop_registry) + list(extra)}

    seen: dict[str, int] = {}

    class _Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            seen[name] = seen.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    if x is None:
        x = torch.zeros(1, 3, int(resolution), int(resolution))
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    # FlopCounterMode's module tracker trips over parameters that require grad under no_grad, so switch
    # requires_grad off instead (and restore it).
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with counter, _Census():
            module(x)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op).replace("aten.", "")] = int(n)
    uncounted = {k: v for k, v in seen.items()
                 if k not in counted_names and k.rstrip("_") not in _VIEW_LIKE and k not in _VIEW_LIKE}
    return FlopCount(resolution=int(resolution), flops=int(counter.get_total_flops()), by_op=by_op,
                     uncounted_ops=uncounted)


def achieved_fraction(flops: float, latency_ms: float, peak_gflops: float) -> float:
    """Fraction of the GEMM ceiling a run achieves: (flops / latency) / peak."""
    if latency_ms <= 0 or peak_gflops <= 0:
        raise ValueError(f"latency and peak must be positive; got {latency_ms} ms, {peak_gflops} GFLOP/s")
    return float(flops) / (latency_ms / 1000.0) / (peak_gflops * 1e9)


# ----------------------------------------------------------------------------------------------------------------
# 3. backends: what to load, how, and in a fresh process
# ----------------------------------------------------------------------------------------------------------------

#: backend kinds ``open_backend`` understands: the one vocabulary of ``nailkit.runtime.BACKENDS``
KINDS = BACKENDS


@dataclass
class BackendSpec:
    """One backend to benchmark. ``path`` is the checkpoint for torch kinds, else the .onnx/.tflite/.pt file."""

    name: str
    kind: str
    path: str
    resolution: int
    segmentation: bool = True
    layout: str = "NCHW"  # the input the runner takes; set from the file for tflite
    meta: dict[str, Any] = field(default_factory=dict)  # route, precision, ... (reported, not used to load)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backend {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}")
        if int(self.resolution) <= 0:
            raise ValueError(f"backend {self.name!r}: resolution must be positive; got {self.resolution}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def file_size_mb(self) -> Optional[float]:
        """Size of the deployable artifact (for torch kinds: the checkpoint, weights in fp32)."""
        p = Path(self.path)
        return p.stat().st_size / 2 ** 20 if p.is_file() else None


_MODEL_CACHE: dict[Any, Any] = {}


def cached_model(checkpoint: str):
    """The rfdetr model of ``checkpoint`` (``nailkit.model.load_model``), loaded once per process."""
    from nailkit.model import load_model

    key = ("rf", str(checkpoint))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(checkpoint)
    return _MODEL_CACHE[key]


def spec_options(spec: "BackendSpec") -> dict[str, Any]:
    """The export options a backend was made with (``nailkit.model.export_options``: only non-default ones)."""
    from nailkit.model import export_options

    return export_options(spec.meta.get("sampling"), spec.meta.get("mask_queries"))


def torch_export_module(checkpoint: str, resolution: int, segmentation: bool = True, **options: Any):
    """Export-mode module at ``resolution``; ``segmentation=False`` is the detection-only module (head removed,
    ``nailkit.alternatives.detection_only_module``); ``options``: ``export_module``'s sampling / mask_queries.
    Cached in this process."""
    from nailkit.alternatives import detection_only_module
    from nailkit.model import export_module

    key = ("module", str(checkpoint), int(resolution), bool(segmentation), tuple(sorted(options.items())))
    if key not in _MODEL_CACHE:
        rf = cached_model(checkpoint)
        _MODEL_CACHE[key] = (export_module(rf, resolution, **options) if segmentation
                             else detection_only_module(rf, resolution))
    return _MODEL_CACHE[key]


class _TorchCallable:
    """Runs a torch module (detection-only export module, or a saved TorchScript file) on an NCHW numpy input."""

    def __init__(self, module, threads: Optional[int]) -> None:
        import torch

        self.module = module
        self.threads = threads
        self.resolution = None
        self._torch = torch

    def run(self, x: np.ndarray):
        from nailkit.parity import raw_from_outputs

        torch = self._torch
        if self.threads:
            torch.set_num_threads(int(self.threads))
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)))
        if isinstance(out, dict):
            out = [out[k] for k in ("pred_boxes", "pred_logits", "pred_masks") if k in out]
        return raw_from_outputs([o.numpy() for o in out])


def open_backend(spec: BackendSpec, threads: Optional[int] = None):
    """Load a backend; returns an object with ``.run(x_nchw) -> RawOutputs``.

    PyTorch eager / traced (rfdetr's ``inference(compile=True)``), ORT and TFLite go through
    ``nailkit.runtime.make_runner`` (NHWC/NCHW and output order are its business). Detection-only PyTorch and a saved
    TorchScript ``.pt`` file are run here.
    """
    from nailkit.runtime import make_runner

    if spec.kind in ("torch", "torch-traced"):
        if not spec.segmentation:
            if spec.kind != "torch":
                raise ValueError(f"{spec.name}: detection-only is supported for kind 'torch' only")
            return _TorchCallable(torch_export_module(spec.path, spec.resolution, False), threads)
        if spec_options(spec):
            from nailkit.runtime import TorchRunner

            return TorchRunner(cached_model(spec.path), spec.resolution, traced=(spec.kind == "torch-traced"),
                               threads=threads, **spec_options(spec))
        return make_runner(cached_model(spec.path), backend=spec.kind, threads=threads, resolution=spec.resolution)
    if spec.kind == "torchscript":
        if not Path(spec.path).is_file():
            raise FileNotFoundError(f"{spec.path}: no such TorchScript file")
        import torch

        return _TorchCallable(torch.jit.load(spec.path, map_location="cpu").eval(), threads)
    return make_runner(spec.path, backend=spec.kind, threads=threads)


def set_threads(runner, spec: BackendSpec, threads: int):
    """The runner at ``threads``: torch runners switch in place; ORT/TFLite fix it at load, so they are reopened."""
    if spec.kind in ("torch", "torch-traced", "torchscript"):
        runner.threads = int(threads)
        return runner
    return open_backend(spec, threads)


def run_backend(runner, x_nchw: np.ndarray):
    """``runner.run`` on the NCHW input (runtime runners transpose to NHWC themselves when the file wants it)."""
    return runner.run(x_nchw)


def _proc_status_mb(field: str) -> Optional[float]:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    v = _proc_status_mb("VmRSS")
    return float("nan") if v is None else v


def _maxrss_mb() -> float:
    """Peak RSS of this process image: ``VmHWM`` (per address space, reset by exec). ``ru_maxrss`` is only the
    fallback: Linux carries it across fork+exec, so a child of a 5 GB notebook kernel would report 5 GB."""
    v = _proc_status_mb("VmHWM")
    if v is not None:
        return v
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _child_main(spec_json: str) -> None:
    """Entry point of the fresh process: import, load, run; print one JSON line."""
    req = json.loads(spec_json)
    spec = BackendSpec(**req["spec"])
    runs = int(req.get("runs", 3))
    threads = req.get("threads")
    t0 = time.perf_counter()
    if spec.kind in ("torch", "torch-traced", "torchscript"):
        import torch  # noqa: F401
    if spec.kind in ("onnxruntime",):
        import onnxruntime  # noqa: F401
    if spec.kind == "tflite":
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    import nailkit.runtime  # noqa: F401
    import_s = time.perf_counter() - t0
    rss_import = _maxrss_mb()
    x = np.zeros((1, 3, spec.resolution, spec.resolution), dtype=np.float32)
    t0 = time.perf_counter()
    runner = open_backend(spec, threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_backend(runner, x)
    first_s = time.perf_counter() - t0
    for _ in range(max(0, runs - 1)):
        run_backend(runner, x)
    from nailkit.subproc import emit

    emit({"import_s": import_s, "load_s": load_s, "first_run_s": first_s,
          "rss_after_import_mb": rss_import, "peak_rss_mb": _maxrss_mb(), "rss_now_mb": _rss_mb()})


def measure_in_fresh_process(spec: BackendSpec, *, threads: int = 1, runs: int = 3, timeout: float = 900
                             ) -> dict[str, Any]:
    """Load + run ``spec`` in a fresh python process; returns load time, first-run time and peak RSS (MB).

    ``peak_rss_mb`` is the process's peak RSS (``VmHWM``) after load and ``runs`` runs; ``rss_after_import_mb`` is
    the same measure right after importing the runtime (torch only for torch kinds: ORT and TFLite children never
    import it), so ``peak_rss_mb - rss_after_import_mb`` is what loading and running the model costs.
    """
    from nailkit import subproc

    req = json.dumps({"spec": spec.to_json(), "threads": threads, "runs": runs})
    try:
        res = subproc.run_python(["-m", "nailkit.bench", "_child", req], desc=f"fresh process {spec.name}",
                                 timeout=timeout, progress=False)
    except subproc.WorkerError as exc:
        raise RuntimeError(f"backend {spec.name!r} ({spec.path}) failed in a fresh process: {exc}") from None
    res["model_rss_mb"] = res["peak_rss_mb"] - res["rss_after_import_mb"]
    return res


# ----------------------------------------------------------------------------------------------------------------
# 4. the whole benchmark
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """Everything one benchmark measured; ``to_json`` for outputs/06_benchmark.json, ``markdown`` for the table."""

    machine: dict[str, Any]
    specs: dict[str, BackendSpec]
    latency: dict[int, dict[str, dict[str, float]]]  # threads -> name -> LatencyStats.summary()
    gemm: dict[int, dict[str, float]]  # threads -> gemm_peak()
    flops: dict[int, dict[str, Any]]  # resolution -> FlopCount.summary() (+ "detection_only" variant keyed -R)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> measure_in_fresh_process()
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> accuracy drift vs PyTorch fp32 @ ref R
    extra: dict[str, Any] = field(default_factory=dict)
    #: threads -> {"fp32"|"dynamic_int8"|"int8": GFLOP/s}: XNNPACK GEMM ceilings (``nailkit.hardware``), best of
    #: many runs; at t > 1 threads never below the 1-thread ceiling (a probe that measured less under-measured)
    ceilings: dict[int, dict[str, float]] = field(default_factory=dict)
    reference_ort: str = "onnxruntime fp32"
    reference_torch: str = "pytorch eager"

    def rows(self, threads: int) -> list[dict[str, Any]]:
        """One row per backend at ``threads``: ms, ratios, size, load, RSS, GEMM fraction, drift."""
        lat = self.latency[threads]
        med = {k: v["median_ms"] for k, v in lat.items()}
        r_ort = ratios(med, self.reference_ort) if self.reference_ort in med else {}
        r_pt = ratios(med, self.reference_torch) if self.reference_torch in med else {}
        peak = self.gemm.get(threads, {}).get("median_gflops")
        rows = []
        for name, st in lat.items():
            spec = self.specs[name]
            fl = self.flops.get(_spec_flop_key(spec))
            mem = self.memory.get(name, {})
            d = self.drift.get(name, {})
            rows.append({
                "backend": name, "kind": spec.kind, "resolution": spec.resolution,
                "route": spec.meta.get("route"), "precision": spec.meta.get("precision", "fp32"),
                "threads": threads, "median_ms": st["median_ms"], "p90_ms": st["p90_ms"],
                "x_ort_fp32": r_ort.get(name), "x_pytorch_eager": r_pt.get(name),
                "size_mb": spec.file_size_mb, "load_s": mem.get("load_s"), "peak_rss_mb": mem.get("peak_rss_mb"),
                "model_rss_mb": mem.get("model_rss_mb"),
                "gflops": fl["gflops"] if fl else None,
                "gemm_fraction": (achieved_fraction(fl["gflops"] * 1e9, st["median_ms"], peak)
                                  if fl and peak else None),
                "sampling": spec.meta.get("sampling") or "grid", "mask_queries": spec.meta.get("mask_queries"),
                "ceiling": ceiling_precision(spec),
                "ceiling_fraction": (achieved_fraction(fl["gflops"] * 1e9, st["median_ms"],
                                                       self.ceilings[threads][ceiling_precision(spec)])
                                     if fl and self.ceilings.get(threads, {}).get(ceiling_precision(spec))
                                     else None),
                "matched_top10": d.get("matched_top10"), "min_mask_iou": d.get("min_mask_iou"),
                "max_logit_abs": d.get("max_logit_abs")})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "specs": {k: v.to_json() for k, v in self.specs.items()},
                "latency": {str(t): v for t, v in self.latency.items()},
                "gemm": {str(t): v for t, v in self.gemm.items()},
                "flops": {str(k): v for k, v in self.flops.items()}, "memory": self.memory, "drift": self.drift,
                "ceilings": {str(t): v for t, v in self.ceilings.items()},
                "rows": {str(t): self.rows(t) for t in self.latency},
                "sweep": {str(t): sweep_rows(self, t) for t in self.latency}, "extra": self.extra,
                "reference_ort": self.reference_ort, "reference_torch": self.reference_torch}

    def markdown(self) -> str:
        return markdown_report(self)


def sweep_rows(res: BenchResult, threads: Optional[int] = None) -> list[dict[str, Any]]:
    """Resolution sweep: per backend at a lower resolution, its speed-up over the same backend at the base
    resolution and its drift vs PyTorch fp32 at the base resolution (detections post-processed to the original
    image size, matched by IoU)."""
    t = threads or min(res.latency)
    lat = res.latency[t]
    base_by_family = {family(s): s for s in res.specs.values() if " @" not in s.name and s.segmentation}
    rows = []
    for name, spec in res.specs.items():
        fam = family(spec)
        base = base_by_family.get(fam)
        if base is None or name not in lat or base.name not in lat:
            continue
        d = res.drift.get(name, {})
        rows.append({"backend": fam, "resolution": spec.resolution, "threads": t,
                     "median_ms": lat[name]["median_ms"], "speedup": lat[base.name]["median_ms"] /
                     lat[name]["median_ms"], "gflops": res.flops.get(_flop_key(spec.resolution, True), {}).get("gflops"),
                     "matched_top10": d.get("matched_top10"), "mean_min_mask_iou": d.get("mean_min_mask_iou"),
                     "max_box_l1_px": d.get("max_box_l1_px"), "max_score_diff": d.get("max_score_diff")})
    swept = {r["backend"] for r in rows if r["resolution"] != res.specs[base_by_family[r["backend"]].name].resolution}
    rows = [r for r in rows if r["backend"] in swept]
    rows.sort(key=lambda r: (r["backend"], -r["resolution"]))
    return rows


SWEEP_COLUMNS = (("backend", "backend", "s"), ("resolution", "R", "d"), ("speedup", "speed-up vs same @base", ".2f"),
                 ("median_ms", "median ms", ".1f"), ("gflops", "GFLOP", ".1f"),
                 ("matched_top10", "top-10 matched vs PyTorch@base", "s"),
                 ("mean_min_mask_iou", "mean min mask IoU", ".3f"), ("max_box_l1_px", "max box Δ px", ".1f"),
                 ("max_score_diff", "max score Δ", ".2g"))


def _flop_key(resolution: int, segmentation: bool, options: Optional[Mapping[str, Any]] = None) -> int | str:
    """resolution (negative: detection-only); with export options a string, e.g. ``"432_tent"``, ``"432_mq20"``."""
    from nailkit.model import export_suffix

    base = int(resolution) if segmentation else -int(resolution)
    tag = export_suffix(**(options or {}))
    return f"{base}{tag}" if tag else base


def _spec_flop_key(spec: "BackendSpec") -> int | str:
    return _flop_key(spec.resolution, spec.segmentation, spec_options(spec))


HEADLINE_COLUMNS = (
    ("backend", "backend", "s"), ("resolution", "R", "d"), ("x_ort_fp32", "× ORT fp32", ".2f"),
    ("x_pytorch_eager", "× PyTorch eager", ".2f"), ("median_ms", "median ms", ".1f"), ("p90_ms", "p90 ms", ".1f"),
    ("size_mb", "size MB", ".1f"), ("load_s", "load s", ".2f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("gflops", "GFLOP", ".1f"), ("gemm_fraction", "of torch GEMM (median)", ".0%"),
    ("ceiling", "ceiling", "s"), ("ceiling_fraction", "of its ceiling", ".0%"),
    ("matched_top10", "top-10 matched", "s"), ("min_mask_iou", "min mask IoU", ".3f"),
    ("max_logit_abs", "max |Δlogit|", ".1e"))


def markdown_report(res: BenchResult) -> str:
    m = res.machine
    lines = [f"# nailkit benchmark — {m.get('cpu')} ({m.get('cpu_count')} cores)", "",
             "Latency ratios are median latency ÷ the reference's median latency at the same thread count "
             "(< 1 = faster). Batch 1, preprocessed input; pre/post-processing not timed. Backends interleaved "
             "round by round in one process.", ""]
    if m.get("note"):
        lines += [f"Note: {m['note']}", ""]
    for t in sorted(res.latency):
        g = res.gemm.get(t, {})
        c = res.ceilings.get(t, {})
        ceil = ", ".join(f"{k} {v:.1f}" for k, v in c.items())
        lines += [f"## {t} thread{'s' if t != 1 else ''} (torch fp32 GEMM {g.get('median_gflops', float('nan')):.1f} "
                  f"GFLOP/s median, interleaved; XNNPACK ceilings: {ceil or 'not measured'} GFLOP/s"
                  f"{', oversubscribed: more threads than cores' if t > (m.get('cpu_count') or t) else ''})",
                  "", table(res.rows(t), HEADLINE_COLUMNS), ""]
    if sweep_rows(res):
        lines += ["## Resolution sweep (drift vs PyTorch fp32 at the base resolution, detections on the original "
                  "image)", "", table(sweep_rows(res), SWEEP_COLUMNS), ""]
    if res.flops:
        lines += ["## FLOPs (counted: matmul/conv/attention; other ops listed as uncounted)", ""]
        def _order(kv):
            k = str(kv[0])
            return (k.startswith("-"), k)

        for k, v in sorted(res.flops.items(), key=_order):
            ks = str(k)
            label = ks.lstrip("-").replace("_", " ") + (" detection-only" if ks.startswith("-") else "")
            unc = ", ".join(list(v.get("uncounted_ops", {}))[:8])
            lines.append(f"- {label}: {v['gflops']:.1f} GFLOP ({v['gmacs']:.1f} GMAC); not counted: {unc}")
        lines.append("")
    return "\n".join(lines)


def drift_summary(ref_raws: Sequence[Any], raws: Sequence[Any], sizes: Sequence[tuple[int, int]], *,
                  top_k: int = 10) -> dict[str, Any]:
    """Accuracy drift of one backend vs the reference over several images (nailkit.parity).

    Detection level: both post-processed to the *original* image size (so different input resolutions compare),
    reference top-k matched by IoU. ``max_logit_abs`` is the query-matched logit max-abs (same query count only).
    """
    from nailkit.parity import detection_parity, query_matched_diff

    if not (len(ref_raws) == len(raws) == len(sizes)) or not sizes:
        raise ValueError("drift_summary needs equally many (>= 1) reference runs, runs and image sizes")
    matched = total = 0
    mask_ious: list[float] = []
    l1 = score = 0.0
    logit = 0.0
    for a, b, sz in zip(ref_raws, raws, sizes):
        p = detection_parity(a, b, sz, top_k=top_k)
        matched += p.num_matched
        total += p.num_a
        if p.min_mask_iou is not None:
            mask_ious.append(p.min_mask_iou)
        l1 = max(l1, p.max_box_l1_px)
        score = max(score, p.max_score_diff)
        if a.logits.shape == b.logits.shape:
            logit = max(logit, query_matched_diff(RawNoMask(a), RawNoMask(b)).logits_max_abs)
    return {"images": len(sizes), "matched": matched, "of": total, "matched_top10": f"{matched}/{total}",
            "min_mask_iou": min(mask_ious) if mask_ious else None,
            "mean_min_mask_iou": float(np.mean(mask_ious)) if mask_ious else None,
            "max_box_l1_px": l1, "max_score_diff": score, "max_logit_abs": logit}


def RawNoMask(raw):  # noqa: N802 - a tiny adapter
    """The same raw outputs without masks (so query matching works across mask resolutions)."""
    from nailkit.postprocess import RawOutputs

    return RawOutputs(boxes=raw.boxes, logits=raw.logits, masks=None)


def run_benchmark(specs: Sequence[BackendSpec], images: Sequence[Any], *, threads: Sequence[int] = (1, 2, 4),
                  runs: int = 10, warmup: int = 2, reference_resolution: Optional[int] = None,
                  measure_memory: bool | Sequence[str] = True, reference_ort: str = "onnxruntime fp32",
                  reference_torch: str = "pytorch eager", ceilings: bool = True,
                  log: Callable[[str], None] = print) -> BenchResult:
    """Benchmark ``specs`` side by side (see the module docstring for the method).

    ``images``: paths for the accuracy drift (vs the first ``kind == 'torch'`` spec at ``reference_resolution``
    with segmentation) and the first one is also the timed input. Every spec must load and produce finite outputs.
    """
    import torch

    from nailkit.preprocess import preprocess

    specs = list(specs)
    if not specs:
        raise ValueError("run_benchmark: no backends")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"backend names must be unique; got {names}")
    threads = [int(t) for t in threads]
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"thread counts must be positive integers; got {threads}")
    if not images:
        raise ValueError("run_benchmark needs at least one image")
    by_name = {s.name: s for s in specs}
    ref_spec = next((s for s in specs if s.kind == "torch" and s.segmentation and
                     (reference_resolution is None or s.resolution == reference_resolution)), None)
    if ref_spec is None:
        raise ValueError("run_benchmark needs a PyTorch eager (kind='torch', segmentation) backend as the reference")

    machine = machine_info()
    torch_threads_before = torch.get_num_threads()
    # --- FLOPs per (resolution, head)
    flops: dict[int, dict[str, Any]] = {}
    for s in specs:
        key = _spec_flop_key(s)
        if key not in flops:
            log(f"FLOPs at {s.resolution}{'' if s.segmentation else ' (detection-only)'} {spec_options(s) or ''}...")
            mod = torch_export_module(ref_spec.path, s.resolution, s.segmentation, **spec_options(s))
            flops[key] = count_flops(mod, s.resolution).summary()

    # --- inputs per resolution
    inputs: dict[int, list[tuple[np.ndarray, tuple[int, int]]]] = {}
    for s in specs:
        if s.resolution not in inputs:
            inputs[s.resolution] = [preprocess(im, s.resolution) for im in images]

    # --- drift (one load at 1 thread, also checks every backend runs and gives finite outputs)
    drift: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {}
    for s in specs:
        log(f"load + accuracy drift: {s.name} ...")
        runners[s.name] = open_backend(s, threads[0])
    ref_raws = [runners[ref_spec.name].run(x) for x, _ in inputs[ref_spec.resolution]]
    sizes = [sz for _, sz in inputs[ref_spec.resolution]]
    for s in specs:
        raws = [runners[s.name].run(x) for x, _ in inputs[s.resolution]]
        for raw in raws:
            _check_finite(s.name, raw)
        drift[s.name] = drift_summary(ref_raws, raws, sizes)

    # --- interleaved latency, per thread count
    latency: dict[int, dict[str, dict[str, float]]] = {}
    gemm: dict[int, dict[str, float]] = {}
    for t in threads:
        runners = {s.name: set_threads(runners[s.name], s, t) for s in specs}
        fns = {n: _bound(runners[n], inputs[by_name[n].resolution][0][0], t) for n in names}
        gemm_fn, gemm_flops = gemm_callable(t)
        fns[GEMM_NAME] = gemm_fn  # the ceiling, measured in the same rounds as the backends
        log(f"latency at {t} thread(s): {len(names)} backends + GEMM × {runs} interleaved rounds ...")
        stats = interleaved_latency(fns, runs=runs, warmup=warmup)
        g = stats.pop(GEMM_NAME)
        gemm[t] = {"threads": t, "n": 1536, "reps": g.n, "median_gflops": gemm_flops / (g.median_ms / 1e3) / 1e9,
                   "best_gflops": gemm_flops / (g.min_ms / 1e3) / 1e9, "how": "interleaved with the backends"}
        latency[t] = {n: st.summary() for n, st in stats.items()}
        del fns
    del runners
    torch.set_num_threads(torch_threads_before)

    # --- fresh-process load time + peak RSS
    memory: dict[str, dict[str, Any]] = {}
    if measure_memory:
        chosen = specs if measure_memory is True else [s for s in specs if s.name in set(measure_memory)]
        for s in chosen:
            log(f"fresh process (load time, peak RSS): {s.name} ...")
            memory[s.name] = measure_in_fresh_process(s, threads=threads[0], runs=2)
    res = BenchResult(machine=machine, specs=by_name, latency=latency, gemm=gemm, flops=flops, memory=memory,
                      drift=drift, reference_ort=reference_ort, reference_torch=reference_torch)
    if ceilings:
        log("XNNPACK GEMM ceilings (fp32, dynamic int8, int8) ...")
        res.ceilings, res.extra["gemm_probes"] = measure_ceilings(threads)
    return res


#: a TFLite precision → the XNNPACK kernel family its linears/convs run on (``nailkit.hardware.PRECISIONS``):
#: fp16 weights are widened to fp32 on x86; dynamic-range int8 = qd8 kernels; static int8 (w8a8) = qs8 kernels;
#: w8a16 has no int8×int8 kernel, so the int8 ceiling is only an upper bound for it
CEILING_OF_PRECISION = {"fp32": "fp32", "fp16": "fp32", "int8": "dynamic_int8", "full_int8": "int8",
                        "w8a8": "int8", "w8a16": "int8"}


#: route B's static selective int8 precisions (``nailkit.tflite.STATIC_PRECISIONS``)
STATIC_INT8 = ("w8a8", "w8a16")


def ceiling_precision(spec: BackendSpec) -> str:
    """Which GEMM ceiling a backend is held against (PyTorch / ORT / TorchScript run fp32)."""
    if spec.kind.startswith("tflite"):
        return CEILING_OF_PRECISION.get(str(spec.meta.get("precision", "fp32")), "fp32")
    return "fp32"


def measure_ceilings(threads: Sequence[int], *, seconds: float = 1.0) -> tuple[dict[int, dict[str, float]],
                                                                               list[dict[str, Any]]]:
    """XNNPACK GEMM ceilings per thread count (``nailkit.hardware.gemm_ceilings``: one large FULLY_CONNECTED at
    fp32 / dynamic int8 / int8, best of many runs). A count above 1 is floored at the 1-thread ceiling: a second
    thread can only add throughput, so a lower reading is the probe under-measuring (a busy or SMT-sibling core),
    which is what made "of GEMM peak" exceed 100 % before. Returns ({threads: {precision: GFLOP/s}}, raw probes)."""
    from nailkit.hardware import gemm_ceilings

    ts = sorted({1, *[int(t) for t in threads]})
    probes = gemm_ceilings(ts, seconds=seconds)
    best = {t: {p.precision: p.best_gflops for p in probes if p.threads == t} for t in ts}
    out = {t: {k: max(v, best[1][k]) for k, v in best[t].items()} for t in ts if t in set(threads)}
    return out, [p.to_json() for p in probes]


def _bound(runner, x: np.ndarray, threads: int) -> Callable[[], Any]:
    import torch

    def fn():
        torch.set_num_threads(threads)  # torch's pool is process-wide; keep it at this pass's count
        return runner.run(x)

    return fn


def gemm_callable(threads: int, n: int = 1536) -> tuple[Callable[[], Any], float]:
    """(fn, flops): one fp32 n×n @ n×n ``torch.matmul`` at ``threads`` threads, to time *inside* the interleaved
    rounds so the GEMM ceiling sees the same machine noise as the backends."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)

    def fn():
        torch.set_num_threads(threads)
        torch.matmul(a, b, out=out)

    return fn, 2.0 * n ** 3


GEMM_NAME = "__fp32 GEMM__"


def _check_finite(name: str, raw) -> None:
    for label, arr in (("boxes", raw.boxes), ("logits", raw.logits), ("masks", raw.masks)):
        if arr is not None and not np.isfinite(arr).all():
            raise RuntimeError(f"backend {name!r} produced non-finite {label}")


def valid_numbers(res: BenchResult) -> list[str]:
    """Problems with a result (empty list = every backend ran at every thread count and produced valid numbers)."""
    problems = []
    for t, lat in res.latency.items():
        for name in res.specs:
            st = lat.get(name)
            if st is None:
                problems.append(f"{name}: no latency at {t} threads")
            elif not (st["median_ms"] > 0 and math.isfinite(st["median_ms"]) and st["p90_ms"] >= st["median_ms"]):
                problems.append(f"{name}: invalid latency at {t} threads: {st}")
    for name in res.specs:
        if name not in res.drift:
            problems.append(f"{name}: no accuracy drift")
    for name, mem in res.memory.items():
        if not (mem.get("peak_rss_mb", 0) > 0 and mem.get("load_s", -1) >= 0):
            problems.append(f"{name}: invalid fresh-process numbers {mem}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# 5. CLI
# ----------------------------------------------------------------------------------------------------------------


def find_tflite(output_dir: str | Path, checkpoint_sha256: str, route: str, precision: str, resolution: int, *,
                sampling: Optional[str] = None, mask_queries: Optional[int] = None) -> Optional[Path]:
    """A .tflite that ``nailkit.tflite.ensure_tflite`` already wrote for this checkpoint/route/precision/resolution
    and export options (``sampling`` "grid"/None = default, ``mask_queries`` None = all queries) — its sidecar says
    so, and the file's sha256 still equals the sidecar's — newest first; None when there is none. Never converts."""
    from nailkit.artifacts import file_sha256, read_sidecar
    from nailkit.model import normalize_sampling

    want = (normalize_sampling(sampling), None if mask_queries is None else int(mask_queries))
    hits = []
    for f in Path(output_dir, "tflite").glob(f"{route}_{resolution}_*/model_{precision}.tflite"):
        meta = read_sidecar(f) or {}
        if meta.get("checkpoint_sha256") == checkpoint_sha256 and meta.get("route") == route \
                and int(meta.get("resolution", -1)) == int(resolution) and meta.get("precision") == precision \
                and (normalize_sampling(meta.get("sampling")), meta.get("mask_queries")) == want \
                and meta.get("sha256") == file_sha256(f, 64):
            hits.append(f)
    return max(hits, key=lambda p: p.stat().st_mtime) if hits else None


def collect_backends(checkpoint: str | Path, output_dir: str | Path, *, resolutions: Sequence[int] = (432,),
                     tflite_routes: Sequence[str] = ("onnx2tf", "litert"),
                     precisions: Sequence[str] = ("fp32", "fp16", "int8"),
                     sweep_kinds: Sequence[str] = ("torch", "onnxruntime"),
                     convert_sweep_tflite: bool = False, detection_only: bool = True, torchscript: bool = True,
                     tent_routes: Sequence[str] = (), xnn_routes: Sequence[str] = (),
                     xnn_precisions: Sequence[str] = (),
                     mask_queries: Optional[int] = None,
                     mask_query_kinds: Sequence[str] = ("torch", "onnxruntime"), convert_variants: bool = False,
                     rf=None, log: Callable[[str], None] = print) -> tuple[list[BackendSpec], dict[str, Any]]:
    """Every backend of the benchmark, reusing artifacts earlier notebooks left in ``output_dir``.

    * at the model's resolution: PyTorch eager, PyTorch traced (rfdetr ``inference(compile=True)``), the saved
      TorchScript ``.pt``, ORT fp32 (``ensure_onnx``: cached by notebook 03), and every TFLite route × precision
      that ``ensure_tflite`` already converted (``find_tflite``: never converts here);
    * at each other resolution: ``sweep_kinds`` among torch / onnxruntime / tflite-litert (route B fp32: converted
      only when ``convert_sweep_tflite``, ~2-3 min each on 2 cores) / tflite-onnx2tf (cached only);
    * detection-only: PyTorch and ORT without the segmentation head;
    * ``tent_routes``: the fp32 TFLite of each route with the gather-free tent sampler (``sampling="tent"``), named
      ``tflite <route> fp32 tent``; ``xnn_routes``: the same with the query selection and sine embedding kept on
      XNNPACK too (``sampling="xnn"``, ``nailkit.xnnpack_friendly``), named ``tflite <route> fp32 xnn``, and its
      static int8 files for ``xnn_precisions`` (``w8a8``/``w8a16``, route B), named ``tflite litert w8a8 xnn``;
      route B's static int8 precisions (``w8a8``, ``w8a16`` in ``precisions``) are quantised from the cached fp32 file
      when missing and ``convert_variants`` (``ensure_tflite``: ~1 min calibration + its parity run);
      ``mask_queries=N``: masks for the N best queries only, one row per
      ``mask_query_kinds`` (torch, onnxruntime, tflite-litert, tflite-onnx2tf), named ``... mqN``. TFLite variants are
      converted (``ensure_tflite``) only when ``convert_variants`` and the route is litert (onnx2tf: cached only);
      the ONNX variant is exported and verified by ``ensure_onnx`` (cached).

    Returns (specs, notes): ``notes['missing']`` lists what was asked for but has no artifact yet.
    """
    from nailkit.alternatives import ensure_torchscript, export_detection_only_onnx
    from nailkit.artifacts import file_sha256
    from nailkit.model import validate_resolution
    from nailkit.onnx_export import ensure_onnx

    ckpt = str(checkpoint)
    out = Path(output_dir)
    rf = rf or cached_model(ckpt)
    base = int(rf.model.resolution)
    sha = file_sha256(ckpt)
    res_list = [validate_resolution(rf, r) for r in resolutions]
    if base not in res_list:
        res_list.insert(0, base)
    specs: list[BackendSpec] = []
    notes: dict[str, Any] = {"missing": [], "checkpoint_sha256": sha, "base_resolution": base}

    def onnx_spec(r: int, name: str) -> Optional[BackendSpec]:
        log(f"ONNX at {r} (cached by notebook 03 when it exists) ...")
        try:
            # Lower resolutions: ensure_onnx's raw max-abs gate fails on a TopK near-tie of the random-weight demo
            # (at 336, 2 of 200 queries swap on one photo while all top-10 detections match), so those files are
            # judged by this benchmark's own detection-level drift instead (``drift`` in the result).
            path, meta = ensure_onnx(ckpt, out, resolution=r, rf=rf, verify=(r == base))
        except (RuntimeError, ValueError) as exc:  # e.g. its parity gate failed: report, keep benchmarking
            if r == base:
                raise
            notes["missing"].append(f"{name}: {str(exc).splitlines()[0][:300]}")
            return None
        return BackendSpec(name, "onnxruntime", str(path), r, meta={"route": "ort", "precision": "fp32"})

    specs.append(BackendSpec("pytorch eager", "torch", ckpt, base, meta={"route": "torch"}))
    specs.append(BackendSpec("pytorch traced", "torch-traced", ckpt, base,
                             meta={"route": "torch", "how": "rfdetr inference(compile=True)"}))
    if torchscript:
        pt, pt_meta = ensure_torchscript(rf, out / "alternatives")
        specs.append(BackendSpec("torchscript .pt", "torchscript", str(pt), base,
                                 meta={"route": "torchscript", "workaround": pt_meta.get("workaround")}))
        notes["torchscript"] = pt_meta
    specs.append(onnx_spec(base, "onnxruntime fp32"))
    from nailkit.tflite import STATIC_PRECISIONS

    for route in tflite_routes:
        for prec in precisions:
            if prec in STATIC_PRECISIONS and route != "litert":
                continue  # static selective int8 is route B's (ai-edge-quantizer on the litert file)
            f = find_tflite(out, sha, route, prec, base)
            if f is None and prec in STATIC_PRECISIONS and convert_variants:
                from nailkit.tflite import ensure_tflite

                log(f"quantising route B {prec} (static, calibrated on the train split) ...")
                f, _ = ensure_tflite(ckpt, out, route="litert", precision=prec, resolution=base)
            if f is None:
                notes["missing"].append(f"tflite {route} {prec} @{base}: not converted yet (notebook 04 / "
                                        f"`python -m nailkit convert`)")
                continue
            specs.append(BackendSpec(f"tflite {route} {prec}", "tflite", str(f), base,
                                     meta={"route": route, "precision": prec}))
    for r in res_list:
        if r == base:
            continue
        for kind in sweep_kinds:
            if kind == "torch":
                specs.append(BackendSpec(f"pytorch eager @{r}", "torch", ckpt, r, meta={"route": "torch"}))
            elif kind == "onnxruntime":
                spec = onnx_spec(r, f"onnxruntime fp32 @{r}")
                if spec is not None:
                    specs.append(spec)
            elif kind.startswith("tflite-"):
                route = kind.split("-", 1)[1]
                f = find_tflite(out, sha, route, "fp32", r)
                if f is None and convert_sweep_tflite and route == "litert":
                    from nailkit.tflite import ensure_tflite

                    log(f"converting route B fp32 at {r} (litert-torch) ...")
                    f, _ = ensure_tflite(ckpt, out, route="litert", precision="fp32", resolution=r)
                if f is None:
                    notes["missing"].append(f"tflite {route} fp32 @{r}: not converted")
                    continue
                specs.append(BackendSpec(f"tflite {route} fp32 @{r}", "tflite", str(f), r,
                                         meta={"route": route, "precision": "fp32"}))
            else:
                raise ValueError(f"unknown sweep kind {kind!r}; expected torch, onnxruntime, tflite-litert, "
                                 f"tflite-onnx2tf")
    def tflite_variant(route: str, name: str, **opts: Any) -> None:
        f = find_tflite(out, sha, route, "fp32", base, **opts)
        if f is None and convert_variants and route == "litert":
            from nailkit.tflite import ensure_tflite

            log(f"converting route B fp32 {opts} (litert-torch) ...")
            f, _ = ensure_tflite(ckpt, out, route="litert", precision="fp32", resolution=base, **opts)
        if f is None:
            notes["missing"].append(f"{name}: not converted (`python -m nailkit convert --route {route} --precision "
                                    f"fp32" + "".join(f" --{k.replace('_', '-')} {v}" for k, v in opts.items()) + "`)")
            return
        specs.append(BackendSpec(name, "tflite", str(f), base, meta={"route": route, "precision": "fp32", **opts}))

    for route in tent_routes:
        tflite_variant(route, f"tflite {route} fp32 tent", sampling="tent")
    for route in xnn_routes:
        tflite_variant(route, f"tflite {route} fp32 xnn", sampling="xnn")
        for prec in [p for p in xnn_precisions if p in STATIC_PRECISIONS and route == "litert"]:
            # static int8 of the xnn graph: the int8 backbone and a decoder that stays on XNNPACK
            f = find_tflite(out, sha, route, prec, base, sampling="xnn")
            if f is None and convert_variants:
                from nailkit.tflite import ensure_tflite

                log(f"quantising route B {prec} of the xnn graph ...")
                f, _ = ensure_tflite(ckpt, out, route="litert", precision=prec, resolution=base, sampling="xnn")
            if f is None:
                notes["missing"].append(f"tflite {route} {prec} xnn: not converted")
                continue
            specs.append(BackendSpec(f"tflite {route} {prec} xnn", "tflite", str(f), base,
                                     meta={"route": route, "precision": prec, "sampling": "xnn"}))
    if mask_queries is not None:
        n = int(mask_queries)
        for kind in mask_query_kinds:
            if kind == "torch":
                specs.append(BackendSpec(f"pytorch eager mq{n}", "torch", ckpt, base,
                                         meta={"route": "torch", "mask_queries": n}))
            elif kind == "onnxruntime":
                log(f"ONNX with masks for the top {n} queries (ensure_onnx, verified) ...")
                path, _ = ensure_onnx(ckpt, out, resolution=base, rf=rf, mask_queries=n)
                specs.append(BackendSpec(f"onnxruntime fp32 mq{n}", "onnxruntime", str(path), base,
                                         meta={"route": "ort", "precision": "fp32", "mask_queries": n}))
            elif kind.startswith("tflite-"):
                route = kind.split("-", 1)[1]
                tflite_variant(route, f"tflite {route} fp32 mq{n}", mask_queries=n)
            else:
                raise ValueError(f"unknown mask-query kind {kind!r}; expected torch, onnxruntime, tflite-litert, "
                                 f"tflite-onnx2tf")
    if detection_only:
        specs.append(BackendSpec("pytorch eager det-only", "torch", ckpt, base, segmentation=False,
                                 meta={"route": "torch"}))
        log("detection-only ONNX ...")
        det = export_detection_only_onnx(rf, out / "alternatives", base)
        specs.append(BackendSpec("onnxruntime fp32 det-only", "onnxruntime", str(det), base, segmentation=False,
                                 meta={"route": "ort", "precision": "fp32"}))
    return specs, notes


def cli_bench(args) -> int:  # pragma: no cover - exercised by the notebook
    from nailkit.artifacts import atomic_write
    from nailkit.data import sample_images
    from nailkit.model import resolve_checkpoint

    if args.runs < 1 or not args.threads or any(t < 1 for t in args.threads):
        raise ValueError(f"--runs must be >= 1 and --threads positive integers; got {args.runs}, {args.threads}")
    out = Path(args.out)
    ckpt = str(resolve_checkpoint(args.checkpoint, args.artifacts))
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint; expected an rfdetr .pth (or '' for the demo)")
    specs, notes = collect_backends(ckpt, args.artifacts)
    for m in notes["missing"]:
        print(f"skipped: {m}")
    res = run_benchmark(specs, sample_images("all"), threads=args.threads, runs=args.runs)
    res.extra["notes"] = notes
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", lambda p: p.write_text(json.dumps(res.to_json(), indent=2, default=str)))
    atomic_write(out / "bench.md", lambda p: p.write_text(res.markdown()))
    print(res.markdown())
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    problems = valid_numbers(res)
    for p in problems:
        print(f"invalid: {p}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------------------------
# 6. plots (matplotlib axes in, nothing returned)
# ----------------------------------------------------------------------------------------------------------------


def family(spec: BackendSpec) -> str:
    """Backend family for the latency-vs-resolution plot: the name without its '@R' suffix."""
    return spec.name.split(" @")[0]


def plot_latency_vs_resolution(ax, res: BenchResult, threads: Optional[int] = None) -> None:
    t = threads or min(res.latency)
    lat = res.latency[t]
    fams: dict[str, list[tuple[int, float]]] = {}
    for name, spec in res.specs.items():
        if spec.segmentation and name in lat:
            fams.setdefault(family(spec), []).append((spec.resolution, lat[name]["median_ms"]))
    for fam, pts in sorted(fams.items()):
        if len(pts) < 2:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel(f"median latency, ms ({t} thread{'s' if t > 1 else ''})")
    ax.set_title("latency vs resolution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_size_vs_drift(ax, res: BenchResult) -> None:
    for name, spec in res.specs.items():
        d = res.drift.get(name, {})
        size = spec.file_size_mb
        if size is None or d.get("of") in (None, 0):
            continue
        miss = 1.0 - d["matched"] / d["of"]
        mi = d.get("mean_min_mask_iou")
        y = miss if mi is None else max(miss, 1.0 - mi)
        ax.scatter(size, max(y, 1e-6), s=30)
        ax.annotate(name, (size, max(y, 1e-6)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("drift vs PyTorch fp32: max(1 − matched top-10, 1 − mean min mask IoU)")
    ax.set_title("size vs accuracy drift (floor 1e-6 = identical)")
    ax.grid(alpha=0.3)


def plot_delegation_latency(ax, res: BenchResult, coverage: Mapping[str, Mapping[str, Any]],
                            threads: Optional[int] = None) -> None:
    """Per TFLite backend: XNNPACK-delegated fraction of ops (bars, left axis) next to median latency (right)."""
    t = threads or min(res.latency)
    names = [n for n in res.specs if n in coverage and n in res.latency[t]]
    x = np.arange(len(names))
    frac = [100 * float(coverage[n].get("xnnpack_fraction", 0.0)) for n in names]
    ax.bar(x - 0.2, frac, width=0.4, color="tab:green", label="ops delegated to XNNPACK (%)")
    for i, n in enumerate(names):
        ax.annotate(f"{coverage[n].get('xnnpack_partitions', '?')} part.", (x[i] - 0.2, frac[i]), fontsize=7,
                    ha="center", va="bottom")
    ax.set_ylim(0, 110)
    ax.set_ylabel("delegated ops, %")
    ax2 = ax.twinx()
    ax2.bar(x + 0.2, [res.latency[t][n]["median_ms"] for n in names], width=0.4, color="tab:blue",
            label=f"median ms ({t} thr.)")
    ax2.set_ylabel("median latency, ms")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_title("XNNPACK coverage next to latency")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")


if __name__ == "__main__":  # the fresh-process child of measure_in_fresh_process
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        _child_main(sys.argv[2])
    else:
        print("usage: python -m nailkit.bench _child SPEC_JSON (internal); use `python -m nailkit bench`",
              file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# 7. issue 11: where the time goes, and the speed targets with the measurement that decides each
# ----------------------------------------------------------------------------------------------------------------

def time_split(spec: BackendSpec, image: Any, *, threads: int = 1, runs: int = 3, threshold: float = 0.5
               ) -> dict[str, float]:
    """Median ms of pre-processing (``nailkit.preprocess``: decode-free resize + normalise), the forward pass and
    post-processing (``nailkit.postprocess``: top-k, boxes, masks resized to the image and thresholded) for one
    backend on one image. Pre/post are the same numpy code for every backend; post depends on how many mask rows the
    model returns (a top-N file returns N)."""
    from nailkit.postprocess import postprocess
    from nailkit.preprocess import load_image, preprocess

    arr = load_image(image)
    runner = open_backend(spec, threads)
    pre, fwd, post = [], [], []
    for _ in range(max(1, runs) + 1):  # the first round is a warm-up
        t0 = time.perf_counter()
        x, size = preprocess(arr, spec.resolution)
        t1 = time.perf_counter()
        raw = runner.run(x)
        t2 = time.perf_counter()
        postprocess(raw, size, threshold=threshold)
        t3 = time.perf_counter()
        pre.append(t1 - t0)
        fwd.append(t2 - t1)
        post.append(t3 - t2)
    med = {k: 1000.0 * float(np.median(v[1:])) for k, v in (("pre_ms", pre), ("forward_ms", fwd), ("post_ms", post))}
    med["total_ms"] = sum(med.values())
    med["forward_share"] = med["forward_ms"] / med["total_ms"]
    return med


def _first(rows: Sequence[Mapping[str, Any]], **match: Any) -> Optional[Mapping[str, Any]]:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def speed_targets(res: BenchResult, coverage: Mapping[str, Mapping[str, Any]], *, threads: int = 1,
                  cpu: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """Issue 11's targets, one row each: ``target``, ``measured`` (text), ``met`` (bool, or None when no row of this
    run can decide it) and ``why`` — the measurement that explains a miss (what stays off XNNPACK, the ceiling ratio,
    the share of FLOPs a change can remove). Numbers come from this run only (``res`` at ``threads``, ``coverage``:
    ``tflite.delegation_report`` per backend name)."""
    rows = res.rows(threads)
    by = {r["backend"]: r for r in rows}
    out: list[dict[str, Any]] = []
    ceil = res.ceilings.get(threads, {})

    # 1. delegation, per fp32 file
    for name, rep in coverage.items():
        r = by.get(name)
        if r is None or r["precision"] != "fp32" or r.get("mask_queries"):
            continue
        frac, parts = rep.get("xnnpack_fraction", 0.0), rep.get("xnnpack_partitions")
        left = ", ".join(f"{k}×{v['count']}" for k, v in list(rep.get("undelegated", {}).items())[:8])
        out.append({"target": f"≥ 99% of ops on XNNPACK in ≤ 3 partitions ({name})",
                    "measured": f"{rep.get('xnnpack_nodes')}/{rep.get('xnnpack_total')} = {frac:.1%} in {parts} "
                                f"partitions",
                    "met": bool(frac >= 0.99 and parts is not None and parts <= 3),
                    "why": f"off XNNPACK: {left}" if left else ""})

    # 2./3. int8
    int8 = [r for r in rows if r["kind"] == "tflite" and r["ceiling"] in ("dynamic_int8", "int8")
            and r.get("x_ort_fp32") is not None and r["resolution"] == res.specs[res.reference_ort].resolution]
    best = min(int8, key=lambda r: r["x_ort_fp32"]) if int8 else None
    dot = list((cpu or {}).get("int8_dot") or [])
    gain = (ceil.get("dynamic_int8", 0) / ceil["fp32"]) if ceil.get("fp32") else None
    if best is None:
        out.append({"target": "best int8 TFLite ≤ 0.45× ORT fp32 (int8-dot CPU), mask mAP within 1 pt",
                    "measured": "no int8 file in this run", "met": None, "why": ""})
    else:
        out.append({"target": "best int8 TFLite ≤ 0.45× ORT fp32 (int8-dot CPU), mask mAP within 1 pt (07)",
                    "measured": f"{best['backend']}: {best['x_ort_fp32']:.2f}× ORT fp32; CPU int8 dot: "
                                f"{'+'.join(dot) or 'none'}",
                    "met": bool(best["x_ort_fp32"] <= 0.45) if dot else None,
                    "why": (f"the dynamic-int8 GEMM ceiling is {gain:.2f}× the fp32 one on this CPU; only the "
                            f"linears/convs (GEMM) get it, the rest of the graph stays fp32" if gain else "")})
        cf = best.get("ceiling_fraction")
        out.append({"target": "best int8 file ≥ 70% of this CPU's int8 GEMM ceiling",
                    "measured": (f"{best['backend']}: {cf:.0%} of the {best['ceiling']} ceiling "
                                 f"({ceil.get(best['ceiling'], float('nan')):.0f} GFLOP/s)") if cf else "no ceiling",
                    "met": bool(cf >= 0.70) if cf else None,
                    "why": ("static selective int8 runs only the backbone's linears/convs on int8 kernels; the "
                            "decoder, heads, attention matmuls, layer norms, softmax, GELU and mask upsampling stay "
                            "fp32, with QUANTIZE/DEQUANTIZE at every boundary"
                            if best["precision"] in STATIC_INT8 else
                            "dynamic-range int8 quantises activations at run time per op and runs every non-GEMM op "
                            "(softmax, layer norm, GELU, sampling, mask upsampling) in fp32")})

    # 4. fp32 TFLite vs ORT
    fp32 = [r for r in rows if r["kind"] == "tflite" and r["precision"] == "fp32" and not r.get("mask_queries")
            and r.get("x_ort_fp32") is not None and r["resolution"] == res.specs[res.reference_ort].resolution]
    if fp32:
        b = min(fp32, key=lambda r: r["x_ort_fp32"])
        ort = by.get(res.reference_ort, {})
        out.append({"target": "fp32 TFLite ≤ 0.95× ORT fp32 (fp32 gates unchanged)",
                    "measured": f"{b['backend']}: {b['x_ort_fp32']:.2f}× ORT fp32 "
                                f"({b['ceiling_fraction']:.0%} of the fp32 ceiling)" if b.get("ceiling_fraction")
                    else f"{b['backend']}: {b['x_ort_fp32']:.2f}×",
                    "met": bool(b["x_ort_fp32"] <= 0.95),
                    "why": (f"ORT fp32 already runs at {ort['ceiling_fraction']:.0%} of the fp32 GEMM ceiling: "
                            f"at most {1 / ort['ceiling_fraction']:.2f}× is left for any fp32 backend"
                            if ort.get("ceiling_fraction") else "")})

    # 5. mask queries
    for r in rows:
        n = r.get("mask_queries")
        if not n:
            continue
        full_name = {"torch": res.reference_torch, "onnxruntime": res.reference_ort}.get(r["kind"])
        if r["kind"] == "tflite":
            full_name = next((x["backend"] for x in rows if x["kind"] == "tflite" and x["route"] == r["route"]
                              and x["precision"] == "fp32" and not x.get("mask_queries")
                              and x.get("sampling", "grid") == r.get("sampling", "grid")
                              and x["resolution"] == r["resolution"]), None)
        full = by.get(full_name)
        if full is None:
            continue
        fl_full, fl_n = full.get("gflops"), r.get("gflops")
        det = res.flops.get(_flop_key(r["resolution"], False), {}).get("gflops")
        ratio = r["median_ms"] / full["median_ms"]
        why = ""
        if fl_full and fl_n:
            why = f"FLOPs {fl_n:.1f} / {fl_full:.1f} GFLOP = {fl_n / fl_full:.3f}"
            if det:
                why += (f"; the whole mask head is {(fl_full - det) / fl_full:.1%} of the full model's FLOPs, "
                        f"{(fl_n - det) / fl_full:.1%} left at {n} queries")
        out.append({"target": f"--mask-queries {n} forward ≤ 0.92× the full model ({r['backend']})",
                    "measured": f"{ratio:.3f}× {full_name} ({r['median_ms']:.0f} vs {full['median_ms']:.0f} ms)",
                    "met": bool(ratio <= 0.92), "why": why})
    return out


TARGET_COLUMNS = (("target", "target", "s"), ("measured", "measured (this run)", "s"), ("met", "met", "s"),
                  ("why", "the measurement that says why", "s"))


def static_int8_rows(res: BenchResult, coverage: Mapping[str, Mapping[str, Any]], *, threads: int = 1
                     ) -> list[dict[str, Any]]:
    """One row per route-B static int8 file of this run (``STATIC_INT8``): latency against ORT fp32 and against the
    fp32 file of its route, the fraction of the int8 GEMM ceiling, size, calibration images, how many linears/convs
    it quantised, the parity run's ratio to the dynamic-int8 rounding control (reported, not gated) and its XNNPACK
    coverage (``coverage``: ``tflite.delegation_report`` per backend name)."""
    from nailkit.artifacts import read_sidecar

    rows = res.rows(threads)
    out = []
    for r in rows:
        if r["kind"] != "tflite" or r["precision"] not in STATIC_INT8:
            continue
        meta = read_sidecar(res.specs[r["backend"]].path) or {}
        fp32 = next((x for x in rows if x["kind"] == "tflite" and x["route"] == r["route"]
                     and x["precision"] == "fp32" and x["sampling"] == r["sampling"] and not x.get("mask_queries")
                     and x["resolution"] == r["resolution"]), None)
        q = ((meta.get("recipe") or {}).get("quantized_ops") or {})
        cov = coverage.get(r["backend"], {})
        out.append({"backend": r["backend"], "precision": r["precision"], "median_ms": r["median_ms"],
                    "x_ort_fp32": r["x_ort_fp32"],
                    "x_tflite_fp32": r["median_ms"] / fp32["median_ms"] if fp32 else None,
                    "ceiling_fraction": r["ceiling_fraction"], "size_mb": r["size_mb"],
                    "calibration_images": (meta.get("calibration") or {}).get("n"),
                    "quantized_linears": sum(v for k, v in q.items() if k in ("FULLY_CONNECTED", "CONV_2D",
                                                                              "DEPTHWISE_CONV_2D")),
                    "control_ratio_max": (meta.get("parity") or {}).get("control_ratio_max"),
                    "xnnpack_fraction": cov.get("xnnpack_fraction"),
                    "xnnpack_partitions": cov.get("xnnpack_partitions")})
    return out


STATIC_INT8_COLUMNS = (("backend", "backend", "s"), ("median_ms", "median ms", ".0f"),
                       ("x_ort_fp32", "× ORT fp32", ".2f"), ("x_tflite_fp32", "× its TFLite fp32", ".2f"),
                       ("ceiling_fraction", "of the int8 ceiling", ".0%"), ("size_mb", "MB", ".1f"),
                       ("calibration_images", "calibration images", "d"),
                       ("quantized_linears", "int8 linears/convs", "d"),
                       ("control_ratio_max", "error ÷ dynamic-int8 control (reported)", ".2f"),
                       ("xnnpack_fraction", "on XNNPACK", ".1%"), ("xnnpack_partitions", "partitions", "d"))
