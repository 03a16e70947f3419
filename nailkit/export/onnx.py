"""Export the export-mode model to ONNX and verify it with onnxruntime against PyTorch.

* ``export_onnx(rf, out_path, resolution=None, opset=None, exporter="legacy", segmentation=True, simplify=False)``:
  the export-mode network (``nailkit.model.build.export_module``: rfdetr's own export preparation, position embeddings
  frozen) at a fixed square resolution (a multiple of patch × windows = 24), named input ``input`` and outputs
  ``pred_boxes``, ``pred_logits`` [, ``pred_masks``]. Defaults: opset 17 with the legacy exporter, 18 with dynamo.
  Optional onnxslim simplification. Written atomically.
* ``verify_onnx(rf_or_module, onnx_path, images)``: onnxruntime vs the PyTorch export-mode module on real images —
  per-output max/mean abs, query-matched comparison, top-10 IoU-matched detections with mask IoU — plus node
  histogram, file size. ``report.passed`` is the GATE: a silently wrong export (e.g. one corrupted initializer)
  fails it.
* ``ensure_onnx(checkpoint, output_dir, ...) -> Artifact`` (``path, meta = ...``): cached, verified export under
  ``output_dir/onnx/`` (``nailkit.core.artifacts``: keyed by the checkpoint's content + parameters + versions, sidecar
  ``<file>.onnx.json``). The file is exported into a staging folder, verified there, and published only when the gate
  passed; a failing gate raises ``ParityError`` and leaves nothing under the final name.
* ``cli_export_onnx(args)``: ``python -m nailkit export-onnx``.

The tolerances are ``nailkit.verify.gates.GATES["onnx"]``; tables and plots of a report are in ``nailkit.report.tables``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.core import artifacts
from nailkit.core.artifacts import atomic_write
from nailkit.data import samples as data
from nailkit.export.opscan import onnx_op_histogram
from nailkit.model.build import (
    DEFAULT_OUTPUT_DIR,
    export_module,
    export_options,
    export_suffix,
    INPUT_NAME,
    load_model,
    resolve_checkpoint,
    validate_resolution,
)
from nailkit.model.checkpoint import checkpoint_content
from nailkit.portable.preprocess import load_image, preprocess
from nailkit.report.tables import format_onnx_parity, onnx_parity_table, plot_per_query
from nailkit.runtime.onnx_runner import OnnxRunner
from nailkit.verify import gates
from nailkit.verify.parity import detection_parity, query_matched_diff, raw_from_outputs, tensor_diff

DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}
#: versions that enter the cache key
ONNX_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxslim", "rfdetr")


class ParityError(RuntimeError):
    """The exported file disagrees with PyTorch beyond the gate's tolerances (the file is removed)."""


def default_opset(exporter: str) -> int:
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter {exporter!r} is not one of {sorted(DEFAULT_OPSET)}")
    return DEFAULT_OPSET[exporter]


def export_onnx_with_meta(rf, out_path: str | os.PathLike[str], *, resolution: int | None = None,
                          opset: int | None = None, exporter: str = "legacy", segmentation: bool = True,
                          simplify: bool = False, sampling: str | None = None, mask_queries: int | None = None
                          ) -> tuple[Path, dict[str, Any]]:
    """``export_onnx`` that also returns {resolution, opset, exporter, export_seconds, simplify_seconds, bytes}.

    ``sampling`` ("grid" default | "tent") and ``mask_queries`` (None = all queries | N) are
    ``nailkit.model.build.export_module``'s options; with ``mask_queries`` the outputs hold the N best queries' rows."""
    import torch

    opset = opset or default_opset(exporter)
    if exporter == "legacy" and opset < 16:
        raise ValueError(f"opset {opset} is too old for this model: deformable attention needs ONNX GridSample "
                         f"(opset >= 16); use 16 or newer (default 17)")
    module = export_module(rf, resolution, segmentation=segmentation, sampling=sampling,
                           mask_queries=mask_queries)  # validates resolution, seg head and options
    res = module.resolution
    x = torch.zeros(1, 3, res, res)
    meta: dict[str, Any] = {"resolution": res, "opset": opset, "exporter": exporter, "simplify": bool(simplify),
                            "segmentation": bool(segmentation), "output_names": list(module.output_names),
                            **export_options(sampling, mask_queries)}

    def write(tmp: Path) -> None:
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.time()
            if exporter == "dynamo":
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    prog = torch.onnx.export(module, (x,), None, input_names=[INPUT_NAME],
                                             output_names=list(module.output_names), opset_version=opset,
                                             dynamo=True, verbose=False)
                    prog.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(module, (x,), str(tmp), input_names=[INPUT_NAME],
                                  output_names=list(module.output_names), opset_version=opset,
                                  dynamo=False, do_constant_folding=True)
            meta["export_seconds"] = round(time.time() - t0, 2)
        if simplify:
            import onnx
            import onnxslim

            t1 = time.time()
            slim = onnxslim.slim(str(tmp))
            onnx.save(slim, str(tmp))
            meta["simplify_seconds"] = round(time.time() - t1, 2)
        _add_metadata(tmp, rf, meta)

    path = atomic_write(Path(out_path), write)
    meta["bytes"] = path.stat().st_size
    return path, meta


