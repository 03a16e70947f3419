"""Static, selective int8 for the litert-route .tflite, through ai-edge-quantizer.

Upstream rf-detr refuses static int8 ("transformer activations are not expected to survive"); the DETR-family
experience is that it survives when the *decoder* stays in float. ai-edge-quantizer selects ops by a regex over the
op's output tensor names, and litert-torch names every tensor after the PyTorch module path it came from
(``…/rfdetr.models.backbone.Joiner_backbone/…``, ``…Transformer_transformer/…``, ``…segmentation_head…``), so a
recipe can say "int8 for the backbone's linears and convs, float for everything else".

Recipes (``RECIPES``; ``build_recipe(name)``):

* ``backbone_w8a8``: FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D inside the backbone (DINOv2 + the projector) at
  STATIC_WI8_AI8 (attention BATCH_MATMULs stay float: XNNPACK does not take them at int8); the decoder, the heads, every LayerNorm (MEAN/SQUARED_DIFFERENCE/RSQRT), softmax and
  the deformable sampling stay float (no config → float).
* ``backbone_w8a16``: the same ops at STATIC_WI8_AI16 (int16 activations).
* ``snr_guided``: ``backbone_w8a8`` minus the layers whose per-layer SNR (``layer_snr`` of a ``backbone_w8a8``
  validation) falls below ``snr_db``; built by ``snr_guided_recipe(report, snr_db)``.
* ``full_int8``: every supported op at STATIC_WI8_AI8 (the configuration that fails at run time; kept to diagnose).

Calibration data: ``calibration_inputs(dataset_dir, n)`` picks ``n`` images of a COCO split folder (Roboflow layout:
``_annotations.coco.json`` + images), deterministically, and preprocesses each with ``nailkit.portable.preprocess.preprocess``
(the exact ``predict()`` preprocessing), as NHWC float32 [1, R, R, 3] — the litert file's input layout.

This module imports ai_edge_quantizer / ai_edge_litert only (no tensorflow, no torch).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from nailkit.core import subproc
from nailkit.portable.io_contract import make_interpreter
from nailkit.portable.preprocess import preprocess, to_nhwc
from nailkit.tflite.flatbuffer import pack_model, read_bytes, schema, unpack
from nailkit.tflite.passes import inline_buffers

#: Tensor-name scopes (regexes over the op's output tensor name, as litert-torch writes them).
BACKBONE_SCOPE = r".*Joiner_backbone.*"
DECODER_SCOPE = r".*Transformer_transformer.*"
SEG_HEAD_SCOPE = r".*segmentation_head.*"

#: The op types a backbone recipe quantises (its linears and convs; everything else stays float). Not BATCH_MATMUL:
#: measured on the demo model, the DINOv2 attention matmuls (two activation inputs) quantised to int8 are *not* taken
#: by XNNPACK (22 of 24 fell back to the reference kernels and cut the delegated region into 35 partitions).
MATMUL_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")

RECIPES = ("backbone_w8a8", "backbone_w8a16", "snr_guided", "full_int8")


@dataclass
class QuantizeResult:
    recipe: str
    path: str
    size_bytes: int
    fp32_size_bytes: int
    seconds: float
    num_calibration: int
    quantized_ops: dict[str, int] = field(default_factory=dict)  # op type → count carrying int8/int16 tensors

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# calibration data
# ----------------------------------------------------------------------------------------------------------------

def split_images(split_dir: str | Path) -> list[Path]:
    """The images of a COCO split folder (Roboflow layout), in the annotation file's order."""
    d = Path(split_dir)
    ann = d / "_annotations.coco.json"
    if not ann.is_file():
        raise FileNotFoundError(f"{d}: no _annotations.coco.json (expected a Roboflow COCO split folder, e.g. "
                                f"<dataset>/train)")
    images = json.loads(ann.read_text()).get("images", [])
    paths = [d / im["file_name"] for im in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: {len(missing)} images listed in _annotations.coco.json are missing "
                                f"(e.g. {missing[0].name})")
    if not paths:
        raise ValueError(f"{ann}: lists no images")
    return paths


