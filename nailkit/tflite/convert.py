"""TFLite conversion, two routes, three precisions, with caching, verification and a delegation report.

* Route A ``onnx2tf``: checkpoint → verified ONNX (``nailkit.export.onnx.ensure_onnx``) → the needed ONNX passes
  (``nailkit.export.onnx_passes.DEFAULT_PASSES``; with onnx2tf 2.6.9 + onnxsim 0.6.5 none is) + the selection outputs →
  onnx2tf (``tflite_backend="tf_converter"``, ``replace_to_pseudo_operators=["Erf"]`` only: adding ``"GeLU"`` makes
  onnx2tf emit the tanh approximation) → ``*_float32`` / ``*_float16`` .tflite, plus dynamic-range int8 from the
  SavedModel with ``TFLiteConverter`` (``Optimize.DEFAULT``, as rfdetr does). Optional full-integer int8
  (calibrated on ``data/``) behind ``full_int8=True``.
* Route B ``litert``: the export-mode module (wrapped to take NHWC input) → ``litert_torch.convert``; fp16 and
  dynamic int8 through ai-edge-quantizer recipes; **static selective int8** (``STATIC_PRECISIONS``: ``w8a8`` /
  ``w8a16``, ``nailkit.tflite.quantize``'s backbone recipes: the backbone's linears/convs at int8 weights + int8/int16
  activations, the decoder, heads, LayerNorms, softmax and sampling in float), calibrated on ``calibration`` images of
  a train split with ``predict()``'s preprocessing; the calibration set's content is in the file's key.

Every conversion runs in its own subprocess (``python -m nailkit.tflite.convert <worker> ...`` through ``nailkit.core.subproc``:
tensorflow/triton import order, memory, a timeout that holds even when the worker is silent), with its output captured
to a log file under ``outputs/logs/`` and echoed as a tqdm progress line; wall time and the child's peak RSS are
recorded. ``ensure_tflite`` keeps each file in a staging folder until its parity gate (``nailkit.verify.gates``) has passed,
then publishes it with its sidecar (``nailkit.core.artifacts``); a file under its final name has always passed its gate.

Outputs are identified by shape and meaning (``nailkit.portable.io_contract``), never by position: the int8 file orders them
differently. Every artifact also carries the selection tensors ``enc_scores`` / ``topk_indices`` (see
``nailkit.verify.parity.selection_aware_parity``). Tables and plots of these results: ``nailkit.report.tables``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nailkit.core import artifacts, subproc
from nailkit.core.artifacts import atomic_write, file_sha256
from nailkit.core.hardware import cpu_info, peak_rss_mb
from nailkit.core.import_order import import_tensorflow, load_triton_first
from nailkit.data.dataset import ensure_dataset
from nailkit.data.samples import sample_images
from nailkit.export import onnx_passes
from nailkit.export.onnx import ensure_onnx
from nailkit.model.build import (
    DEFAULT_OUTPUT_DIR,
    export_module,
    export_options,
    export_suffix,
    load_model,
    normalize_sampling,
    OUTPUT_NAMES,
    resolve_checkpoint,
)
from nailkit.model.checkpoint import Checkpoint, checkpoint_content, class_labels
from nailkit.portable.io_contract import (
    check_tflite_file,
    make_interpreter,
    OUTPUT_MEANINGS,
    POSTPROCESS_STEPS,
    TFLiteModel,
)
from nailkit.portable.preprocess import preprocess, to_nhwc
from nailkit.tflite import metadata as tm, quantize as Q
from nailkit.tflite.passes import inline_buffers
from nailkit.verify import gates
from nailkit.verify.parity import (
    error_summary,
    rounding_control,
    run_torch_with_selection,
    selection_aware_parity,
    selection_module,
)

ROUTES = ("onnx2tf", "litert")
PRECISIONS = ("fp32", "fp16", "int8")

#: The default path of ``convert`` and ``bundle``: the fastest file measured that passes its gate (2026-12-02, trained
#: demo, 1 thread, notebook 06): route B (litert-torch) with the XNNPACK-friendly graph — 1598/1600 ops on XNNPACK
#: in 2 partitions, 0.84× ORT fp32 on an AVX2 EPYC, same fp32 gate — where route A's onnx2tf + grid file put 96% of
#: ops on XNNPACK in 9 partitions at 1.13× and took 24 minutes to convert. Route A and grid stay one flag away.
DEFAULT_ROUTE = "litert"
DEFAULT_SAMPLING = {"litert": "xnn", "onnx2tf": "grid"}
DEFAULT_PATH_WHY = ("litert-torch + xnn sampling: the fastest measured file that passes its gate (99.9% of ops on "
                    "XNNPACK in 2 partitions, 0.84x ORT fp32 on AVX2, 0.92-0.96x on AVX-512; route A onnx2tf + grid: "
                    "96% in 9 partitions, 1.13x, and ~20 minutes to convert)")


def default_path(route: str | None = None, sampling: str | None = None) -> tuple[str, str]:
    """(route, sampling) with the defaults filled in: litert + xnn, or route A with grid sampling."""
    route = route or DEFAULT_ROUTE
    return route, sampling or DEFAULT_SAMPLING.get(route, "grid")


def default_precisions(cpu: Any = None) -> list[str]:
    """fp32, plus dynamic int8 where the CPU has int8 dot-product instructions (VNNI, AMX, dotprod): there int8 runs
    at ~0.6x fp32 (notebook 06); without them it ran at 1.14x ORT fp32 (AVX2 EPYC), slower than fp32."""
    info = cpu if cpu is not None else cpu_info()
    return ["fp32", "int8"] if info.int8_dot else ["fp32"]
EXTRA_PRECISIONS = ("full_int8",)  # route A only, slow, not in CI
#: route B only: static selective int8 (precision -> ``nailkit.tflite.quantize`` recipe). Reported against the dynamic-int8
#: rounding control, not gated by it (that control rounds activations per run, not to calibrated static ranges);
#: judged by notebook 07's accuracy gate instead.
STATIC_PRECISIONS = {"w8a8": "backbone_w8a8", "w8a16": "backbone_w8a16"}
#: train-split images a static precision is calibrated on by default (8: ~1 min and ~9 GB RSS for the 432 model)
DEFAULT_CALIBRATION = 8
#: precisions whose parity is reported (aggregate + ratio to the dynamic-int8 control) but not gated
REPORTED_NOT_GATED = ("full_int8", *STATIC_PRECISIONS)
ALL_OUTPUT_NAMES = tuple(OUTPUT_NAMES) + ("enc_scores", "topk_indices")
#: ONNX passes route A applies (only those shown to be needed), then the selection outputs are exposed.
ROUTE_A_PASSES = onnx_passes.DEFAULT_PASSES

#: ``disable_strict_mode``: onnx2tf's strict mode runs the TF graph built so far on dummy data inside the conversion of
#: every Reshape/MatMul/Concat/LayerNorm/… (50 op converters call ``dummy_tf_inference``), which grows with the square
#: of the graph: most of route A's time on this model (py-spy, 2026-12-02). nailkit gates every file against PyTorch
#: anyway (selection-aware fp32 parity), so a transposition error strict mode would have corrected fails the gate.
ONNX2TF_KWARGS = {"output_signaturedefs": True, "replace_to_pseudo_operators": ["Erf"],
                  "tflite_backend": "tf_converter", "disable_strict_mode": True}
#: Without strict mode, MatMul/Conv/… still run the TF graph built so far on onnxruntime's per-op reference values
#: (``acquisition_of_validation_data``) — again quadratic in the graph. onnx2tf skips that whole step when its ONNX
#: dummy inference fails; ``_without_per_op_validation`` makes it skip it on purpose. The model's shapes are static,
#: so nothing needs onnx2tf's shape estimation; the gate is the check. Part of the cache key.
ONNX2TF_PER_OP_VALIDATION = False
#: a conversion worker still running after this is killed (rfdetr's own int8 export took up to 684 s on 2 cores)
WORKER_TIMEOUT_S = 3600.0


#: the schema of the metadata embedded in every converted file (``embed_file_metadata``); part of the cache key
EMBEDDED_METADATA = 1


class ConversionError(subproc.WorkerError):
    """A conversion worker failed, printed no result or timed out; the message names its log."""


# ----------------------------------------------------------------------------------------------------------------
# subprocess plumbing (nailkit.core.subproc)
# ----------------------------------------------------------------------------------------------------------------

#: onnx2tf's own log lines that start a stage of route A (``subproc.run_python`` shows the stage and its time)
ONNX2TF_STAGES = (("Model optimizing started", "simplify (onnxsim)"), ("Model conversion started", "convert ops"),
                  ("saved_model output started", "SavedModel + fp32 TFLite"),
                  ("Float32 tflite output complete", "fp16 TFLite"))


def run_worker(args: list[str], log_path: Path, desc: str, timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run ``python -m nailkit.tflite.convert <args>`` (``nailkit.core.subproc.run_python``: log file, a progress line with the
    stage and its time, killed at ``timeout`` even when silent); returns the worker's result plus ``wall_s`` and
    ``stages``."""
    try:
        return subproc.run_python(["-m", "nailkit.tflite.convert", *args], desc=desc, timeout=timeout, log_path=log_path,
                                  stages=ONNX2TF_STAGES if args[0] == "route-a" else ())
    except subproc.WorkerError as exc:
        raise ConversionError(str(exc)) from None


