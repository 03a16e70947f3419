"""TFLite conversion, two routes, three precisions, with caching, verification and a delegation report.

* Route A ``onnx2tf``: checkpoint → verified ONNX (``nailkit.onnx_export.ensure_onnx``) → the needed ONNX passes
  (``nailkit.onnx_passes.DEFAULT_PASSES``; with onnx2tf 2.6.9 + onnxsim 0.6.5 none is) + the selection outputs →
  onnx2tf (``tflite_backend="tf_converter"``, ``replace_to_pseudo_operators=["Erf"]`` only: adding ``"GeLU"`` makes
  onnx2tf emit the tanh approximation) → ``*_float32`` / ``*_float16`` .tflite, plus dynamic-range int8 from the
  SavedModel with ``TFLiteConverter`` (``Optimize.DEFAULT``, as rfdetr does). Optional full-integer int8
  (calibrated on ``data/``) behind ``full_int8=True``.
* Route B ``litert``: the export-mode module (wrapped to take NHWC input) → ``litert_torch.convert``; fp16 and
  dynamic int8 through ai-edge-quantizer recipes.

Every conversion runs in its own subprocess (``python -m nailkit.tflite <worker> ...``: tensorflow/triton import
order, memory), with its output captured to a log file under ``outputs/`` and echoed as a tqdm progress line; wall time
and the child's peak RSS are recorded. Files are produced in a temporary directory and moved into place with
``os.replace``; the cache sidecar (``.json``) is written last, so a file under its final name is always complete.

Outputs are identified by shape and meaning (``identify_outputs``), never by position: the int8 file orders them
differently. Every artifact also carries the selection tensors ``enc_scores`` / ``topk_indices`` (see
``nailkit.parity.selection_aware_parity``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nailkit.checkpoint import atomic_write, file_sha256
from nailkit.model import DEFAULT_OUTPUT_DIR, OUTPUT_NAMES

ROUTES = ("onnx2tf", "litert")
PRECISIONS = ("fp32", "fp16", "int8")
EXTRA_PRECISIONS = ("full_int8",)  # route A only, slow, not in CI
ALL_OUTPUT_NAMES = tuple(OUTPUT_NAMES) + ("enc_scores", "topk_indices")
#: ONNX passes route A applies (only those shown to be needed), then the selection outputs are exposed.
from nailkit.onnx_passes import DEFAULT_PASSES as ROUTE_A_PASSES  # noqa: E402

ONNX2TF_KWARGS = {"output_signaturedefs": True, "replace_to_pseudo_operators": ["Erf"],
                  "tflite_backend": "tf_converter"}
CACHE_VERSION = 1
TFLITE_MAGIC = b"TFL3"


class ConversionError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# reading / identifying / running a .tflite
# ----------------------------------------------------------------------------------------------------------------

def check_tflite_file(path: str | os.PathLike[str]) -> Path:
    """Refuse anything that is not a complete TFLite flatbuffer (missing, truncated, wrong magic)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such .tflite file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
    if size < 64 or head[4:8] != TFLITE_MAGIC:
        raise ValueError(f"{p}: not a TFLite flatbuffer (expected the 'TFL3' identifier at bytes 4-8, "
                         f"got {head[4:8]!r}, {size} bytes); re-run the conversion (`python -m nailkit convert`)")
    return p


