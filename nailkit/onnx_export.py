"""Export the export-mode model to ONNX and verify it with onnxruntime.

(Minimal first version: ``export_onnx``. Verification, caching and the CLI are being added — see issue 3.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from nailkit.checkpoint import atomic_write
from nailkit.model import INPUT_NAME, export_module


def export_onnx(rf, out_path: str | os.PathLike[str], *, resolution: int | None = None, opset: int | None = None,
                exporter: str = "legacy", segmentation: bool = True) -> Path:
    """Export ``rf`` (an rfdetr model from ``load_model``) at a fixed square resolution. Returns the .onnx path."""
    import torch

    module = export_module(rf, resolution, segmentation=segmentation)
    res = module.resolution
    x = torch.zeros(1, 3, res, res)
    opset = opset or (17 if exporter == "legacy" else 18)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(module, (x,), str(tmp), input_names=[INPUT_NAME],
                              output_names=list(module.output_names), opset_version=opset,
                              dynamo=(exporter == "dynamo"), do_constant_folding=True)

    t0 = time.time()
    path = atomic_write(Path(out_path), write)
    path_time = time.time() - t0
    _ = path_time
    return path
