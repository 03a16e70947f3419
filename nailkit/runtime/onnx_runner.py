"""The ONNX Runtime backend: ``OnnxRunner(path, threads=None)`` runs an .onnx file on CPUExecutionProvider with
``intra_op_num_threads=threads``; class names come from the sidecar or the model's metadata_props. onnxruntime is
imported inside the class, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nailkit.core.artifacts import read_sidecar
from nailkit.core.errors import first_line
from nailkit.runtime.base import _apply_meta, _check_model_file, _single_input, _square_resolution, Runner


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
            raise ValueError(f"{self.path}: not a loadable ONNX model ({first_line(exc)}); the file may be truncated or "
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

