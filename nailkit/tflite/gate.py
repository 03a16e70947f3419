"""The parity gate of a converted .tflite, run before it is published, and what is written into and next to it.

* ``reference_outputs`` / ``artifact_parity``: a file's selection-aware parity against the PyTorch export-mode module
  on ``data/`` images (``nailkit.verify.parity``), with the rounding control of its precision;
* ``Gate``: that measurement for a freshly converted file, checked against ``nailkit.verify.gates``
  (full_int8 and the static precisions are reported, not gated);
* ``embed_file_metadata``: nailkit's metadata inside the file (``nailkit.tflite.metadata``), before it is gated and
  hashed;
* ``gate_and_publish``: each converted file gated, then published with its sidecar (``nailkit.core.artifacts``) — or a
  refusal recorded instead; ``raise_if_refused`` answers a later request for a refused key without converting again.
  A file under its final name has always passed its gate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nailkit.core import artifacts, subproc
from nailkit.data.samples import sample_images
from nailkit.model.build import export_module, load_model
from nailkit.model.checkpoint import Checkpoint
from nailkit.portable.io_contract import check_tflite_file, OUTPUT_MEANINGS, POSTPROCESS_STEPS, TFLiteModel
from nailkit.portable.preprocess import preprocess, to_nhwc
from nailkit.tflite import metadata as tm
from nailkit.tflite.launch import ConversionError
from nailkit.tflite.options import ALL_OUTPUT_NAMES, REPORTED_NOT_GATED
from nailkit.verify import gates
from nailkit.verify.parity import error_summary, rounding_control, run_torch_with_selection, selection_aware_parity


def reference_outputs(module: Any, images: list[Path], resolution: int) -> list[dict[str, Any]]:
    """PyTorch export-mode outputs (+ selection tensors) for each image: list of {x, size, ref}."""
    rows = []
    for img in images:
        x, size = preprocess(img, resolution)
        rows.append({"image": Path(img).name, "x": x, "size": size, "ref": run_torch_with_selection(module, x)})
    return rows


def artifact_parity(path: str | os.PathLike[str], module: Any, refs: list[dict[str, Any]], precision: str = "fp32",
                    controls: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Parity of one .tflite (run by ``nailkit.portable.io_contract.TFLiteModel``) against the PyTorch references
    (``reference_outputs``).

    Returns per-image rows and an aggregate: worst pre-TopK max-abs, worst forced max-abs / mask IoU, unforced
    top-10 agreement where no tie (within ``nailkit.verify.gates.TIE_EPS``), and for fp16/int8 the error relative to the
    rounding control (``controls[precision]`` = the control's outputs per image, from
    ``reference_outputs(rounding_control(...))``). ``nailkit.verify.gates.check("tflite_<precision>", aggregate)`` gates it.
    """
    model = TFLiteModel(path)
    rows = []
    for i, r in enumerate(refs):
        be = model.run(to_nhwc(r["x"]) if model.layout == "NHWC" else r["x"])
        row = selection_aware_parity(module, r["x"], r["ref"], be, r["size"], top_k=gates.TOP_K,
                                     tie_eps=gates.TIE_EPS)
        row["image"] = r["image"]
        row["error"] = error_summary(r["ref"], be)
        if controls and precision in controls:
            row["control_error"] = error_summary(r["ref"], controls[precision][i]["ref"])
        rows.append(row)
    model.close()
    agg: dict[str, Any] = {
        "pre_topk_max_abs": max(r["pre_topk_max_abs"] for r in rows),
        "forced_max_abs": max(r["forced_max_abs"] for r in rows),
        "forced_mask_iou_all": min(r.get("forced_mask_iou_all", 1.0) for r in rows),
        "forced_min_mask_iou": min(r["forced_min_mask_iou"] for r in rows),
        "tensor_max_abs": {n: max(r["tensor"][n]["max_abs"] for r in rows) for n in rows[0]["tensor"]},
        "selection_same": sum(r["selection_same"] for r in rows),
        "selection_order_same": sum(r["selection_order_same"] for r in rows),
        "images": len(rows),
        "unforced_agree": sum(r["detect_agrees"] for r in rows),
        "unforced_agree_untied": all(r["detect_agrees"] for r in rows if not r["tie"]),
        "ties": sum(r["tie"] for r in rows),
        "detect_min_mask_iou": min((r["detect"]["min_mask_iou"] or 1.0) for r in rows),
    }
    keys = rows[0]["error"].keys()
    agg["error"] = {k: float(np.mean([r["error"][k] for r in rows])) for k in keys}
    if "control_error" in rows[0]:
        agg["control_error"] = {k: float(np.mean([r["control_error"][k] for r in rows])) for k in keys}
        # (err + floor) / (control + floor): an error below the metric's floor (negligible: e.g. 1e-3 of a
        # normalised box coordinate is 0.4 px at 432) cannot make a ratio explode when the control's is 0.
        floors = gates.RATIO_FLOORS
        agg["control_ratio"] = {k: (agg["error"][k] + floors.get(k, 1e-6)) / (agg["control_error"][k]
                                                                               + floors.get(k, 1e-6)) for k in keys}
        agg["control_ratio_max"] = max(agg["control_ratio"].values())
    return {"rows": rows, "aggregate": agg}


