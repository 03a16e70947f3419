"""What every runner shares: the ``Runner`` base class (``run`` / ``predict_raw`` / ``predict``), the mapping of a
model's outputs to ``RawOutputs`` by shape and meaning (``canonical_outputs``), and the small checks the backends use
on a model file and its input.

Outputs are mapped **by shape and meaning, never by position** (``canonical_outputs`` → ``io_contract``): boxes
``[1,Q,4]``, logits ``[1,Q,C]`` (when C == 4 too, the output names decide, else the values: boxes lie in [0, 1]),
masks the rank-4 output, ``[1,Q,h,w]`` or the NHWC ``[1,h,w,Q]`` that onnx2tf writes (told apart by Q). Inputs may
be NCHW ``[1,3,R,R]`` or NHWC ``[1,R,R,3]`` (onnx2tf); ``run`` always takes NCHW and transposes when the model wants
NHWC.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.portable import io_contract
from nailkit.portable.postprocess import postprocess, Prediction, RawOutputs
from nailkit.portable.preprocess import ImageLike, preprocess, to_nhwc

DEFAULT_NUM_SELECT = 200  # rfdetr's num_select for the segmentation models


class Runner:
    """Base class: subclasses set the attributes below and implement ``_forward`` (model-native input → arrays)."""

    backend: str = ""
    name: str = ""
    resolution: int = 0
    input_layout: str = "NCHW"
    path: Optional[Path] = None
    class_names: Optional[list[str]] = None
    num_select: int = DEFAULT_NUM_SELECT
    threads: Optional[int] = None
    last_ms: float = float("nan")
    output_names: Optional[list[str]] = None  # names of ``_forward``'s arrays, when the model has them

    # -- to implement ------------------------------------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------------------------
    def run(self, x: np.ndarray) -> RawOutputs:
        """Run one preprocessed NCHW float32 [1,3,R,R] batch; return the canonical ``RawOutputs``."""
        x = np.asarray(x, dtype=np.float32)
        expected = (1, 3, self.resolution, self.resolution)
        if x.shape != expected:
            raise ValueError(f"{self.name}: input shape {tuple(x.shape)} does not match the model; expected NCHW "
                             f"{list(expected)} (preprocess(image, {self.resolution}))")
        native = to_nhwc(x) if self.input_layout == "NHWC" else np.ascontiguousarray(x)
        t0 = time.perf_counter()
        arrays = self._forward(native)
        self.last_ms = (time.perf_counter() - t0) * 1000.0
        return canonical_outputs(arrays, where=self.name, names=self.output_names)

    def predict_raw(self, image: ImageLike) -> tuple[RawOutputs, tuple[int, int]]:
        """Preprocess ``image`` exactly like rfdetr and run it: (RawOutputs, (orig_width, orig_height))."""
        x, size = preprocess(image, self.resolution)
        return self.run(x), size

    def postprocess(self, raw: RawOutputs, size: tuple[int, int], threshold: float = 0.5,
                    num_select: Optional[int] = None, mask_threshold: float = 0.0, *,
                    mask_format: str = "full") -> Prediction:
        return postprocess(raw, size, threshold=threshold, num_select=num_select or self.num_select,
                           mask_threshold=mask_threshold, class_names=self.class_names, mask_format=mask_format)

    def predict(self, image: ImageLike, threshold: float = 0.5, num_select: Optional[int] = None,
                mask_threshold: float = 0.0, *, mask_format: str = "full") -> Prediction:
        """``mask_format="crop"``: one cropped mask per detection (memory follows the masks, not the photo)."""
        raw, size = self.predict_raw(image)
        return self.postprocess(raw, size, threshold, num_select, mask_threshold, mask_format=mask_format)

    def close(self) -> None:
        """Release the model; the runner cannot be used afterwards."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "path": str(self.path) if self.path else None,
                "resolution": self.resolution, "input_layout": self.input_layout, "threads": self.threads}

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} R={self.resolution} {self.input_layout}>"


# ---------------------------------------------------------------------------------------------------------------
# Output mapping by shape and meaning
# ---------------------------------------------------------------------------------------------------------------