def _emit(result: dict[str, Any]) -> None:
    result["peak_rss_mb"] = peak_rss_mb(children=True)  # the worker and any process it ran
    subproc.emit(result)


# ----------------------------------------------------------------------------------------------------------------
# workers (run in the child process)
# ----------------------------------------------------------------------------------------------------------------

def _worker_route_a(onnx_path: str, work: str, precisions: str) -> None:
    """onnx2tf → SavedModel + fp32/fp16 .tflite under ``work/saved_model``; then int8 / full_int8 from it."""
    tf = import_tensorflow()
    from rfdetr.export._tflite.exporter import _interpreter_scripts_on_path, _numpy_allow_pickle

    import onnx2tf

    work_p = Path(work)
    t0 = time.time()
    wanted = precisions.split(",")
    subproc.stage("onnx2tf")
    print(f"onnx2tf {onnx2tf.__version__}, tensorflow {tf.__version__}: converting {onnx_path}", flush=True)
    with _numpy_allow_pickle(), _interpreter_scripts_on_path(), _per_op_validation(ONNX2TF_PER_OP_VALIDATION), \
            _onnx2tf_tflite("fp16" in wanted, tf):
        onnx2tf.convert(input_onnx_file_path=onnx_path, output_folder_path=str(work_p / "saved_model"),
                        non_verbose=False, verbosity="info", **ONNX2TF_KWARGS)
    times = {"onnx2tf_s": time.time() - t0}
    stem = Path(onnx_path).stem
    files = {}
    for prec, token in (("fp32", "float32"), ("fp16", "float16")):
        src = work_p / "saved_model" / f"{stem}_{token}.tflite"
        if src.is_file() and src.stat().st_size and prec in wanted + ["fp32"]:
            files[prec] = str(src)
    q_files, q_times = _quantize_saved_model(tf, work_p / "saved_model", precisions.split(","), work_p)
    files.update(q_files)
    times.update(q_times)
    _emit({"files": files, "times": times, "onnx2tf": onnx2tf.__version__, "tensorflow": tf.__version__})


