"""The mobile bundle: one self-contained folder an app developer can use without reading the notebooks.

``make_bundle`` writes (atomically: a temp folder renamed into place)::

    <out>/model.tflite      the converted model (either route, any precision)
    <out>/labels.txt        class names, line i = class id i
    <out>/model_card.json   input/outputs read off the .tflite itself, post-processing steps, measured parity and
                            latency on this machine, versions
    <out>/preprocess.py     byte-identical copy of nailkit/portable/preprocess.py   (numpy + Pillow)
    <out>/postprocess.py    byte-identical copy of nailkit/portable/postprocess.py  (numpy)
    <out>/io_contract.py    byte-identical copy of nailkit/portable/io_contract.py  (numpy; ai-edge-litert to run the model)
    <out>/run_bundle.py     entry point / library: numpy + Pillow + ai-edge-litert only
    <out>/README.md         for the app developer

``python -m nailkit bundle CKPT --out DIR [--route] [--precision] [--resolution] [--tflite FILE]``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.bench.timing import interleaved_latency
from nailkit.core.artifacts import file_sha256, read_sidecar
from nailkit.core.hardware import cpu_info
from nailkit.core.outdir import check_output_folder, MARKER, read_marker
from nailkit.core.paths import PORTABLE_DIR
from nailkit.core.validate import KNOWN_PRECISIONS
from nailkit.data.samples import sample_images
from nailkit.model.build import DEFAULT_OUTPUT_DIR, load_model, resolve_checkpoint
from nailkit.model.checkpoint import Checkpoint
from nailkit.portable.gpu_chain import GRAPH_NAMES, SplitModel
from nailkit.portable.io_contract import check_tflite_file, OUTPUT_MEANINGS, POSTPROCESS_STEPS, TFLiteModel
from nailkit.portable.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from nailkit.report.bundle_readme import gpu_readme, readme
from nailkit.runtime.runners import make_runner
from nailkit.runtime.torch_runner import TorchRunner
from nailkit.tflite import metadata as tm
from nailkit.tflite.convert import delegation_report, ensure_tflite
from nailkit.tflite.options import default_path, DEFAULT_PATH_WHY
from nailkit.verify.drift import drift_summary
from nailkit.verify.parity import tie_resolved_reference

MODEL_FILE = "model.tflite"
#: files copied verbatim into every bundle (nailkit/portable/: numpy-only, flat imports inside a bundle)
COPIED = {name: PORTABLE_DIR / name for name in ("preprocess.py", "postprocess.py", "io_contract.py", "run_bundle.py")}

TARGETS = ("cpu", "gpu")
#: the GPU target's bundle: three graphs + the numpy runtime between them
GPU_COPIED = {**COPIED, "gpu_chain.py": PORTABLE_DIR / "gpu_chain.py"}

def read_tflite_io(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Input and outputs of a .tflite, read off the file by ``nailkit.portable.io_contract.TFLiteModel`` (the code the bundle
    runs), each output with its meaning, description, format and value kind for the model card."""
    model = TFLiteModel(path)
    io = model.describe()
    model.close()
    for info in io["outputs"]:
        what, coords, kind = OUTPUT_MEANINGS[info["meaning"]]
        info.update(description=what, format=coords, values=kind)
    return io


def tflite_raw(path: str | os.PathLike[str], images: Sequence[Any], threads: Optional[int] = None):
    """The .tflite on ``images`` through ``nailkit.runtime.tflite_runner`` (``io_contract.TFLiteModel``): RawOutputs, sizes,
    runner."""
    runner = make_runner(str(path), backend="tflite", threads=threads)
    out = [runner.predict_raw(im) for im in images]
    return [r for r, _ in out], [s for _, s in out], runner


