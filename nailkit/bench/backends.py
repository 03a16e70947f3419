"""The backends of the benchmark: what one is (``BackendSpec``), how it is loaded and run, and what loading it costs
in a fresh process.

* ``open_backend(spec, threads)``: PyTorch eager / traced, ORT and TFLite through ``nailkit.runtime.runners``; the
  detection-only PyTorch module and a saved TorchScript ``.pt`` are run here (``_TorchCallable``).
* **Thread counts**: ORT (``intra_op_num_threads``) and TFLite (``num_threads``) fix them at load, so
  ``set_threads`` reopens those; torch runners switch in place (``torch.set_num_threads``).
* **Peak RSS / load time** (``measure_in_fresh_process``): peak RSS is per process, so each backend is loaded and run
  in its own fresh ``python`` process (``python -m nailkit.bench.backends _child``) that reports its peak RSS
  (``nailkit.core.hardware.peak_rss_mb``) after importing its runtime and after load + runs. ORT and TFLite children
  never import torch.
* ``time_split``: pre-processing, forward pass and post-processing of one backend on one image.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from nailkit.core import subproc
from nailkit.core.hardware import peak_rss_mb
from nailkit.core.subproc import emit
from nailkit.export.variants import detection_only_module
from nailkit.model.build import export_module, export_options, load_model
from nailkit.portable.postprocess import postprocess
from nailkit.portable.preprocess import load_image, preprocess
from nailkit.runtime.runners import BACKENDS, make_runner
from nailkit.runtime.torch_runner import TorchRunner
from nailkit.verify.parity import raw_from_outputs

#: backend kinds ``open_backend`` understands: the one vocabulary of ``nailkit.runtime.runners.BACKENDS``
KINDS = BACKENDS

#: the kinds that run in torch (their thread count is torch's process-wide pool)
TORCH_KINDS = ("torch", "torch-traced", "torchscript")


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
    """The rfdetr model of ``checkpoint`` (``nailkit.model.build.load_model``), loaded once per process."""
    key = ("rf", str(checkpoint))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(checkpoint)
    return _MODEL_CACHE[key]


def spec_options(spec: BackendSpec) -> dict[str, Any]:
    """The export options a backend was made with (``nailkit.model.build.export_options``: only non-default ones)."""
    return export_options(spec.meta.get("sampling"), spec.meta.get("mask_queries"))


def torch_export_module(checkpoint: str, resolution: int, segmentation: bool = True, **options: Any):
    """Export-mode module at ``resolution``; ``segmentation=False`` is the detection-only module (head removed,
    ``nailkit.export.variants.detection_only_module``); ``options``: ``export_module``'s sampling / mask_queries.
    Cached in this process."""
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
    ``nailkit.runtime.runners.make_runner`` (NHWC/NCHW and output order are its business). Detection-only PyTorch
    and a saved TorchScript ``.pt`` file are run here.
    """
    if spec.kind in ("torch", "torch-traced"):
        if not spec.segmentation:
            if spec.kind != "torch":
                raise ValueError(f"{spec.name}: detection-only is supported for kind 'torch' only")
            return _TorchCallable(torch_export_module(spec.path, spec.resolution, False), threads)
        if spec_options(spec):
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
    if spec.kind in TORCH_KINDS:
        runner.threads = int(threads)
        return runner
    return open_backend(spec, threads)


# ----------------------------------------------------------------------------------------------------------------
# load time and peak RSS, each backend in a fresh process
# ----------------------------------------------------------------------------------------------------------------

def _child_main(spec_json: str) -> None:
    """Entry point of the fresh process: import the runtime, load, run; print one JSON line."""
    req = json.loads(spec_json)
    spec = BackendSpec(**req["spec"])
    runs = int(req.get("runs", 3))
    threads = req.get("threads")
    t0 = time.perf_counter()
    if spec.kind in TORCH_KINDS:
        import torch  # noqa: F401
    if spec.kind == "onnxruntime":
        import onnxruntime  # noqa: F401
    if spec.kind.startswith("tflite"):
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    import_s = time.perf_counter() - t0
    rss_import = peak_rss_mb()
    x = np.zeros((1, 3, spec.resolution, spec.resolution), dtype=np.float32)
    t0 = time.perf_counter()
    runner = open_backend(spec, threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.run(x)
    first_s = time.perf_counter() - t0
    for _ in range(max(0, runs - 1)):
        runner.run(x)
    emit({"import_s": import_s, "load_s": load_s, "first_run_s": first_s,
          "rss_after_import_mb": rss_import, "peak_rss_mb": peak_rss_mb()})


def measure_in_fresh_process(spec: BackendSpec, *, threads: int = 1, runs: int = 3, timeout: float = 900
                             ) -> dict[str, Any]:
    """Load + run ``spec`` in a fresh python process; returns load time, first-run time and peak RSS (MB).

    ``peak_rss_mb`` is the process's peak RSS (``VmHWM``) after load and ``runs`` runs; ``rss_after_import_mb`` is
    the same measure right after importing the runtime (torch only for torch kinds: ORT and TFLite children never
    import it), so ``model_rss_mb = peak_rss_mb - rss_after_import_mb`` is what loading and running the model costs.
    """
    req = json.dumps({"spec": spec.to_json(), "threads": threads, "runs": runs})
    try:
        res = subproc.run_python(["-m", "nailkit.bench.backends", "_child", req], desc=f"fresh process {spec.name}",
                                 timeout=timeout, progress=False)
    except subproc.WorkerError as exc:
        raise RuntimeError(f"backend {spec.name!r} ({spec.path}) failed in a fresh process: {exc}") from None
    res["model_rss_mb"] = res["peak_rss_mb"] - res["rss_after_import_mb"]
    return res


# ----------------------------------------------------------------------------------------------------------------
# where the time of one prediction goes
# ----------------------------------------------------------------------------------------------------------------

def time_split(spec: BackendSpec, image: Any, *, threads: int = 1, runs: int = 3, threshold: float = 0.5
               ) -> dict[str, float]:
    """Median ms of pre-processing (``nailkit.portable.preprocess``: decode-free resize + normalise), the forward
    pass and post-processing (``nailkit.portable.postprocess``: top-k, boxes, masks resized to the image and
    thresholded) for one backend on one image. Pre/post are the same numpy code for every backend; post depends on
    how many mask rows the model returns (a top-N file returns N)."""
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


if __name__ == "__main__":  # the fresh-process child of measure_in_fresh_process
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        _child_main(sys.argv[2])
    else:
        print("usage: python -m nailkit.bench.backends _child SPEC_JSON (internal); use `python -m nailkit bench`",
              file=sys.stderr)
        sys.exit(2)
