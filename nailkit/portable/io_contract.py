"""The model-I/O contract: what a converted model takes and returns, and the one way to run a ``.tflite``.

numpy-only (``ai_edge_litert`` is imported only when a ``.tflite`` is opened). It ships in the mobile bundle beside
``preprocess.py`` and ``postprocess.py``, so the parity gates (``nailkit.tflite.gate``), inference (``nailkit.runtime.runners``)
and the bundle (``run_bundle.py``) run the same code.

* ``identify_outputs(details)``: canonical meaning → index, by **shape and meaning, never position**. rank 4 →
  ``pred_masks`` (``[1,Q,h,w]`` or the NHWC ``[1,h,w,Q]``); integer rank 2 → ``topk_indices``; float rank 2 →
  ``enc_scores``; the two rank 3 → the one ending in 4 is ``pred_boxes``, the other ``pred_logits``. When both end
  in 4 (3 classes + no-object) the output **names** decide (``box`` / ``logit``); otherwise it is an error, never
  a guess.
* ``mask_layout(shape, q)``: ``"NQHW"`` or ``"NHWQ"``; ``input_layout(shape)``: ``(layout, resolution)``.
* ``quantize(x, detail)`` / ``dequantize(a, detail)``: with the tensor's own scale and zero-point.
* ``TFLiteModel(path, threads=None, use_xnnpack=True)``: the one TFLite runner. ``model.run(x)`` takes the model's
  native input (float32, its own layout) and returns ``{meaning: array}`` with a batch axis, dequantised, masks as
  ``[1,Q,h,w]``. ``model.describe()`` is the input/outputs part of the bundle's model card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

TFLITE_MAGIC = b"TFL3"
#: canonical output names, in the order the model card lists them
OUTPUT_ORDER = ("pred_boxes", "pred_logits", "pred_masks", "enc_scores", "topk_indices")


# ----------------------------------------------------------------------------------------------------------------
# identification
# ----------------------------------------------------------------------------------------------------------------

def identify_outputs(details: Sequence[Mapping[str, Any]], values: Optional[Sequence[np.ndarray]] = None
                     ) -> dict[str, int]:
    """Map canonical names → index into ``details`` (each has 'name', 'shape', 'dtype'). Raises ValueError when the
    outputs are not rfdetr's or cannot be told apart.

    Boxes vs logits when both are ``[1,Q,4]``: the names decide; only when they do not and the output ``values`` are
    given, boxes are the one whose values all lie in [0, 1] (the sigmoid output)."""
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
        elif len(shape) == 3:
            rank3.append(i)
            continue
        else:
            raise ValueError(f"output {d.get('name')!r} with shape {list(shape)} matches no known output")
        if key in out:
            raise ValueError(f"two outputs look like {key}: {details[out[key]].get('name')!r} and {d.get('name')!r}")
        out[key] = i
    if len(rank3) != 2:
        raise ValueError(f"expected two rank-3 outputs ([1,Q,4] boxes, [1,Q,C] logits), found {len(rank3)}: "
                         f"{[list(d['shape']) for d in details]}")
    a, b = rank3
    if int(details[a]["shape"][1]) != int(details[b]["shape"][1]):
        raise ValueError(f"box/logit outputs {list(details[a]['shape'])} and {list(details[b]['shape'])} disagree on "
                         f"the number of queries")
    la, lb = int(details[a]["shape"][-1]), int(details[b]["shape"][-1])
    if 4 not in (la, lb):
        raise ValueError(f"no [1,Q,4] box output among {[list(d['shape']) for d in details]}")
    if la == 4 and lb != 4:
        out["pred_boxes"], out["pred_logits"] = a, b
    elif lb == 4 and la != 4:
        out["pred_boxes"], out["pred_logits"] = b, a
    else:
        names = {i: str(details[i].get("name", "")).lower() for i in (a, b)}
        boxes = [i for i in (a, b) if "box" in names[i]]
        logits = [i for i in (a, b) if "logit" in names[i]]
        if len(boxes) == 1:
            out["pred_boxes"], out["pred_logits"] = boxes[0], (b if boxes[0] == a else a)
        elif len(logits) == 1:
            out["pred_logits"], out["pred_boxes"] = logits[0], (b if logits[0] == a else a)
        elif values is not None and [_in_unit(values[i]) for i in (a, b)].count(True) == 1:
            out["pred_boxes"], out["pred_logits"] = (a, b) if _in_unit(values[a]) else (b, a)
        else:
            raise ValueError(f"cannot tell boxes from logits: both end in {la}, names {list(names.values())}")
    q = int(details[out["pred_boxes"]]["shape"][1])
    if "pred_masks" in out:
        mask_layout(details[out["pred_masks"]]["shape"], q)  # raises when no axis has Q queries
    return out


def _in_unit(a: np.ndarray) -> bool:
    a = np.asarray(a)
    return bool(np.all((a >= 0) & (a <= 1)))


def mask_layout(shape: Sequence[int], q: int) -> str:
    """``"NQHW"`` for ``[1,Q,h,w]``, ``"NHWQ"`` for onnx2tf's ``[1,h,w,Q]`` (told apart by which axis is Q)."""
    s = [int(v) for v in shape]
    if s[1] == q:
        return "NQHW"
    if s[3] == q:
        return "NHWQ"
    raise ValueError(f"mask output {s} has no axis of Q={q} queries; expected [1,{q},h,w] or [1,h,w,{q}]")