def _add_metadata(path: Path, rf, meta: dict[str, Any]) -> None:
    """Store class names and the export parameters as ONNX metadata_props (read by nailkit.runtime.onnx_runner.OnnxRunner)."""
    import onnx

    m = onnx.load(str(path))
    props = {"class_names": json.dumps(list(getattr(rf, "class_names", []) or [])),
             "nailkit_export": json.dumps({k: meta[k] for k in ("resolution", "opset", "exporter", "simplify",
                                                                "sampling", "mask_queries") if k in meta})}
    for k, v in props.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))


def export_onnx(rf, out_path: str | os.PathLike[str], *, resolution: int | None = None, opset: int | None = None,
                exporter: str = "legacy", segmentation: bool = True, simplify: bool = False) -> Path:
    """Export ``rf`` (an rfdetr model from ``load_model``) at a fixed square resolution. Returns the .onnx path."""
    return export_onnx_with_meta(rf, out_path, resolution=resolution, opset=opset, exporter=exporter,
                                 segmentation=segmentation, simplify=simplify)[0]


# ----------------------------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ImageParity:
    image: str
    size: tuple[int, int]
    tensor: dict[str, dict[str, float]]
    query: dict[str, Any]
    detections: dict[str, Any]
    detection_rows: list[dict[str, Any]]
    per_query: dict[str, list[float]]
    agrees: bool


@dataclass
class OnnxParityReport:
    onnx_path: str
    resolution: int
    images: list[ImageParity]
    output_shapes: dict[str, list[int]]
    node_histogram: dict[str, int]
    file_bytes: int
    max_abs_tol: float = gates.GATES["onnx"]["max_abs"]
    min_mask_iou: float = gates.GATES["onnx"]["min_mask_iou"]
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def max_abs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for im in self.images:
            for k, v in im.tensor.items():
                out[k] = max(out.get(k, 0.0), v["max_abs"])
        return out

    def mean_abs(self) -> dict[str, float]:
        out: dict[str, list[float]] = {}
        for im in self.images:
            for k, v in im.tensor.items():
                out.setdefault(k, []).append(v["mean_abs"])
        return {k: float(np.mean(v)) for k, v in out.items()}

    def table(self) -> list[dict[str, Any]]:
        """One row per (image, output): max/mean abs, plus the query-matched max."""
        rows = []
        for im in self.images:
            qm = {"pred_boxes": im.query.get("boxes_max_abs"), "pred_logits": im.query.get("logits_max_abs"),
                  "pred_masks": im.query.get("masks_max_abs")}
            for k, v in im.tensor.items():
                rows.append({"image": im.image, "output": k, "max_abs": v["max_abs"], "mean_abs": v["mean_abs"],
                             "query_matched_max_abs": qm.get(k), "ok": v["max_abs"] <= self.max_abs_tol})
        return rows

    def summary(self) -> dict[str, Any]:
        dets = [im.detections for im in self.images]
        mins = [d["min_mask_iou"] for d in dets if d.get("min_mask_iou") is not None]
        return {"onnx": self.onnx_path, "resolution": self.resolution, "passed": self.passed,
                "failures": self.failures, "num_images": len(self.images), "max_abs": self.max_abs(),
                "mean_abs": self.mean_abs(), "max_abs_tol": self.max_abs_tol,
                "queries_permuted": max((im.query["num_permuted"] for im in self.images), default=0),
                "top_k": gates.TOP_K, "detections_matched": sum(d["num_matched"] for d in dets),
                "detections_expected": sum(d["num_a"] for d in dets),
                "min_mask_iou": min(mins) if mins else None,
                "max_box_l1_px": max((d["max_box_l1_px"] for d in dets), default=0.0),
                "max_score_diff": max((d["max_score_diff"] for d in dets), default=0.0),
                "output_shapes": self.output_shapes, "file_bytes": self.file_bytes,
                "num_nodes": int(sum(self.node_histogram.values())), "seconds": round(self.seconds, 1)}

    def markdown(self) -> str:
        return onnx_parity_table(self)

    def plot_per_query(self, ax=None, image_index: int = 0):
        """Per-query max-abs error after query matching (``nailkit.report.tables.plot_per_query``)."""
        return plot_per_query(ax, self, image_index)


