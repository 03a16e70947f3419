"""Route B's static selective int8 (``nailkit.tflite.options.STATIC_PRECISIONS``: ``w8a8`` / ``w8a16``,
``nailkit.tflite.quantize``'s backbone recipes: the backbone's linears/convs at int8 weights + int8/int16 activations,
the decoder, heads, LayerNorms, softmax and sampling in float), quantised from the cached, gated fp32 file and
calibrated on ``calibration`` images of a train split with ``predict()``'s preprocessing; the calibration set's content
is in the file's key. Its parity is reported, not gated (see ``STATIC_PRECISIONS``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nailkit.core import artifacts
from nailkit.data.synthetic_dataset import ensure_dataset
from nailkit.model.checkpoint import Checkpoint
from nailkit.portable.io_contract import check_tflite_file
from nailkit.tflite import launch, quantize as Q
from nailkit.tflite.gate import embed_file_metadata, Gate, raise_if_refused
from nailkit.tflite.launch import ConversionError
from nailkit.tflite.options import ALL_OUTPUT_NAMES, checkpoint_info, DEFAULT_CALIBRATION, STATIC_PRECISIONS


def calibration_split(output_dir: str | os.PathLike[str], n: int = DEFAULT_CALIBRATION) -> Path:
    """The default calibration images: the synthetic dataset's train split (seed 0; image i depends only on
    (seed, split, i), so these are the first ``n`` images the demo model was trained on), generated when absent."""
    d = ensure_dataset(Path(output_dir) / "datasets" / f"nails-seed0-train{int(n)}", seed=0,
                       sizes={"train": int(n), "valid": 0, "test": 0})
    return d / "train"


def calibration_set(split_dir: str | os.PathLike[str], resolution: int, n: int = DEFAULT_CALIBRATION,
                    seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """(NHWC float32 [n, R, R, 3] calibration inputs, their identity for the cache key): ``n`` images of the split
    (``nailkit.tflite.quantize.calibration_images``), preprocessed exactly as ``predict()`` does."""
    import hashlib

    paths = Q.calibration_images(split_dir, n, seed)
    xs = np.concatenate(Q.calibration_inputs(split_dir, resolution, n, seed), axis=0).astype(np.float32)
    ident = {"images": [p.name for p in paths], "n": len(paths), "seed": seed,
             "inputs_sha256": hashlib.sha256(np.ascontiguousarray(xs).tobytes()).hexdigest()}
    return xs, ident


def ensure_static(ckpt: Checkpoint, out_dir: Path, adir: Path, key: dict[str, Any], precision: str, res: int, *,
                  also: tuple[str, ...], force: bool, verify: bool, sampling: str, mask_queries: int | None,
                  calibration: int, calibration_dir: str | os.PathLike[str] | None,
                  fp32: Callable[[], artifacts.Artifact]) -> artifacts.Artifact:
    """Route B static selective int8 (``STATIC_PRECISIONS``) from the cached, gated fp32 file (``fp32()``:
    ``ensure_tflite`` of the same file at fp32); the key is the fp32 folder's key plus the recipe and the calibration
    set. Published after its (reported) parity run."""
    split = Path(calibration_dir) if calibration_dir else calibration_split(out_dir, calibration)
    xs, ident = calibration_set(split, res, calibration)
    ident["split"] = str(split) if calibration_dir else "synthetic train (seed 0)"

    def key_of(prec: str) -> dict[str, Any]:
        return {**key, "static": {"precision": prec, "recipe": STATIC_PRECISIONS[prec], "calibration": ident}}

    path = adir / f"model_{precision}.tflite"
    if not force:
        meta = artifacts.cached(path, key_of(precision))
        if meta:
            return artifacts.Artifact(path, meta)
        raise_if_refused(path, key_of(precision), "litert", precision)
    wanted = [precision] + [p for p in dict.fromkeys(also) if p != precision
                            and (force or not artifacts.cached(adir / f"model_{p}.tflite", key_of(p)))]
    fp32_path, fp32_meta = fp32()
    info = checkpoint_info(ckpt)
    h = key_of(precision)["static"]["calibration"]["inputs_sha256"][:8]
    log_path = out_dir / "logs" / f"convert_litert_{res}_{adir.name}_{'-'.join(wanted)}_calib{h}.log"
    with artifacts.staging(path) as wp:
        np.save(wp / "calib.npy", xs)
        result = launch.run_worker(["quantize-static", str(fp32_path), str(wp / "calib.npy"), str(wp),
                                    ",".join(wanted)], log_path,
                                   f"ai-edge-quantizer static {'+'.join(wanted)} ({len(xs)} calibration images)")
        gate = Gate(ckpt, res, mask_queries) if verify else None
        metas: dict[str, dict[str, Any]] = {}
        for prec, f in result["files"].items():
            check_tflite_file(f)
            embed_file_metadata(f, info, "litert", prec, res, {"static_recipe": STATIC_PRECISIONS[prec]})
            meta = {"key": key_of(prec), "route": "litert", "precision": prec, "resolution": res,
                    "class_names": info["class_names"], "num_select": info["num_select"], "input": "NHWC float32",
                    "outputs": list(ALL_OUTPUT_NAMES), "checkpoint": str(ckpt),
                    "checkpoint_sha256": ckpt.sha256(), "log": str(log_path),
                    "conversion_wall_s": result["wall_s"], "conversion_peak_rss_mb": result["peak_rss_mb"],
                    "times": result.get("times", {}), "recipe": result.get("recipes", {}).get(prec),
                    "calibration": ident, "versions": {"ai_edge_quantizer": result.get("ai_edge_quantizer")},
                    "converted_together": sorted(result["files"]), "sampling": sampling,
                    "mask_queries": mask_queries, "made_from": str(fp32_path),
                    "fp32_conversion_wall_s": fp32_meta["conversion_wall_s"],
                    "gated": False, "gate_note": "reported, not gated: the dynamic-int8 rounding control does not "
                                                 "model calibrated static activation ranges (accuracy: notebook 07)"}
            if gate is not None:
                meta["parity"], _ = gate(Path(f), prec)
            metas[prec] = artifacts.publish(f, adir / f"model_{prec}.tflite", meta).meta
    if precision not in metas:
        raise ConversionError(f"route litert: the static quantization wrote no {precision} file (got "
                              f"{sorted(metas)}); see {log_path}")
    return artifacts.Artifact(path, metas[precision])
