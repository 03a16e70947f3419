"""The GPU target's chain parity: the three-graph chain against PyTorch.

* ``chain_parity(ref_raws, raws, sizes, rerun=)``: detection-level parity of a chain's raws (``chain_raw``) against the
  one-graph export-mode model (``_reference``), on inputs from ``_nhwc`` (stage ``gpu_target``); where the chain's
  host selection differs from PyTorch's only by a near-tie, against PyTorch forced onto the chain's selection.
* ``forced_chain_parity(graphs, x, chain)``: a chain run on another backend against the PyTorch graphs, each graph fed
  the inputs the backend's chain used, selection-aware (stage ``gpu_chain_forced``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import numpy as np

from nailkit.gpu.split import torch_runner
from nailkit.model.build import export_module
from nailkit.portable.gpu_chain import GRAPH_OUTPUTS
from nailkit.portable.postprocess import RawOutputs, select_mask_queries, select_proposals, sigmoid
from nailkit.portable.preprocess import preprocess
from nailkit.verify.drift import drift_summary
from nailkit.verify.gates import GATES
from nailkit.verify.parity import (raw_with_selection, run_torch_with_selection, selection_difference,
                                   tie_resolved_reference)

#: ``rerun(i, indices)``: the reference's image ``i`` re-run with its two-stage selection forced to ``indices``
Rerun = Callable[[int, np.ndarray], RawOutputs]


def _reference(rf, images: Sequence[Any], res: int) -> tuple[list[RawOutputs], list[tuple[int, int]], Rerun]:
    """PyTorch fp32, the one-graph export-mode model (rfdetr's own ops): raws (their two-stage selection in
    ``extra``), original sizes, and ``rerun(i, indices)`` for ``chain_parity``."""
    module = export_module(rf, res)
    pre = [preprocess(im, res) for im in images]
    xs, sizes = [x for x, _ in pre], [size for _, size in pre]

    def rerun(i: int, indices: Optional[np.ndarray] = None) -> RawOutputs:
        return raw_with_selection(run_torch_with_selection(module, xs[i], forced_indices=indices))

    return [rerun(i) for i in range(len(xs))], sizes, rerun


def _nhwc(images: Sequence[Any], res: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(preprocess(im, res)[0].transpose(0, 2, 3, 1)) for im in images]


def chain_raw(chain: dict[str, Any]) -> RawOutputs:
    """``run_chain``'s raw with its host selection in ``extra`` as the one-graph files expose theirs: ``topk_indices``
    [1,Q] and ``enc_scores`` [1,S] (graph A's max class logit per token, what ``select_proposals`` ranks)."""
    raw = chain["raw"]
    raw.extra.update(topk_indices=np.asarray(chain["topk_indices"], np.int64).reshape(1, -1),
                     enc_scores=np.asarray(chain["enc_logits"], np.float32).max(-1))
    return raw


def chain_parity(ref_raws: Sequence[Any], raws: Sequence[Any], sizes: Sequence[tuple[int, int]], *,
                 rerun: Optional[Rerun] = None) -> dict[str, Any]:
    """Detection-level parity of a chain's raws against the one-graph reference (``verify.drift.drift_summary``: the
    reference's top-10 detections matched by box IoU; mask IoU at the original image size).

    Where a chain raw (``chain_raw``) and its reference (``_reference``) record their selections and these differ only
    between near-tied encoder scores (``parity.tie_resolved_reference``), that image compares against
    ``rerun(i, indices)``: PyTorch forced onto the chain's selection. A real difference compares unforced.
    ``selection``: the verdict per image (None where a selection is missing)."""
    pairs = [tie_resolved_reference(ref, raw, None if rerun is None else functools.partial(rerun, i))
             for i, (ref, raw) in enumerate(zip(ref_raws, raws))]
    d = drift_summary([p[0] for p in pairs], raws, sizes)
    d["selection"] = [None if tie is None else tie["selection"] for _, tie in pairs]
    d["forced_images"] = sum(ref is not p[0] for ref, p in zip(ref_raws, pairs))
    d["matched_frac"] = d["matched"] / d["of"] if d["of"] else None
    d["same_class"] = True  # detection_parity matches within a class only
    return d


def forced_chain_parity(graphs, x_nhwc, chain: dict[str, Any], *, num_select: int = 200, threshold: float = -1.0
                        ) -> dict[str, Any]:
    """A chain run on another backend (``run_chain``'s result, e.g. ``SplitModel(...).run``) against the PyTorch
    graphs, selection-aware, the way the one-graph parity gates compare (stage ``gpu_chain_forced``).

    Graph A runs on the same image. Graph B and C in PyTorch are then fed the inputs the backend's chain used (its
    memory, the proposals it selected, the mask rows it selected), so their outputs compare without re-ranking. The
    two host selections are compared with ``parity.selection_difference``: where they differ, it reports how far
    apart the swapped scores are (the proposals' max class logit; the queries' best sigmoid score). ``threshold`` and
    ``num_select`` must be the ones the chain ran with. Returns ``{"outputs": {name: {"max_abs", "excess"}},
    "proposals": …, "mask_queries": …}``; ``excess`` is max(|Δ| − rtol·|PyTorch|) with the gate's rtol."""
    rtol = GATES["gpu_chain_forced"]["rtol"]
    run = torch_runner(graphs)
    meta = graphs[0].nailkit_meta
    got = {k: np.asarray(v) for k, v in chain.items() if k != "raw"}

    def diff(ref: np.ndarray, name: str) -> dict[str, float]:
        r, o = np.asarray(ref, np.float64), np.asarray(got[name], np.float64).reshape(np.shape(ref))
        d = np.abs(r - o)
        return {"max_abs": float(d.max()), "excess": float((d - rtol * np.abs(r)).max())}

    a = run("graph_a", {"image": np.asarray(x_nhwc, np.float32)})
    outputs = {k: diff(a[k], k) for k in GRAPH_OUTPUTS["graph_a"]}
    _, ref_idx = select_proposals(a["enc_logits"][0], a["enc_boxes"][0], int(meta["num_queries"]))
    proposals = selection_difference(np.asarray(a["enc_logits"][0], np.float32).max(-1), ref_idx,
                                     got["topk_indices"])
    ref_boxes = got["enc_boxes"][0][np.asarray(got["topk_indices"], np.int64)]
    b = run("graph_b", {"memory": got["memory"], "ref_boxes": ref_boxes[None]})
    outputs.update({k: diff(b[k], k) for k in GRAPH_OUTPUTS["graph_b"]})
    slots = int(got["pred_masks"].shape[1])
    _, ref_q = select_mask_queries(b["pred_logits"][0], b["query_features"][0], num_select=num_select,
                                   threshold=threshold, slots=slots)
    mask_queries = selection_difference(sigmoid(np.asarray(b["pred_logits"][0], np.float64)).max(-1), ref_q,
                                        got["mask_queries"])
    rows = np.zeros((slots, got["query_features"].shape[-1]), np.float32)
    q = np.asarray(got["mask_queries"], np.int64)
    rows[:q.size] = got["query_features"][0][q]
    c = run("graph_c", {"memory": got["memory"], "query_features": rows[None]})
    outputs["pred_masks"] = diff(c["pred_masks"], "pred_masks")
    return {"outputs": outputs, "proposals": proposals, "mask_queries": mask_queries}
