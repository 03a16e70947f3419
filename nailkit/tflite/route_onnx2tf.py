"""Route A, the parent's side: checkpoint → verified ONNX (``nailkit.export.onnx.ensure_onnx``) → the needed ONNX
passes (``nailkit.export.onnx_passes.DEFAULT_PASSES``; with onnx2tf 2.6.9 + onnxsim 0.6.5 none is) + the selection
outputs → onnx2tf in a worker (``nailkit.tflite.workers``: ``tflite_backend="tf_converter"``,
``replace_to_pseudo_operators=["Erf"]`` only: adding ``"GeLU"`` makes onnx2tf emit the tanh approximation) →
``*_float32`` .tflite, plus dynamic-range int8 from the SavedModel with ``TFLiteConverter`` (``Optimize.DEFAULT``,
as rfdetr does). Optional full-integer int8 (calibrated on ``data/``) behind ``full_int8``. fp16 is made from the fp32
file by a flatbuffer pass (``make_fp16``: GEMM weights stored as fp16, everything else fp32).

``convert_route_a`` converts into a staging folder for ``nailkit.tflite.convert.ensure_tflite``, which gates and
publishes; ``convert_onnx_file`` runs route A on an arbitrary ONNX file (no passes, no cache, no gate).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nailkit.core import artifacts, subproc
from nailkit.data.samples import sample_images
from nailkit.export import onnx_passes
from nailkit.export.onnx import ensure_onnx
from nailkit.model.build import DEFAULT_OUTPUT_DIR, export_options, export_suffix, resolve_checkpoint
from nailkit.model.checkpoint import Checkpoint, checkpoint_content
from nailkit.portable.preprocess import preprocess, to_nhwc
from nailkit.tflite import launch, passes
from nailkit.tflite.options import (
    ONNX2TF_KWARGS,
    ONNX2TF_PER_OP_VALIDATION,
    ONNX_PACKAGES,
    resolution_of,
    ROUTE_A_PASSES,
)


def key_params(passes: tuple[str, ...]) -> dict[str, Any]:
    """What route A adds to a file's cache key: the ONNX passes and onnx2tf's settings."""
    params: dict[str, Any] = {"passes": list(passes), "onnx2tf_kwargs": ONNX2TF_KWARGS}
    if not ONNX2TF_PER_OP_VALIDATION:
        params["onnx2tf_per_op_validation"] = False
    params["onnx2tf_tflite_from"] = "concrete_function"  # see nailkit.tflite.workers._onnx2tf_tflite
    params["fp16_from"] = "fp32_file:gemm_weights"  # see make_fp16
    return params


def make_fp16(fp32: Path, dst: Path) -> dict[str, Any]:
    """Route A's fp16 file: the fp32 file with its GEMM weights stored as fp16 (``nailkit.tflite.passes.fp16_gemm_weights``)
    rather than TFLiteConverter's fp16 mode, which also rounds onnx2tf's folded constants (its pseudo-Erf coefficients,
    the proposal anchors, the interpolated position embedding) and failed the gate at 3.41x the rounding control."""
    if not fp32.is_file():
        raise launch.ConversionError(f"{dst.name}: route A's fp16 file is made from the fp32 file, and {fp32} is missing "
                              "(its conversion failed or was refused); convert fp32 first")
    t0 = time.time()
    with subproc.step(f"fp16 from {fp32.name}", "GEMM weights to fp16"):
        stats = passes.fp16_gemm_weights(fp32, dst)
    return {"file": str(dst), "seconds": round(time.time() - t0, 2), **stats}


def ensure_selection_onnx(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                          resolution: int | None = None, passes: tuple[str, ...] = ROUTE_A_PASSES,
                          rf: Any = None, sampling: str | None = None, mask_queries: int | None = None
                          ) -> artifacts.Artifact:
    """The ONNX route A converts: the verified export (``onnx_export.ensure_onnx``: its gate failing raises
    ``ParityError`` here, there is no unverified fallback) → ``passes`` → selection outputs exposed. Cached."""
    import onnx

    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    res = resolution_of(ckpt, resolution)
    opts = export_options(sampling, mask_queries)
    h, key = artifacts.artifact_key("onnx_for_tflite", checkpoint_content(ckpt),
                                    {"resolution": res, "passes": list(passes), "opset": 17, **opts}, ONNX_PACKAGES)
    path = out_dir / "tflite" / "onnx" / f"model_{res}{export_suffix(sampling, mask_queries)}_{h}.onnx"
    meta = artifacts.cached(path, key)
    if meta:
        return artifacts.Artifact(path, meta)
    t0 = time.time()
    base, _ = ensure_onnx(ckpt, out_dir, resolution=res, rf=rf, sampling=sampling, mask_queries=mask_queries)
    model = onnx_passes.expose_selection(onnx_passes.apply_passes(onnx.load(str(base)), passes))
    with artifacts.staging(path) as work:
        staged = work / path.name
        onnx.save(model, str(staged))
        return artifacts.publish(staged, path, {"key": key, "source_onnx": str(base), "passes": list(passes),
                                                "seconds": time.time() - t0,
                                                "op_counts": onnx_passes.op_counts(model)})


def _calibration_npy(path: Path, resolution: int, n: int = 6) -> Path:
    xs = [to_nhwc(preprocess(p, resolution)[0])[0] for p in sample_images()[:n]]
    np.save(path, np.stack(xs).astype(np.float32))
    return path


def convert_route_a(ckpt: Checkpoint, out_dir: Path, adir: Path, key: dict[str, Any], res: int, wanted: list[str],
                    wp: Path, log_path: Path, *, passes: tuple[str, ...], sampling: str, mask_queries: int | None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route A into the staging folder ``wp``: the verified selection ONNX → onnx2tf (fp32, and fp16 when wanted) in
    a worker, or — when fp32 is cached with its SavedModel kept — the wanted precisions from that SavedModel. Returns
    the worker's result and the meta it adds (``onnx``, ``made_from``)."""
    extra: dict[str, Any] = {}
    fp16 = "fp16" in wanted  # made from the fp32 file afterwards (make_fp16), never by the converter
    wanted = [p for p in wanted if p != "fp16"]
    with subproc.step(f"onnx2tf {res}", "export + verify ONNX (cached after the first time)"):
        onnx_path, _ = ensure_selection_onnx(ckpt, out_dir, res, passes=passes, sampling=sampling,
                                             mask_queries=mask_queries)
    extra["onnx"] = str(onnx_path)
    if "full_int8" in wanted:
        _calibration_npy(wp / "calib.npy", res)
    kept = adir / "saved_model"
    have = {p for p in ("fp32", "fp16") if artifacts.cached(adir / f"model_{p}.tflite", key)}
    # a precision whose refusal is recorded is done too: onnx2tf would only make the same failing file again
    done = have | {p for p in ("fp32", "fp16") if artifacts.refusal(adir / f"model_{p}.tflite", key)}
    if kept.is_dir() and "fp32" in done:
        # fp32 is cached: make fp16 / int8 / full_int8 from the kept SavedModel, no second onnx2tf run.
        wanted = [p for p in wanted if p not in done]
        extra["made_from"] = str(kept)
        result: dict[str, Any] = {"files": {}, "times": {}}
        if wanted:
            result = launch.run_worker(["quantize-saved-model", str(kept), str(wp), ",".join(wanted)], log_path,
                                       f"TFLiteConverter {'+'.join(wanted)}")
        if fp16:
            _add_fp16(result, adir / "model_fp32.tflite", wp)
        return result, extra
    src = wp / "model.onnx"  # onnx2tf names its files after the stem
    os.symlink(onnx_path.resolve(), src)
    result = launch.run_worker(["route-a", str(src), str(wp), ",".join(wanted)], log_path,
                               f"onnx2tf {res} {'+'.join(wanted)}")
    for f in (wp / "saved_model").glob("*.tflite"):
        if str(f) not in result["files"].values():
            f.unlink()
    for prec, f in list(result["files"].items()):  # out of the SavedModel folder before it is kept
        if Path(f).parent.name == "saved_model":
            result["files"][prec] = str(Path(f).replace(wp / f"{prec}.tflite"))
    if kept.exists():
        shutil.rmtree(kept)
    os.replace(wp / "saved_model", kept)  # onnx2tf's SavedModel, for later quantization
    if fp16:
        _add_fp16(result, Path(result["files"]["fp32"]), wp)
    return result, extra


def _add_fp16(result: dict[str, Any], fp32: Path, wp: Path) -> None:
    made = make_fp16(fp32, wp / "fp16.tflite")
    result["files"]["fp16"] = made["file"]
    result.setdefault("times", {})["fp16_s"] = made["seconds"]


def convert_onnx_file(onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      precisions: tuple[str, ...] = ("fp32",), log_path: str | os.PathLike[str] | None = None
                      ) -> dict[str, Path]:
    """Route A on an arbitrary ONNX file (no passes, no cache, no gate): ``{precision: path}`` under ``out_dir``.
    Used by the pass tests to show what onnx2tf does with and without a pass."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else out / f"{Path(onnx_path).stem}.log"
    with tempfile.TemporaryDirectory(prefix=".work-", dir=out) as work:
        src = Path(work) / "model.onnx"
        shutil.copy(onnx_path, src)
        result = launch.run_worker(["route-a", str(src), work, ",".join(precisions)], log,
                                   f"onnx2tf {Path(onnx_path).name}")
        paths = {}
        for prec, f in result["files"].items():
            dst = out / f"{Path(onnx_path).stem}_{prec}.tflite"
            os.replace(f, dst)
            paths[prec] = dst
    return paths