def measure_parity(tflite_path: str | os.PathLike[str], rf, images: Sequence[Any]) -> dict[str, Any]:
    """The bundle's .tflite vs PyTorch fp32 (export-mode module, ``TorchRunner``) on ``images``: detection-level top-10
    matched by IoU (``nailkit.verify.drift.drift_summary``).

    Selection-aware like the consistency rows (``nailkit.verify.parity.tie_resolved_reference``): on an image where the
    .tflite's two-stage selection differs from PyTorch's only between near-tied encoder scores, it is compared with
    PyTorch re-run on the .tflite's selection. ``selection`` gives each image's verdict ("same", "tie", "differs", or
    None when the file exposes no selection); ``unforced`` keeps the plain comparison when any image was a tie."""
    raws, sizes, runner = tflite_raw(tflite_path, images)
    torch_runner = TorchRunner(rf, runner.resolution)
    plain, resolved, selection = [], [], []
    for im, raw in zip(images, raws):
        x, _ = preprocess(im, runner.resolution)
        ref = torch_runner.run(x)
        forced, tie = tie_resolved_reference(ref, raw, functools.partial(torch_runner.run_selected, x))
        plain.append(ref)
        resolved.append(forced)
        selection.append(tie["selection"] if tie else None)
    d = drift_summary(resolved, raws, sizes)
    d["selection"] = dict(zip((Path(str(i)).name for i in images), selection))
    if "tie" in selection:
        d["unforced"] = drift_summary(plain, raws, sizes)
    d["images_used"] = [Path(str(i)).name for i in images]
    d["reference"] = ("PyTorch fp32 export-mode module (nailkit.runtime.torch_runner.TorchRunner); on a near-tied "
                      "selection, re-run on the .tflite's selection")
    return d


def measure_latency(tflite_path: str | os.PathLike[str], threads: Sequence[int] = (1, 2), runs: int = 10
                    ) -> dict[str, Any]:
    """Median/p90 ms of the .tflite (XNNPACK default delegate) at each thread count, on this machine."""
    out: dict[str, Any] = {"cpu": cpu_info().model_name, "cpu_count": os.cpu_count(), "runs": runs,
                           "loadavg_1m": os.getloadavg()[0], "timed": "interpreter.invoke() incl. input copy; "
                           "pre/post-processing excluded", "by_threads": {}}
    for t in threads:
        r = make_runner(str(tflite_path), backend="tflite", threads=int(t))
        x = np.zeros((1, 3, r.resolution, r.resolution), dtype=np.float32)
        st = interleaved_latency({"tflite": lambda: r.run(x)}, runs=runs, warmup=2)["tflite"]
        out["by_threads"][str(t)] = {"median_ms": st.median_ms, "p90_ms": st.p90_ms}
    return out


def _versions(meta: dict[str, Any]) -> dict[str, Any]:
    from importlib import metadata

    v: dict[str, Any] = {}
    for pkg in ("rfdetr", "torch", "ai-edge-litert", "onnx2tf", "tensorflow", "litert-torch", "ai-edge-quantizer",
                "onnx", "numpy"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    route = meta.get("route")
    v["converter"] = ({"route": "onnx2tf", "onnx2tf": v["onnx2tf"], "tensorflow": v["tensorflow"]}
                      if route == "onnx2tf" else
                      {"route": "litert", "litert-torch": v["litert-torch"], "ai-edge-quantizer": v["ai-edge-quantizer"]}
                      if route == "litert" else {"route": route})
    if meta.get("versions"):
        v["converter"]["recorded_at_conversion"] = meta["versions"]
    return v


def make_bundle(checkpoint: str | os.PathLike[str] | None, out: str | os.PathLike[str], *, route: Optional[str] = None,
                precision: str = "fp32", sampling: Optional[str] = None, resolution: Optional[int] = None,
                tflite: Optional[str] = None, output_dir: str | os.PathLike[str] | None = None,
                images: Optional[Sequence[Any]] = None, threshold: float = 0.5, latency_runs: int = 10, latency_threads: Sequence[int] = (1, 2),
                trusted: bool = False, overwrite: bool = False, target: str = "cpu", gpu_check: bool = False) -> Path:
    """Build the bundle for ``checkpoint`` in ``out``.

    ``out`` may be new, empty or an earlier nailkit bundle (it holds ``nailkit.core.outdir.MARKER``); its files are then
    replaced. Any other non-empty folder is refused unless ``overwrite`` (CLI ``--force``): the bundle's files are
    written into it and nothing else there is deleted.

    ``target="cpu"``: one .tflite from ``tflite`` when given (its input resolution must match), else from
    ``nailkit.tflite.convert.ensure_tflite`` (cached: converts only when no artifact for this checkpoint exists yet).
    ``target="gpu"``: the GPU target's three graphs (``nailkit.gpu.convert.ensure_gpu_graphs``) with the host steps
    (``gpu_chain.py`` + ``postprocess.py``); ``gpu_check`` also runs them under LiteRT's GPU accelerator
    (SwiftShader here) and writes the delegate's verdict and parity into the card.
    """
    _check_request(target, precision, tflite)
    out = _writable_output_folder(out, overwrite)
    out_root = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_root)
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint; expected an rfdetr .pth")
    rf = load_model(ckpt, trusted=trusted, output_dir=out_root)
    if target == "gpu":
        return _make_gpu_bundle(ckpt, rf, out, out_root, resolution=resolution, images=images, threshold=threshold,
                                latency_runs=latency_runs, gpu_check=gpu_check)
    src, meta, route = _bundle_tflite(ckpt, out_root, tflite=tflite, route=route, precision=precision,
                                      sampling=sampling, resolution=resolution)
    io = read_tflite_io(src)
    res = io["input"]["resolution"]
    if resolution and int(resolution) != res:
        raise ValueError(f"{src}: takes {res}x{res} input but --resolution {resolution} was asked for")
    images = list(images) if images is not None else sample_images("all")
    parity = measure_parity(src, rf, images)
    latency = measure_latency(src, latency_threads, latency_runs)
    card = _cpu_card(ckpt, rf, src, meta, io, route=route, precision=precision, threshold=threshold, parity=parity,
                     latency=latency, out_root=out_root)
    files = {MODEL_FILE: Path(src), **COPIED, "labels.txt": "\n".join(card["labels"]) + "\n",
             "model_card.json": json.dumps(card, indent=2, default=_json_default), "README.md": readme(card)}
    return _write_folder(out, files)


