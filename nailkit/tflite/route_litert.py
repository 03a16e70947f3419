"""Route B, the parent's side: the export-mode module (wrapped to take NHWC input) → ``litert_torch.convert`` in a
worker (``nailkit.tflite.workers``); fp16 and dynamic int8 through ai-edge-quantizer recipes, made from the cached,
gated fp32 file. Static selective int8 is ``nailkit.tflite.static_int8``.

``convert_route_b`` converts into a staging folder for ``nailkit.tflite.convert.ensure_tflite``, which gates and
publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from nailkit.core import artifacts
from nailkit.model.build import export_suffix
from nailkit.model.checkpoint import Checkpoint
from nailkit.tflite import launch


def convert_route_b(ckpt: Checkpoint, res: int, wanted: list[str], wp: Path, log_path: Path, *, sampling: str,
                    mask_queries: int | None, fp32: Callable[[], artifacts.Artifact]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route B into ``wp``: fp32 with litert-torch, or the wanted quantised precisions from the cached (gated) fp32
    file, converted first when missing (``fp32()``: ``ensure_tflite`` of the same file at fp32). Returns the worker's
    result and the meta it adds."""
    quant = [p for p in wanted if p != "fp32"]
    if not quant:
        return launch.run_worker(["route-b", str(ckpt), str(res), sampling, str(mask_queries or "all"), str(wp)],
                                 log_path, f"litert-torch {res} fp32{export_suffix(sampling, mask_queries)}"), {}
    fp32_path, fp32_meta = fp32()
    extra = {"fp32_conversion_wall_s": fp32_meta["conversion_wall_s"], "made_from": str(fp32_path)}
    return launch.run_worker(["quantize-litert", str(fp32_path), str(wp), ",".join(quant)], log_path,
                             f"ai-edge-quantizer {'+'.join(quant)}"), extra