def _torch_module(rf_or_module, resolution: int):
    import torch

    if isinstance(rf_or_module, torch.nn.Module):
        return rf_or_module
    return export_module(rf_or_module, resolution,
                         segmentation=bool(getattr(rf_or_module.model_config, "segmentation_head", False)))


def verify_onnx(rf_or_module, onnx_path: str | os.PathLike[str], images: Optional[Sequence[Any]] = None, *,
                tolerances: Optional[dict[str, float]] = None, threads: Optional[int] = None) -> OnnxParityReport:
    """Compare onnxruntime with the PyTorch export-mode module on ``images`` (default: the real photos in data/).

    GATE (``report.passed``): ``nailkit.verify.gates.check("onnx", ...)`` on every image — every output's max-abs
    difference, and the reference's top-k detections each with an IoU-matched partner of the same class, close box,
    score and mask. ``tolerances`` overrides ``gates.GATES["onnx"]`` (experiments only). ``report.failures`` says
    which check failed where."""
    import onnx
    import torch

    t0 = time.time()
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file; export it first (python -m nailkit export-onnx)")
    images = list(images) if images is not None else data.sample_images("photos")
    if not images:
        raise ValueError("verify_onnx needs at least one image (data/ has none: run python -m nailkit make-data)")
    runner = OnnxRunner(path, threads=threads)
    res = runner.resolution
    module = _torch_module(rf_or_module, res)
    proto = onnx.load(str(path), load_external_data=False)
    names = [o.name for o in proto.graph.output]
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    tol = dict(gates.GATES["onnx"], **(tolerances or {}))
    report = OnnxParityReport(onnx_path=str(path), resolution=res, images=[], output_shapes=shapes,
                              node_histogram=onnx_op_histogram(proto), file_bytes=path.stat().st_size,
                              max_abs_tol=tol["max_abs"], min_mask_iou=tol["min_mask_iou"])
    del proto
    for img in images:
        arr = load_image(img)
        x, size = preprocess(arr, res)
        with torch.no_grad():
            ref_out = [t.detach().cpu().numpy() for t in module(torch.from_numpy(x))]
        ort_out = list(runner.session.run(runner.output_names, {runner.input_name: x}))
        ref = {n: v for n, v in zip(names, ref_out)}
        if len(ort_out) != len(ref_out):
            raise ValueError(f"{path}: {len(ort_out)} outputs, PyTorch module gives {len(ref_out)}")
        td = tensor_diff(ref, ort_out)
        raw_ref, raw_ort = raw_from_outputs(ref_out), raw_from_outputs(ort_out)
        qm = query_matched_diff(raw_ref, raw_ort)
        dp = detection_parity(raw_ref, raw_ort, size, top_k=gates.TOP_K)
        name = Path(img).name if isinstance(img, (str, os.PathLike)) else f"image{len(report.images)}"
        per_query = {"logits": qm.per_query_logit_abs.tolist(), "boxes": qm.per_query_box_abs.tolist()}
        if qm.per_query_mask_abs is not None:
            per_query["masks"] = qm.per_query_mask_abs.tolist()
        fails = gates.check("onnx", {"max_abs": {k: v["max_abs"] for k, v in td.items()},
                                     "detections": dp.summary()}, tol)
        report.images.append(ImageParity(image=name, size=tuple(size), tensor=td, query=qm.summary(),
                                         detections=dp.summary(), detection_rows=dp.rows(), per_query=per_query,
                                         agrees=not gates.detection_failures(tol, dp.summary())))
        report.failures += [f"{name}: {f}" for f in fails]
    runner.close()
    report.seconds = time.time() - t0
    return report