def _check_request(target: str, precision: str, tflite: Optional[str]) -> None:
    """``make_bundle``'s target, precision and ``--tflite`` file checked before anything loads."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    if target == "cpu" and not tflite and precision not in KNOWN_PRECISIONS:  # checked before the model loads
        raise ValueError(f"--precision: expected one of {', '.join(KNOWN_PRECISIONS)}, got {precision!r}")
    if tflite and not Path(tflite).is_file():
        raise FileNotFoundError(f"{tflite}: --tflite names no file; expected a converted .tflite")


def _writable_output_folder(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """``out`` as ``check_output_folder`` accepts it, its parent created and checked writable."""
    out = check_output_folder(out, force=overwrite)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: not writable; choose another --out")
    return out


def _bundle_tflite(ckpt: Checkpoint, out_root: Path, *, tflite: Optional[str], route: Optional[str], precision: str,
                   sampling: Optional[str], resolution: Optional[int]) -> tuple[Path, dict[str, Any], Optional[str]]:
    """The CPU bundle's .tflite, its metadata and the route asked for: the given ``tflite`` file (its sidecar), else
    ``ensure_tflite``'s file for the route and sampling asked for or the default path (converted when not cached)."""
    if tflite:
        src = check_tflite_file(tflite)
        meta = dict(read_sidecar(src) or {})
        meta.setdefault("route", route)
        meta.setdefault("precision", precision)
        return src, meta, route
    chosen = "default" if route is None and sampling is None else "asked for"
    route, sampling = default_path(route, sampling)
    src, meta = ensure_tflite(ckpt, out_root, route=route, precision=precision, resolution=resolution,
                              sampling=sampling)
    return src, {**meta, "path_chosen": chosen}, route


