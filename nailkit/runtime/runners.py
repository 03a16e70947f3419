"""One runner for every backend: PyTorch (eager or traced), ONNX Runtime and TFLite, one canonical output layout.

The API (stable; other stages build on it)::

    runner = make_runner(model, backend=None, threads=None, resolution=None)
        # model: an rfdetr object, or a path to a .pth / .onnx / .tflite; backend: None (by file type) or one of
        # BACKENDS (torch, torch-traced, onnxruntime, tflite, tflite-noxnnpack; "torchscript":
        # nailkit.bench.backends runs it)
    runner.run(x)                  # x: preprocessed float32 NCHW [1,3,R,R] -> RawOutputs (boxes [Q,4] cxcywh,
                                   #    logits [Q,C], masks [Q,h,w] logits), whatever the backend's own layout
    runner.predict_raw(image)      # image: path / PIL / numpy -> (RawOutputs, (orig_w, orig_h)); exact rfdetr
                                   #    preprocessing (nailkit.portable.preprocess)
    runner.predict(image, threshold=0.5, num_select=None, mask_threshold=0.0) -> postprocess.Prediction
    runner.resolution, runner.name, runner.backend, runner.input_layout ("NCHW"|"NHWC"), runner.path,
    runner.class_names, runner.num_select, runner.last_ms (wall time of the last run()), runner.close()

Backends:

* ``TorchRunner(rf, resolution=None, traced=False, threads=None)``: eager = nailkit's export-mode module
  (``nailkit.model.build.export_module``: rfdetr's own export preparation, frozen position embeddings). ``traced=True`` is
  rfdetr's ``RFDETR.inference(compile=True)`` path (``torch.jit.trace`` of the deployment-mode network, which runs on
  CPU); at a resolution other than the model's, the export-mode module is traced instead.
* ``OnnxRunner(path, threads=None)``: onnxruntime, CPUExecutionProvider, ``intra_op_num_threads=threads``.
* ``TFLiteRunner(path, threads=None, use_xnnpack=True)``: ``nailkit.portable.io_contract.TFLiteModel`` (the one TFLite runner,
  shared with the parity gates and the bundle); ``use_xnnpack=False`` runs the builtin kernels without the default
  XNNPACK delegate. Quantised inputs/outputs are (de)quantised with the tensor's own scale/zero-point.

Outputs are mapped **by shape and meaning, never by position** (``canonical_outputs`` → ``io_contract``): boxes
``[1,Q,4]``, logits ``[1,Q,C]`` (when C == 4 too, the output names decide, else the values: boxes lie in [0, 1]),
masks the rank-4 output, ``[1,Q,h,w]`` or the NHWC ``[1,h,w,Q]`` that onnx2tf writes (told apart by Q). Inputs may
be NCHW ``[1,3,R,R]`` or NHWC ``[1,R,R,3]`` (onnx2tf); ``run`` always takes NCHW and transposes when the model wants
NHWC.

Helpers for notebook 05 (and anyone comparing backends): ``find_tflite_artifacts(dir, checkpoint_sha256)`` (the
.tflite files whose sidecar names this checkpoint and still matches the file's sha256; the benchmark's discovery too),
``build_runners(rf, onnx_path=, tflite=, backends=, threads=)``, ``run_all(runners, images)``,
``consistency_rows(results, precision, ...)`` (IoU-matched detections vs torch, gated per precision by
``nailkit.verify.gates``), ``time_runner`` / ``benchmark_rows`` (median ms, FPS, detected count).


Heavy imports (torch, onnxruntime, ai_edge_litert) happen inside the classes, so ``import nailkit.runtime.runners`` is cheap.
``cli_predict`` implements ``python -m nailkit predict MODEL IMAGE... [--backend] [--threshold] [--out]``: overlay PNGs
``<out>/<stem>_overlay.png`` + ``<out>/detections.json``; an unwritable ``--out`` or an unreadable image is refused
before any model runs, and every file is written atomically.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from nailkit.core.artifacts import atomic_write, file_sha256, read_sidecar
from nailkit.model.build import (
    export_module,
    export_options,
    export_suffix,
    load_model,
    normalize_sampling,
    validate_resolution,
)
from nailkit.portable import io_contract
from nailkit.portable.io_contract import TFLiteModel
from nailkit.portable.postprocess import postprocess, Prediction, RawOutputs
from nailkit.portable.preprocess import ImageLike, load_image, MAX_PIXELS, preprocess, to_nhwc
from nailkit.report.viz import overlay
from nailkit.verify import gates
from nailkit.verify.parity import detection_parity, match_detections

#: the one backend vocabulary (``nailkit.bench.backends`` uses it too). ``make_runner`` opens all but "torchscript"
#: (a saved TorchScript .pt, which the benchmark runs itself).
BACKENDS = ("torch", "torch-traced", "torchscript", "onnxruntime", "tflite", "tflite-noxnnpack")
_BACKEND_ALIASES = {"pytorch": "torch", "eager": "torch", "traced": "torch-traced",
                    "onnx": "onnxruntime", "ort": "onnxruntime", "litert": "tflite", "pt": "torchscript",
                    "tflite-no-xnnpack": "tflite-noxnnpack"}
DEFAULT_NUM_SELECT = 200  # rfdetr's num_select for the segmentation models


class Runner:
    """Base class: subclasses set the attributes below and implement ``_forward`` (model-native input → arrays)."""

    backend: str = ""
    name: str = ""
    resolution: int = 0
    input_layout: str = "NCHW"
    path: Optional[Path] = None
    class_names: Optional[list[str]] = None
    num_select: int = DEFAULT_NUM_SELECT
    threads: Optional[int] = None
    last_ms: float = float("nan")
    output_names: Optional[list[str]] = None  # names of ``_forward``'s arrays, when the model has them

    # -- to implement ------------------------------------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------------------------
    def run(self, x: np.ndarray) -> RawOutputs:
        """Run one preprocessed NCHW float32 [1,3,R,R] batch; return the canonical ``RawOutputs``."""
        x = np.asarray(x, dtype=np.float32)
        expected = (1, 3, self.resolution, self.resolution)
        if x.shape != expected:
            raise ValueError(f"{self.name}: input shape {tuple(x.shape)} does not match the model; expected NCHW "
                             f"{list(expected)} (preprocess(image, {self.resolution}))")
        native = to_nhwc(x) if self.input_layout == "NHWC" else np.ascontiguousarray(x)
        t0 = time.perf_counter()
        arrays = self._forward(native)
        self.last_ms = (time.perf_counter() - t0) * 1000.0
        return canonical_outputs(arrays, where=self.name, names=self.output_names)

    def predict_raw(self, image: ImageLike) -> tuple[RawOutputs, tuple[int, int]]:
        """Preprocess ``image`` exactly like rfdetr and run it: (RawOutputs, (orig_width, orig_height))."""
        x, size = preprocess(image, self.resolution)
        return self.run(x), size

    def postprocess(self, raw: RawOutputs, size: tuple[int, int], threshold: float = 0.5,
                    num_select: Optional[int] = None, mask_threshold: float = 0.0, *,
                    mask_format: str = "full") -> Prediction:
        return postprocess(raw, size, threshold=threshold, num_select=num_select or self.num_select,
                           mask_threshold=mask_threshold, class_names=self.class_names, mask_format=mask_format)

    def predict(self, image: ImageLike, threshold: float = 0.5, num_select: Optional[int] = None,
                mask_threshold: float = 0.0, *, mask_format: str = "full") -> Prediction:
        """``mask_format="crop"``: one cropped mask per detection (memory follows the masks, not the photo)."""
        raw, size = self.predict_raw(image)
        return self.postprocess(raw, size, threshold, num_select, mask_threshold, mask_format=mask_format)

    def close(self) -> None:
        """Release the model; the runner cannot be used afterwards."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "path": str(self.path) if self.path else None,
                "resolution": self.resolution, "input_layout": self.input_layout, "threads": self.threads}

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} R={self.resolution} {self.input_layout}>"


