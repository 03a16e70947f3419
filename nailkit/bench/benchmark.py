"""Benchmark every backend side by side: latency, peak memory, size, load time, FLOPs and the CPU's GEMM ceilings.

How the numbers are made (and why); each step lives in its own module of ``nailkit.bench``:

* **Interleaved latency** (``timing``): all backends live in one process; after a warm-up, each round runs every
  backend once, in an order rotated by one per round, so a burst of machine noise hits every backend alike. Per
  backend: median and p90 of the rounds. The input is the preprocessed tensor; preprocessing and post-processing are
  not timed (they are identical numpy code for every backend; ``backends.time_split`` times them separately).
* **Thread counts**: each thread count is a separate interleaved pass; runners are (re)made with that many threads
  (``backends.set_threads``). More threads than cores oversubscribes the CPU: the table records ``os.cpu_count()``.
* **Peak RSS / load time** (``backends.measure_in_fresh_process``): each backend loaded and run in its own fresh
  ``python`` process (peak RSS is per process).
* **FLOPs** (``flops.count_flops``): matmul/conv/attention of the export-mode module at each resolution, every other
  op listed as uncounted (a lower bound that says what it left out).
* **GEMM ceilings** (``ceilings.measure_ceilings``): one large FULLY_CONNECTED layer through XNNPACK at fp32 /
  dynamic int8 / int8, best of many runs, measured after the latency passes; each backend is held against the
  ceiling of its own precision (``ceilings.ceiling_precision``): achieved fraction = model FLOPs / latency / ceiling.
* **Headline = ratios**: latency ÷ ORT fp32 latency and ÷ PyTorch eager latency (< 1 = faster), ms as context.

``run_benchmark`` returns a ``BenchResult`` (``rows``, ``sweep_rows``, ``to_json``; ``markdown`` is
``nailkit.report.bench_report.markdown_report``); ``cli_bench`` is ``python -m nailkit bench``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from nailkit.bench.backends import (
    BackendSpec,
    measure_in_fresh_process,
    open_backend,
    set_threads,
    spec_options,
    torch_export_module,
)
from nailkit.bench.ceilings import ceiling_precision, measure_ceilings
from nailkit.bench.discovery import collect_backends
from nailkit.bench.flops import achieved_fraction, count_flops, flop_key
from nailkit.bench.timing import interleaved_latency, ratios
from nailkit.core.artifacts import atomic_write
from nailkit.core.hardware import cpu_info
from nailkit.data.samples import sample_images
from nailkit.model.build import resolve_checkpoint
from nailkit.portable.preprocess import preprocess
from nailkit.report.bench_report import family, markdown_report
from nailkit.verify.drift import drift_summary


def machine_info() -> dict[str, Any]:
    """CPU, core count, Python / torch versions, CPU affinity and the 1-minute load average of this run."""
    import torch

    info = {"cpu": cpu_info().model_name, "cpu_count": os.cpu_count(), "machine": platform.machine(),
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


def _spec_flop_key(spec: BackendSpec) -> int | str:
    return flop_key(spec.resolution, spec.segmentation, spec_options(spec))


@dataclass
class BenchResult:
    """Everything one benchmark measured; ``to_json`` for outputs/06_benchmark.json, ``markdown`` for the table."""

    machine: dict[str, Any]
    specs: dict[str, BackendSpec]
    latency: dict[int, dict[str, dict[str, float]]]  # threads -> name -> LatencyStats.summary()
    flops: dict[int | str, dict[str, Any]]  # flop_key -> FlopCount.summary() (detection-only: negative R)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> measure_in_fresh_process()
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> accuracy drift vs PyTorch fp32 @ ref R
    extra: dict[str, Any] = field(default_factory=dict)
    #: threads -> {"fp32"|"dynamic_int8"|"int8": GFLOP/s}: XNNPACK GEMM ceilings (``nailkit.bench.ceilings``), best
    #: of many runs; at t > 1 threads never below the 1-thread ceiling (a probe that measured less under-measured)
    ceilings: dict[int, dict[str, float]] = field(default_factory=dict)
    reference_ort: str = "onnxruntime fp32"
    reference_torch: str = "pytorch eager"

    def rows(self, threads: int) -> list[dict[str, Any]]:
        """One row per backend at ``threads``: ms, ratios, size, load, RSS, fraction of its ceiling, drift."""
        lat = self.latency[threads]
        med = {k: v["median_ms"] for k, v in lat.items()}
        r_ort = ratios(med, self.reference_ort) if self.reference_ort in med else {}
        r_pt = ratios(med, self.reference_torch) if self.reference_torch in med else {}
        rows = []
        for name, st in lat.items():
            spec = self.specs[name]
            fl = self.flops.get(_spec_flop_key(spec))
            mem = self.memory.get(name, {})
            d = self.drift.get(name, {})
            ceiling = ceiling_precision(spec)
            peak = self.ceilings.get(threads, {}).get(ceiling)
            rows.append({
                "backend": name, "kind": spec.kind, "resolution": spec.resolution,
                "route": spec.meta.get("route"), "precision": spec.meta.get("precision", "fp32"),
                "threads": threads, "median_ms": st["median_ms"], "p90_ms": st["p90_ms"],
                "x_ort_fp32": r_ort.get(name), "x_pytorch_eager": r_pt.get(name),
                "size_mb": spec.file_size_mb, "load_s": mem.get("load_s"), "peak_rss_mb": mem.get("peak_rss_mb"),
                "model_rss_mb": mem.get("model_rss_mb"),
                "gflops": fl["gflops"] if fl else None,
                "sampling": spec.meta.get("sampling") or "grid", "mask_queries": spec.meta.get("mask_queries"),
                "ceiling": ceiling,
                "ceiling_fraction": (achieved_fraction(fl["gflops"] * 1e9, st["median_ms"], peak)
                                     if fl and peak else None),
                "matched_top10": d.get("matched_top10"), "min_mask_iou": d.get("min_mask_iou"),
                "max_logit_abs": d.get("max_logit_abs")})
        return rows

    def sweep_rows(self, threads: Optional[int] = None) -> list[dict[str, Any]]:
        """Resolution sweep: per backend at a lower resolution, its speed-up over the same backend at the base
        resolution and its drift vs PyTorch fp32 at the base resolution (detections post-processed to the original
        image size, matched by IoU). Empty when nothing ran at a second resolution."""
        t = threads or min(self.latency)
        lat = self.latency[t]
        base_by_family = {family(s): s for s in self.specs.values() if " @" not in s.name and s.segmentation}
        rows = []
        for name, spec in self.specs.items():
            fam = family(spec)
            base = base_by_family.get(fam)
            if base is None or name not in lat or base.name not in lat:
                continue
            d = self.drift.get(name, {})
            rows.append({"backend": fam, "resolution": spec.resolution, "threads": t,
                         "median_ms": lat[name]["median_ms"],
                         "speedup": lat[base.name]["median_ms"] / lat[name]["median_ms"],
                         "gflops": self.flops.get(flop_key(spec.resolution, True), {}).get("gflops"),
                         "matched_top10": d.get("matched_top10"), "mean_min_mask_iou": d.get("mean_min_mask_iou"),
                         "max_box_l1_px": d.get("max_box_l1_px"), "max_score_diff": d.get("max_score_diff")})
        swept = {r["backend"] for r in rows if r["resolution"] != base_by_family[r["backend"]].resolution}
        rows = [r for r in rows if r["backend"] in swept]
        rows.sort(key=lambda r: (r["backend"], -r["resolution"]))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "specs": {k: v.to_json() for k, v in self.specs.items()},
                "latency": {str(t): v for t, v in self.latency.items()},
                "flops": {str(k): v for k, v in self.flops.items()}, "memory": self.memory, "drift": self.drift,
                "ceilings": {str(t): v for t, v in self.ceilings.items()},
                "rows": {str(t): self.rows(t) for t in self.latency},
                "sweep": {str(t): self.sweep_rows(t) for t in self.latency}, "extra": self.extra,
                "reference_ort": self.reference_ort, "reference_torch": self.reference_torch}

    def markdown(self) -> str:
        return markdown_report(self)


def run_benchmark(specs: Sequence[BackendSpec], images: Sequence[Any], *, threads: Sequence[int] = (1, 2, 4),
                  runs: int = 10, warmup: int = 2, reference_resolution: Optional[int] = None,
                  measure_memory: bool | Sequence[str] = True, reference_ort: str = "onnxruntime fp32",
                  reference_torch: str = "pytorch eager", ceilings: bool = True,
                  log: Optional[Callable[[str], None]] = None) -> BenchResult:
    """Benchmark ``specs`` side by side (see the module docstring for the method).

    ``images``: paths for the accuracy drift (vs the first ``kind == 'torch'`` spec at ``reference_resolution``
    with segmentation) and the first one is also the timed input. Every spec must load and produce finite outputs.
    ``log`` (None: silent; the CLI and notebook 06 pass ``print``) gets a line before each step.
    """
    import torch

    log = log or (lambda _line: None)
    specs, threads, ref_spec = _checked_request(specs, threads, images, reference_resolution)
    by_name = {s.name: s for s in specs}

    machine = machine_info()
    torch_threads_before = torch.get_num_threads()
    flops = _count_flops(specs, ref_spec, log)
    inputs = _preprocessed_inputs(specs, images)
    runners = _open_backends(specs, threads[0], log)
    drift = _drift(specs, runners, inputs, ref_spec)
    latency = _latency_passes(specs, runners, inputs, threads, runs=runs, warmup=warmup, log=log)
    del runners
    torch.set_num_threads(torch_threads_before)
    memory = _fresh_process_memory(specs, measure_memory, threads[0], log)
    res = BenchResult(machine=machine, specs=by_name, latency=latency, flops=flops, memory=memory,
                      drift=drift, reference_ort=reference_ort, reference_torch=reference_torch)
    if ceilings:
        log("XNNPACK GEMM ceilings (fp32, dynamic int8, int8) ...")
        res.ceilings, res.extra["gemm_probes"] = measure_ceilings(threads)
    return res


def _checked_request(specs: Sequence[BackendSpec], threads: Sequence[int], images: Sequence[Any],
                     reference_resolution: Optional[int]) -> tuple[list[BackendSpec], list[int], BackendSpec]:
    """``run_benchmark``'s arguments checked: the specs (unique names), the thread counts (positive ints) and the
    PyTorch eager spec every other backend's drift is measured against."""
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
    ref_spec = next((s for s in specs if s.kind == "torch" and s.segmentation and
                     (reference_resolution is None or s.resolution == reference_resolution)), None)
    if ref_spec is None:
        raise ValueError("run_benchmark needs a PyTorch eager (kind='torch', segmentation) backend as the reference")
    return specs, threads, ref_spec


