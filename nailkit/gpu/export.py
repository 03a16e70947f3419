"""The GPU target's conversion: Graph A/B/C (``nailkit.gpu.split``) → ``graph_{a,b,c}.tflite`` with litert-torch,
each op-checked (``nailkit.gpu.op_check``) and with nailkit metadata embedded (``IO_MEANINGS``, ``HOST_STEPS``).

``export_gpu_graphs`` runs in its own process (``python -m nailkit.gpu.export export CKPT OUT_DIR RES SLOTS``: loads
triton through litert_torch before anything imports tensorflow); ``nailkit.gpu.convert.ensure_gpu_graphs`` starts it
and caches the result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from nailkit.core import subproc
from nailkit.core.import_order import load_triton_first
from nailkit.gpu.op_check import op_check
from nailkit.gpu.patches import gpu_patches
from nailkit.gpu.split import DEFAULT_MASK_SLOTS, build_gpu_graphs, example_inputs
from nailkit.model.build import load_model
from nailkit.portable.gpu_chain import GRAPH_NAMES, GRAPH_OUTPUTS
from nailkit.tflite import metadata as tm
from nailkit.tflite.passes import lift_constant_binary_ops

IO_MEANINGS = {
    "enc_logits": "two-stage proposal class logits for every encoder token [1,HW,C+1]",
    "enc_boxes": "proposal boxes for every token, cxcywh normalised to the input [1,HW,4]",
    "memory": "encoder memory [1,HW,D], input of graphs B and C (keep it on the GPU between graphs)",
    "pred_boxes": "boxes of the Q queries, cxcywh normalised to the input [1,Q,4]",
    "pred_logits": "class LOGITS of the Q queries [1,Q,C+1]: sigmoid per (query, class), last column = no-object",
    "query_features": "mask-head query features [1,Q,D]; the host copies the selected rows into graph C's input",
    "pred_masks": "mask LOGITS at 1/4 input resolution for the K slots [1,K,R/4,R/4]; row i = mask_queries[i]",
    "image": "RGB image [1,R,R,3] NHWC float32, preprocess.py's values (ImageNet-normalised)",
    "ref_boxes": "the host's top-Q proposal boxes [1,Q,4] (postprocess.select_proposals)",
}
HOST_STEPS = {"graph_a->graph_b": "postprocess.select_proposals(enc_logits[0], enc_boxes[0], num_queries)",
              "graph_b->graph_c": "postprocess.select_mask_queries(pred_logits[0], query_features[0], "
                                  "num_select, threshold, slots=K)",
              "final": "postprocess.postprocess(RawOutputs(pred_boxes[0], pred_logits[0], pred_masks[0], "
                       "mask_queries=q), (W, H), threshold)",
              "reference_code": "gpu_chain.py: run_chain / SplitModel"}


def export_gpu_graphs(checkpoint: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str], *,
                      resolution: Optional[int] = None, mask_slots: int = DEFAULT_MASK_SLOTS,
                      class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Convert Graph A/B/C with litert-torch to ``out_dir/graph_{a,b,c}.tflite`` (fp32 weights; the GPU delegate
    picks fp16 or fp32 at run time) with named signature inputs/outputs, op-check each, and embed nailkit metadata
    (``nailkit.tflite.metadata``) in each. Returns a summary. Call it in a fresh process (``ensure_gpu_graphs``)."""
    import time

    load_triton_first()
    import litert_torch
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rf = load_model(checkpoint)
    graphs = build_gpu_graphs(rf, resolution, mask_slots=mask_slots)
    meta = graphs[0].nailkit_meta
    ex = example_inputs(meta)
    names = list(class_names or getattr(rf, "class_names", None) or [])  # labels.txt order: class id i = line i
    summary: dict[str, Any] = {"meta": meta, "graphs": {}}
    for name, g in zip(GRAPH_NAMES, graphs):
        t0 = time.time()
        path = out / f"{name}.tflite"
        with torch.no_grad(), gpu_patches():
            litert_torch.convert(g, sample_args=(), sample_kwargs=ex[name]).export(str(path))
        lifted = lift_constant_binary_ops(path)  # the WebGPU delegate's rank-2 × constant defect (tflite_passes)
        oc = op_check(path)
        ins = [(k, list(v.shape)) for k, v in ex[name].items()]
        doc = tm.build_metadata(class_names=names, resolution=meta["resolution"], input_name=ins[0][0],
                                outputs=[{"name": n, "meaning": IO_MEANINGS[n]} for n in GRAPH_OUTPUTS[name]],
                                graph={"name": name, "of": list(GRAPH_NAMES), "inputs": [
                                    {"name": k, "shape": s, "meaning": IO_MEANINGS[k]} for k, s in ins],
                                    "host_steps": HOST_STEPS, **meta},
                                extra={"op_check": {"ok": oc.ok, "n_ops": oc.n_ops}})
        tm.embed_metadata(path, doc, labels=names)
        summary["graphs"][name] = {"path": str(path), "convert_s": round(time.time() - t0, 1),
                                   "lifted_constant_ops": lifted, "op_check": oc.summary()}
    return summary


def _main(argv: list[str]) -> None:
    if argv and argv[0] == "export":
        ckpt, out, res, slots = argv[1:5]
        subproc.emit({"summary": export_gpu_graphs(ckpt, out, resolution=int(res), mask_slots=int(slots))})
        return
    raise SystemExit("usage: python -m nailkit.gpu.export export CKPT OUT_DIR RES SLOTS")


if __name__ == "__main__":
    _main(sys.argv[1:])