# ---------------------------------------------------------------------------------------------------------------
# Output mapping by shape and meaning
# ---------------------------------------------------------------------------------------------------------------

def canonical_outputs(arrays: Sequence[np.ndarray], where: str = "model",
                      names: Optional[Sequence[str]] = None) -> RawOutputs:
    """Map a model's outputs, in any order, to ``RawOutputs`` by shape and meaning (``nailkit.portable.io_contract``).

    * boxes ``[1,Q,4]``, logits ``[1,Q,C]``; when C == 4 too, the ``names`` decide, else the values (boxes in [0,1]);
    * masks: rank 4, ``[1,Q,h,w]`` or NHWC ``[1,h,w,Q]`` (by which axis equals Q); optional;
    * rank-2 selection outputs (float ``enc_scores`` [1,S], integer ``topk_indices`` [1,Q]) go to ``raw.extra``.
    """
    arrays = [np.asarray(a) for a in arrays]
    for a in arrays:
        if a.ndim == 0 or a.shape[0] != 1:
            raise ValueError(f"{where}: output of shape {list(a.shape)} has no batch dimension of 1; expected "
                             f"[1,Q,4] boxes, [1,Q,C] logits and [1,Q,h,w] (or [1,h,w,Q]) masks")
    ranks = [a.ndim for a in arrays]
    if ranks.count(3) != 2 or ranks.count(4) > 1 or any(r not in (2, 3, 4) for r in ranks):
        raise ValueError(f"{where}: outputs {[list(a.shape) for a in arrays]} are not rfdetr's; expected two rank-3 "
                         f"outputs ([1,Q,4] boxes, [1,Q,C] logits) and at most one rank-4 mask output")
    details = [{"name": (names[i] if names else ""), "shape": a.shape, "dtype": a.dtype} for i, a in enumerate(arrays)]
    try:
        index = io_contract.identify_outputs(details, values=arrays)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    boxes, logits = arrays[index["pred_boxes"]], arrays[index["pred_logits"]]
    masks = None
    if "pred_masks" in index:
        m = arrays[index["pred_masks"]]
        masks = m[0] if io_contract.mask_layout(m.shape, boxes.shape[1]) == "NQHW" else np.transpose(m[0], (2, 0, 1))
    raw = RawOutputs(boxes=boxes[0], logits=logits[0], masks=masks)
    raw.extra.update({k: arrays[index[k]] for k in ("enc_scores", "topk_indices") if k in index})
    return raw