def identify_outputs(details: list[dict[str, Any]]) -> dict[str, int]:
    """Map canonical names → index into ``details`` (each has 'name', 'shape', 'dtype'), by shape and meaning.

    rank 4 → pred_masks; integer rank 2 → topk_indices; float rank 2 → enc_scores; rank 3 with last dim 4 →
    pred_boxes, the other rank-3 → pred_logits. When both rank-3 outputs end in 4 (3 classes + background) the
    signature names decide. Raises ValueError when the outputs cannot be told apart.
    """
    out: dict[str, int] = {}
    rank3: list[int] = []
    for i, d in enumerate(details):
        shape = tuple(int(s) for s in d["shape"])
        is_int = np.issubdtype(np.dtype(d["dtype"]), np.integer)
        if len(shape) == 4:
            key = "pred_masks"
        elif len(shape) == 2 and is_int:
            key = "topk_indices"
        elif len(shape) == 2:
            key = "enc_scores"
        elif len(shape) == 3 and not is_int:
            rank3.append(i)
            continue
        else:
            raise ValueError(f"output {d.get('name')!r} with shape {list(shape)} matches no known output")
        if key in out:
            raise ValueError(f"two outputs look like {key}: {details[out[key]].get('name')!r} and {d.get('name')!r}")
        out[key] = i
    if len(rank3) != 2:
        raise ValueError(f"expected two rank-3 outputs (boxes, logits), found {len(rank3)}")
    a, b = rank3
    la, lb = int(details[a]["shape"][-1]), int(details[b]["shape"][-1])
    if la == 4 and lb != 4:
        out["pred_boxes"], out["pred_logits"] = a, b
    elif lb == 4 and la != 4:
        out["pred_boxes"], out["pred_logits"] = b, a
    else:
        names = {i: str(details[i].get("name", "")) for i in (a, b)}
        boxes = [i for i in (a, b) if "box" in names[i]]
        if len(boxes) != 1:
            raise ValueError(f"cannot tell boxes from logits: both end in {la}, names {list(names.values())}")
        out["pred_boxes"] = boxes[0]
        out["pred_logits"] = b if boxes[0] == a else a
    return out


class _Runner:
    """Minimal ai_edge_litert runner (XNNPACK default delegate), outputs by canonical name."""

    def __init__(self, path: str | os.PathLike[str], num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = check_tflite_file(path)
        try:
            self.interp = Interpreter(model_path=str(self.path), num_threads=num_threads)
            self.interp.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{self.path}: LiteRT could not load this model ({exc})") from None
        self.inp = self.interp.get_input_details()
        if len(self.inp) != 1:
            raise ValueError(f"{self.path}: expected one input, found {len(self.inp)}")
        outs = self.interp.get_output_details()
        self.out_details = outs
        self.index = identify_outputs(outs)
        self.input_shape = tuple(int(s) for s in self.inp[0]["shape"])

    def __call__(self, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x_nhwc, dtype=np.float32)
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"{self.path}: input shape {list(x.shape)}, model expects {list(self.input_shape)}")
        self.interp.set_tensor(self.inp[0]["index"], x)
        self.interp.invoke()
        return {k: np.array(self.interp.get_tensor(self.out_details[i]["index"])) for k, i in self.index.items()}


def load_runner(path: str | os.PathLike[str], num_threads: int | None = None) -> _Runner:
    return _Runner(path, num_threads=num_threads)