@contextlib.contextmanager
def _onnx2tf_tflite(fp16: bool, tf: Any) -> Iterator[None]:
    """How onnx2tf's tf_converter backend turns its Keras model into .tflite, made cheaper (py-spy, 2026-12-02: half of
    route A's time was TF's Keras converter re-saving the model as a temporary SavedModel, with tf_keras' tracking
    metadata and ``get_config`` deep copies, once for fp32 and again for fp16):

    * ``from_keras_model`` raises, so onnx2tf takes its own fallback, ``from_concrete_functions([concrete_func])`` —
      the same graph frozen and converted without the Keras re-save;
    * when fp16 was not asked for, the second (fp16) conversion returns nothing: onnx2tf writes an empty
      ``*_float16.tflite``, which is ignored. fp16 asked for later is made from the kept SavedModel
      (``_quantize_saved_model``), with no second onnx2tf run.
    Every file is gated against PyTorch afterwards, so a difference in conversion path cannot pass unseen."""
    cls = tf.lite.TFLiteConverter
    from_keras, from_funcs = cls.from_keras_model, cls.from_concrete_functions

    def no_keras(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("nailkit: convert onnx2tf's concrete function instead of re-saving the Keras model")

    def from_concrete_functions(funcs: Any, trackable_obj: Any = None) -> Any:
        conv = from_funcs(funcs, trackable_obj)
        real = conv.convert

        def convert() -> bytes:
            if not fp16 and tf.float16 in list(conv.target_spec.supported_types or []):
                print("nailkit: onnx2tf's fp16 conversion skipped (fp16 not asked for)", flush=True)
                return b""
            return real()

        conv.convert = convert
        return conv

    cls.from_keras_model = staticmethod(no_keras)
    cls.from_concrete_functions = staticmethod(from_concrete_functions)
    try:
        yield
    finally:
        cls.from_keras_model, cls.from_concrete_functions = from_keras, from_funcs


@contextlib.contextmanager
def _per_op_validation(enabled: bool) -> Iterator[None]:
    """onnx2tf's per-op validation on (as shipped) or off: off, its ONNX dummy inference raises, which onnx2tf
    already handles by skipping the per-op comparisons (see ``ONNX2TF_PER_OP_VALIDATION``)."""
    import onnx2tf.onnx2tf as o2t

    if enabled:
        yield
        return
    original = o2t.dummy_onnx_inference

    def skipped(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("per-op validation skipped by nailkit (static shapes; every file is gated against PyTorch)")

    o2t.dummy_onnx_inference = skipped
    try:
        yield
    finally:
        o2t.dummy_onnx_inference = original


def _worker_quantize_saved_model(saved_model: str, work: str, precisions: str) -> None:
    tf = import_tensorflow()
    files, times = _quantize_saved_model(tf, Path(saved_model), precisions.split(","), Path(work),
                                         fp16_from_saved_model=True)
    _emit({"files": files, "times": times, "tensorflow": tf.__version__})


def _quantize_saved_model(tf: Any, saved_model: Path, precs: list[str], work_p: Path,
                          fp16_from_saved_model: bool = False) -> tuple[dict[str, str], dict[str, float]]:
    """Dynamic-range int8 (``Optimize.DEFAULT``, as rfdetr does) and, when asked, full-integer int8 calibrated on
    ``work/calib.npy`` (int8 builtins, float fallback allowed for ops without an int8 kernel)."""
    files: dict[str, str] = {}
    times: dict[str, float] = {}
    for prec in precs:
        if prec not in ("int8", "full_int8", "fp16") or (prec == "fp16" and not fp16_from_saved_model):
            continue
        t1 = time.time()
        subproc.stage(f"quantize {prec} (TFLiteConverter)")
        print(f"TFLiteConverter {prec} from {saved_model} ...", flush=True)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if prec == "fp16":  # what onnx2tf itself does for fp16, from the kept SavedModel
            conv.target_spec.supported_types = [tf.float16]
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        if prec == "full_int8":
            calib = np.load(work_p / "calib.npy")

            def rep():
                for i in range(len(calib)):
                    yield [calib[i:i + 1]]

            conv.representative_dataset = rep
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        dst = work_p / f"{prec}.tflite"
        dst.write_bytes(conv.convert())
        files[prec] = str(dst)
        times[f"{prec}_s"] = time.time() - t1
    return files, times


def _worker_route_b(checkpoint: str, resolution: str, *rest: str) -> None:
    """fp32 through litert_torch; fp16/int8 are made from it by ``_worker_quantize_litert``.

    ``rest``: ``[sampling, mask_queries,] work`` — ``export_module``'s options (``mask_queries`` "all" or N; both
    optional, the default graph without them), the work folder last."""
    *opts, work = rest
    sampling = opts[0] if opts else "grid"
    mask_queries = opts[1] if len(opts) > 1 and opts[1] not in ("", "all") else ""
    import torch

    load_triton_first()
    import litert_torch

    work_p = Path(work)
    t0 = time.time()
    subproc.stage("load checkpoint + export module")
    rf = load_model(checkpoint, trusted=False)
    module = selection_module(export_module(rf, int(resolution), sampling=sampling,
                                            mask_queries=int(mask_queries) if mask_queries else None))
    res = module.resolution

    class NHWC(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 3, 1, 2))

    wrapped = NHWC(module).eval()
    x = torch.zeros(1, res, res, 3)
    print(f"litert_torch.convert at {res}, sampling {sampling}, mask queries {mask_queries or 'all'} "
          f"(torch.export → LiteRT) ...", flush=True)
    subproc.stage("torch.export + litert-torch convert")
    with torch.no_grad():
        edge = litert_torch.convert(wrapped, (x,))
    subproc.stage("write fp32 TFLite")
    fp32 = work_p / "fp32.tflite"
    edge.export(str(fp32))
    times = {"convert_s": time.time() - t0}
    files = {"fp32": str(fp32)}
    _emit({"files": files, "times": times, "litert_torch": getattr(litert_torch, "__version__", "?"),
           "torch": torch.__version__})


def _worker_quantize_litert(fp32: str, work: str, precisions: str) -> None:
    import ai_edge_quantizer

    files, times = {}, {}
    for prec in precisions.split(","):
        t1 = time.time()
        subproc.stage(f"quantize {prec} (ai-edge-quantizer)")
        print(f"ai-edge-quantizer {prec}: {fp32}", flush=True)
        files[prec] = str(_quantize_litert(Path(fp32), prec, Path(work) / f"{prec}.tflite"))
        times[f"{prec}_s"] = time.time() - t1
    _emit({"files": files, "times": times, "ai_edge_quantizer": getattr(ai_edge_quantizer, "__version__", "0.10")})


def _worker_quantize_static(fp32: str, calib_npy: str, work: str, precisions: str) -> None:
    """Static selective int8 (``STATIC_PRECISIONS``) of the route-B fp32 file: one calibration (per-tensor min/max
    of the tensors the backbone recipe quantises; bit-width independent) serves every precision asked for."""
    import ai_edge_quantizer

    calib = np.load(calib_npy)
    xs = [np.ascontiguousarray(calib[i:i + 1]) for i in range(len(calib))]
    precs = precisions.split(",")
    t0 = time.time()
    subproc.stage(f"calibrate on {len(xs)} images")
    print(f"ai-edge-quantizer: calibrating {fp32} on {len(xs)} images ...", flush=True)
    stats = Q.calibrate(fp32, "backbone_w8a8", xs)
    times = {"calibration_s": time.time() - t0}
    files, recipes = {}, {}
    for prec in precs:
        t1 = time.time()
        name = STATIC_PRECISIONS[prec]
        subproc.stage(f"quantize {prec} ({name})")
        res = Q.quantize_tflite(fp32, name, xs, Path(work) / f"{prec}.tflite", calibration_result=stats)
        files[prec] = res.path
        recipes[prec] = {"recipe": name, "quantized_ops": res.quantized_ops, "size_bytes": res.size_bytes}
        times[f"{prec}_s"] = time.time() - t1
        print(f"{prec} ({name}): {res.size_bytes / 1e6:.1f} MB, quantized ops {res.quantized_ops}", flush=True)
    _emit({"files": files, "times": times, "recipes": recipes,
           "ai_edge_quantizer": getattr(ai_edge_quantizer, "__version__", "0.10")})


def _quantize_litert(fp32: Path, precision: str, dst: Path) -> Path:
    from ai_edge_quantizer import quantizer, recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    if precision == "int8":
        rcp = recipe.dynamic_wi8_afp32()
    elif precision == "fp16":
        rm = recipe_manager.RecipeManager()
        rm.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                  algorithm_key=AlgorithmName.FLOAT_CASTING)
        rcp = rm.get_quantization_recipe()
    else:
        raise ValueError(f"route litert: no quantization recipe for {precision!r}")
    qt = quantizer.Quantizer(str(fp32), rcp)
    res = qt.quantize(enable_progress_report=False)

    dst.write_bytes(inline_buffers(bytes(res.quantized_model)))  # tensor data inside the flatbuffer (metadata)
    return dst


