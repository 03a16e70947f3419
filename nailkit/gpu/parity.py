"""The GPU target's chain parity: the three-graph chain against PyTorch.

* ``chain_parity(ref_raws, raws, sizes)``: detection-level parity of a chain's raws against the one-graph export-mode
  model (``_reference``), on inputs from ``_nhwc`` (stage ``gpu_target``).
* ``forced_chain_parity(graphs, x, chain)``: a chain run on another backend against the PyTorch graphs, each graph fed
  the inputs the backend's chain used, selection-aware (stage ``gpu_chain_forced``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nailkit.export.variants import torch_raw
from nailkit.gpu.split import torch_runner
from nailkit.model.build import export_module
from nailkit.portable.gpu_chain import GRAPH_OUTPUTS
from nailkit.portable.postprocess import select_mask_queries, select_proposals, sigmoid
from nailkit.portable.preprocess import preprocess
from nailkit.verify.drift import drift_summary
from nailkit.verify.gates import GATES
from nailkit.verify.parity import selection_difference


def _reference(rf, images: Sequence[Any], res: int):
    """PyTorch fp32, the one-graph export-mode model (rfdetr's own ops): raws and original sizes."""
    return torch_raw(export_module(rf, res), images, res)


def _nhwc(images: Sequence[Any], res: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(preprocess(im, res)[0].transpose(0, 2, 3, 1)) for im in images]


def chain_parity(ref_raws: Sequence[Any], raws: Sequence[Any], sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Detection-level parity of a chain's raws against the one-graph reference (``verify.drift.drift_summary``: the
    reference's top-10 detections matched by box IoU; mask IoU at the original image size)."""
    d = drift_summary(ref_raws, raws, sizes)
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