def calibration_images(split_dir: str | Path, n: int = 16, seed: int = 0) -> list[Path]:
    """``n`` images of the split, drawn without replacement with a fixed seed (all of them when fewer)."""
    paths = split_images(split_dir)
    if n >= len(paths):
        return paths
    idx = np.sort(np.random.default_rng(seed).choice(len(paths), size=int(n), replace=False))
    return [paths[i] for i in idx]


def calibration_inputs(split_dir: str | Path, resolution: int, n: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Preprocessed calibration inputs, NHWC float32 [1, R, R, 3], exactly as ``predict()`` preprocesses."""
    return [np.ascontiguousarray(to_nhwc(preprocess(p, resolution)[0]), dtype=np.float32)
            for p in calibration_images(split_dir, n, seed)]


def signature_data(model_path: str | Path, inputs: Iterable[np.ndarray]) -> dict[str, list[dict[str, np.ndarray]]]:
    """ai-edge-quantizer's calibration/test data format: ``{signature: [{input_name: array}, ...]}``."""
    interp = make_interpreter(model_path)
    sigs = interp.get_signature_list()
    if len(sigs) != 1:
        raise ValueError(f"{model_path}: expected one signature, found {list(sigs)}")
    key, sig = next(iter(sigs.items()))
    if len(sig["inputs"]) != 1:
        raise ValueError(f"{model_path}: expected one input, found {sig['inputs']}")
    name = sig["inputs"][0]
    return {key: [{name: x} for x in inputs]}


# ----------------------------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------------------------

def _op(name: str):
    from ai_edge_quantizer.qtyping import TFLOperationName

    return getattr(TFLOperationName, name)


def _manager(entries: Sequence[tuple[str, str, int]]):
    """RecipeManager from (regex, op name, activation bits) entries: int8 channel-wise weights, min/max ranges."""
    from ai_edge_quantizer import recipe_manager

    rm = recipe_manager.RecipeManager()
    for regex, op, abits in entries:
        rm.add_static_config(regex=regex, operation_name=_op(op), activation_num_bits=abits, weight_num_bits=8)
    return rm


def _escape(name: str) -> str:
    return re.escape(name)


def build_recipe(name: str, *, exclude_tensors: Iterable[str] = (), ops: Sequence[str] = MATMUL_OPS,
                 scope: str = BACKBONE_SCOPE) -> list[dict[str, Any]]:
    """The named recipe as ai-edge-quantizer's list of configs (JSON-able).

    ``exclude_tensors``: output tensor names of single-output ops to keep in float (``snr_guided``); implemented as
    an anchored negative lookahead in front of the scope regex.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {list(RECIPES)}")
    if name == "full_int8":
        from ai_edge_quantizer import recipe

        return recipe.static_wi8_ai8()
    abits = 16 if name == "backbone_w8a16" else 8
    excl = list(exclude_tensors)
    regex = scope
    if excl:
        # ai-edge-quantizer re.search()es the op scope "<output names joined by ;>;" — anchor the lookahead.
        regex = "^(?!(?:" + "|".join(_escape(t) + ";" for t in excl) + ")$)" + scope
    return _manager([(regex, op, abits) for op in ops]).get_quantization_recipe()


# ----------------------------------------------------------------------------------------------------------------
# quantise, validate
# ----------------------------------------------------------------------------------------------------------------

def _quantized_op_counts(model: bytes) -> dict[str, int]:
    interp = make_interpreter(model)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    out: dict[str, int] = {}
    for o in interp._get_ops_details():
        ts = [tensors[i] for i in list(o["inputs"]) + list(o["outputs"]) if i >= 0 and i in tensors]
        if any(np.dtype(t["dtype"]) in (np.int8, np.int16) for t in ts):
            out[o["op_name"]] = out.get(o["op_name"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def make_quantizer(fp32_path: str | Path, recipe: Any):
    from ai_edge_quantizer import quantizer

    return quantizer.Quantizer(str(fp32_path), recipe)


def calibrate(fp32_path: str | Path, recipe_name: str, calibration: Sequence[np.ndarray], *, recipe: Any = None,
              num_threads: int = 2) -> dict[str, Any]:
    """Calibration statistics (per-tensor min/max) for the tensors the recipe quantises.

    The statistics do not depend on the bit width, so one calibration with ``backbone_w8a8`` serves
    ``backbone_w8a16`` (and any ``snr_guided`` subset of it) through ``quantize_tflite(calibration_result=...)``.
    Calibration keeps every tensor of a forward pass alive (about 9 GB RSS for the 432² model)."""
    rcp = recipe if recipe is not None else build_recipe(recipe_name)
    qt = make_quantizer(fp32_path, rcp)
    if not calibration:
        raise ValueError(f"recipe {recipe_name!r} needs calibration data")
    calib = qt.calibrate(signature_data(fp32_path, calibration), num_threads=num_threads)
    if not calib:
        raise ValueError(f"recipe {recipe_name!r} selects no op of {fp32_path} (no tensor to calibrate): "
                         f"check its scope regexes against the file's tensor names")
    return calib


def quantize_tflite(fp32_path: str | Path, recipe_name: str, calibration: Sequence[np.ndarray], dst: str | Path, *,
                    recipe: Any = None, return_quantizer: bool = False, num_threads: int = 2,
                    calibration_result: dict[str, Any] | None = None):
    """Quantise ``fp32_path`` with the named recipe (or an explicit ``recipe``), calibrated on ``calibration``
    (NHWC inputs) or with a ``calibration_result`` of ``calibrate``; write ``dst`` (atomically). Returns
    ``QuantizeResult`` (and the Quantizer when asked, for ``validate``)."""
    t0 = time.time()
    rcp = recipe if recipe is not None else build_recipe(recipe_name)
    qt = make_quantizer(fp32_path, rcp)
    calib = None
    if qt.need_calibration and calibration_result is not None:
        calib = calibration_result
    elif qt.need_calibration:
        calib = calibrate(fp32_path, recipe_name, calibration, recipe=rcp, num_threads=num_threads)
    res = qt.quantize(calib, enable_progress_report=False)

    data = inline_buffers(bytes(res.quantized_model))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dst)
    out = QuantizeResult(recipe=recipe_name, path=str(dst), size_bytes=len(data),
                         fp32_size_bytes=Path(fp32_path).stat().st_size, seconds=time.time() - t0,
                         num_calibration=len(calibration), quantized_ops=_quantized_op_counts(data))
    return (out, qt) if return_quantizer else out


def layer_snr(qt: Any, fp32_path: str | Path, test_inputs: Sequence[np.ndarray], num_threads: int = 2
              ) -> list[dict[str, Any]]:
    """Per-tensor SNR and MSE of the quantised model against the float one (ai-edge-quantizer ``validate``), lowest
    SNR first. Each row: tensor name, ``snr`` (ai-edge-quantizer's power ratio mean(x²)/mse), ``snr_db``
    (10·log10 of it), ``mse``. The error is accumulated: a tensor's SNR includes every quantised layer upstream."""
    from ai_edge_quantizer.utils.validation_utils import ValidationErrorMetric

    res = qt.validate(signature_data(fp32_path, test_inputs), error_metrics=[ValidationErrorMetric.SNR,
                                                                             ValidationErrorMetric.MSE],
                      num_threads=num_threads)
    rows = []
    for name, metrics in res.get_all_tensor_results().items():
        row = {"tensor": name, **{str(k).lower(): float(v) for k, v in dict(metrics).items()}}
        if "snr" in row:  # ai-edge-quantizer's SNR is a power ratio (mean(x²) / mse), not dB
            row["snr_db"] = float(10.0 * np.log10(max(row["snr"], 1e-30)))
        rows.append(row)
    rows.sort(key=lambda r: r.get("snr", float("inf")))
    return rows


def snr_guided_recipe(snr_rows: Sequence[dict[str, Any]], snr_db: float = 20.0, quantized_tensors: Iterable[str] = ()
                      ) -> tuple[list[dict[str, Any]], list[str]]:
    """``backbone_w8a8`` minus the quantised layers whose output SNR is below ``snr_db``.

    ``snr_rows``: ``layer_snr`` of a ``backbone_w8a8`` model; ``quantized_tensors``: the output tensor names of the
    ops that recipe quantised (only those can be excluded). Returns (recipe, excluded tensor names).
    """
    qset = set(quantized_tensors)

    def db(r: dict[str, Any]) -> float:
        if "snr_db" in r:
            return float(r["snr_db"])
        return float(10.0 * np.log10(max(r["snr"], 1e-30))) if "snr" in r else float("inf")

    low = [r["tensor"] for r in snr_rows if db(r) < snr_db and (not qset or r["tensor"] in qset)]
    return build_recipe("snr_guided", exclude_tensors=low), low


def quantized_output_tensors(model_path: str | Path, ops: Sequence[str] = MATMUL_OPS) -> list[str]:
    """Output tensor names of the ops of ``ops`` types that carry int8/int16 weights in a quantised model."""
    interp = make_interpreter(model_path)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    names = []
    for o in interp._get_ops_details():
        if o["op_name"] not in ops:
            continue
        ins = [tensors[i] for i in o["inputs"] if i >= 0 and i in tensors]
        if any(np.dtype(t["dtype"]) in (np.int8, np.int16) for t in ins):
            names.extend(tensors[i]["name"] for i in o["outputs"] if i in tensors)
    return names


def run_once(model_path: str | Path, x_nhwc: np.ndarray, num_threads: int = 1) -> dict[str, np.ndarray]:
    """Invoke a .tflite once (XNNPACK) and return its outputs by tensor name; raises what LiteRT raises (e.g. the
    full-int8 DIV failure)."""
    interp = make_interpreter(model_path, num_threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], np.asarray(x_nhwc, dtype=inp["dtype"]))
    interp.invoke()
    return {d["name"]: np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()}


# ----------------------------------------------------------------------------------------------------------------
# why a full-integer file fails at run time: an int8 DIV whose divisor quantises to zero
# ----------------------------------------------------------------------------------------------------------------

#: The check that fails. ai-edge-litert 2.3's ``tflite/kernels/div.cc`` evaluates int8/uint8/int16 DIV, but first
#: refuses a divisor with any element equal to its zero point (a divisor that *quantises to 0.0*), at line 262:
#: "div.cc:262 data[i] != zero_point was not true. Node number N (DIV) failed to invoke". Prepare passes, so the file
#: loads and allocates; the check runs on every invoke, on the divisor's quantised values. A per-tensor int8 divisor
#: with range [lo, hi] maps every |value| < scale/2 (scale ≈ (hi - lo)/255) to the zero point: a wide-range constant
#: such as the sine embedding's ``dim_t = 10000 ** (2 i / d)`` (1 … ~8700 → scale ≈ 34, so every dim_t < 17 becomes
#: 0) or a run-time divisor whose small values fall inside that band.
DIV_ZERO_CHECK = "div.cc:262 data[i] != zero_point"


def _tensor_type_names() -> dict[int, str]:
    fb = schema()
    return {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_") and isinstance(v, int)}


def quantized_divisions(model_path: str | Path) -> list[dict[str, Any]]:
    """Every quantised (int8/uint8/int16) DIV of ``model_path``, read from its flatbuffer (subgraph 0; ``node`` is the
    operator index, LiteRT's node number before delegation), with what decides ``DIV_ZERO_CHECK``.

    Each row: node, output type, the dividend's and the divisor's name / type / shape / scale / zero point, and for
    the divisor: ``zero_band`` (real values in (-scale/2, scale/2) quantise to the zero point), and when it is a
    constant, ``elements_at_zero_point`` (> 0: this node fails on every invoke) and its dequantised min/max."""
    fb = schema()
    model = unpack(read_bytes(model_path))
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}
    tnames = _tensor_type_names()
    sg = model.subgraphs[0]
    np_types = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16}

    def describe(i: int) -> dict[str, Any]:
        t = sg.tensors[i]
        q = t.quantization
        name = t.name.decode() if isinstance(t.name, bytes) else (t.name or "")
        row: dict[str, Any] = {
            "tensor": i, "name": name, "type": tnames.get(t.type, str(t.type)),
            "shape": [int(d) for d in (t.shape if t.shape is not None else [])],
            "scale": [float(v) for v in (q.scale if q is not None and q.scale is not None else [])],
            "zero_point": [int(v) for v in (q.zeroPoint if q is not None and q.zeroPoint is not None else [])]}
        buf = model.buffers[t.buffer] if t.buffer is not None and t.buffer < len(model.buffers) else None
        row["constant"] = bool(buf is not None and buf.data is not None and len(buf.data) > 0)
        if row["scale"]:
            row["zero_band"] = [-row["scale"][0] / 2, row["scale"][0] / 2]
        if row["constant"] and row["type"] in np_types and row["zero_point"]:
            vals = np.frombuffer(bytes(buf.data), dtype=np_types[row["type"]]).astype(np.int64)
            zp, sc = row["zero_point"][0], row["scale"][0]
            row["elements_at_zero_point"] = int((vals == zp).sum())
            row["elements"] = int(vals.size)
            row["dequantized_min"], row["dequantized_max"] = float((vals.min() - zp) * sc), float((vals.max() - zp) * sc)
        return row

    out = []
    for idx, op in enumerate(sg.operators):
        code = model.operatorCodes[op.opcodeIndex]
        if names.get(max(int(code.builtinCode), int(code.deprecatedBuiltinCode))) != "DIV":
            continue
        y = describe(op.outputs[0])
        if y["type"] not in np_types:
            continue
        a, b = (describe(i) for i in op.inputs[:2])
        out.append({"node": idx, "output_type": y["type"], "dividend": a, "divisor": b, "output": y,
                    "fails_on_every_invoke": bool(b.get("elements_at_zero_point", 0))})
    return out