def run_tflite(path: str | os.PathLike[str], x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    return _Runner(path)(x_nhwc)


# ----------------------------------------------------------------------------------------------------------------
# subprocess plumbing
# ----------------------------------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0  # Linux: KiB


def run_worker(args: list[str], log_path: Path, desc: str, timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m nailkit.tflite <args>`` with output tee'd to ``log_path`` and a tqdm line; returns the JSON
    the worker prints last (prefixed ``NAILKIT_RESULT``) plus ``wall_s``."""
    from tqdm.auto import tqdm

    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1"))
    cmd = [sys.executable, "-m", "nailkit.tflite", *args]
    t0 = time.time()
    result: dict[str, Any] | None = None
    tail: list[str] = []
    with open(log_path, "w") as log, tqdm(desc=desc, unit=" lines", leave=True) as bar:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(Path(__file__).resolve().parent.parent), errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith("NAILKIT_RESULT "):
                result = json.loads(line[len("NAILKIT_RESULT "):])
                continue
            tail = (tail + [line.rstrip()])[-20:]
            bar.update(1)
            short = line.strip().replace("\x1b", "")[:60]
            if short:
                bar.set_postfix_str(short, refresh=False)
            if time.time() - t0 > timeout:
                proc.kill()
                raise ConversionError(f"{desc}: timed out after {timeout:.0f} s; log: {log_path}")
        rc = proc.wait()
    wall = time.time() - t0
    if rc != 0 or result is None:
        raise ConversionError(f"{desc} failed (exit {rc}); last lines of {log_path}:\n" + "\n".join(tail[-8:]))
    result["wall_s"] = wall
    return result


def _emit(result: dict[str, Any]) -> None:
    result["peak_rss_mb"] = _peak_rss_mb()
    print("NAILKIT_RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# workers (run in the child process)
# ----------------------------------------------------------------------------------------------------------------

def _worker_route_a(onnx_path: str, work: str, precisions: str) -> None:
    """onnx2tf → SavedModel + fp32/fp16 .tflite under ``work/saved_model``; then int8 / full_int8 from it."""
    from nailkit._imports import import_tensorflow

    tf = import_tensorflow()
    from rfdetr.export._tflite.exporter import _interpreter_scripts_on_path, _numpy_allow_pickle

    import onnx2tf

    work_p = Path(work)
    t0 = time.time()
    print(f"onnx2tf {onnx2tf.__version__}, tensorflow {tf.__version__}: converting {onnx_path}", flush=True)
    with _numpy_allow_pickle(), _interpreter_scripts_on_path():
        onnx2tf.convert(input_onnx_file_path=onnx_path, output_folder_path=str(work_p / "saved_model"),
                        non_verbose=False, verbosity="info", **ONNX2TF_KWARGS)
    times = {"onnx2tf_s": time.time() - t0}
    stem = Path(onnx_path).stem
    files = {}
    for prec, token in (("fp32", "float32"), ("fp16", "float16")):
        src = work_p / "saved_model" / f"{stem}_{token}.tflite"
        if src.is_file():
            files[prec] = str(src)
    q_files, q_times = _quantize_saved_model(tf, work_p / "saved_model", precisions.split(","), work_p)
    files.update(q_files)
    times.update(q_times)
    _emit({"files": files, "times": times, "onnx2tf": onnx2tf.__version__, "tensorflow": tf.__version__})


def _worker_quantize_saved_model(saved_model: str, work: str, precisions: str) -> None:
    from nailkit._imports import import_tensorflow

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
        if prec not in ("int8", "full_int8"):
            continue
        t1 = time.time()
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


def _worker_route_b(checkpoint: str, resolution: str, work: str) -> None:
    """fp32 through litert_torch; fp16/int8 are made from it by ``_worker_quantize_litert``."""
    import torch

    from nailkit._imports import load_triton_first

    load_triton_first()
    import litert_torch

    from nailkit.model import export_module, load_model
    from nailkit.parity import selection_module

    work_p = Path(work)
    t0 = time.time()
    rf = load_model(checkpoint, trusted=False)
    module = selection_module(export_module(rf, int(resolution)))
    res = module.resolution

    class NHWC(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 3, 1, 2))

    wrapped = NHWC(module).eval()
    x = torch.zeros(1, res, res, 3)
    print(f"litert_torch.convert at {res} (torch.export → LiteRT) ...", flush=True)
    with torch.no_grad():
        edge = litert_torch.convert(wrapped, (x,))
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
        print(f"ai-edge-quantizer {prec}: {fp32}", flush=True)
        files[prec] = str(_quantize_litert(Path(fp32), prec, Path(work) / f"{prec}.tflite"))
        times[f"{prec}_s"] = time.time() - t1
    _emit({"files": files, "times": times, "ai_edge_quantizer": getattr(ai_edge_quantizer, "__version__", "0.10")})


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
    dst.write_bytes(bytes(res.quantized_model))
    return dst


def _worker_delegation(path: str) -> None:
    """Op histogram and exact XNNPACK coverage.

    After the XNNPACK delegate is applied, LiteRT appends one DELEGATE node per partition to the node list (the
    replaced nodes stay listed). Each partition's nodes are recovered by walking back from the DELEGATE node's outputs
    to its inputs. Why a node stayed on the default kernels: its op type is never delegated in this model (not in
    XNNPACK's operator set), or the type is delegated elsewhere and this instance is not (its tensor types — e.g.
    int32/int64/bool index math — or dynamic/unsupported parameters)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path)
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
# caching: ensure_onnx / ensure_tflite
# ----------------------------------------------------------------------------------------------------------------

def _ckpt_info(ckpt: Path) -> dict[str, Any]:
    """Resolution, class names and num_select recorded in the checkpoint (no model is built)."""
    from nailkit.checkpoint import args_of, inspect, load_checkpoint

    c = load_checkpoint(ckpt)
    rep = inspect(c)
    args = args_of(c)
    names = rep.class_names or args.get("class_names")
    return {"resolution": int(rep.resolution or 432), "class_names": list(names) if names else None,
            "num_select": int(args.get("num_select") or 200)}


def _resolution_of(ckpt: Path, resolution: int | None) -> int:
    return int(resolution) if resolution else _ckpt_info(ckpt)["resolution"]


def _key(ckpt_sha: str, **params: Any) -> tuple[str, dict[str, Any]]:
    d = {"checkpoint_sha256": ckpt_sha, "cache_version": CACHE_VERSION, **params}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16], d