def input_layout(shape: Sequence[int]) -> tuple[str, int]:
    """``(layout, R)`` of a square image input ``[1,3,R,R]`` (NCHW) or ``[1,R,R,3]`` (NHWC)."""
    s = [int(v) for v in shape]
    if len(s) != 4 or s[0] not in (1, -1):
        raise ValueError(f"input shape {s} is not an image batch; expected [1,R,R,3] or [1,3,R,R]")
    if s[3] == 3 and s[1] != 3:
        layout, hw = "NHWC", (s[1], s[2])
    elif s[1] == 3:
        layout, hw = "NCHW", (s[2], s[3])
    else:
        raise ValueError(f"input shape {s} has no channel axis of 3; expected [1,R,R,3] or [1,3,R,R]")
    if hw[0] != hw[1]:
        raise ValueError(f"input {s} is not square ({hw[0]}x{hw[1]}); the rfdetr pipeline resizes to R x R")
    return layout, int(hw[0])


# ----------------------------------------------------------------------------------------------------------------
# (de)quantisation
# ----------------------------------------------------------------------------------------------------------------

def _scale_zero(detail: Mapping[str, Any]) -> tuple[float, int]:
    q = detail.get("quantization") or (0.0, 0)
    return float(q[0]), int(q[1])


def quantize(x: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    """float32 → the tensor's dtype: unchanged for float inputs, scale/zero-point for int8/uint8 ones."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return np.ascontiguousarray(x, dtype=np.float32)
    scale, zero = _scale_zero(detail)
    if dtype not in (np.int8, np.uint8) or not scale:
        raise ValueError(f"input {detail.get('name')!r} is {dtype.name} without a quantisation scale; expected "
                         f"float32, or int8/uint8 with a scale")
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero, info.min, info.max).astype(dtype)


def dequantize(a: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    """The tensor's values as float32 (integer outputs without a scale, e.g. ``topk_indices``, stay integers)."""
    a = np.asarray(a)
    scale, zero = _scale_zero(detail)
    if a.dtype in (np.int8, np.uint8, np.int16) and scale:
        return (a.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    return a


def tensor_info(detail: Mapping[str, Any]) -> dict[str, Any]:
    """name, shape, dtype and quantisation of one tensor, JSON-ready."""
    scale, zero = _scale_zero(detail)
    return {"name": detail["name"], "shape": [int(s) for s in detail["shape"]], "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": scale, "zero_point": zero} if scale else None}


# ----------------------------------------------------------------------------------------------------------------
# the one TFLite runner
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
        raise ValueError(f"{p}: not a TFLite flatbuffer (expected the 'TFL3' identifier at bytes 4-8, got "
                         f"{head[4:8]!r}, {size} bytes); re-run the conversion (`python -m nailkit convert`)")
    return p


#: CPU kernel sets: XNNPACK (LiteRT's default delegate), the builtin kernels without it, or TFLite's reference
#: kernels (slow; another summation order again, which parity tests use)
CPU_KERNELS = ("xnnpack", "builtin", "reference")


def make_interpreter(model: str | os.PathLike[str] | bytes, threads: Optional[int] = None, *,
                     kernels: str = "xnnpack"):
    """The one way nailkit opens a ``.tflite`` on LiteRT's CPU ``Interpreter``: a path or the file's bytes, a thread
    count (None: LiteRT's default) and the kernel set (``CPU_KERNELS``). Tensors are not allocated yet."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if kernels not in CPU_KERNELS:
        raise ValueError(f"kernels must be one of {CPU_KERNELS}, got {kernels!r}")
    resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                "reference": OpResolverType.BUILTIN_REF}[kernels]
    source = {"model_content": model} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
    return Interpreter(**source, num_threads=threads, experimental_op_resolver_type=resolver)


class TFLiteModel:
    """A ``.tflite`` on ``ai_edge_litert``'s Interpreter, outputs by meaning.

    ``use_xnnpack=False`` runs the builtin kernels without the default XNNPACK delegate. Attributes: ``path``,
    ``input`` (the input's detail), ``layout`` ("NHWC"/"NCHW"), ``resolution``, ``output_details``, ``index``
    ({meaning: index into output_details}), ``num_queries``."""

    def __init__(self, path: str | os.PathLike[str], threads: Optional[int] = None, *, use_xnnpack: bool = True) -> None:
        self.path = check_tflite_file(path)
        try:
            self.interpreter = make_interpreter(self.path, threads, kernels="xnnpack" if use_xnnpack else "builtin")
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ValueError(f"{self.path}: LiteRT cannot load this file ({msg}); it may be truncated or corrupt, "
                             f"re-convert it (python -m nailkit convert)") from None
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: model has {len(inputs)} inputs; expected one image input")
        self.input = inputs[0]
        sig = [int(d) for d in self.input.get("shape_signature", self.input["shape"])]
        try:
            self.layout, self.resolution = input_layout([s if s > 0 else 1 for s in sig[:1]] + sig[1:])
        except ValueError as exc:
            raise ValueError(f"{self.path}: model {exc}") from None
        if any(s <= 0 for s in sig):  # a dynamic batch: fix it to 1
            want = [1, 3, self.resolution, self.resolution] if self.layout == "NCHW" else \
                [1, self.resolution, self.resolution, 3]
            self.interpreter.resize_tensor_input(self.input["index"], want)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
        dtype = np.dtype(self.input["dtype"])
        if dtype != np.float32 and not (dtype in (np.int8, np.uint8) and _scale_zero(self.input)[0]):
            raise ValueError(f"{self.path}: input dtype {dtype} is not supported; expected float32 (or int8/uint8 "
                             f"with a quantisation scale)")
        self.output_details = self.interpreter.get_output_details()
        try:
            self.index = identify_outputs(self.output_details)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from None
        self.num_queries = int(self.output_details[self.index["pred_boxes"]]["shape"][1])
        self.input_shape = tuple(int(s) for s in self.input["shape"])

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``x``: float32 in the model's own layout (``self.input_shape``). Returns ``{meaning: array}`` with the
        batch axis, dequantised, masks as ``[1,Q,h,w]``."""
        x = np.asarray(x, dtype=np.float32)
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"{self.path}: input shape {list(x.shape)}, model expects {list(self.input_shape)} "
                             f"({self.layout})")
        self.interpreter.set_tensor(self.input["index"], quantize(x, self.input))
        self.interpreter.invoke()
        out = {}
        for meaning, i in self.index.items():
            d = self.output_details[i]
            a = dequantize(np.array(self.interpreter.get_tensor(d["index"])), d)
            if meaning == "pred_masks" and mask_layout(a.shape, self.num_queries) == "NHWQ":
                a = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
            out[meaning] = a
        return out

    def describe(self) -> dict[str, Any]:
        """``{"input": {..., layout, resolution}, "outputs": [{..., meaning[, layout]}], "num_queries"}``."""
        inp = dict(tensor_info(self.input), layout=self.layout, resolution=self.resolution)
        outs = []
        for meaning, i in sorted(self.index.items(), key=lambda kv: OUTPUT_ORDER.index(kv[0])):
            info = dict(tensor_info(self.output_details[i]), meaning=meaning)
            if meaning == "pred_masks":
                info["layout"] = mask_layout(info["shape"], self.num_queries)
            outs.append(info)
        return {"input": inp, "outputs": outs, "num_queries": self.num_queries}

    def close(self) -> None:
        self.interpreter = None


# What each output means and how to post-process it: read by the model card, the .tflite metadata and the
# bundle's README (one definition; this file ships in the bundle).
OUTPUT_MEANINGS = {
    "pred_boxes": ("boxes", "normalised [0,1] (cx, cy, w, h) relative to the model input; multiply by the ORIGINAL "
                            "image width/height after converting to (x1, y1, x2, y2)", "values (sigmoid applied)"),
    "pred_logits": ("class scores per query", "column c = class id c (labels.txt line c); the last column is rfdetr's "
                    "no-object slot", "LOGITS: apply sigmoid per element (independent sigmoids, not softmax)"),
    "pred_masks": ("mask per query", "mask logits at 1/4 of the input resolution; resize bilinearly (half-pixel, "
                   "no antialias) to the ORIGINAL image size, THEN threshold (> 0)", "LOGITS"),
    "enc_scores": ("diagnostic: pre-TopK encoder scores (two-stage query selection)", "not needed by the app",
                   "logits"),
    "topk_indices": ("diagnostic: indices of the queries the encoder selected", "not needed by the app", "int"),
}

POSTPROCESS_STEPS = [
    "scores = sigmoid(pred_logits) for every (query, class) pair — independent sigmoids, not softmax, not argmax",
    "take the top num_select pairs over the flattened Q×C scores (descending; ties by ascending flat index); "
    "query = index // C, class = index % C",
    "boxes of the selected queries: (cx, cy, w, h) → (x1, y1, x2, y2), times (W, H, W, H) of the ORIGINAL image, "
    "clamped to the image",
    "keep pairs with score > threshold (strictly greater)",
    "masks of the kept queries: resize the mask logits bilinearly (half-pixel centres, no antialias) to the original "
    "H×W, then mask = logit > mask_threshold",
]