class Gate:
    """The parity gate of a freshly converted file, run before it is published (PyTorch references made once)."""

    def __init__(self, ckpt: Path, res: int, mask_queries: int | None = None) -> None:
        self.ckpt, self.res, self.mask_queries = ckpt, res, mask_queries
        self.module = None
        self.refs: list[dict[str, Any]] = []
        self.controls: dict[str, list[dict[str, Any]]] = {}
        self.rows: list[dict[str, Any]] = []

    def __call__(self, path: Path, precision: str) -> tuple[dict[str, Any], list[str]]:
        """(aggregate, failures) of ``path``; full_int8 and the static precisions are reported, never gated."""
        import copy

        images = sample_images()
        if self.module is None:
            # the reference is rfdetr's own sampling (grid_sample) even for a tent file: the gate checks the swap too
            self.module = export_module(load_model(self.ckpt), self.res, mask_queries=self.mask_queries)
            self.refs = reference_outputs(self.module, images, self.res)
        control = "int8" if precision in REPORTED_NOT_GATED else precision
        if control != "fp32" and control not in self.controls:
            self.controls[control] = reference_outputs(rounding_control(copy.deepcopy(self.module), control), images,
                                                       self.res)
        par = artifact_parity(path, self.module, self.refs, control, self.controls)
        self.rows = json.loads(json.dumps(par["rows"], default=_jsonable))  # kept in the sidecar: see published_parity
        agg = par["aggregate"]
        fails = [] if precision in REPORTED_NOT_GATED else gates.check(gates.tflite_stage(precision), agg)
        return agg, fails


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def published_parity(meta: dict[str, Any], refs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The parity the gate measured before publishing a file (``{"rows", "aggregate"}``, as ``artifact_parity``
    returns it), when it was measured on the same images as ``refs``; else None. Lets a notebook show the gate's
    per-image numbers instead of measuring the same file on the same images a second time."""
    rows = meta.get("parity_rows")
    if not rows or [r.get("image") for r in rows] != [r["image"] for r in refs]:
        return None
    return {"rows": rows, "aggregate": meta["parity"]}


def embed_file_metadata(path: str | os.PathLike[str], info: dict[str, Any], route: str, precision: str,
                        resolution: int, options: dict[str, Any] | None = None) -> None:
    """Write nailkit's metadata into a converted .tflite (``nailkit.tflite.metadata``: a ``nailkit_metadata``
    flatbuffer entry + an appended zip with ``nailkit_metadata.json`` and ``labels.txt``): class names, input size,
    layout and normalisation, each output's name, shape and meaning, the post-processing steps and version. Done
    before the file is gated and hashed, so the published file and its sha256 are the ones with metadata."""
    model = TFLiteModel(path)
    io = model.describe()
    model.close()
    outputs = [{"name": o["name"], "meaning": o["meaning"], "shape": [int(d) for d in o["shape"]],
                "description": OUTPUT_MEANINGS[o["meaning"]][0], "format": OUTPUT_MEANINGS[o["meaning"]][1],
                "values": OUTPUT_MEANINGS[o["meaning"]][2], **({"layout": o["layout"]} if o.get("layout") else {})}
               for o in io["outputs"]]
    doc = tm.build_metadata(class_names=info["class_names"], num_classes=info.get("num_classes"),
                            resolution=resolution, input_name=io["input"]["name"],
                            layout=io["input"]["layout"], outputs=outputs, postprocess_steps=POSTPROCESS_STEPS,
                            extra={"route": route, "precision": precision, "num_select": info["num_select"],
                                   "class_names_source": info.get("class_names_source", "checkpoint"),
                                   **(options or {})})
    tm.embed_metadata(path, doc, labels=info["class_names"])


def gate_and_publish(result: dict[str, Any], extra: dict[str, Any], ckpt: Checkpoint, adir: Path,
                     key: dict[str, Any], route: str, res: int, info: dict[str, Any], opts: dict[str, Any],
                     log_path: Path, *, verify: bool, sampling: str, mask_queries: int | None
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Each converted file: metadata embedded, its sidecar meta, its parity gate (``verify``), then published — or,
    when the gate fails, a refusal record instead. Returns ({precision: published meta}, {precision: failures})."""
    gate = Gate(ckpt, res, mask_queries) if verify else None
    metas: dict[str, dict[str, Any]] = {}
    refused: dict[str, list[str]] = {}
    for prec, f in result["files"].items():
        check_tflite_file(f)
        embed_file_metadata(f, info, route, prec, res, opts)
        meta = {"key": key, "route": route, "precision": prec, "resolution": res,
                "class_names": info["class_names"], "num_select": info["num_select"], "input": "NHWC float32",
                "outputs": list(ALL_OUTPUT_NAMES),
                "checkpoint": str(ckpt), "checkpoint_sha256": ckpt.sha256(), "log": str(log_path),
                "conversion_wall_s": result["wall_s"], "conversion_peak_rss_mb": result["peak_rss_mb"],
                "times": result.get("times", {}),
                "versions": {k: result[k] for k in ("onnx2tf", "tensorflow", "litert_torch", "torch",
                                                   "ai_edge_quantizer") if k in result},
                "converted_together": sorted(result["files"]), "sampling": sampling,
                "mask_queries": mask_queries, **extra}
        if gate is not None:
            with subproc.step(f"{route} {res} {prec}", "gate: parity against PyTorch on 6 images"):
                meta["parity"], fails = gate(Path(f), prec)
            meta["parity_rows"] = gate.rows
            if fails:
                refused[prec] = fails
                artifacts.record_refusal(adir / f"model_{prec}.tflite", key, fails, route=route, precision=prec,
                                         parity=meta["parity"], log=str(log_path), conversion_wall_s=result["wall_s"])
                continue
        metas[prec] = artifacts.publish(f, adir / f"model_{prec}.tflite", meta).meta
    return metas, refused


def raise_if_refused(path: Path, key: dict[str, Any], route: str, precision: str) -> None:
    """Raise ``ConversionError`` from a recorded refusal of ``path`` for this ``key`` (no conversion is run)."""
    rec = artifacts.refusal(path, key)
    if rec:
        raise ConversionError(
            f"{path}: route {route} {precision} FAILED its parity gate on {rec.get('recorded')} for these very weights, "
            f"parameters and versions, and was not published: " + "; ".join(rec.get("failures", []))
            + f" (recorded in {artifacts.refusal_path(path).name}; not converted again — force=True / --force "
              f"re-converts; log: {rec.get('log')})")