# ----------------------------------------------------------------------------------------------------------------
# cached, verified export
# ----------------------------------------------------------------------------------------------------------------

def onnx_file_name(stem: str, resolution: int, exporter: str, opset: int, simplify: bool, segmentation: bool,
                   sampling: str | None = None, mask_queries: int | None = None) -> str:
    return (f"{stem}_{resolution}_{exporter}{opset}" + ("_slim" if simplify else "")
            + ("" if segmentation else "_det") + export_suffix(sampling, mask_queries) + ".onnx")


def ensure_onnx(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                resolution: int | None = None, opset: int | None = None, exporter: str = "legacy",
                simplify: bool = False, segmentation: bool = True, *, images: Optional[Sequence[Any]] = None,
                rf=None, force: bool = False, verify: bool = True, sampling: str | None = None,
                mask_queries: int | None = None) -> artifacts.Artifact:
    """A verified ONNX file for ``checkpoint`` under ``output_dir/onnx/`` (``path, meta = ensure_onnx(...)``), reused
    when its sidecar key (checkpoint content + parameters + versions) matches and the file's sha256 is unchanged;
    otherwise exported into a staging folder, verified there, and published only when the gate passed.

    ``checkpoint`` "" = the demo; ``resolution`` None = the checkpoint's; ``opset`` None = 17 (legacy) / 18 (dynamo);
    ``images`` default: the real photos in data/; ``rf``: an already loaded model for ``checkpoint`` (saves a load).
    ``sampling`` ("grid" default | "tent": the gather-free sampler, ``nailkit.model.sampling``) and ``mask_queries`` (None =
    masks for all queries | N: only the N best queries' rows, ``nailkit.model.build.export_module``) enter the key and the
    file name only when not the default. A tent file is verified against the *default* (grid_sample) PyTorch module
    — the same gate, so the swap itself is checked too; a top-N file against the top-N PyTorch module.
    ``verify=False`` publishes an unverified file (``meta["verified"]`` False), which a later ``verify=True`` call
    re-exports. Raises ``ParityError`` (a RuntimeError; nothing is published) when the gate fails, ValueError for an
    invalid resolution, CheckpointError for a detection-only checkpoint when ``segmentation`` is requested.
    ``meta``: key, sha256, bytes, export_seconds (simplify_seconds), parity summary, node_histogram, cached, and —
    when it was verified in this call — ``report`` (the full ``OnnxParityReport``)."""
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint file; expected an rfdetr .pth")
    opset = opset or default_opset(exporter)
    rf = rf or load_model(ckpt, require_segmentation=segmentation, output_dir=out_dir)
    res = validate_resolution(rf, resolution)
    content = checkpoint_content(ckpt)
    h, key = artifacts.artifact_key("onnx", content, {"resolution": res, "opset": opset, "exporter": exporter,
                                                      "simplify": bool(simplify), "segmentation": bool(segmentation),
                                                      **export_options(sampling, mask_queries)},
                                    ONNX_PACKAGES)
    path = out_dir / "onnx" / onnx_file_name(f"model_{h[:12]}", res, exporter, opset, simplify, segmentation,
                                             sampling, mask_queries)
    meta = None if force else artifacts.cached(path, key)
    if meta and (meta.get("verified") or not verify):
        meta["cached"] = True
        return artifacts.Artifact(path, meta)
    report = None
    with artifacts.staging(path) as work:
        staged, emeta = export_onnx_with_meta(rf, work / path.name, resolution=res, opset=opset, exporter=exporter,
                                              segmentation=segmentation, simplify=simplify, sampling=sampling,
                                              mask_queries=mask_queries)
        meta = {"key": key, "checkpoint": str(ckpt), "checkpoint_content": content, **emeta,
                "class_names": list(rf.class_names), "verified": bool(verify),
                "num_select": int(getattr(rf.model.postprocess, "num_select", 200))}
        if verify:
            # the reference: the default PyTorch module (grid_sample), or the top-N one when the outputs are top-N
            ref = export_module(rf, res, mask_queries=mask_queries) if mask_queries is not None else rf
            report = verify_onnx(ref, staged, images)
            report.onnx_path = str(path)
            meta["parity"] = report.summary()
            meta["node_histogram"] = report.node_histogram
            meta["verify_seconds"] = round(report.seconds, 1)
            if not report.passed:
                raise ParityError(f"{path}: ONNX export FAILED verification against PyTorch and was not published: "
                                  + "; ".join(report.failures[:3]))
        art = artifacts.publish(staged, path, meta)
    art.meta["cached"] = False
    if report is not None:
        art.meta["report"] = report  # the full OnnxParityReport (per-query errors, detection rows); not in the sidecar
    return art