def _count_flops(specs: list[BackendSpec], ref_spec: BackendSpec, log: Callable[[str], None]
                 ) -> dict[int | str, dict[str, Any]]:
    """FLOPs once per (resolution, head, export options) among ``specs``."""
    flops: dict[int | str, dict[str, Any]] = {}
    for s in specs:
        key = _spec_flop_key(s)
        if key not in flops:
            log(f"FLOPs at {s.resolution}{'' if s.segmentation else ' (detection-only)'} {spec_options(s) or ''}...")
            mod = torch_export_module(ref_spec.path, s.resolution, s.segmentation, **spec_options(s))
            flops[key] = count_flops(mod, s.resolution).summary()
    return flops


def _preprocessed_inputs(specs: list[BackendSpec], images: Sequence[Any]
                         ) -> dict[int, list[tuple[np.ndarray, tuple[int, int]]]]:
    """Every image preprocessed once per resolution among ``specs``: (input tensor, original size) pairs."""
    inputs: dict[int, list[tuple[np.ndarray, tuple[int, int]]]] = {}
    for s in specs:
        if s.resolution not in inputs:
            inputs[s.resolution] = [preprocess(im, s.resolution) for im in images]
    return inputs


def _open_backends(specs: list[BackendSpec], threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Every backend loaded once at ``threads`` (the first thread count), by name."""
    runners: dict[str, Any] = {}
    for s in specs:
        log(f"load + accuracy drift: {s.name} ...")
        runners[s.name] = open_backend(s, threads)
    return runners


def _drift(specs: list[BackendSpec], runners: dict[str, Any],
           inputs: dict[int, list[tuple[np.ndarray, tuple[int, int]]]], ref_spec: BackendSpec
           ) -> dict[str, dict[str, Any]]:
    """Each backend's accuracy drift against ``ref_spec`` on every image; also checks that every backend runs and
    gives finite outputs."""
    ref_raws = [runners[ref_spec.name].run(x) for x, _ in inputs[ref_spec.resolution]]
    sizes = [sz for _, sz in inputs[ref_spec.resolution]]
    drift: dict[str, dict[str, Any]] = {}
    for s in specs:
        raws = [runners[s.name].run(x) for x, _ in inputs[s.resolution]]
        for raw in raws:
            _check_finite(s.name, raw)
        drift[s.name] = drift_summary(ref_raws, raws, sizes)
    return drift


def _latency_passes(specs: list[BackendSpec], runners: dict[str, Any],
                    inputs: dict[int, list[tuple[np.ndarray, tuple[int, int]]]], threads: list[int], *, runs: int,
                    warmup: int, log: Callable[[str], None]) -> dict[int, dict[str, dict[str, float]]]:
    """Interleaved latency, one pass per thread count; ``runners`` is updated in place to each pass's thread count
    (ORT/TFLite runners are reopened), timed on the first image."""
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}
    latency: dict[int, dict[str, dict[str, float]]] = {}
    for t in threads:
        runners.update({s.name: set_threads(runners[s.name], s, t) for s in specs})
        fns = {n: _bound(runners[n], inputs[by_name[n].resolution][0][0], t) for n in names}
        log(f"latency at {t} thread(s): {len(names)} backends × {runs} interleaved rounds ...")
        latency[t] = {n: st.summary() for n, st in interleaved_latency(fns, runs=runs, warmup=warmup).items()}
        del fns
    return latency


def _fresh_process_memory(specs: list[BackendSpec], measure_memory: bool | Sequence[str], threads: int,
                          log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Load time and peak RSS of each chosen backend (all when ``measure_memory`` is True, those named otherwise,
    none when falsy), each in a fresh process."""
    memory: dict[str, dict[str, Any]] = {}
    if measure_memory:
        chosen = specs if measure_memory is True else [s for s in specs if s.name in set(measure_memory)]
        for s in chosen:
            log(f"fresh process (load time, peak RSS): {s.name} ...")
            memory[s.name] = measure_in_fresh_process(s, threads=threads, runs=2)
    return memory


def _bound(runner, x: np.ndarray, threads: int) -> Callable[[], Any]:
    import torch

    def fn():
        torch.set_num_threads(threads)  # torch's pool is process-wide; keep it at this pass's count
        return runner.run(x)

    return fn


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


def cli_bench(args) -> int:  # pragma: no cover - exercised by the notebook
    """``python -m nailkit bench``: collect, run, write ``bench.json`` + ``bench.md``; 1 when a number is invalid."""
    if args.runs < 1 or not args.threads or any(t < 1 for t in args.threads):
        raise ValueError(f"--runs must be >= 1 and --threads positive integers; got {args.runs}, {args.threads}")
    out = Path(args.out)
    ckpt = resolve_checkpoint(args.checkpoint, args.artifacts)
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint; expected an rfdetr .pth (or '' for the demo)")
    specs, notes = collect_backends(ckpt, args.artifacts, log=print)
    for m in notes["missing"]:
        print(f"skipped: {m}")
    res = run_benchmark(specs, sample_images("all"), threads=args.threads, runs=args.runs, log=print)
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