def _cpu_card(ckpt: Checkpoint, rf, src: Path, meta: dict[str, Any], io: dict[str, Any], *, route: Optional[str],
              precision: str, threshold: float, parity: dict[str, Any], latency: dict[str, Any], out_root: Path
              ) -> dict[str, Any]:
    """The CPU bundle's ``model_card.json``: source, labels, input pipeline, outputs, post-processing, conversion
    path, measured parity and latency, versions."""
    res = io["input"]["resolution"]
    labels = list(rf.class_names)
    num_select = int(getattr(rf.model.postprocess, "num_select", 200))
    return {
        "model_file": MODEL_FILE,
        "model_sha256": file_sha256(src, 64),
        "source": {"checkpoint": ckpt.name, "checkpoint_sha256": ckpt.sha256(),
                   "architecture": ckpt.report.rfdetr_class or "RFDETRSegPreview",
                   "route": meta.get("route", route), "precision": meta.get("precision", precision),
                   "tflite_source": str(src), "demo_random_weights": "demo" in ckpt.name},
        "labels": labels,
        "input": {**io["input"], "colour_order": "RGB",
                  "value_pipeline": ["decode to 8-bit RGB (drop alpha; grayscale/palette → RGB)",
                                     "scale to float32 [0, 1] (divide by 255)",
                                     f"resize to {res}x{res} (aspect ratio NOT kept) with bilinear interpolation, "
                                     "half-pixel centres (align_corners=False), NO antialias",
                                     "normalise per channel: (x - mean) / std",
                                     f"layout {io['input']['layout']}, batch 1"],
                  "resize": "bilinear, half-pixel centres, no antialias, to a square (aspect not preserved)",
                  "mean": [round(float(v), 6) for v in IMAGENET_MEAN], "std": [round(float(v), 6) for v in IMAGENET_STD],
                  "reference_code": "preprocess.py: preprocess(image, R) (+ to_nhwc for NHWC)"},
        "outputs": io["outputs"],
        "num_queries": io["num_queries"],
        "postprocess": {"steps": POSTPROCESS_STEPS, "num_select": num_select, "threshold": float(threshold),
                        "mask_threshold": 0.0, "reference_code": "postprocess.py: postprocess(RawOutputs, (W, H), "
                        "threshold, num_select, mask_threshold, class_names)",
                        "background_slot": "class id == len(labels) is rfdetr's no-object slot (named "
                                           "'__background__'); it can appear in the top-k like rfdetr's predict()"},
        "path": path_card(src, meta, output_dir=out_root),
        "parity": parity,
        "latency": latency,
        "versions": _versions(meta),
        "conversion": {k: meta.get(k) for k in ("conversion_wall_s", "conversion_peak_rss_mb", "bytes", "log")
                       if k in meta},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _preprocess_card(res: int, layout: str, shape: list[int]) -> dict[str, Any]:
    return {"shape": shape, "dtype": "float32", "layout": layout, "resolution": res, "colour_order": "RGB",
            "value_pipeline": ["decode to 8-bit RGB (drop alpha; grayscale/palette → RGB)",
                               "scale to float32 [0, 1] (divide by 255)",
                               f"resize to {res}x{res} (aspect ratio NOT kept) with bilinear interpolation, "
                               "half-pixel centres (align_corners=False), NO antialias",
                               "normalise per channel: (x - mean) / std", f"layout {layout}, batch 1"],
            "resize": "bilinear, half-pixel centres, no antialias, to a square (aspect not preserved)",
            "mean": [round(float(v), 6) for v in IMAGENET_MEAN], "std": [round(float(v), 6) for v in IMAGENET_STD],
            "reference_code": "preprocess.py: preprocess(image, R) (+ to_nhwc for NHWC)"}


def _make_gpu_bundle(ckpt: Checkpoint, rf, out: Path, out_root: Path, *, resolution: Optional[int],
                     images: Optional[Sequence[Any]], threshold: float, latency_runs: int, gpu_check: bool) -> Path:
    """The ``--target gpu`` bundle (see ``make_bundle``)."""
    from nailkit.gpu.convert import ensure_gpu_graphs  # lazy: torch + rfdetr at import
    from nailkit.gpu.export import HOST_STEPS, IO_MEANINGS
    from nailkit.gpu.verify import verify_gpu_graphs

    art = ensure_gpu_graphs(ckpt, out_root, resolution, images=images)
    meta = art["meta"]
    res = int(meta["resolution"])
    split = SplitModel(art["dir"], "cpu", threads=1)
    x = np.zeros((1, res, res, 3), dtype=np.float32)
    for _ in range(max(1, latency_runs)):
        split.run(x, threshold=threshold)
    graphs = {}
    for g in GRAPH_NAMES:
        md = tm.read_metadata(art["paths"][g])
        graphs[g] = {"file": f"{g}.tflite", "sha256": file_sha256(art["paths"][g], 64),
                     "inputs": md["graph"]["inputs"], "outputs": md["outputs"],
                     "ops": meta["graphs"][g]["op_check"]["n_ops"],
                     "op_histogram": meta["graphs"][g]["op_check"]["histogram"],
                     "cpu_latency_ms_1_thread": round(float(np.median(split.timings_ms[g])), 1)}
    labels = list(rf.class_names)
    card = {
        "target": "gpu",
        "graphs": graphs,
        "source": {"checkpoint": ckpt.name, "checkpoint_sha256": ckpt.sha256(),
                   "architecture": ckpt.report.rfdetr_class or "RFDETRSegPreview",
                   "route": "litert-torch (GPU target: graph split, tent sampling, SafeLayerNorm)",
                   "precision": "fp32 weights; the GPU delegate runs fp16 or fp32 (enforce_f32)",
                   "demo_random_weights": "demo" in ckpt.name},
        "labels": labels,
        "input": _preprocess_card(res, "NHWC", [1, res, res, 3]),
        "num_queries": int(meta["graph_meta"]["num_queries"]),
        "mask_slots": int(meta["mask_slots"]),
        "host_steps": HOST_STEPS,
        "io_meanings": IO_MEANINGS,
        "postprocess": {"steps": GPU_POSTPROCESS_STEPS, "num_select": int(getattr(rf.model.postprocess, "num_select",
                                                                                    200)),
                        "threshold": float(threshold), "mask_threshold": 0.0,
                        "reference_code": "gpu_chain.py: SplitModel.raw(x, threshold) → postprocess.py: "
                                          "postprocess(raw, (W, H), threshold)"},
        "parity_cpu_interpreter": meta["cpu_parity"],
        "gpu_check": (verify_gpu_graphs(ckpt, out_root, res, images=images) if gpu_check else
                      "not run for this bundle (make_bundle(..., gpu_check=True) / notebook 04 runs it)"),
        "versions": _versions({"route": "litert"}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if isinstance(card["gpu_check"], dict):
        card["gpu_check"].pop("dir", None)
    files: dict[str, Any] = {f"{g}.tflite": Path(art["paths"][g]) for g in GRAPH_NAMES}
    files.update(GPU_COPIED)
    files.update({"labels.txt": "\n".join(labels) + "\n",
                  "model_card.json": json.dumps(card, indent=2, default=_json_default), "README.md": gpu_readme(card)})
    return _write_folder(out, files)


GPU_POSTPROCESS_STEPS = [
    "graph_a(image) → enc_logits, enc_boxes, memory",
    "host: score per token = max over enc_logits' classes; the top num_queries tokens (descending, ties by index); "
    "ref_boxes = their enc_boxes (postprocess.select_proposals)",
    "graph_b(memory, ref_boxes) → pred_boxes, pred_logits, query_features",
    "host: sigmoid(pred_logits); top num_select (query, class) pairs; the distinct queries of pairs with score > "
    "threshold, best first, at most mask_slots; their query_features rows, zero-padded to mask_slots "
    "(postprocess.select_mask_queries)",
    "graph_c(memory, those rows) → pred_masks for those queries only",
    "host: postprocess.postprocess(RawOutputs(pred_boxes, pred_logits, pred_masks, mask_queries), (W, H), "
    "threshold): boxes cxcywh → xyxy × image size; masks resized bilinearly (half-pixel, no antialias) to the "
    "original size, then logit > 0; when all mask_slots were used, detections past the first one whose query got no "
    "slot are left out (the kept ones are the best, each with its own mask) and counted (Prediction.dropped)",
]


def _write_folder(out: Path, files: dict[str, Any]) -> Path:
    """Write ``files`` ({name: source Path to copy | text}) as the folder ``out``: built in a temporary sibling, then
    renamed into place, so a failure never leaves a half-written bundle.

    Nothing nailkit did not write is deleted: a new or empty ``out`` is replaced by the finished folder; into an
    existing one (an earlier bundle, or any folder with ``--force``) the files are moved one by one, and only the
    files that the earlier bundle's marker lists and this bundle lacks are removed.
    """
    parent = out.resolve().parent
    files = dict(files)
    files[MARKER] = json.dumps({"written_by": "nailkit", "command": "bundle", "files": sorted(files)}, indent=2)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=parent))
    try:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_text(content)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out.is_dir() and any(out.iterdir()):
            earlier = (read_marker(out) or {}).get("files") or []
            for name in files:
                os.replace(tmp / name, out / name)
            for name in set(earlier) - set(files):
                if isinstance(name, str) and "/" not in name and (out / name).is_file():
                    (out / name).unlink()
        else:
            if out.is_dir():
                out.rmdir()  # empty
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder only
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def path_card(src: Path, meta: dict[str, Any], output_dir: Optional[Path] = None) -> dict[str, Any]:
    """Which conversion path made the bundle's file and why: route, sampling, precision, whether it was the default,
    the measured reasons (XNNPACK delegation of this very file, its gate numbers, and its latency ratio to ORT fp32
    from notebook 06's table when that has run)."""
    route, sampling, precision = meta.get("route"), meta.get("sampling") or "grid", meta.get("precision")
    chosen = meta.get("path_chosen", "given file (--tflite)")
    card: dict[str, Any] = {"route": route, "sampling": sampling, "precision": precision, "chosen": chosen,
                            "why": DEFAULT_PATH_WHY if chosen == "default" else f"{chosen}: --route/--sampling/"
                                                                                "--precision"}
    try:
        rep = delegation_report(src, output_dir)
        card["xnnpack"] = {"ops": rep["xnnpack_nodes"], "of": rep["xnnpack_total"],
                           "partitions": rep["xnnpack_partitions"], "undelegated": rep.get("undelegated")}
    except Exception as exc:  # noqa: BLE001 - the card says why the number is missing
        card["xnnpack"] = f"not measured: {str(exc).splitlines()[0][:200]}"
    agg = meta.get("parity") or {}  # the gate's aggregate, as ensure_tflite stored it
    card["gate"] = {k: agg[k] for k in ("pre_topk_max_abs", "forced_max_abs", "forced_min_mask_iou",
                                        "control_ratio_max") if k in agg}
    bench = Path(output_dir or "outputs") / "06_benchmark.json"
    card["latency_vs_ort_fp32"] = "not measured yet (notebook 06 writes it)"
    if bench.is_file():  # the row of this very file in notebook 06's table (specs name their file)
        doc = json.loads(bench.read_text())
        names = {n for n, sp in (doc.get("specs") or {}).items()
                 if Path(str(sp.get("path", ""))).resolve() == Path(src).resolve()}
        for t, rows in sorted((doc.get("rows") or {}).items()):
            for r in rows:
                if r.get("backend") in names and r.get("x_ort_fp32") is not None:
                    card["latency_vs_ort_fp32"] = {"ratio": r["x_ort_fp32"], "threads": int(t),
                                                   "cpu": ((doc.get("hardware") or {}).get("cpu") or {}).get("summary")}
                    return card
    return card


def cli_bundle(args) -> int:
    target = getattr(args, "target", "cpu")
    out = make_bundle(args.checkpoint, args.out, route=args.route, precision=args.precision,
                      sampling=getattr(args, "sampling", None),
                      resolution=args.resolution, tflite=args.tflite, trusted=args.trusted, target=target,
                      gpu_check=bool(getattr(args, "gpu_check", False)), overwrite=bool(getattr(args, "force", False)))
    card = json.loads((out / "model_card.json").read_text())
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    if target == "gpu":
        par = card["parity_cpu_interpreter"]
        print(f"chain on the CPU interpreter vs PyTorch: {par['matched_top10']} top-10 matched, min mask IoU "
              f"{par['min_mask_iou']}")
        for g, v in card["graphs"].items():
            print(f"{g}: {v['ops']} ops, {v['cpu_latency_ms_1_thread']} ms on 1 CPU thread")
        gc = card["gpu_check"]
        print(gc if isinstance(gc, str) else (gc.get("skipped") or f"GPU delegate: failures {gc['failures'] or 'none'}"))
        return 0
    par = card["parity"]
    ties = sorted(k for k, v in (par.get("selection") or {}).items() if v == "tie")
    print(f"parity vs PyTorch: {par['matched']}/{par['of']} top-10 matched, min mask IoU {par['min_mask_iou']}"
          + (f" (near-tied selection on {', '.join(ties)}: compared on the .tflite's selection)" if ties else ""))
    for t, v in card["latency"]["by_threads"].items():
        print(f"latency {t} thread(s): {v['median_ms']:.1f} ms median")
    return 0
