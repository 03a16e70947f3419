"""Every backend on every image, and how each agrees with PyTorch (notebook 05 and anyone comparing backends):
``build_runners(rf, onnx_path=, tflite=, backends=, threads=)``, ``run_all(runners, images)``,
``consistency_rows(results, precision, ...)`` (IoU-matched detections vs torch, gated per precision by
``nailkit.verify.gates``), ``time_runner`` / ``benchmark_rows`` (median ms, FPS, detected count). The TFLite files to
compare come from ``nailkit.runtime.discovery.find_tflite_artifacts``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from nailkit.portable.postprocess import postprocess
from nailkit.portable.preprocess import preprocess
from nailkit.runtime.base import DEFAULT_NUM_SELECT, Runner
from nailkit.runtime.onnx_runner import OnnxRunner
from nailkit.runtime.runners import normalize_backend
from nailkit.runtime.tflite_runner import TFLiteRunner
from nailkit.runtime.torch_runner import TorchRunner
from nailkit.verify import gates
from nailkit.verify.parity import detection_parity, match_detections

#: Consistency gates vs the eager PyTorch model, per precision (None = reported, not gated): the numbers live in
#: ``nailkit.verify.gates`` (stages ``consistency_fp32`` / ``consistency_fp16``); this is a read-only view of them.
CONSISTENCY_GATES: dict[str, Optional[dict[str, float]]] = {
    p: (gates.gate(st) if (st := gates.consistency_stage(p)) else None) for p in ("fp32", "fp16", "int8")}


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