def _sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".json")


def _cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return None
    if meta.get("key") != key or meta.get("bytes") != path.stat().st_size:
        return None
    return meta


def ensure_selection_onnx(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                          resolution: int | None = None, passes: tuple[str, ...] = ROUTE_A_PASSES,
                          rf: Any = None) -> tuple[Path, dict[str, Any]]:
    """The ONNX route A converts: exported model → ``passes`` → selection outputs exposed. Cached."""
    import onnx

    from nailkit import onnx_passes
    from nailkit.model import load_model, resolve_checkpoint

    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    res = _resolution_of(ckpt, resolution)
    sha = file_sha256(ckpt)
    h, key = _key(sha, stage="onnx_for_tflite", resolution=res, passes=list(passes), opset=17)
    path = out_dir / "tflite" / "onnx" / f"model_{res}_{h}.onnx"
    meta = _cached(path, key)
    if meta:
        return path, meta
    t0 = time.time()
    base = None
    try:
        from nailkit import onnx_export

        if hasattr(onnx_export, "ensure_onnx"):
            got = onnx_export.ensure_onnx(ckpt, out_dir, resolution=res)
            base = Path(got[0] if isinstance(got, tuple) else got)
    except Exception:  # noqa: BLE001 - fall back to a plain export below
        base = None
    if base is None:
        from nailkit.onnx_export import export_onnx

        rf = rf or load_model(ckpt)
        base = export_onnx(rf, out_dir / "tflite" / "onnx" / f"base_{res}_{sha[:12]}.onnx", resolution=res)
    model = onnx.load(str(base))
    model = onnx_passes.apply_passes(model, passes)
    model = onnx_passes.expose_selection(model)
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))
    meta = {"key": key, "bytes": path.stat().st_size, "source_onnx": str(base), "passes": list(passes),
            "seconds": time.time() - t0, "op_counts": onnx_passes.op_counts(model)}
    atomic_write(_sidecar(path), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return path, meta


def _calibration_npy(path: Path, resolution: int, n: int = 6) -> Path:
    from nailkit.data import sample_images
    from nailkit.preprocess import preprocess, to_nhwc

    xs = [to_nhwc(preprocess(p, resolution)[0])[0] for p in sample_images()[:n]]
    np.save(path, np.stack(xs).astype(np.float32))
    return path


def _artifact_dir(out_dir: Path, route: str, res: int, h: str) -> Path:
    return out_dir / "tflite" / f"{route}_{res}_{h}"


def ensure_tflite(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                  route: str = "onnx2tf", precision: str = "fp32", resolution: int | None = None, *,
                  also: tuple[str, ...] = (), force: bool = False, passes: tuple[str, ...] | None = None
                  ) -> tuple[Path, dict[str, Any]]:
    """Return ``(path, meta)`` of a verified-loadable .tflite, converting only when the cache misses.

    The cache key is ``file_sha256(checkpoint)`` + route + resolution + passes + converter settings; a sidecar
    ``<file>.tflite.json`` records it with the conversion's wall time, the child's peak RSS and the log path. Route A
    converts fp32 and fp16 together (onnx2tf writes both) plus any precision in ``also``, and keeps onnx2tf's
    SavedModel so that int8 / full_int8 asked for later are made from it without a second onnx2tf run. Route B
    converts fp32 with litert-torch; fp16/int8 are quantized from the cached fp32 file (``made_from`` in the meta).
    ``passes`` (route A) overrides ``ROUTE_A_PASSES`` — e.g. ``()`` to show what a pass is needed for.
    """
    from nailkit.model import resolve_checkpoint

    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    valid = PRECISIONS + (EXTRA_PRECISIONS if route == "onnx2tf" else ())
    for p in (precision, *also):
        if p not in valid:
            raise ValueError(f"route {route}: unknown precision {p!r}; expected one of {valid}")
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (expected an rfdetr .pth)")
    res = _resolution_of(ckpt, resolution)
    sha = file_sha256(ckpt)
    params: dict[str, Any] = {"route": route, "resolution": res, "selection_outputs": True}
    if route == "onnx2tf":
        passes = tuple(ROUTE_A_PASSES if passes is None else passes)
        params.update(passes=list(passes), onnx2tf_kwargs=ONNX2TF_KWARGS, input="NHWC")
    else:
        params.update(input="NHWC")
    h, key = _key(sha, **params)
    adir = _artifact_dir(out_dir, route, res, h)
    path = adir / f"model_{precision}.tflite"
    if not force:
        meta = _cached(path, key)
        if meta:
            return path, meta
    wanted = [precision, *[a for a in also if a != precision]]
    if route == "onnx2tf":
        wanted = list(dict.fromkeys(["fp32", "fp16", *wanted]))
    info = _ckpt_info(ckpt)
    adir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "logs" / f"convert_{route}_{res}_{h}_{'-'.join(wanted)}.log"
    with tempfile.TemporaryDirectory(prefix=".work-", dir=adir) as work:
        wp = Path(work)
        extra: dict[str, Any] = {}
        if route == "onnx2tf":
            onnx_path, onnx_meta = ensure_selection_onnx(ckpt, out_dir, res, passes=passes)
            extra["onnx"] = str(onnx_path)
            if "full_int8" in wanted:
                _calibration_npy(wp / "calib.npy", res)
            kept = adir / "saved_model"
            have = {p for p in ("fp32", "fp16") if _cached(adir / f"model_{p}.tflite", key)}
            if kept.is_dir() and have == {"fp32", "fp16"}:
                # fp32/fp16 are cached: make int8 / full_int8 from the kept SavedModel, no second onnx2tf run.
                wanted = [p for p in wanted if p not in have]
                extra["made_from"] = str(kept)
                result = run_worker(["quantize-saved-model", str(kept), str(wp), ",".join(wanted)], log_path,
                                    f"TFLiteConverter {'+'.join(wanted)}")
            else:
                src = wp / "model.onnx"  # onnx2tf names its files after the stem
                os.symlink(onnx_path.resolve(), src)
                result = run_worker(["route-a", str(src), str(wp), ",".join(wanted)], log_path,
                                    f"onnx2tf {res} {'+'.join(wanted)}")
                for f in (wp / "saved_model").glob("*.tflite"):
                    if str(f) not in result["files"].values():
                        f.unlink()
                if kept.exists():
                    shutil.rmtree(kept)
                os.replace(wp / "saved_model", kept)  # onnx2tf's SavedModel, for later quantization
                result["files"] = {k: str(kept / Path(v).name) if Path(v).parent.name == "saved_model" else v
                                   for k, v in result["files"].items()}
        else:
            quant = [p for p in wanted if p != "fp32"]
            if quant:  # quantize the cached fp32 file; convert it first when missing
                fp32_path, fp32_meta = ensure_tflite(ckpt, out_dir, route, "fp32", res)
                extra["fp32_conversion_wall_s"] = fp32_meta["conversion_wall_s"]
                extra["made_from"] = str(fp32_path)
                result = run_worker(["quantize-litert", str(fp32_path), str(wp), ",".join(quant)], log_path,
                                    f"ai-edge-quantizer {'+'.join(quant)}")
            else:
                result = run_worker(["route-b", str(ckpt), str(res), str(wp)], log_path,
                                    f"litert-torch {res} fp32")
        metas = {}
        for prec, f in result["files"].items():
            dst = adir / f"model_{prec}.tflite"
            check_tflite_file(f)
            os.replace(f, dst)
            meta = {"key": key, "bytes": dst.stat().st_size, "route": route, "precision": prec, "resolution": res,
                    "class_names": info["class_names"], "num_select": info["num_select"], "input": "NHWC float32",
                    "outputs": list(ALL_OUTPUT_NAMES),
                    "checkpoint": str(ckpt), "checkpoint_sha256": sha, "log": str(log_path),
                    "conversion_wall_s": result["wall_s"], "conversion_peak_rss_mb": result["peak_rss_mb"],
                    "times": result.get("times", {}),
                    "versions": {k: result[k] for k in ("onnx2tf", "tensorflow", "litert_torch", "torch",
                                                       "ai_edge_quantizer") if k in result},
                    "converted_together": sorted(result["files"]), **extra}
            atomic_write(_sidecar(dst), lambda tmp, m=meta: tmp.write_text(json.dumps(m, indent=1)))
            metas[prec] = meta
    if precision not in metas:
        raise ConversionError(f"route {route}: the conversion wrote no {precision} file (got {sorted(metas)}); "
                              f"see {log_path}")
    return path, metas[precision]


def convert_onnx_file(onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      precisions: tuple[str, ...] = ("fp32",), log_path: str | os.PathLike[str] | None = None
                      ) -> dict[str, Path]:
    """Route A on an arbitrary ONNX file (no passes, no cache): ``{precision: path}`` under ``out_dir``.
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
    """Op histogram and XNNPACK coverage of a .tflite (measured in a subprocess; cached next to the file)."""
    p = check_tflite_file(path)
    side = p.with_suffix(".delegation.json")
    if side.is_file() and side.stat().st_mtime >= p.stat().st_mtime:
        return json.loads(side.read_text())
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    rep = run_worker(["delegation", str(p)], out_dir / "logs" / f"delegation_{p.parent.name}_{p.stem}.log",
                     f"delegation {p.name}")
    rep.pop("wall_s", None)
    rep.pop("peak_rss_mb", None)
    atomic_write(side, lambda tmp: tmp.write_text(json.dumps(rep, indent=1)))
    return rep


# ----------------------------------------------------------------------------------------------------------------
# parity of one artifact on data/ images
# ----------------------------------------------------------------------------------------------------------------

#: Below these absolute errors a metric is negligible; used as the floor of the control ratio.
RATIO_FLOORS = {"pre_topk_max_abs": 1e-5, "logits_qm_mean": 1e-4, "boxes_qm_mean": 1e-3, "masks_qm_mean": 1e-3}
GATES = {"pre_topk_max_abs": 1e-4, "forced_max_abs": 1e-3, "forced_mask_iou": 0.999, "control_ratio": 1.5,
         "tie_eps": 1e-4}


def reference_outputs(module: Any, images: list[Path], resolution: int) -> list[dict[str, Any]]:
    """PyTorch export-mode outputs (+ selection tensors) for each image: list of {x, size, ref}."""
    from nailkit.parity import run_torch_with_selection
    from nailkit.preprocess import preprocess

    rows = []
    for img in images:
        x, size = preprocess(img, resolution)
        rows.append({"image": Path(img).name, "x": x, "size": size, "ref": run_torch_with_selection(module, x)})
    return rows


def artifact_parity(path: str | os.PathLike[str], module: Any, refs: list[dict[str, Any]], precision: str = "fp32",
                    controls: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Parity of one .tflite against the PyTorch references (``reference_outputs``).

    Returns per-image rows and an aggregate: worst pre-TopK max-abs, worst forced max-abs / mask IoU, unforced
    top-10 agreement where no tie, and for fp16/int8 the error relative to the rounding control
    (``controls[precision]`` = the control's outputs per image, from ``reference_outputs(rounding_control(...))``).
    """
    from nailkit.parity import error_summary, selection_aware_parity
    from nailkit.preprocess import to_nhwc

    runner = load_runner(path)
    rows = []
    for i, r in enumerate(refs):
        be = runner(to_nhwc(r["x"]))
        row = selection_aware_parity(module, r["x"], r["ref"], be, r["size"])
        row["image"] = r["image"]
        row["error"] = error_summary(r["ref"], be)
        if controls and precision in controls:
            row["control_error"] = error_summary(r["ref"], controls[precision][i]["ref"])
        rows.append(row)
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
        agg["control_ratio"] = {k: (agg["error"][k] + RATIO_FLOORS.get(k, 1e-6))
                                / (agg["control_error"][k] + RATIO_FLOORS.get(k, 1e-6)) for k in keys}
        agg["control_ratio_max"] = max(agg["control_ratio"].values())
    return {"rows": rows, "aggregate": agg}


def gate_failures(precision: str, agg: dict[str, Any], gates: dict[str, float] = GATES) -> list[str]:
    """The gates of issue 4 that ``agg`` (``artifact_parity(...)['aggregate']``) fails, as readable strings."""
    fails = []
    if precision == "fp32":
        if agg["pre_topk_max_abs"] > gates["pre_topk_max_abs"]:
            fails.append(f"pre-TopK max-abs {agg['pre_topk_max_abs']:.2e} > {gates['pre_topk_max_abs']:.0e}")
        if agg["forced_max_abs"] > gates["forced_max_abs"]:
            fails.append(f"forced max-abs {agg['forced_max_abs']:.2e} > {gates['forced_max_abs']:.0e}")
        if agg["forced_min_mask_iou"] < gates["forced_mask_iou"]:
            fails.append(f"forced mask IoU {agg['forced_min_mask_iou']:.4f} < {gates['forced_mask_iou']}")
        if not agg["unforced_agree_untied"]:
            fails.append("unforced top-10 detections disagree on an image without a tie at the boundary")
    elif "control_ratio_max" in agg and agg["control_ratio_max"] > gates["control_ratio"]:
        fails.append(f"converter error {agg['control_ratio_max']:.2f}x the rounding control's "
                     f"(> {gates['control_ratio']}x): {agg['control_ratio']}")
    return fails


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def cli_convert(args) -> int:
    """checkpoint → ONNX → TFLite for each precision; verify each artifact; exit 1 when a gate fails."""
    import copy

    from nailkit.data import sample_images
    from nailkit.model import export_module, load_model, resolve_checkpoint
    from nailkit.parity import rounding_control

    out_dir = Path(args.out)
    ckpt = resolve_checkpoint(args.checkpoint, out_dir)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (expected an rfdetr .pth)")
    precisions = list(args.precision)
    for p in precisions:
        if p not in PRECISIONS + (EXTRA_PRECISIONS if args.route == "onnx2tf" else ()):
            raise ValueError(f"--precision {p}: expected a comma list of {PRECISIONS}")
    rf = load_model(ckpt, trusted=getattr(args, "trusted", False))
    module = export_module(rf, args.resolution)
    res = module.resolution
    images = sample_images()
    refs = reference_outputs(module, images, res)
    failed = False
    for prec in precisions:
        path, meta = ensure_tflite(ckpt, out_dir, args.route, prec, res, also=tuple(precisions))
        controls = None
        if prec != "fp32":
            controls = {prec: reference_outputs(rounding_control(copy.deepcopy(module), prec), images, res)}
        par = artifact_parity(path, module, refs, prec, controls)
        fails = gate_failures(prec, par["aggregate"])
        a = par["aggregate"]
        line = (f"{args.route} {prec}: {path} ({meta['bytes'] / 1e6:.1f} MB, converted in "
                f"{meta['conversion_wall_s']:.0f} s, peak RSS {meta['conversion_peak_rss_mb']:.0f} MB) "
                f"pre-TopK {a['pre_topk_max_abs']:.1e}, forced {a['forced_max_abs']:.1e}")
        if "control_ratio_max" in a:
            line += f", vs rounding control {a['control_ratio_max']:.2f}x"
        print(line + (" — FAIL: " + "; ".join(fails) if fails else " — ok"))
        failed |= bool(fails)
    return 1 if failed else 0


def _main(argv: list[str]) -> None:
    cmd, rest = argv[0], argv[1:]
    if cmd == "route-a":
        _worker_route_a(*rest)
    elif cmd == "route-b":
        _worker_route_b(*rest)
    elif cmd == "quantize-saved-model":
        _worker_quantize_saved_model(*rest)
    elif cmd == "quantize-litert":
        _worker_quantize_litert(*rest)
    elif cmd == "delegation":
        _worker_delegation(*rest)
    else:
        raise SystemExit(f"unknown worker {cmd!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])


# ----------------------------------------------------------------------------------------------------------------
# tables and plots for notebook 04
# ----------------------------------------------------------------------------------------------------------------

def parity_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per artifact from ``{label: {'precision', 'meta', 'parity', 'delegation'}}``."""
    rows = []
    for label, r in results.items():
        a = r["parity"]["aggregate"]
        rows.append({
            "artifact": label, "MB": r["meta"]["bytes"] / 1e6,
            "pre-TopK max-abs": a["pre_topk_max_abs"],
            "same selection": f"{a['selection_same']}/{a['images']}",
            "same order": f"{a['selection_order_same']}/{a['images']}",
            "forced max-abs": a["forced_max_abs"], "forced mask IoU": a["forced_min_mask_iou"],
            "unforced top-10 agree": f"{a['unforced_agree']}/{a['images']} ({a['ties']} tied)",
            "control ratio": a.get("control_ratio_max", float("nan")),
            "convert s": r["meta"]["conversion_wall_s"], "peak RSS MB": r["meta"]["conversion_peak_rss_mb"],
            "XNNPACK": (f"{r['delegation']['xnnpack_nodes']}/{r['delegation']['xnnpack_total']} in "
                        f"{r['delegation']['xnnpack_partitions']}") if r.get("delegation") else "",
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_error_vs_control(ax, results: dict[str, dict[str, Any]], metric: str = "pre_topk_max_abs") -> None:
    """Bar per artifact: its error vs PyTorch fp32, next to its rounding control's (log scale)."""
    labels = list(results)
    err = [results[k]["parity"]["aggregate"]["error"][metric] for k in labels]
    ctl = [results[k]["parity"]["aggregate"].get("control_error", {}).get(metric, np.nan) for k in labels]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, err, 0.4, label="artifact vs PyTorch fp32")
    ax.bar(x + 0.2, ctl, 0.4, label="PyTorch rounding control vs fp32")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)


def plot_delegation(ax, results: dict[str, dict[str, Any]]) -> None:
    """Delegated fraction per artifact, annotated with the partition count."""
    labels = [k for k in results if results[k].get("delegation")]
    frac = [results[k]["delegation"]["xnnpack_fraction"] * 100 for k in labels]
    parts = [results[k]["delegation"]["xnnpack_partitions"] for k in labels]
    bars = ax.bar(labels, frac, color="tab:green")
    for b, p in zip(bars, parts):
        ax.annotate(f"{p} part.", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.axhline(99, ls="--", color="gray", lw=1)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of ops on XNNPACK")
    ax.tick_params(axis="x", rotation=30)