def quantizes_to_zero_point(values: Any, scale: float, zero_point: int, dtype: str = "int8") -> np.ndarray:
    """Which of ``values`` (real numbers) land on ``zero_point`` when quantised with ``scale`` (round to nearest,
    clamped to the type's range) — the divisor elements ``DIV_ZERO_CHECK`` refuses."""
    info = np.iinfo(np.dtype(dtype))
    q = np.clip(np.round(np.asarray(values, np.float64) / float(scale)) + int(zero_point), info.min, info.max)
    return q == int(zero_point)


def one_div_tflite(dtype: str = "int8", divisor_raw: Sequence[int] | None = None,
                   divisor_zero_point: int | None = None, scale: float = 0.05) -> bytes:
    """A one-operator .tflite, ``y = x [1,4] / divisor [4]`` (constant divisor), every tensor of ``dtype`` (int8 /
    uint8 at ``scale``, or float32): the smallest file that shows ``DIV_ZERO_CHECK``. ``divisor_raw`` are the
    divisor's stored integers (default 1, 2, 4, 0.5 at scale 0.05), ``divisor_zero_point`` its zero point."""
    fb = schema()
    ttype = {"int8": fb.TensorType.INT8, "uint8": fb.TensorType.UINT8, "float32": fb.TensorType.FLOAT32}[dtype]
    zp = 128 if dtype == "uint8" else 0
    divisor = {"float32": np.array([1.0, 2.0, 4.0, 0.5], np.float32), "int8": np.array([20, 40, 80, 10], np.int8),
               "uint8": np.array([148, 168, 208, 138], np.uint8)}[dtype]
    if divisor_raw is not None:
        divisor = np.asarray(divisor_raw, dtype=divisor.dtype)
    buffers = [fb.BufferT(), fb.BufferT()]
    b = fb.BufferT()
    b.data = np.frombuffer(divisor.tobytes(), dtype=np.uint8)
    buffers += [b, fb.BufferT()]

    def tensor(name: str, shape: tuple[int, ...], buf: int, z: int = zp):
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), ttype, buf
        if dtype != "float32":
            q = fb.QuantizationParametersT()
            q.scale, q.zeroPoint = [float(scale)], [int(z)]
            t.quantization = q
        return t

    dz = zp if divisor_zero_point is None else int(divisor_zero_point)
    tensors = [tensor("x", (1, 4), 1), tensor("divisor", (4,), 2, dz), tensor("y", (1, 4), 3)]
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType = fb.BuiltinOptions.DivOptions
    op.builtinOptions = fb.DivOptionsT()
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.DIV
    code.version = 1 if dtype == "float32" else 2
    sg = fb.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [0], [2], [op], "main"
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sg], buffers
    return pack_model(model)