def _worker_delegation(path: str) -> None:
    """Op histogram and exact XNNPACK coverage.

    After the XNNPACK delegate is applied, LiteRT appends one DELEGATE node per partition to the node list (the
    replaced nodes stay listed). Each partition's nodes are recovered by walking back from the DELEGATE node's outputs
    to its inputs. Why a node stayed on the default kernels: its op type is never delegated in this model (not in
    XNNPACK's operator set), or the type is delegated elsewhere and this instance is not (its tensor types — e.g.
    int32/int64/bool index math — or dynamic/unsupported parameters)."""
    interp = make_interpreter(path)
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    orig = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {t: o["index"] for o in orig for t in o["outputs"] if t >= 0}
    by_index = {o["index"]: o for o in orig}
    delegated: set[int] = set()
    sizes = []
    for d in delegates:
        boundary = {t for t in d["inputs"] if t >= 0}
        stack, part = [t for t in d["outputs"] if t >= 0], set()
        while stack:
            node = producer.get(stack.pop())
            if node is None or node in part:
                continue
            part.add(node)
            stack.extend(u for u in by_index[node]["inputs"] if u >= 0 and u not in boundary)
        sizes.append(len(part))
        delegated |= part
    hist: dict[str, int] = {}
    for o in orig:
        hist[o["op_name"]] = hist.get(o["op_name"], 0) + 1
    delegated_types = {by_index[i]["op_name"] for i in delegated}
    undelegated: dict[str, dict[str, Any]] = {}
    for o in orig:
        if o["index"] in delegated:
            continue
        dts = sorted({np.dtype(tensors[i]["dtype"]).name for i in list(o["inputs"]) + list(o["outputs"])
                      if i >= 0 and i in tensors})
        e = undelegated.setdefault(o["op_name"], {"count": 0, "dtypes": set()})
        e["count"] += 1
        e["dtypes"].update(dts)
    for name, e in undelegated.items():
        e["dtypes"] = sorted(e["dtypes"])
        nonfloat = [d for d in e["dtypes"] if d not in ("float32", "float16")]
        if name not in delegated_types:
            e["reason"] = "op type not taken by XNNPACK anywhere in this model (outside its operator set)"
        else:
            e["reason"] = ("delegated elsewhere; these instances carry " + (", ".join(nonfloat) + " tensors"
                           if nonfloat else "parameters/shapes XNNPACK rejects"))
    total = len(orig)
    _emit({"ops": total, "histogram": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
           "xnnpack_nodes": len(delegated), "xnnpack_total": total, "xnnpack_partitions": len(delegates),
           "xnnpack_fraction": len(delegated) / total if total else 0.0, "partition_sizes": sizes,
           "undelegated": dict(sorted(undelegated.items(), key=lambda kv: -kv[1]["count"]))})