def canonical_outputs(arrays: Sequence[np.ndarray], where: str = "model",
                      names: Optional[Sequence[str]] = None) -> RawOutputs:
    """Map a model's outputs, in any order, to ``RawOutputs`` by shape and meaning (``nailkit.portable.io_contract``).

    * boxes ``[1,Q,4]``, logits ``[1,Q,C]``; when C == 4 too, the ``names`` decide, else the values (boxes in [0,1]);
    * masks: rank 4, ``[1,Q,h,w]`` or NHWC ``[1,h,w,Q]`` (by which axis equals Q); optional;
    * rank-2 selection outputs (float ``enc_scores`` [1,S], integer ``topk_indices`` [1,Q]) go to ``raw.extra``.
    """
    arrays = [np.asarray(a) for a in arrays]
    for a in arrays:
        if a.ndim == 0 or a.shape[0] != 1:
            raise ValueError(f"{where}: output of shape {list(a.shape)} has no batch dimension of 1; expected "
                             f"[1,Q,4] boxes, [1,Q,C] logits and [1,Q,h,w] (or [1,h,w,Q]) masks")
    ranks = [a.ndim for a in arrays]
    if ranks.count(3) != 2 or ranks.count(4) > 1 or any(r not in (2, 3, 4) for r in ranks):
        raise ValueError(f"{where}: outputs {[list(a.shape) for a in arrays]} are not rfdetr's; expected two rank-3 "
                         f"outputs ([1,Q,4] boxes, [1,Q,C] logits) and at most one rank-4 mask output")
    details = [{"name": (names[i] if names else ""), "shape": a.shape, "dtype": a.dtype} for i, a in enumerate(arrays)]
    try:
        index = io_contract.identify_outputs(details, values=arrays)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    boxes, logits = arrays[index["pred_boxes"]], arrays[index["pred_logits"]]
    masks = None
    if "pred_masks" in index:
        m = arrays[index["pred_masks"]]
        masks = m[0] if io_contract.mask_layout(m.shape, boxes.shape[1]) == "NQHW" else np.transpose(m[0], (2, 0, 1))
    raw = RawOutputs(boxes=boxes[0], logits=logits[0], masks=masks)
    raw.extra.update({k: arrays[index[k]] for k in ("enc_scores", "topk_indices") if k in index})
    return raw


def _apply_meta(runner: Runner, meta: dict[str, Any], class_names: Optional[Sequence[str]]) -> None:
    names = class_names if class_names is not None else meta.get("class_names")
    runner.class_names = list(names) if names else None
    if isinstance(meta.get("num_select"), int):
        runner.num_select = int(meta["num_select"])


def _check_model_file(path: Path, kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file; expected a {kind} model (re-export it)")
    return path


def _single_input(inputs: Sequence[Any], path: Path) -> Any:
    if len(inputs) != 1:
        raise ValueError(f"{path}: model has {len(inputs)} inputs; expected one image input")
    return inputs[0]


def _square_resolution(shape: Sequence[Any], where: str, resolution: Optional[int]) -> tuple[int, str]:
    """(R, layout) from a model input shape [1,3,R,R] (NCHW) or [1,R,R,3] (NHWC); dynamic dims need ``resolution``."""
    dims = [d if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape]
    if len(dims) != 4 or dims[0] not in (1, None):
        raise ValueError(f"{where}: model input shape {list(shape)} does not match the image pipeline; expected "
                         f"[1,3,R,R] (NCHW) or [1,R,R,3] (NHWC), float32")
    if dims[1] == 3 and dims[3] != 3:
        layout, hw = "NCHW", (dims[2], dims[3])
    elif dims[3] == 3 and dims[1] != 3:
        layout, hw = "NHWC", (dims[1], dims[2])
    elif dims[1] == 3 and dims[3] == 3:
        layout, hw = "NCHW", (dims[2], dims[3])
    else:
        raise ValueError(f"{where}: model input shape {list(shape)} has no channel axis of 3; expected [1,3,R,R] "
                         f"(NCHW) or [1,R,R,3] (NHWC)")
    h, w = hw
    if h is not None and w is not None and h != w:
        raise ValueError(f"{where}: model input {list(shape)} is not square ({h}x{w}); the rfdetr pipeline resizes "
                         f"to a square R x R")
    res = h or w or resolution
    if res is None:
        raise ValueError(f"{where}: model input {list(shape)} has a dynamic size; pass resolution=R")
    if resolution is not None and int(resolution) != int(res):
        raise ValueError(f"{where}: model input is {res}x{res} but resolution={resolution} was asked for")
    return int(res), layout

