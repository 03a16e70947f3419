"""Choosing and opening a runner: ``make_runner`` picks the backend for a model (by file type, or ``backend``) and
``normalize_backend`` / ``BACKENDS`` are the one backend vocabulary.

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

The runners themselves: ``nailkit.runtime.base`` (``Runner``, ``canonical_outputs``), ``torch_runner``
(``TorchRunner``), ``onnx_runner`` (``OnnxRunner``), ``tflite_runner`` (``TFLiteRunner``). Comparing backends:
``nailkit.runtime.compare``; finding converted files: ``nailkit.runtime.discovery``; ``python -m nailkit predict``:
``nailkit.runtime.predict``.

Heavy imports (torch, onnxruntime, ai_edge_litert) happen inside the classes, so ``import nailkit.runtime.runners`` is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from nailkit.model.build import load_model
from nailkit.runtime.base import Runner
from nailkit.runtime.onnx_runner import OnnxRunner
from nailkit.runtime.tflite_runner import TFLiteRunner
from nailkit.runtime.torch_runner import TorchRunner

#: the one backend vocabulary (``nailkit.bench.backends`` uses it too). ``make_runner`` opens all but "torchscript"
#: (a saved TorchScript .pt, which the benchmark runs itself).
BACKENDS = ("torch", "torch-traced", "torchscript", "onnxruntime", "tflite", "tflite-noxnnpack")
_BACKEND_ALIASES = {"pytorch": "torch", "eager": "torch", "traced": "torch-traced",
                    "onnx": "onnxruntime", "ort": "onnxruntime", "litert": "tflite", "pt": "torchscript",
                    "tflite-no-xnnpack": "tflite-noxnnpack"}


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