# ----------------------------------------------------------------------------------------------------------------
# the cached, gated stages: ensure_selection_onnx / ensure_tflite (nailkit.core.artifacts)
# ----------------------------------------------------------------------------------------------------------------

#: versions that enter each stage's cache key
ONNX_PACKAGES = ("torch", "onnx", "rfdetr")
ROUTE_PACKAGES = {"onnx2tf": ONNX_PACKAGES + ("onnx2tf", "onnxsim", "tensorflow", "ai-edge-litert"),
                  "litert": ("torch", "rfdetr", "litert-torch", "ai-edge-quantizer", "ai-edge-litert")}


def _ckpt_info(ckpt: Checkpoint) -> dict[str, Any]:
    """Resolution, class names and num_select recorded in the checkpoint (no model is built; read once)."""
    rep = ckpt.report
    names, source = class_labels(rep)
    return {"resolution": int(rep.resolution or 432), "class_names": names, "class_names_source": source,
            "num_classes": rep.num_classes, "num_select": int(ckpt.args.get("num_select") or 200)}


def _resolution_of(ckpt: Checkpoint, resolution: int | None) -> int:
    return int(resolution) if resolution else _ckpt_info(ckpt)["resolution"]


def ensure_selection_onnx(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                          resolution: int | None = None, passes: tuple[str, ...] = ROUTE_A_PASSES,
                          rf: Any = None, sampling: str | None = None, mask_queries: int | None = None
                          ) -> artifacts.Artifact:
    """The ONNX route A converts: the verified export (``onnx_export.ensure_onnx``: its gate failing raises
    ``ParityError`` here, there is no unverified fallback) → ``passes`` → selection outputs exposed. Cached."""
    import onnx

    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    res = _resolution_of(ckpt, resolution)
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


def _artifact_dir(out_dir: Path, route: str, res: int, h: str, suffix: str = "") -> Path:
    return out_dir / "tflite" / f"{route}_{res}{suffix}_{h}"


class _Gate:
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


