"""The conversion workers: what runs in the child process that ``nailkit.tflite.launch.run_worker`` starts as
``python -m nailkit.tflite.workers <worker> <args...>``.

* ``route-a``: onnx2tf → SavedModel + fp32/fp16 .tflite, then int8 / full_int8 from the SavedModel
  (``TFLiteConverter``); ``quantize-saved-model``: those from a kept SavedModel, without a second onnx2tf run.
* ``route-b``: the export-mode module (wrapped to take NHWC input) → ``litert_torch.convert`` (fp32);
  ``quantize-litert``: fp16 / dynamic int8 with ai-edge-quantizer recipes; ``quantize-static``: static selective int8
  (``nailkit.tflite.options.STATIC_PRECISIONS``, ``nailkit.tflite.quantize``'s backbone recipes).
* ``delegation``: op histogram and exact XNNPACK coverage of a .tflite.

Each worker prints one result line (``nailkit.core.subproc.emit``) with its files, times, versions and peak RSS.
tensorflow, onnx2tf, litert-torch and ai-edge-quantizer are imported inside the workers only (``import_tensorflow``
keeps the import order), so the parent never loads them.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nailkit.core import subproc
from nailkit.core.hardware import peak_rss_mb
from nailkit.core.import_order import import_tensorflow, load_triton_first
from nailkit.model.build import export_module, load_model
from nailkit.portable.io_contract import make_interpreter
from nailkit.tflite import quantize as Q
from nailkit.tflite.options import ONNX2TF_KWARGS, ONNX2TF_PER_OP_VALIDATION, STATIC_PRECISIONS
from nailkit.tflite.passes import inline_buffers
from nailkit.verify.parity import selection_module


def _emit(result: dict[str, Any]) -> None:
    result["peak_rss_mb"] = peak_rss_mb(children=True)  # the worker and any process it ran
    subproc.emit(result)


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
      ``*_float16.tflite``, which is ignored. Route A's fp16 file is made from the fp32 file by a flatbuffer pass
      (``nailkit.tflite.route_onnx2tf.make_fp16``), with no second onnx2tf run.
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
    files, times = _quantize_saved_model(tf, Path(saved_model), precisions.split(","), Path(work))
    _emit({"files": files, "times": times, "tensorflow": tf.__version__})


def _quantize_saved_model(tf: Any, saved_model: Path, precs: list[str], work_p: Path
                          ) -> tuple[dict[str, str], dict[str, float]]:
    """Dynamic-range int8 (``Optimize.DEFAULT``, as rfdetr does) and, when asked, full-integer int8 calibrated on
    ``work/calib.npy`` (int8 builtins, float fallback allowed for ops without an int8 kernel)."""
    files: dict[str, str] = {}
    times: dict[str, float] = {}
    for prec in precs:
        if prec not in ("int8", "full_int8"):  # fp16: nailkit.tflite.route_onnx2tf.make_fp16, from the fp32 file
            continue
        t1 = time.time()
        subproc.stage(f"quantize {prec} (TFLiteConverter)")
        print(f"TFLiteConverter {prec} from {saved_model} ...", flush=True)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
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
