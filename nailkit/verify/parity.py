"""Comparisons between two runs of the same model (PyTorch vs ONNX Runtime vs TFLite ...).

Three levels, each a plain function on numpy arrays / nailkit's canonical layout:

* ``tensor_diff``        — per-output max-abs / mean-abs difference of raw tensors;
* ``query_matched_diff`` — queries matched by box distance (Hungarian) before logits and masks are compared, because
  with near-tied scores (random weights) a tiny numeric change can legitimately permute queries;
* ``detection_parity``   — both runs post-processed with ``nailkit.portable.postprocess``; the top-k detections of each are
  matched by box IoU (never by rank) and compared by box L1 (px), score and mask IoU.

Other stages append their own helpers (selection-aware parity, rounding controls) below the marked section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from nailkit.portable.postprocess import postprocess, Prediction, RawOutputs, sigmoid
from nailkit.verify import gates
from nailkit.verify.gates import TIE_EPS, TOP_K


# ----------------------------------------------------------------------------------------------------------------
# 1. raw tensors
# ----------------------------------------------------------------------------------------------------------------

def tensor_diff(ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray] | Sequence[np.ndarray]
                ) -> dict[str, dict[str, float]]:
    """Per-output ``{max_abs, mean_abs}`` of ``other - ref``. ``other`` is a dict with the same names, or a sequence
    in ``ref``'s order. Shapes must match exactly (a shape mismatch is an error, not a large difference)."""
    names = list(ref)
    if not isinstance(other, Mapping):
        other = dict(zip(names, other))
    out: dict[str, dict[str, float]] = {}
    for name in names:
        if name not in other:
            raise KeyError(f"output {name!r} missing from the compared run (has {sorted(other)})")
        a = np.asarray(ref[name], dtype=np.float64)
        b = np.asarray(other[name], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output {name!r}: shape {list(b.shape)} vs reference {list(a.shape)}")
        d = np.abs(a - b)
        out[name] = {"max_abs": float(d.max()) if d.size else 0.0, "mean_abs": float(d.mean()) if d.size else 0.0}
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. query-matched comparison
# ----------------------------------------------------------------------------------------------------------------

def match_queries(ref_boxes: np.ndarray, other_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match the queries of two runs by L1 distance of their (cxcywh) boxes, Hungarian assignment.

    Returns ``(ref_idx, other_idx)``, both sorted by ``ref_idx``."""
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(ref_boxes, dtype=np.float64)
    b = np.asarray(other_boxes, dtype=np.float64)
    cost = np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
    ri, oi = linear_sum_assignment(cost)
    order = np.argsort(ri)
    return ri[order].astype(np.int64), oi[order].astype(np.int64)


@dataclass
class QueryMatchedDiff:
    num_queries: int
    num_permuted: int  # queries whose match is not the same index
    boxes_max_abs: float
    logits_max_abs: float
    masks_max_abs: Optional[float]
    per_query_box_abs: np.ndarray  # [Q] max-abs per ref query after matching
    per_query_logit_abs: np.ndarray
    per_query_mask_abs: Optional[np.ndarray]
    ref_idx: np.ndarray
    other_idx: np.ndarray

    def summary(self) -> dict[str, Any]:
        return {"num_queries": self.num_queries, "num_permuted": self.num_permuted,
                "boxes_max_abs": self.boxes_max_abs, "logits_max_abs": self.logits_max_abs,
                "masks_max_abs": self.masks_max_abs}


def query_matched_diff(ref: RawOutputs, other: RawOutputs) -> QueryMatchedDiff:
    """Compare boxes, logits and masks after matching queries by box distance."""
    ri, oi = match_queries(ref.boxes, other.boxes)
    box = np.abs(ref.boxes[ri].astype(np.float64) - other.boxes[oi]).max(-1)
    logit = np.abs(ref.logits[ri].astype(np.float64) - other.logits[oi]).max(-1)
    mask = None
    if ref.masks is not None and other.masks is not None:
        if ref.masks.shape != other.masks.shape:
            raise ValueError(f"mask shapes differ: {ref.masks.shape} vs {other.masks.shape}")
        mask = np.abs(ref.masks[ri].astype(np.float64) - other.masks[oi]).reshape(len(ri), -1).max(-1)
    return QueryMatchedDiff(
        num_queries=int(len(ri)), num_permuted=int((ri != oi).sum()),
        boxes_max_abs=float(box.max()) if box.size else 0.0, logits_max_abs=float(logit.max()) if logit.size else 0.0,
        masks_max_abs=(float(mask.max()) if mask is not None and mask.size else None),
        per_query_box_abs=box, per_query_logit_abs=logit, per_query_mask_abs=mask, ref_idx=ri, other_idx=oi)


# ----------------------------------------------------------------------------------------------------------------
# 3. detection level
# ----------------------------------------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: [N,4] x [M,4] -> [N,M] (``supervision.box_iou_batch``; 0 where a union is empty)."""
    import supervision as sv

    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.nan_to_num(np.asarray(sv.box_iou_batch(a, b), dtype=np.float64), nan=0.0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks count as identical (1.0)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@dataclass
class DetectionMatch:
    a_idx: int
    b_idx: int
    box_iou: float
    box_l1_px: float  # max abs coordinate difference, pixels
    score_diff: float  # |score_a - score_b|
    same_class: bool
    mask_iou: Optional[float]


@dataclass
class DetectionParity:
    num_a: int
    num_b: int
    matches: list[DetectionMatch]
    unmatched_a: list[int]
    unmatched_b: list[int]

    @property
    def num_matched(self) -> int:
        return len(self.matches)

    @property
    def min_mask_iou(self) -> Optional[float]:
        v = [m.mask_iou for m in self.matches if m.mask_iou is not None]
        return min(v) if v else None

    @property
    def max_box_l1_px(self) -> float:
        return max((m.box_l1_px for m in self.matches), default=0.0)

    @property
    def max_score_diff(self) -> float:
        return max((m.score_diff for m in self.matches), default=0.0)

    @property
    def all_same_class(self) -> bool:
        return all(m.same_class for m in self.matches)

    def agrees(self, **tolerances: float) -> bool:
        """All detections matched one-to-one, same class, boxes/scores close, masks (if any) nearly identical:
        ``nailkit.verify.gates.DETECTIONS``, overridden by ``tolerances`` (min_mask_iou, max_box_l1_px, max_score_diff)."""
        return not gates.detection_failures(dict(gates.DETECTIONS, **tolerances), self.summary())

    def summary(self) -> dict[str, Any]:
        return {"num_a": self.num_a, "num_b": self.num_b, "num_matched": self.num_matched,
                "unmatched_a": len(self.unmatched_a), "unmatched_b": len(self.unmatched_b),
                "all_same_class": self.all_same_class, "max_box_l1_px": self.max_box_l1_px,
                "max_score_diff": self.max_score_diff, "min_mask_iou": self.min_mask_iou}

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.matches]


def match_detections(pred_a: Prediction, pred_b: Prediction, iou_thr: float = 0.5) -> DetectionParity:
    """Match two sets of detections one-to-one by box IoU (Hungarian on 1 - IoU); pairs below ``iou_thr`` are
    left unmatched. Never matches by rank: near-tied scores may reorder detections."""
    from scipy.optimize import linear_sum_assignment

    na, nb = len(pred_a), len(pred_b)
    matches: list[DetectionMatch] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    if na and nb:
        iou = box_iou(pred_a.xyxy, pred_b.xyxy)
        # prefer same-class pairs: a different class costs one extra unit
        same = pred_a.class_id[:, None] == pred_b.class_id[None, :]
        ri, ci = linear_sum_assignment((1.0 - iou) + (~same))
        for i, j in zip(ri, ci):
            if iou[i, j] < iou_thr:
                continue
            mi = None
            if pred_a.mask is not None and pred_b.mask is not None:
                mi = mask_iou(pred_a.mask[i], pred_b.mask[j])
            matches.append(DetectionMatch(
                a_idx=int(i), b_idx=int(j), box_iou=float(iou[i, j]),
                box_l1_px=float(np.abs(pred_a.xyxy[i].astype(np.float64) - pred_b.xyxy[j]).max()),
                score_diff=float(abs(float(pred_a.confidence[i]) - float(pred_b.confidence[j]))),
                same_class=bool(pred_a.class_id[i] == pred_b.class_id[j]), mask_iou=mi))
            used_a.add(int(i))
            used_b.add(int(j))
    return DetectionParity(num_a=na, num_b=nb, matches=matches,
                           unmatched_a=[i for i in range(na) if i not in used_a],
                           unmatched_b=[j for j in range(nb) if j not in used_b])


def detection_parity(raw_ref: RawOutputs, raw_other: RawOutputs, image_size: tuple[int, int], *, top_k: int = TOP_K,
                     iou_thr: float = 0.5, mask_threshold: float = 0.0, margin: int = 5) -> DetectionParity:
    """Post-process both runs (threshold 0) and compare the reference's top-``top_k`` detections by IoU.

    The compared run contributes its top ``top_k + margin`` candidates so that a detection whose rank moved by a
    near-tie just across the cut still finds its partner; its unmatched extras are not counted as failures.
    """
    a = postprocess(raw_ref, image_size, threshold=0.0, num_select=top_k, mask_threshold=mask_threshold)
    b = postprocess(raw_other, image_size, threshold=0.0, num_select=top_k + margin, mask_threshold=mask_threshold)
    res = match_detections(a, b, iou_thr=iou_thr)
    res.unmatched_b = []  # extras beyond the reference's top-k are expected
    res.num_b = min(res.num_b, top_k)
    return res


def raw_from_outputs(outputs: Sequence[np.ndarray] | Mapping[str, np.ndarray], batch_index: int = 0) -> RawOutputs:
    """Canonical ``RawOutputs`` from (pred_boxes, pred_logits[, pred_masks]) batched arrays or a dict by name."""
    if isinstance(outputs, Mapping):
        seq = [outputs["pred_boxes"], outputs["pred_logits"], outputs.get("pred_masks")]
    else:
        seq = list(outputs) + [None] * (3 - len(outputs))
    boxes, logits, masks = (None if v is None else np.asarray(v)[batch_index] for v in seq[:3])
    return RawOutputs(boxes=boxes, logits=logits, masks=masks)


# ----------------------------------------------------------------------------------------------------------------
# Additions by other stages go below this line (append-only).
# ----------------------------------------------------------------------------------------------------------------


# ================================================================================================================
# Selection-aware parity and rounding controls (used by nailkit.tflite.gate)
# ================================================================================================================
#
# The two-stage query selection is ``torch.topk`` over the encoder's per-token class scores (near-tied with random
# weights). A 1e-5 difference can swap a selected query; the swapped-in query has its own embedding, so no permutation
# matching can pair it. So: compare the pre-TopK scores directly, then re-run PyTorch with the backend's selected
# indices *forced* and compare everything downstream. ``rounding_control`` builds the PyTorch model whose weights are
# rounded like an fp16 / dynamic-range int8 artifact, so converter error can be told apart from the precision's own.

import contextlib as _contextlib

SELECTION_OUTPUT_NAMES = ("enc_scores", "topk_indices")


@_contextlib.contextmanager
def topk_probe(forced_indices: Any = None):
    """Patch ``torch.topk`` for the duration: record its input scores and selected indices, and optionally replace
    the selection with ``forced_indices`` ([B, k] int). Yields a list that receives ``(scores, indices)`` per call.

    rfdetr calls ``torch.topk`` exactly once in the export-mode forward (the two-stage encoder selection)."""
    import torch

    calls: list[tuple[Any, Any]] = []
    orig = torch.topk

    def patched(input, k, dim=-1, largest=True, sorted=True, *, out=None):  # noqa: A002
        values, indices = orig(input, k, dim=dim, largest=largest, sorted=sorted)
        if forced_indices is not None:
            idx = torch.as_tensor(np.asarray(forced_indices), dtype=torch.int64).reshape(indices.shape)
            indices = idx
            values = torch.gather(input, dim, idx)
        calls.append((input, indices))
        return torch.return_types.topk((values, indices))

    torch.topk = patched
    try:
        yield calls
    finally:
        torch.topk = orig


def run_torch_with_selection(module: Any, x: np.ndarray, forced_indices: Any = None) -> dict[str, np.ndarray]:
    """Run an export-mode module on NCHW ``x``; returns its outputs by name plus ``enc_scores`` [B,S] (pre-TopK) and
    ``topk_indices`` [B,Q] (the selection actually used, forced or not)."""
    import torch

    with torch.no_grad(), topk_probe(forced_indices) as calls:
        outs = module(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    if len(calls) != 1:
        raise RuntimeError(f"expected exactly one torch.topk call (two-stage selection), saw {len(calls)}")
    names = list(getattr(module, "output_names", ("pred_boxes", "pred_logits", "pred_masks")))
    res = {n: o.detach().cpu().numpy() for n, o in zip(names, outs)}
    res["enc_scores"] = calls[0][0].detach().cpu().numpy()
    res["topk_indices"] = calls[0][1].detach().cpu().numpy().astype(np.int64)
    return res


def selection_module(module: Any):
    """Wrap an export-mode module so its forward also returns ``enc_scores`` and ``topk_indices`` (for export)."""
    import torch

    class _Sel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with topk_probe() as calls:
                outs = self.inner(x)
            scores, idx = calls[0]
            return tuple(outs) + (scores, idx)

    m = _Sel(module).eval()
    m.resolution = getattr(module, "resolution", None)
    m.output_names = tuple(getattr(module, "output_names", ())) + SELECTION_OUTPUT_NAMES
    return m


def score_gap_at(scores: np.ndarray, k: int) -> float:
    """Gap between the k-th and (k+1)-th largest values of ``scores`` (flattened); inf when there is no (k+1)-th."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())[::-1]
    return float(s[k - 1] - s[k]) if s.size > k else float("inf")


def selection_difference(scores: np.ndarray, ref_idx: Any, other_idx: Any) -> dict[str, Any]:
    """How two top-k selections over the same ``scores`` (the reference's) differ: same set, same order, how many
    indices swapped, and ``swap_max_gap``, the largest score difference between the indices that stand at the same
    position in the two selections but differ. A gap below ``gates.TIE_EPS`` means a near-tie resolved the other way
    by another summation order (another ISA, XNNPACK vs reference kernels), not a converter error; ``inf`` when the
    two selections differ in length."""
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    ri = np.asarray(ref_idx).ravel().astype(np.int64)
    bi = np.asarray(other_idx).ravel().astype(np.int64)
    out = {"size": int(ri.size), "same_set": set(ri.tolist()) == set(bi.tolist()),
           "same_order": bool(np.array_equal(ri, bi)), "swapped": len(set(ri.tolist()) - set(bi.tolist()))}
    if ri.size != bi.size:
        return {**out, "differs": True, "positions": None, "swap_max_gap": float("inf")}
    pos = np.nonzero(ri != bi)[0]
    gap = float(np.abs(flat[ri[pos]] - flat[bi[pos]]).max()) if pos.size else 0.0
    return {**out, "differs": bool(pos.size), "positions": int(pos.size), "swap_max_gap": gap}


def detection_score_gap(raw: RawOutputs, top_k: int = TOP_K) -> float:
    """Gap between the top_k-th and next detection score (sigmoid over the flattened [Q, C] grid)."""
    return score_gap_at(sigmoid(np.asarray(raw.logits, dtype=np.float64)), top_k)


def _global_mask_iou(a: np.ndarray, b: np.ndarray, thr: float = 0.0) -> float:
    a, b = np.asarray(a) > thr, np.asarray(b) > thr
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def selection_aware_parity(module: Any, x: np.ndarray, ref: Mapping[str, np.ndarray],
                           backend: Mapping[str, np.ndarray], image_size: tuple[int, int], *, top_k: int = TOP_K,
                           tie_eps: float = TIE_EPS) -> dict[str, Any]:
    """All five comparison levels for one image.

    ``ref`` is ``run_torch_with_selection(module, x)``; ``backend`` the artifact's outputs by name (it must include
    ``enc_scores`` and ``topk_indices``). Returns a flat dict of numbers:

    * ``tensor``: (a) per-output max/mean-abs; ``query``: (b); ``detect``: (c) top-k IoU-matched;
    * ``pre_topk_max_abs``: (d) encoder scores; ``selection_same``: same selected set;
      ``forced``: torch re-run with the backend's indices forced vs the backend (max-abs per output, mask IoU after
      thresholding over all queries, and the top-k detection-level min mask IoU);
    * ``tie``: whether a score tie within ``tie_eps`` lies at the top-k detection boundary, or the two selections
      differ (membership or order) only between encoder scores within ``tie_eps`` of each other — i.e. whether the
      unforced top-k is allowed to differ.
    """
    names = ("pred_boxes", "pred_logits", "pred_masks")
    names = tuple(n for n in names if n in ref and n in backend)
    out: dict[str, Any] = {}
    out["tensor"] = tensor_diff({n: ref[n] for n in names}, {n: backend[n] for n in names})
    raw_ref, raw_be = raw_from_outputs(ref), raw_from_outputs(backend)
    out["query"] = query_matched_diff(raw_ref, raw_be).summary()
    det = detection_parity(raw_ref, raw_be, image_size, top_k=top_k)
    out["detect"] = det.summary()
    out["detect_agrees"] = det.agrees()
    es_r, es_b = np.asarray(ref["enc_scores"], np.float64), np.asarray(backend["enc_scores"], np.float64)
    out["pre_topk_max_abs"] = float(np.abs(es_r.reshape(es_b.shape) - es_b).max())
    sel = selection_difference(es_r, ref["topk_indices"], backend["topk_indices"])
    out["selection_same"] = sel["same_set"]
    out["selection_order_same"] = sel["same_order"]
    out["selection_swapped"] = sel["swapped"]
    out["selection_gap"] = score_gap_at(es_r, sel["size"])
    out["selection_swap_max_gap"] = sel["swap_max_gap"]
    forced = run_torch_with_selection(module, x, forced_indices=np.asarray(backend["topk_indices"]))
    fd = tensor_diff({n: forced[n] for n in names}, {n: backend[n] for n in names})
    out["forced"] = {n: v["max_abs"] for n, v in fd.items()}
    out["forced_max_abs"] = max(out["forced"].values())
    if "pred_masks" in names:
        out["forced_mask_iou_all"] = _global_mask_iou(forced["pred_masks"], backend["pred_masks"])
    fdet = detection_parity(raw_from_outputs(forced), raw_be, image_size, top_k=top_k)
    out["forced_detect"] = fdet.summary()
    out["forced_min_mask_iou"] = fdet.min_mask_iou if fdet.min_mask_iou is not None else 1.0
    gap = detection_score_gap(raw_ref, top_k)
    out["detection_gap"] = gap
    out["tie"] = bool(gap < tie_eps or (sel["differs"] and sel["swap_max_gap"] < tie_eps))
    return out


def fp16_round_weights(module: Any) -> Any:
    """Copy of ``module`` whose floating parameters and buffers went through an fp16 round trip."""
    import copy

    import torch

    m = copy.deepcopy(module)
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return m


def int8_fake_quant_weights(module: Any) -> Any:
    """Copy of ``module`` with per-output-channel symmetric int8 fake-quant of every Linear/Conv weight
    (what dynamic-range quantization stores; biases and other tensors stay float)."""
    import copy

    import torch

    m = copy.deepcopy(module)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and mod.weight is not None:
                w = mod.weight
                flat = w.reshape(w.shape[0], -1)
                scale = flat.abs().amax(1).clamp_min(1e-12) / 127.0
                q = torch.clamp(torch.round(flat / scale[:, None]), -127, 127) * scale[:, None]
                w.copy_(q.reshape(w.shape))
    return m


def _fake_quant_rows_asym(x: Any, rows_dim: int) -> Any:
    """Asymmetric int8 fake-quant with one (scale, zero point) per row (``rows_dim=-1``: per vector along the last
    dim, i.e. per token) or per batch item (``rows_dim=0``) — what dynamic-range kernels do to activations."""
    import torch

    flat = x.reshape(-1, x.shape[-1]) if rows_dim == -1 else x.reshape(x.shape[0], -1)
    lo = torch.minimum(flat.amin(1, keepdim=True), torch.zeros_like(flat[:, :1]))
    hi = torch.maximum(flat.amax(1, keepdim=True), torch.zeros_like(flat[:, :1]))
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    zero = torch.round(-lo / scale) - 128.0
    q = torch.clamp(torch.round(flat / scale) + zero, -128, 127)
    return ((q - zero) * scale).reshape(x.shape)


def int8_dynamic_fake_quant(module: Any) -> Any:
    """Dynamic-range int8 control: int8 weights (``int8_fake_quant_weights``) *and* the run-time int8 quantisation of
    each Linear/Conv input (asymmetric, per row for Linear, per image for Conv), as dynamic-range kernels do."""
    import torch

    m = int8_fake_quant_weights(module)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda _m, args: (_fake_quant_rows_asym(args[0], -1),) + tuple(args[1:]))
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
            mod.register_forward_pre_hook(lambda _m, args: (_fake_quant_rows_asym(args[0], 0),) + tuple(args[1:]))
    return m


def rounding_control(module: Any, precision: str) -> Any:
    """The PyTorch control for an artifact of ``precision`` ('fp32' → the module itself).

    ``fp16``: weights through an fp16 round trip. ``int8``: dynamic-range int8 (int8 weights and run-time int8
    activations into Linear/Conv). ``int8_weights``: int8 weights only (a lower bound)."""
    if precision == "fp32":
        return module
    if precision == "fp16":
        return fp16_round_weights(module)
    if precision in ("int8", "dynamic_int8"):
        return int8_dynamic_fake_quant(module)
    if precision == "int8_weights":
        return int8_fake_quant_weights(module)
    raise ValueError(f"no rounding control for precision {precision!r} (expected fp32, fp16, int8 or int8_weights)")


def error_summary(ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The numbers used for error attribution: pre-TopK scores max-abs, and query-matched mean-abs of logits /
    masks (mean over matched queries of per-query max-abs) — robust to a swapped query."""
    raw_r, raw_o = raw_from_outputs(ref), raw_from_outputs(other)
    qm = query_matched_diff(raw_r, raw_o)
    out = {"pre_topk_max_abs": float(np.abs(np.asarray(ref["enc_scores"], np.float64)
                                            - np.asarray(other["enc_scores"], np.float64).reshape(
                                                np.shape(ref["enc_scores"]))).max()),
           "logits_qm_mean": float(np.mean(qm.per_query_logit_abs)),
           "boxes_qm_mean": float(np.mean(qm.per_query_box_abs))}
    if qm.per_query_mask_abs is not None:
        out["masks_qm_mean"] = float(np.mean(qm.per_query_mask_abs))
    return out


# ================================================================================================================
# Near-tied selections in the detection-level comparisons (runtime.compare.consistency_rows, gpu.parity.chain_parity)
# ================================================================================================================
#
# Each selected proposal gets the content query of its rank, so a near-tie resolved the other way changes those
# queries' detections (no permutation pairs them). A comparison whose two selections differ only by such a tie is made
# against the reference re-run on the other run's selection instead (``tie_resolved_reference``).


def selection_tie(ref_scores: np.ndarray, ref_idx: Any, other_idx: Any, *, score_error: float = 0.0,
                  tie_eps: float = TIE_EPS) -> dict[str, Any]:
    """``selection_difference`` with a verdict: ``selection`` is "same" (same indices in the same order), "tie" (every
    differing position holds two indices whose reference scores are closer than ``bound`` = max(``tie_eps``,
    2 × ``score_error``), the other run's measured encoder-score error: two scores each off by up to that can swap) or
    "differs"; ``gap`` is the largest score difference at a differing position (inf for selections of another
    length)."""
    d = selection_difference(ref_scores, ref_idx, other_idx)
    bound = max(float(tie_eps), 2.0 * float(score_error))
    verdict = "same" if d["same_order"] else "tie" if d["swap_max_gap"] < bound else "differs"
    return {**d, "selection": verdict, "gap": d["swap_max_gap"], "bound": bound, "score_error": float(score_error)}


def raw_selection_tie(ref: RawOutputs, other: RawOutputs, *, tie_eps: float = TIE_EPS) -> Optional[dict[str, Any]]:
    """``selection_tie`` of two runs' recorded selections (``raw.extra``: ``topk_indices``, ``enc_scores``), with the
    score error measured between their encoder scores (0 when ``other`` records none). None when either run records
    no selection, or the two score other token grids (another resolution): nothing to compare."""
    if "topk_indices" not in other.extra or not set(SELECTION_OUTPUT_NAMES) <= set(ref.extra):
        return None
    scores = np.asarray(ref.extra["enc_scores"], np.float64).ravel()
    theirs = other.extra.get("enc_scores")
    if theirs is not None and np.size(theirs) != scores.size:
        return None
    err = 0.0 if theirs is None else float(np.abs(np.asarray(theirs, np.float64).ravel() - scores).max())
    return selection_tie(scores, ref.extra["topk_indices"], other.extra["topk_indices"], score_error=err,
                         tie_eps=tie_eps)


def tie_resolved_reference(ref: RawOutputs, other: RawOutputs,
                           rerun: Optional[Callable[[np.ndarray], RawOutputs]], *, tie_eps: float = TIE_EPS
                           ) -> tuple[RawOutputs, Optional[dict[str, Any]]]:
    """The reference to compare ``other`` with, and the verdict (``raw_selection_tie``; None: no selection recorded).
    On a "tie" it is ``rerun(indices)``, the reference re-run with its selection forced to ``other``'s
    (``TorchRunner.run_selected``); otherwise (and without ``rerun``) ``ref`` itself."""
    tie = raw_selection_tie(ref, other, tie_eps=tie_eps)
    if rerun is None or tie is None or tie["selection"] != "tie":
        return ref, tie
    return rerun(np.asarray(other.extra["topk_indices"])), tie


def raw_with_selection(outputs: Mapping[str, np.ndarray]) -> RawOutputs:
    """``raw_from_outputs`` of ``run_torch_with_selection``'s result, its selection (``enc_scores`` [1,S],
    ``topk_indices`` [1,Q]) in ``extra`` as the converted files expose it."""
    raw = raw_from_outputs(outputs)
    raw.extra.update({k: np.asarray(outputs[k]) for k in SELECTION_OUTPUT_NAMES})
    return raw