def ensure_tflite(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                  route: str = "onnx2tf", precision: str = "fp32", resolution: int | None = None, *,
                  also: tuple[str, ...] = (), force: bool = False, passes: tuple[str, ...] | None = None,
                  verify: bool = True, sampling: str | None = None, mask_queries: int | None = None,
                  calibration: int = DEFAULT_CALIBRATION, calibration_dir: str | os.PathLike[str] | None = None
                  ) -> artifacts.Artifact:
    """The ``.tflite`` of ``checkpoint`` for ``route``/``precision`` (an ``Artifact``: ``path, meta = ...``),
    converting only when the cache misses, and publishing a file only after its parity gate passed.

    The key (``nailkit.core.artifacts``) is the checkpoint's content + route + resolution + passes + converter settings
    and versions; the sidecar ``<file>.tflite.json`` records it with the file's sha256, the conversion's wall time,
    the child's peak RSS, the log path and the gate's aggregate (``parity``). ``verify=True`` runs the gate of
    ``nailkit.verify.gates`` (stage ``tflite_<precision>``; full_int8 is reported, not gated) on the converted file before
    it is published; a failure raises ``ConversionError`` and publishes nothing. Route A converts fp32 and fp16
    together (onnx2tf writes both) plus any precision in ``also``, and keeps onnx2tf's SavedModel so that int8 /
    full_int8 asked for later are made from it without a second onnx2tf run. Route B converts fp32 with litert-torch;
    fp16/int8 are quantized from the cached fp32 file (``made_from`` in the meta). ``passes`` (route A) overrides
    ``ROUTE_A_PASSES`` — e.g. ``()`` to show what a pass is needed for.

    ``sampling`` ("grid" default | "tent": gather-free deformable sampling, ``nailkit.model.sampling``) and ``mask_queries``
    (None = masks for all queries | N: in-graph top-N before the mask head) are ``nailkit.model.build.export_module``'s
    options, for both routes; they enter the key (and the folder name) only when not the default, so a tent or top-N
    file is never served for a default request. The fp32 gate of a tent file compares it with the default
    (grid_sample) PyTorch module; a top-N file is compared with the top-N PyTorch module. Tolerances unchanged.

    A precision that fails its gate leaves a refusal record (``<file>.refused.json``: key + failures,
    ``nailkit.core.artifacts.record_refusal``); a later request for the same key raises ``ConversionError`` from that
    record at once, without converting again (route A's fp16 of the trained model: ~20 min of onnx2tf each time),
    unless ``force=True``.

    Route B's static precisions (``STATIC_PRECISIONS``: ``w8a8``, ``w8a16``) are quantised from the cached fp32 file
    (``_ensure_static``), calibrated on ``calibration`` images of ``calibration_dir`` (a COCO split folder; default:
    the synthetic dataset's train split, seed 0, generated under ``output_dir/datasets/``); the names of those images
    and the sha256 of their preprocessed inputs enter the file's key. Their parity is reported, not gated (see
    ``STATIC_PRECISIONS``).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    valid = PRECISIONS + (EXTRA_PRECISIONS if route == "onnx2tf" else tuple(STATIC_PRECISIONS))
    for p in (precision, *also):
        if p not in valid:
            raise ValueError(f"route {route}: unknown precision {p!r}; expected one of {valid}")
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    if not ckpt.path.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (expected an rfdetr .pth)")
    res = _resolution_of(ckpt, resolution)
    sampling = normalize_sampling(sampling)
    opts = export_options(sampling, mask_queries)
    mask_queries = opts.get("mask_queries")
    params: dict[str, Any] = {"route": route, "resolution": res, "selection_outputs": True, "input": "NHWC",
                              "verified": bool(verify), "embedded_metadata": EMBEDDED_METADATA, **opts}
    if route == "onnx2tf":
        passes = tuple(ROUTE_A_PASSES if passes is None else passes)
        params.update(passes=list(passes), onnx2tf_kwargs=ONNX2TF_KWARGS)
        if not ONNX2TF_PER_OP_VALIDATION:
            params["onnx2tf_per_op_validation"] = False
        params["onnx2tf_tflite_from"] = "concrete_function"  # see _onnx2tf_tflite
    h, key = artifacts.artifact_key("tflite", checkpoint_content(ckpt), params, ROUTE_PACKAGES[route])
    adir = _artifact_dir(out_dir, route, res, h, export_suffix(sampling, mask_queries))
    if precision in STATIC_PRECISIONS:
        return _ensure_static(ckpt, out_dir, adir, key, precision, res,
                              also=tuple(p for p in also if p in STATIC_PRECISIONS), force=force, verify=verify,
                              sampling=sampling, mask_queries=mask_queries, calibration=calibration,
                              calibration_dir=calibration_dir)
    also = tuple(p for p in also if p not in STATIC_PRECISIONS)
    path = adir / f"model_{precision}.tflite"
    if not force:
        meta = artifacts.cached(path, key)
        if meta:
            return artifacts.Artifact(path, meta)
        _raise_if_refused(path, key, route, precision)
    wanted = [precision, *[a for a in also if a != precision]]
    if route == "onnx2tf":  # onnx2tf always writes fp32; fp16 only when asked (see _onnx2tf_tflite)
        wanted = list(dict.fromkeys(["fp32", *wanted]))
    info = _ckpt_info(ckpt)
    log_path = out_dir / "logs" / f"convert_{route}_{res}_{h}_{'-'.join(wanted)}.log"
    with artifacts.staging(path) as wp:
        if route == "onnx2tf":
            result, extra = _convert_route_a(ckpt, out_dir, adir, key, res, wanted, wp, log_path, passes=passes,
                                             sampling=sampling, mask_queries=mask_queries)
        else:
            result, extra = _convert_route_b(ckpt, out_dir, res, wanted, wp, log_path, verify=verify,
                                             sampling=sampling, mask_queries=mask_queries)
        metas, refused = _gate_and_publish(result, extra, ckpt, adir, key, route, res, info, opts, log_path,
                                           verify=verify, sampling=sampling, mask_queries=mask_queries)
    if precision in refused:
        raise ConversionError(f"{path}: route {route} {precision} FAILED its parity gate and was not published: "
                              + "; ".join(refused[precision]) + f" (log: {log_path})")
    if precision not in metas:
        raise ConversionError(f"route {route}: the conversion wrote no {precision} file (got {sorted(metas)}); "
                              f"see {log_path}")
    return artifacts.Artifact(path, metas[precision])


def _convert_route_a(ckpt: Checkpoint, out_dir: Path, adir: Path, key: dict[str, Any], res: int, wanted: list[str],
                     wp: Path, log_path: Path, *, passes: tuple[str, ...], sampling: str, mask_queries: int | None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route A into the staging folder ``wp``: the verified selection ONNX → onnx2tf (fp32, and fp16 when wanted) in
    a worker, or — when fp32 is cached with its SavedModel kept — the wanted precisions from that SavedModel. Returns
    the worker's result and the meta it adds (``onnx``, ``made_from``)."""
    extra: dict[str, Any] = {}
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
        result = run_worker(["quantize-saved-model", str(kept), str(wp), ",".join(wanted)], log_path,
                            f"TFLiteConverter {'+'.join(wanted)}")
        return result, extra
    src = wp / "model.onnx"  # onnx2tf names its files after the stem
    os.symlink(onnx_path.resolve(), src)
    result = run_worker(["route-a", str(src), str(wp), ",".join(wanted)], log_path, f"onnx2tf {res} {'+'.join(wanted)}")
    for f in (wp / "saved_model").glob("*.tflite"):
        if str(f) not in result["files"].values():
            f.unlink()
    for prec, f in list(result["files"].items()):  # out of the SavedModel folder before it is kept
        if Path(f).parent.name == "saved_model":
            result["files"][prec] = str(Path(f).replace(wp / f"{prec}.tflite"))
    if kept.exists():
        shutil.rmtree(kept)
    os.replace(wp / "saved_model", kept)  # onnx2tf's SavedModel, for later quantization
    return result, extra