def _apply_meta(runner: Runner, meta: dict[str, Any], class_names: Optional[Sequence[str]]) -> None:
    names = class_names if class_names is not None else meta.get("class_names")
    runner.class_names = list(names) if names else None
    if isinstance(meta.get("num_select"), int):
        runner.num_select = int(meta["num_select"])


def _check_model_file(path: Path, kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file; expected a {kind} model (re-export it)")
    return path


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message, shortened at a word boundary (with "…") when longer than ``limit``."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"


def _single_input(inputs: Sequence[Any], path: Path) -> Any:
    if len(inputs) != 1:
        raise ValueError(f"{path}: model has {len(inputs)} inputs; expected one image input")
    return inputs[0]


def _square_resolution(shape: Sequence[Any], where: str, resolution: Optional[int]) -> tuple[int, str]:
    """(R, layout) from a model input shape [1,3,R,R] (NCHW) or [1,R,R,3] (NHWC); dynamic dims need ``resolution``."""
    dims = [d if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape]
    if len(dims) != 4 or dims[0] not in (1, None):
        raise ValueError(f"{where}: model input shape {list(shape)} does not match the image pipeline; expected "
                         f"[1,3,R,R] (NCHW) or [1,R,R,3] (NHWC), float32")
    if dims[1] == 3 and dims[3] != 3:
        layout, hw = "NCHW", (dims[2], dims[3])
    elif dims[3] == 3 and dims[1] != 3:
        layout, hw = "NHWC", (dims[1], dims[2])
    elif dims[1] == 3 and dims[3] == 3:
        layout, hw = "NCHW", (dims[2], dims[3])
    else:
        raise ValueError(f"{where}: model input shape {list(shape)} has no channel axis of 3; expected [1,3,R,R] "
                         f"(NCHW) or [1,R,R,3] (NHWC)")
    h, w = hw
    if h is not None and w is not None and h != w:
        raise ValueError(f"{where}: model input {list(shape)} is not square ({h}x{w}); the rfdetr pipeline resizes "
                         f"to a square R x R")
    res = h or w or resolution
    if res is None:
        raise ValueError(f"{where}: model input {list(shape)} has a dynamic size; pass resolution=R")
    if resolution is not None and int(resolution) != int(res):
        raise ValueError(f"{where}: model input is {res}x{res} but resolution={resolution} was asked for")
    return int(res), layout


# ---------------------------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------------------------

class TorchRunner(Runner):
    """The PyTorch model: eager export-mode module, or rfdetr's traced ``inference(compile=True)`` form."""

    def __init__(self, rf, resolution: Optional[int] = None, *, traced: bool = False,
                 threads: Optional[int] = None, sampling: Optional[str] = None,
                 mask_queries: Optional[int] = None, checkpoint: Optional[os.PathLike] = None) -> None:
        """``sampling`` / ``mask_queries``: ``nailkit.model.build.export_module``'s options (the traced form then traces
        that module instead of rfdetr's own); with ``mask_queries=N`` the outputs hold the N best queries' rows.
        ``checkpoint``: the file ``rf`` was loaded from (``path`` in ``describe()``; optional)."""
        import torch

        self.rf = rf
        self.resolution = validate_resolution(rf, resolution)
        self.threads = threads
        self.traced = bool(traced)
        self.backend = "torch-traced" if traced else "torch"
        self.options = export_options(sampling, mask_queries)
        self.name = self.backend + export_suffix(sampling, mask_queries).replace("_", " ")
        self.input_layout = "NCHW"
        self.path = Path(checkpoint) if checkpoint else None
        self.class_names = list(rf.class_names)
        self.num_select = int(getattr(rf.model.postprocess, "num_select", DEFAULT_NUM_SELECT))
        with self._threads():
            if not traced:
                self.module = export_module(rf, self.resolution, **self.options)
                self.how = "nailkit.model.build.export_module (rfdetr prepare_export_graph, eager)"
            elif (not self.options and self.resolution == int(rf.model.resolution)
                  and not getattr(rf, "_is_optimized_for_inference", False)):
                # rfdetr's own path: deepcopy → eval → export() → torch.jit.trace at the model resolution.
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rf.inference(compile=True, batch_size=1)
                self.module = rf.model.inference_model
                rf.remove_optimized_model()  # leave rf.predict() on the eager model, as before
                self.how = "rfdetr RFDETR.inference(compile=True) (torch.jit.trace)"
            else:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    eager = export_module(rf, self.resolution, **self.options)
                    self.module = torch.jit.trace(eager, torch.zeros(1, 3, self.resolution, self.resolution),
                                                  check_trace=False)
                self.how = "torch.jit.trace of nailkit.model.build.export_module"

    def _threads(self):
        import contextlib

        import torch

        if not self.threads:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def ctx():
            old = torch.get_num_threads()
            torch.set_num_threads(int(self.threads))
            try:
                yield
            finally:
                torch.set_num_threads(old)

        return ctx()

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        with self._threads(), torch.inference_mode():
            out = self.module(torch.from_numpy(x))
        if isinstance(out, dict):
            out = [v for k, v in out.items() if k in ("pred_boxes", "pred_logits", "pred_masks")]
        return [o.detach().cpu().numpy() for o in out if o is not None]

    def close(self) -> None:
        self.module = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["how"] = self.how
        d.update(self.options)
        return d


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------

class OnnxRunner(Runner):
    """An .onnx file on onnxruntime's CPUExecutionProvider."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], threads: Optional[int] = None, *,
                 resolution: Optional[int] = None, class_names: Optional[Sequence[str]] = None) -> None:
        self.path = _check_model_file(Path(path), "ONNX")
        self.threads = threads
        self.name = "onnxruntime"
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - in the project environment
            raise RuntimeError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a loadable ONNX model ({_first_line(exc)}); the file may be truncated or "
                             f"corrupt, re-export it (python -m nailkit export-onnx)") from None
        inp = _single_input(self.session.get_inputs(), self.path)
        if inp.type != "tensor(float)":
            raise ValueError(f"{self.path}: input {inp.name!r} is {inp.type}; expected tensor(float) (float32)")
        self.input_name = inp.name
        self.resolution, self.input_layout = _square_resolution(inp.shape, str(self.path), resolution)
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta = read_sidecar(self.path) or {}
        try:
            props = self.session.get_modelmeta().custom_metadata_map or {}
            if "class_names" in props and "class_names" not in meta:
                meta["class_names"] = json.loads(props["class_names"])
        except Exception:  # noqa: BLE001 - metadata is optional
            pass
        _apply_meta(self, meta, class_names)

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(self.output_names, {self.input_name: x}))

    def close(self) -> None:
        self.session = None


# ---------------------------------------------------------------------------------------------------------------
# TFLite (LiteRT)
# ---------------------------------------------------------------------------------------------------------------

class TFLiteRunner(Runner):
    """A .tflite file (either conversion route, any precision), run by ``nailkit.portable.io_contract.TFLiteModel`` — the
    same code the parity gates and the mobile bundle use."""

    backend = "tflite"

    def __init__(self, path: str | os.PathLike[str], threads: Optional[int] = None, *, use_xnnpack: bool = True,
                 resolution: Optional[int] = None, class_names: Optional[Sequence[str]] = None) -> None:
        self.path = _check_model_file(Path(path), "TFLite")
        self.threads = threads
        self.use_xnnpack = bool(use_xnnpack)
        self.backend = "tflite" if use_xnnpack else "tflite-noxnnpack"
        self.name = f"tflite:{self.path.stem}" + ("" if use_xnnpack else " (no XNNPACK)")
        try:
            self.model = TFLiteModel(self.path, threads, use_xnnpack=use_xnnpack)
        except ImportError as exc:  # pragma: no cover - in the project environment
            raise RuntimeError(f"ai-edge-litert is not installed ({exc}); pip install ai-edge-litert") from None
        self.resolution, self.input_layout = self.model.resolution, self.model.layout
        self.output_names = list(self.model.index)  # the order of model.run()'s dict: canonical meanings
        if resolution is not None and int(resolution) != self.resolution:
            raise ValueError(f"{self.path}: model input is {self.resolution}x{self.resolution} but "
                             f"resolution={resolution} was asked for")
        _apply_meta(self, read_sidecar(self.path) or {}, class_names)

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.model.run(x).values())

    def close(self) -> None:
        self.model.close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        io = self.model.describe()
        d.update(xnnpack=self.use_xnnpack, input_dtype=io["input"]["dtype"],
                 output_dtypes=[o["dtype"] for o in io["outputs"]])
        return d


# ---------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------

def normalize_backend(backend: Optional[str]) -> Optional[str]:
    if backend is None or backend == "":
        return None
    b = _BACKEND_ALIASES.get(backend.lower(), backend.lower())
    if b not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return b


def make_runner(model: Any, backend: Optional[str] = None, threads: Optional[int] = None,
                resolution: Optional[int] = None, *, trusted: bool = False,
                class_names: Optional[Sequence[str]] = None) -> Runner:
    """A runner for ``model``: an rfdetr object or a .pth/.pt (torch), .onnx (onnxruntime) or .tflite (TFLite) path.

    ``backend`` picks torch vs torch-traced for PyTorch models and tflite vs tflite-noxnnpack for .tflite files;
    a backend that cannot run the given file is an error.
    """
    b = normalize_backend(backend)
    if b == "torchscript":
        raise ValueError("backend 'torchscript' (a saved .pt) is run by nailkit.bench.backends; to trace a checkpoint "
                         "here use torch-traced")
    if not isinstance(model, (str, os.PathLike)):
        if not (hasattr(model, "model") and hasattr(model, "model_config")):
            raise ValueError(f"cannot run a {type(model).__name__}; expected an rfdetr model or a path to a "
                             f".pth/.onnx/.tflite file")
        if b not in (None, "torch", "torch-traced"):
            raise ValueError(f"backend {backend!r} needs a model file; an rfdetr object runs on torch/torch-traced")
        return TorchRunner(model, resolution, traced=(b == "torch-traced"), threads=threads)
    path = Path(model)
    suffix = path.suffix.lower()
    kinds = {".pth": "torch", ".pt": "torch", ".ckpt": "torch", ".onnx": "onnxruntime", ".tflite": "tflite"}
    if suffix not in kinds:
        raise ValueError(f"{path}: unknown model type {suffix or '(no suffix)'!r}; expected .pth, .onnx or .tflite")
    kind = kinds[suffix]
    if b is not None and not (b == kind or (kind == "torch" and b == "torch-traced")
                              or (kind == "tflite" and b == "tflite-noxnnpack")):
        raise ValueError(f"{path}: backend {backend!r} cannot run a {suffix} file (use {kind})")
    if kind == "torch":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        rf = load_model(path, trusted=trusted)
        return TorchRunner(rf, resolution, traced=(b == "torch-traced"), threads=threads, checkpoint=path)
    if kind == "onnxruntime":
        return OnnxRunner(path, threads, resolution=resolution, class_names=class_names)
    return TFLiteRunner(path, threads, use_xnnpack=(b != "tflite-noxnnpack"), resolution=resolution,
                        class_names=class_names)


def find_artifacts(artifacts_dir: str | os.PathLike[str], suffixes: Sequence[str] = (".onnx", ".tflite")
                   ) -> list[Path]:
    """Model files under ``artifacts_dir`` (recursive, sorted), skipping temp/partial files."""
    d = Path(artifacts_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not p.name.startswith(".") and ".part" not in p.name)


def time_runner(runner: Runner, x: np.ndarray, runs: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median wall time of ``runner.run(x)``: {'ms', 'fps', 'min_ms', 'runs'} (the seed's benchmark line)."""
    for _ in range(max(0, warmup)):
        runner.run(x)
    times = []
    for _ in range(max(1, runs)):
        runner.run(x)
        times.append(runner.last_ms)
    ms = float(np.median(times))
    return {"ms": ms, "fps": 1000.0 / ms if ms > 0 else float("inf"), "min_ms": float(min(times)), "runs": len(times)}


# ---------------------------------------------------------------------------------------------------------------
# Every backend on every image, and how each agrees with PyTorch (notebook 05)
# ---------------------------------------------------------------------------------------------------------------

#: Consistency gates vs the eager PyTorch model, per precision (None = reported, not gated): the numbers live in
#: ``nailkit.verify.gates`` (stages ``consistency_fp32`` / ``consistency_fp16``); this is a read-only view of them.
CONSISTENCY_GATES: dict[str, Optional[dict[str, float]]] = {
    p: (gates.gate(st) if (st := gates.consistency_stage(p)) else None) for p in ("fp32", "fp16", "int8")}


def _precision_of(path: Path, meta: dict[str, Any]) -> str:
    if meta.get("precision"):
        return str(meta["precision"])
    stem = path.stem.lower()
    for key, names in (("int8", ("int8", "integer_quant", "dynamic_range")), ("fp16", ("fp16", "float16")),
                       ("fp32", ("fp32", "float32"))):
        if any(n in stem for n in names):
            return key
    return "fp32"


def find_tflite_artifacts(artifacts_dir: str | os.PathLike[str], checkpoint_sha256: Optional[str] = None, *,
                          route: Optional[str] = None, precision: Optional[str] = None,
                          resolution: Optional[int] = None, options: Optional[Mapping[str, Any]] = None
                          ) -> tuple[list[dict[str, Any]], list[str]]:
    """The .tflite files under ``artifacts_dir`` that belong to this checkpoint, and notes on the ones skipped: the one
    discovery of converted files (notebook 05, the benchmark). Never converts.

    A file belongs when its sidecar (``<file>.tflite.json``, written by ``nailkit.tflite.convert``) records the
    checkpoint's sha256 (prefix match: sidecars may keep a short hash) and, where the sidecar records the file's own
    sha256 (every file ``nailkit.core.artifacts.publish`` wrote), the file still has it: a file edited or replaced
    after its sidecar was written is skipped with a note. Without ``checkpoint_sha256`` every loadable file counts.
    ``route`` / ``precision`` / ``resolution`` keep only the files whose sidecar says so; ``options`` (export options,
    ``{}`` = the default graph) keeps only files made with exactly those (``sampling``: None/"grid" = default;
    ``mask_queries``: None = all queries). Only the files that pass these filters are hashed.
    Each item: ``{"path", "label", "precision", "route", "meta"}``; labels look like ``tflite:litert:fp16``; sorted by
    path.
    """
    want_options = None
    if options is not None:
        mq = options.get("mask_queries")
        want_options = (normalize_sampling(options.get("sampling")), None if mq is None else int(mq))
    found: list[dict[str, Any]] = []
    notes: list[str] = []
    for path in find_artifacts(artifacts_dir, (".tflite",)):
        meta = read_sidecar(path) or {}
        sha = str(meta.get("checkpoint_sha256") or meta.get("key", {}).get("checkpoint_sha256") or "")
        if checkpoint_sha256 and not (sha and (checkpoint_sha256.startswith(sha) or sha.startswith(checkpoint_sha256))):
            notes.append(f"{path}: skipped ({'no sidecar' if not sha else 'another checkpoint'})")
            continue
        prec = _precision_of(path, meta)
        rt = str(meta.get("route") or path.parent.name.split("_")[0] or "tflite")
        if (route is not None and rt != route) or (precision is not None and prec != precision) \
                or (resolution is not None and int(meta.get("resolution", -1)) != int(resolution)) \
                or (want_options is not None
                    and (normalize_sampling(meta.get("sampling")), meta.get("mask_queries")) != want_options):
            continue
        if meta.get("sha256") and meta["sha256"] != file_sha256(path, 64):
            notes.append(f"{path}: skipped (changed since its sidecar was written: sha256 differs)")
            continue
        options_tag = "".join(f":{t}" for t in ((meta.get("sampling") if meta.get("sampling") in ("tent", "xnn")
                                                 else ""),
                                                (f"mq{meta['mask_queries']}" if meta.get("mask_queries") else ""))
                              if t)
        found.append({"path": path, "precision": prec, "route": rt, "meta": meta,
                      "label": f"tflite:{rt}:{prec}{options_tag}"})
    labels = [f["label"] for f in found]
    for f in found:  # two files with the same route+precision (e.g. two resolutions): make the labels unique
        if labels.count(f["label"]) > 1:
            f["label"] = f"{f['label']}:{f['path'].parent.name}"
    return found, notes


def build_runners(rf, *, onnx_path: Optional[str | os.PathLike[str]] = None,
                  tflite: Sequence[dict[str, Any]] = (), backends: str | Sequence[str] = "all",
                  threads: Optional[int] = None) -> tuple[dict[str, Runner], dict[str, str]]:
    """Runners for every requested backend that can run: ``({label: runner}, {label: precision})``.

    ``backends``: "all" or names among torch, torch-traced, onnxruntime, tflite. The eager torch runner is always
    built (it is the reference). TFLite labels come from ``find_tflite_artifacts``.
    """
    want = {"torch", "torch-traced", "onnxruntime", "tflite"} if backends in ("all", "", None) else {
        normalize_backend(b) for b in ([x.strip() for x in backends.split(",")] if isinstance(backends, str)
                                       else backends) if b}
    runners: dict[str, Runner] = {"torch": TorchRunner(rf, threads=threads)}
    precision = {"torch": "fp32"}
    if "torch-traced" in want:
        runners["torch-traced"] = TorchRunner(rf, traced=True, threads=threads)
        precision["torch-traced"] = "fp32"
    if "onnxruntime" in want and onnx_path:
        runners["onnxruntime"] = OnnxRunner(onnx_path, threads, class_names=rf.class_names)
        precision["onnxruntime"] = "fp32"
    if "tflite" in want or "tflite-noxnnpack" in want:
        for art in tflite:
            r = TFLiteRunner(art["path"], threads, class_names=rf.class_names)
            r.name = art["label"]
            runners[art["label"]] = r
            precision[art["label"]] = art["precision"]
    return runners, precision


def run_all(runners: Mapping[str, Runner], images: Sequence[str | os.PathLike[str]], progress: bool = True
            ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{backend: {image_name: {"raw", "size", "ms"}}}``: every runner once on every image."""
    from tqdm.auto import tqdm

    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in runners}
    jobs = [(n, Path(p)) for n in runners for p in images]
    for name, p in tqdm(jobs, desc="backends x images", disable=not progress):
        raw, size = runners[name].predict_raw(p)
        out[name][p.name] = {"raw": raw, "size": size, "ms": runners[name].last_ms}
    return out


def consistency_rows(results: Mapping[str, Mapping[str, Mapping[str, Any]]], precision: Mapping[str, str], *,
                     reference: str = "torch", threshold: float = 0.5, mask_threshold: float = 0.0,
                     top_k: int = gates.TOP_K, num_select: int = DEFAULT_NUM_SELECT) -> list[dict[str, Any]]:
    """One row per (backend, image) vs ``reference``: the reference's top-``top_k`` detections matched by box IoU
    (``nailkit.verify.parity.detection_parity``), worst mask IoU / score / box differences, and the detection counts above
    ``threshold``; ``gate`` is "pass", "FAIL" or "report" (no gate for that precision)."""
    rows = []
    for name, per_image in results.items():
        if name == reference:
            continue
        prec = precision.get(name, "fp32")
        stage = gates.consistency_stage(prec)
        for img, r in per_image.items():
            ref = results[reference][img]
            par = detection_parity(ref["raw"], r["raw"], ref["size"], top_k=top_k, mask_threshold=mask_threshold)
            a = postprocess(ref["raw"], ref["size"], threshold=threshold, num_select=num_select,
                            mask_threshold=mask_threshold)
            b = postprocess(r["raw"], r["size"], threshold=threshold, num_select=num_select,
                            mask_threshold=mask_threshold)
            at_thr = match_detections(a, b)
            frac = par.num_matched / max(1, min(top_k, par.num_a))
            row = {"backend": name, "precision": prec, "image": img, "top_k": top_k,
                   "matched": par.num_matched, "matched_frac": round(frac, 4),
                   "min_mask_iou": None if par.min_mask_iou is None else round(par.min_mask_iou, 4),
                   "max_score_diff": float(par.max_score_diff), "max_box_px": round(par.max_box_l1_px, 3),
                   "same_class": par.all_same_class,
                   "count_ref": len(a), "count": len(b), "matched_at_threshold": at_thr.num_matched,
                   "max_abs_logit": float(np.abs(r["raw"].logits - ref["raw"].logits).max()),
                   "max_abs_box": float(np.abs(r["raw"].boxes - ref["raw"].boxes).max())}
            if stage is None:
                row["gate"] = "report"
            else:
                fails = gates.check(stage, {"matched_frac": frac, "same_class": par.all_same_class,
                                            "min_mask_iou": par.min_mask_iou, "max_score_diff": par.max_score_diff})
                row["gate"] = "FAIL" if fails else "pass"
            rows.append(row)
    return rows


def benchmark_rows(runners: Mapping[str, Runner], image: str | os.PathLike[str], *, threshold: float = 0.5,
                   runs: int = 3, warmup: int = 1) -> list[dict[str, Any]]:
    """The seed's benchmark line per backend: median inference ms, FPS and detections above ``threshold``."""
    rows = []
    for name, runner in runners.items():
        x, size = preprocess(image, runner.resolution)
        t = time_runner(runner, x, runs=runs, warmup=warmup)
        pred = runner.postprocess(runner.run(x), size, threshold=threshold)
        rows.append({"backend": name, "inference_ms": round(t["ms"], 1), "fps": round(t["fps"], 2),
                     "detected": len(pred), "runs": t["runs"], "threads": runner.threads,
                     "image": Path(image).name})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# CLI: python -m nailkit predict MODEL IMAGE... [--backend] [--threshold] [--out]
# ---------------------------------------------------------------------------------------------------------------

def check_writable_dir(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` if needed and prove a file can be written there; raise a clear error otherwise."""
    import tempfile

    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: --out exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nailkit-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{out}: output directory is not writable ({exc.strerror or exc}); pass --out DIR "
                              f"that you can write to") from None
    return out


def _original_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - load_image already named the problem
        return (0, 0)


def cli_predict(args) -> int:
    """One image at a time: load (photos over ``preprocess.MAX_PIXELS`` are downscaled by Pillow), run, post-process
    with cropped masks, draw, write. Memory does not grow with the number of images or detections."""
    from PIL import Image

    images = [Path(p) for p in args.images]
    for p in images:  # every image must be readable before anything is written (decoded one at a time, then freed)
        load_image(p, downscale=True)
    stems = [p.stem for p in images]
    dup = {s for s in stems if stems.count(s) > 1}
    runner = make_runner(args.model, backend=args.backend, threads=args.threads, trusted=args.trusted)
    out = check_writable_dir(args.out)

    records = []
    written = []
    try:
        for i, path in enumerate(images):
            rgb = load_image(path, downscale=True)
            raw, size = runner.predict_raw(rgb)
            pred = runner.postprocess(raw, size, threshold=args.threshold, num_select=args.num_select,
                                      mask_threshold=args.mask_threshold, mask_format="crop")
            stem = f"{path.stem}_{i}" if path.stem in dup else path.stem
            rec = {"image": str(path), "size": list(size), "overlay": str(out / f"{stem}_overlay.png"),
                   "inference_ms": round(runner.last_ms, 2), "count": len(pred), "detections": pred.to_json()}
            orig = _original_size(path)
            if tuple(orig) != tuple(size):
                rec["original_size"] = list(orig)
                rec["downscaled"] = (f"{orig[0]}x{orig[1]} is over {MAX_PIXELS / 1e6:.0f} MP: predicted on a "
                                     f"{size[0]}x{size[1]} copy (boxes and masks in its pixels)")
            records.append(rec)
            img = overlay(rgb, pred)
            del rgb, raw, pred
            written.append(atomic_write(out / f"{stem}_overlay.png",
                                        lambda p, im=img: Image.fromarray(im).save(p, format="PNG")))
            del img
        doc = {"model": str(args.model), "runner": runner.describe(), "threshold": args.threshold,
               "mask_threshold": args.mask_threshold, "num_select": args.num_select or runner.num_select,
               "images": records}
        js = atomic_write(out / "detections.json", lambda p: p.write_text(json.dumps(doc, indent=2)))
    finally:
        runner.close()
    for stem, rec in zip(written, records):
        print(f"{rec['image']}: {rec['count']} detections (> {args.threshold}) -> {stem}")
        if "downscaled" in rec:
            print(f"  {rec['downscaled']}")
    print(f"detections: {js}")
    return 0