def invoke_error(model_path: str | Path, x: np.ndarray | None = None) -> str | None:
    """The error LiteRT raises when ``model_path`` is invoked on ``x`` (zeros of the input's shape by default), or
    None when it runs (1 thread, default delegates)."""
    try:
        interp = make_interpreter(model_path, 1)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        interp.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]) if x is None
                          else np.asarray(x, dtype=inp["dtype"]))
        interp.invoke()
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return None


def diagnose_full_int8(fp32_path: str | Path, calibration: Sequence[np.ndarray], dst: str | Path) -> dict[str, Any]:
    """Quantise ``fp32_path`` with the ``full_int8`` recipe, invoke it on the first calibration input, and name the
    node that fails: ``{"error", "node", "division" (its ``quantized_divisions`` row, when a DIV), "divisions" (all of
    them), "quantized_ops", "seconds"}``. Needs ~9 GB RSS for the 432 model (``diagnose_full_int8_in_child``)."""
    t0 = time.time()
    res = quantize_tflite(fp32_path, "full_int8", calibration, dst)
    err = invoke_error(dst, calibration[0])
    divs = quantized_divisions(dst)
    m = re.search(r"Node number (\d+) \((\w+)\) failed to invoke", err or "")
    node = int(m.group(1)) if m else None
    return {"error": err, "node": node, "op": m.group(2) if m else None,
            "division": next((d for d in divs if d["node"] == node), None), "divisions": divs,
            "quantized_ops": res.quantized_ops, "size_bytes": res.size_bytes, "seconds": time.time() - t0}


def diagnose_full_int8_in_child(fp32_path: str | Path, calibration: np.ndarray, work: str | Path,
                                log_path: str | Path | None = None, timeout: float = 1800.0) -> dict[str, Any]:
    """``diagnose_full_int8`` in a child process (its memory is returned to the system when it ends);
    ``calibration`` is an NHWC batch [n, R, R, 3]."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", np.asarray(calibration, np.float32))
    return subproc.run_python(["-m", "nailkit.tflite.quantize", "diagnose-full-int8", str(fp32_path), str(work / "calib.npy"),
                               str(work / "full_int8.tflite")], desc="full-int8 diagnosis", timeout=timeout,
                              log_path=Path(log_path) if log_path else work / "diagnose_full_int8.log")


def _main(argv: Sequence[str]) -> None:
    if argv[0] == "diagnose-full-int8":
        calib = np.load(argv[2])
        subproc.emit(diagnose_full_int8(argv[1], [calib[i:i + 1] for i in range(len(calib))], argv[3]))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