def ensure_selection_view(onnx_path: str | os.PathLike[str]) -> artifacts.Artifact:
    """The ONNX file at ``onnx_path`` (e.g. ``ensure_onnx``'s) with its two-stage selection exposed as two more outputs
    (``nailkit.export.onnx_passes.expose_selection``: the one TopK's input scores ``enc_scores`` and its indices
    ``topk_indices``), written beside it as ``<stem>_selection.onnx``; the graph is otherwise the same node for node.
    For parity only: ONNX Runtime's consistency rows then record their selection like the .tflite files and PyTorch
    do, so a near-tied selection is compared on ONNX Runtime's own (``nailkit.runtime.compare.consistency_rows``).
    Cached by the source file's sha256; the source's sidecar (class names, checkpoint, verified) is carried over.
    Raises ValueError when the graph has no single TopK (a detection-only variant exposes nothing)."""
    import onnx

    from nailkit.export.onnx_passes import expose_selection

    src = Path(onnx_path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such ONNX file; expected an export (python -m nailkit export-onnx)")
    dst = src.with_name(f"{src.stem}_selection.onnx")
    key = {"stage": "onnx_selection_view", "source_sha256": artifacts.file_sha256(src, 64)}
    meta = artifacts.cached(dst, key)
    if meta:
        return artifacts.Artifact(dst, meta)
    try:
        model = expose_selection(onnx.load(str(src)))
    except ValueError as exc:
        raise ValueError(f"{src}: cannot expose the two-stage selection: {exc}") from None
    carried = {k: v for k, v in (artifacts.read_sidecar(src) or {}).items()
               if k in ("checkpoint", "checkpoint_content", "class_names", "num_select", "verified")}
    with artifacts.staging(dst) as work:
        staged = work / dst.name
        onnx.save(model, str(staged))
        return artifacts.publish(staged, dst, {**carried, "key": key, "source_onnx": str(src),
                                               "exposed": ["enc_scores", "topk_indices"]})


def cli_export_onnx(args) -> int:
    """python -m nailkit export-onnx CKPT --out DIR [--resolution R] [--opset N] [--exporter E] [--simplify]"""
    out = Path(args.out)
    ckpt = resolve_checkpoint(args.checkpoint, out)
    rf = load_model(ckpt, trusted=getattr(args, "trusted", False), output_dir=out)
    path, meta = ensure_onnx(ckpt, out, resolution=args.resolution, opset=args.opset, exporter=args.exporter,
                             simplify=args.simplify, rf=rf, sampling=getattr(args, "sampling", None),
                             mask_queries=getattr(args, "mask_queries", None))  # failing gate: ParityError, exit 2
    print(path)
    print(f"  {meta['bytes'] / 1e6:.1f} MB, {meta['exporter']} exporter, opset {meta['opset']}, "
          f"resolution {meta['resolution']}"
          + (f", sampling {meta['sampling']}" if meta.get("sampling") else "")
          + (f", masks for the top {meta['mask_queries']} queries" if meta.get("mask_queries") else "")
          + (" (cached)" if meta.get("cached") else
                                                f", exported in {meta.get('export_seconds')} s"))
    print(format_onnx_parity(meta["parity"]))
    return 0
