"""What runs a .tflite: ``TFLiteRunner(path, threads=None, use_xnnpack=True)``.

It goes through ``nailkit.portable.io_contract.TFLiteModel`` (the one TFLite runner, shared with the parity gates and
the bundle); ``use_xnnpack=False`` runs the builtin kernels without the default XNNPACK delegate. Quantised
inputs/outputs are (de)quantised with the tensor's own scale/zero-point. Either conversion route, any precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.core.artifacts import read_sidecar
from nailkit.portable.io_contract import TFLiteModel
from nailkit.runtime.base import _apply_meta, _check_model_file, Runner


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

