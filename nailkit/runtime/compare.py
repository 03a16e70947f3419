"""Every backend on every image, and how each agrees with PyTorch (notebook 05 and anyone comparing backends):
``build_runners(rf, onnx_path=, tflite=, backends=, threads=)``, ``run_all(runners, images)``,
``consistency_rows(results, precision, ...)`` (IoU-matched detections vs torch, gated per precision by
``nailkit.verify.gates``; a backend whose selection differs from torch's only by a near-tie is compared with torch
re-run on its selection), ``time_runner`` / ``benchmark_rows`` (median ms, FPS, detected count). The TFLite files to
compare come from ``nailkit.runtime.discovery.find_tflite_artifacts``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from nailkit.portable.postprocess import postprocess, RawOutputs
from nailkit.portable.preprocess import preprocess
from nailkit.runtime.base import DEFAULT_NUM_SELECT, Runner
from nailkit.runtime.onnx_runner import OnnxRunner
from nailkit.runtime.runners import normalize_backend
from nailkit.runtime.tflite_runner import TFLiteRunner
from nailkit.runtime.torch_runner import TorchRunner
from nailkit.verify import gates
from nailkit.verify.parity import detection_parity, match_detections, tie_resolved_reference

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
    """``{backend: {image_name: {"raw", "size", "ms"[, "rerun"]}}}``: every runner once on every image. ``rerun``,
    for a runner that records its selection and can force it (``TorchRunner.run_selected``): ``rerun(indices) ->
    RawOutputs``, the same image re-run on another backend's selection (``consistency_rows`` uses it on a near-tie)."""
    from tqdm.auto import tqdm

    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in runners}
    jobs = [(n, Path(p)) for n in runners for p in images]
    for name, p in tqdm(jobs, desc="backends x images", disable=not progress):
        runner = runners[name]
        x, size = preprocess(p, runner.resolution)
        raw = runner.run(x)
        out[name][p.name] = {"raw": raw, "size": size, "ms": runner.last_ms}
        if "topk_indices" in raw.extra and hasattr(runner, "run_selected"):
            out[name][p.name]["rerun"] = functools.partial(runner.run_selected, x)
    return out


#: the numbers ``gates.check`` reads from a consistency row; a row also keeps them against the unforced reference
_GATED = ("matched_frac", "same_class", "min_mask_iou", "max_score_diff")
_DIGITS = {"matched_frac": 4, "min_mask_iou": 4, "max_box_px": 3}


def _agreement(ref: RawOutputs, raw: RawOutputs, size: tuple[int, int], *, threshold: float, mask_threshold: float,
               top_k: int, num_select: int) -> dict[str, Any]:
    """The numbers of one consistency row (unrounded): ``raw`` against the reference run ``ref`` on one image."""
    par = detection_parity(ref, raw, size, top_k=top_k, mask_threshold=mask_threshold)
    a, b = (postprocess(r, size, threshold=threshold, num_select=num_select, mask_threshold=mask_threshold)
            for r in (ref, raw))
    return {"matched": par.num_matched, "matched_frac": par.num_matched / max(1, min(top_k, par.num_a)),
            "min_mask_iou": par.min_mask_iou, "max_score_diff": float(par.max_score_diff),
            "max_box_px": par.max_box_l1_px, "same_class": par.all_same_class,
            "count_ref": len(a), "count": len(b), "matched_at_threshold": match_detections(a, b).num_matched,
            "max_abs_logit": float(np.abs(raw.logits - ref.logits).max()),
            "max_abs_box": float(np.abs(raw.boxes - ref.boxes).max())}


def _rounded(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: round(v, _DIGITS[k]) if k in _DIGITS and v is not None else v for k, v in m.items()}


def consistency_rows(results: Mapping[str, Mapping[str, Mapping[str, Any]]], precision: Mapping[str, str], *,
                     reference: str = "torch", threshold: float = 0.5, mask_threshold: float = 0.0,
                     top_k: int = gates.TOP_K, num_select: int = DEFAULT_NUM_SELECT) -> list[dict[str, Any]]:
    """One row per (backend, image) vs ``reference``: the reference's top-``top_k`` detections matched by box IoU
    (``nailkit.verify.parity.detection_parity``), worst mask IoU / score / box differences, and the detection counts above
    ``threshold``; ``gate`` is "pass", "FAIL" or "report" (no gate for that precision).

    ``selection`` compares the two runs' two-stage selections (``parity.tie_resolved_reference``): "same", "tie" (they
    differ only between near-tied encoder scores), "differs", or None (one records none). On a "tie", when the
    reference's entry has a ``rerun`` (``run_all``), every number is measured against the reference re-run on the
    backend's selection (``forced``) and the gated ones against the plain reference stay in ``unforced_*``."""
    kw = {"threshold": threshold, "mask_threshold": mask_threshold, "top_k": top_k, "num_select": num_select}
    rows = []
    for name, per_image in results.items():
        if name == reference:
            continue
        prec = precision.get(name, "fp32")
        stage = gates.consistency_stage(prec)
        for img, r in per_image.items():
            ref = results[reference][img]
            forced, tie = tie_resolved_reference(ref["raw"], r["raw"], ref.get("rerun"))
            m = _agreement(forced, r["raw"], ref["size"], **kw)
            plain = m if forced is ref["raw"] else _agreement(ref["raw"], r["raw"], ref["size"], **kw)
            row = {"backend": name, "precision": prec, "image": img, "top_k": top_k, **_rounded(m),
                   "selection": None if tie is None else tie["selection"],
                   "selection_gap": None if tie is None else tie["gap"], "forced": forced is not ref["raw"],
                   **{f"unforced_{k}": v for k, v in _rounded(plain).items() if k in _GATED}}
            row["gate"] = ("report" if stage is None else
                           "FAIL" if gates.check(stage, {k: m[k] for k in _GATED}) else "pass")
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