def _convert_route_b(ckpt: Checkpoint, out_dir: Path, res: int, wanted: list[str], wp: Path, log_path: Path, *,
                     verify: bool, sampling: str, mask_queries: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route B into ``wp``: fp32 with litert-torch, or the wanted quantised precisions from the cached (gated) fp32
    file, converted first when missing. Returns the worker's result and the meta it adds."""
    quant = [p for p in wanted if p != "fp32"]
    if not quant:
        return run_worker(["route-b", str(ckpt), str(res), sampling, str(mask_queries or "all"), str(wp)], log_path,
                          f"litert-torch {res} fp32{export_suffix(sampling, mask_queries)}"), {}
    fp32_path, fp32_meta = ensure_tflite(ckpt, out_dir, "litert", "fp32", res, verify=verify, sampling=sampling,
                                         mask_queries=mask_queries)
    extra = {"fp32_conversion_wall_s": fp32_meta["conversion_wall_s"], "made_from": str(fp32_path)}
    return run_worker(["quantize-litert", str(fp32_path), str(wp), ",".join(quant)], log_path,
                      f"ai-edge-quantizer {'+'.join(quant)}"), extra


def _gate_and_publish(result: dict[str, Any], extra: dict[str, Any], ckpt: Checkpoint, adir: Path,
                      key: dict[str, Any], route: str, res: int, info: dict[str, Any], opts: dict[str, Any],
                      log_path: Path, *, verify: bool, sampling: str, mask_queries: int | None
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Each converted file: metadata embedded, its sidecar meta, its parity gate (``verify``), then published — or,
    when the gate fails, a refusal record instead. Returns ({precision: published meta}, {precision: failures})."""
    gate = _Gate(ckpt, res, mask_queries) if verify else None
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


def _ensure_static(ckpt: Path, out_dir: Path, adir: Path, key: dict[str, Any], precision: str, res: int, *,
                   also: tuple[str, ...], force: bool, verify: bool, sampling: str, mask_queries: int | None,
                   calibration: int, calibration_dir: str | os.PathLike[str] | None) -> artifacts.Artifact:
    """Route B static selective int8 (``STATIC_PRECISIONS``) from the cached, gated fp32 file; the key is the fp32
    folder's key plus the recipe and the calibration set. Published after its (reported) parity run."""
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
        _raise_if_refused(path, key_of(precision), "litert", precision)
    wanted = [precision] + [p for p in dict.fromkeys(also) if p != precision
                            and (force or not artifacts.cached(adir / f"model_{p}.tflite", key_of(p)))]
    fp32_path, fp32_meta = ensure_tflite(ckpt, out_dir, "litert", "fp32", res, verify=verify, sampling=sampling,
                                         mask_queries=mask_queries)
    info = _ckpt_info(ckpt)
    h = key_of(precision)["static"]["calibration"]["inputs_sha256"][:8]
    log_path = out_dir / "logs" / f"convert_litert_{res}_{adir.name}_{'-'.join(wanted)}_calib{h}.log"
    with artifacts.staging(path) as wp:
        np.save(wp / "calib.npy", xs)
        result = run_worker(["quantize-static", str(fp32_path), str(wp / "calib.npy"), str(wp), ",".join(wanted)],
                            log_path, f"ai-edge-quantizer static {'+'.join(wanted)} ({len(xs)} calibration images)")
        gate = _Gate(ckpt, res, mask_queries) if verify else None
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


def _raise_if_refused(path: Path, key: dict[str, Any], route: str, precision: str) -> None:
    """Raise ``ConversionError`` from a recorded refusal of ``path`` for this ``key`` (no conversion is run)."""
    rec = artifacts.refusal(path, key)
    if rec:
        raise ConversionError(
            f"{path}: route {route} {precision} FAILED its parity gate on {rec.get('recorded')} for these very weights, "
            f"parameters and versions, and was not published: " + "; ".join(rec.get("failures", []))
            + f" (recorded in {artifacts.refusal_path(path).name}; not converted again — force=True / --force "
              f"re-converts; log: {rec.get('log')})")


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
        result = run_worker(["route-a", str(src), work, ",".join(precisions)], log, f"onnx2tf {Path(onnx_path).name}")
        paths = {}
        for prec, f in result["files"].items():
            dst = out / f"{Path(onnx_path).stem}_{prec}.tflite"
            os.replace(f, dst)
            paths[prec] = dst
    return paths


def delegation_report(path: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None
                      ) -> dict[str, Any]:
    """Op histogram and XNNPACK coverage of a .tflite (measured in a subprocess; cached next to the file, keyed by
    the .tflite's sha256 and the runtime's version)."""
    p = check_tflite_file(path)
    side = p.with_suffix(".delegation.json")
    key = {"tflite_sha256": file_sha256(p, 64), "versions": artifacts.package_versions(("ai-edge-litert",))}
    try:
        rep = json.loads(side.read_text())
        if rep.get("key") == key:
            return rep
    except (OSError, ValueError):
        pass
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    rep = run_worker(["delegation", str(p)], out_dir / "logs" / f"delegation_{p.parent.name}_{p.stem}.log",
                     f"delegation {p.name}")
    rep.pop("wall_s", None)
    rep.pop("peak_rss_mb", None)
    rep["key"] = key
    atomic_write(side, lambda tmp: tmp.write_text(json.dumps(rep, indent=1)))
    return rep


# ----------------------------------------------------------------------------------------------------------------
# parity of one artifact on data/ images
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def cli_convert(args) -> int:
    """checkpoint → ONNX → TFLite for each precision; each file is published only after its gate passed."""
    out_dir = Path(args.out)
    ckpt = resolve_checkpoint(args.checkpoint, out_dir, trusted=getattr(args, "trusted", False))
    if not ckpt.path.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (expected an rfdetr .pth)")
    args.route, args.sampling = default_path(args.route, getattr(args, "sampling", None))
    precisions = list(args.precision) if args.precision else default_precisions()
    if not args.precision:
        print(f"defaults: route {args.route}, sampling {args.sampling}, precision {','.join(precisions)} "
              f"({DEFAULT_PATH_WHY})", flush=True)
    for p in precisions:
        if p not in PRECISIONS + (EXTRA_PRECISIONS if args.route == "onnx2tf" else tuple(STATIC_PRECISIONS)):
            raise ValueError(f"--precision {p}: expected a comma list of {PRECISIONS} (+ full_int8 on route onnx2tf, "
                             f"{'/'.join(STATIC_PRECISIONS)} on route litert)")
    redone: set[str] = set()  # --force converts each file once, not once per precision of a joint conversion
    for prec in precisions:
        path, meta = ensure_tflite(ckpt, out_dir, args.route, prec, args.resolution, also=tuple(precisions),
                                   sampling=getattr(args, "sampling", None),
                                   mask_queries=getattr(args, "mask_queries", None),
                                   calibration=int(getattr(args, "calibration", None) or DEFAULT_CALIBRATION),
                                   calibration_dir=getattr(args, "calibration_dir", None),
                                   force=bool(getattr(args, "force", False)) and prec not in redone)
        redone |= set(meta.get("converted_together", [prec]))
        a = meta["parity"]
        tag = export_suffix(meta.get("sampling"), meta.get("mask_queries")).replace("_", " ").strip()
        line = (f"{args.route} {prec}{' (' + tag + ')' if tag else ''}: {path} ({meta['bytes'] / 1e6:.1f} MB, "
                f"converted in "
                f"{meta['conversion_wall_s']:.0f} s, peak RSS {meta['conversion_peak_rss_mb']:.0f} MB) "
                f"pre-TopK {a['pre_topk_max_abs']:.1e}, forced {a['forced_max_abs']:.1e}")
        if "control_ratio_max" in a:
            line += f", vs rounding control {a['control_ratio_max']:.2f}x"
        print(line + (" — reported, not gated" if prec in REPORTED_NOT_GATED else " — ok"))
    return 0


def _main(argv: list[str]) -> None:
    workers = {"route-a": _worker_route_a, "route-b": _worker_route_b,
               "quantize-saved-model": _worker_quantize_saved_model, "quantize-litert": _worker_quantize_litert,
               "quantize-static": _worker_quantize_static, "delegation": _worker_delegation}
    cmd, rest = argv[0], argv[1:]
    if cmd not in workers:
        raise SystemExit(f"unknown worker {cmd!r}")
    workers[cmd](*rest)


if __name__ == "__main__":
    _main(sys.argv[1:])
