"""The GPU target's graph A/B/C split of the rfdetr network, as PyTorch modules: the two-graph split of
google-ai-edge/litert-samples' RF-DETR GPU recipe, extended with the segmentation head (Graph C).

* ``build_gpu_graphs(rf)`` → Graph A (image → proposal logits/boxes + encoder memory), Graph B (decoder + heads for
  the host's top-Q proposals), Graph C (masks for the host's selected queries only), over a GPU-patched export-mode
  copy (``nailkit.gpu.patches``). Every tensor ≤ 4-D; no TopK, GATHER, CAST-to-int.
* the host steps between them are ``postprocess.select_proposals`` / ``postprocess.select_mask_queries`` (numpy
  only, shipped in the bundle; the chain itself is ``nailkit.portable.gpu_chain``).
* ``example_inputs(meta)``: inputs in the shapes the exported files take; ``torch_runner(graphs)``: the PyTorch graphs
  as a ``run_graph`` for ``gpu_chain.run_chain``.

Their conversion is ``nailkit.gpu.export`` (cached: ``nailkit.gpu.convert``); their parity ``nailkit.gpu.parity``.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np

from nailkit.gpu.patches import DEFAULT_PATCHES, _patch_for_gpu, gpu_patches
from nailkit.model.build import export_module
from nailkit.portable.gpu_chain import GRAPH_NAMES

DEFAULT_MASK_SLOTS = 16


def build_gpu_graphs(rf, resolution: Optional[int] = None, *, mask_slots: int = DEFAULT_MASK_SLOTS,
                     safe_layernorm: bool = True, gpu_ops: bool = True, patches: Iterable[str] = DEFAULT_PATCHES):
    """(graph_a, graph_b, graph_c) nn.Modules over a GPU-patched export-mode copy of the rfdetr network.

    * Graph A: NHWC image [1,R,R,3] → ``enc_logits`` [1,HW,C+1] (two-stage proposal class logits, every token),
      ``enc_boxes`` [1,HW,4] (proposal boxes, cxcywh normalised, every token: the box MLP is token-pointwise, so
      computing it for all tokens and gathering on the host equals rfdetr's gather-then-MLP), ``memory`` [1,HW,D].
    * host (``postprocess.select_proposals``): score = max over classes, top-Q tokens, their boxes → ``ref_boxes``.
    * Graph B: (memory, ref_boxes [1,Q,4]) → ``pred_boxes`` [1,Q,4], ``pred_logits`` [1,Q,C+1],
      ``query_features`` [1,Q,D] (the decoder output after the mask head's query MLP and projection).
    * host (``postprocess.select_mask_queries``): rfdetr's predict() selection → up to K query rows, zero-padded.
    * Graph C: (memory, query_features [1,K,D]) → ``pred_masks`` [1,K,R/4,R/4] mask logits for those rows only.

    ``gpu_ops=False`` keeps rfdetr's own ops (for checking the split alone against the one-graph model).
    """
    mod = export_module(rf, resolution)
    net = mod.inner
    res = mod.resolution
    if gpu_ops:
        meta_counts = _patch_for_gpu(net, res, safe_layernorm=safe_layernorm, patches=patches)
    else:
        meta_counts = {}
    hw = res // int(rf.model_config.patch_size)
    _check_supported(net)
    proposals = _proposal_grid(hw, res)
    a, b, c = _graph_a(net, proposals).eval(), _graph_b(net, hw).eval(), _graph_c(net, res, hw).eval()
    meta = {"resolution": res, "num_queries": int(net.num_queries), "hidden_dim": int(net.transformer.d_model),
            "tokens": hw * hw, "mask_slots": int(mask_slots),
            "mask_size": res // int(net.segmentation_head.downsample_ratio),
            "num_logits": int(net.class_embed.out_features), "patched": meta_counts}
    for g in (a, b, c):
        g.nailkit_meta = meta
    return a, b, c


def _check_supported(net) -> None:
    """The split needs a two-stage, bbox-reparam, segmentation rfdetr model."""
    tr = net.transformer
    if not (tr.two_stage and net.bbox_reparam and tr.dec_layers > 0 and net.segmentation_head is not None):
        raise NotImplementedError("GPU target: needs a two-stage, bbox-reparam, segmentation rfdetr model")


def _proposal_grid(hw: int, res: int):
    """The image-independent proposal grid [1, HW, 4] (rfdetr's gen_encoder_output_proposals, bbox_reparam: not
    unsigmoided); every proposal must be valid, since Graph A has no mask for them."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(hw, dtype=torch.float32), torch.arange(hw, dtype=torch.float32),
                            indexing="ij")
    cxcy = (torch.stack([xs, ys], -1).reshape(1, hw * hw, 2) + 0.5) / hw
    proposals = torch.cat([cxcy, torch.full_like(cxcy, 0.05)], -1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
    if not bool(valid.all()):
        raise NotImplementedError(f"GPU target: at {res} some proposals are invalid; the host would need the mask")
    return proposals


def _graph_a(net, proposals):
    """Graph A: image → proposal logits/boxes for every token + encoder memory."""
    import torch
    from torch import nn

    tr = net.transformer

    class GraphA(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = net.backbone
            self.tr = tr
            self.register_buffer("proposals", proposals, persistent=False)

        def forward(self, image):
            x = image.permute(0, 3, 1, 2)
            srcs = self.backbone(x)[0]
            memory = srcs[0].flatten(2).transpose(1, 2)  # [1, HW, D]
            om = self.tr.enc_output_norm[0](self.tr.enc_output[0](memory))
            enc_logits = self.tr.enc_out_class_embed[0](om)
            delta = self.tr.enc_out_bbox_embed[0](om)
            p = self.proposals
            enc_boxes = torch.cat([delta[..., :2] * p[..., 2:] + p[..., :2], delta[..., 2:].exp() * p[..., 2:]], -1)
            return {"enc_logits": enc_logits, "enc_boxes": enc_boxes, "memory": memory}

    return GraphA()


def _graph_b(net, hw: int):
    """Graph B: (memory, the host's top-Q proposal boxes) → decoder boxes, logits and mask-head query features."""
    import torch
    from torch import nn

    q = int(net.num_queries)

    class GraphB(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("ss", torch.tensor([[hw, hw]], dtype=torch.long), persistent=False)
            self.register_buffer("lsi", torch.tensor([0], dtype=torch.long), persistent=False)

        def forward(self, memory, ref_boxes):
            n = self.net
            tgt = n.query_feat.weight[:q].unsqueeze(0)
            rp = n.refpoint_embed.weight[:q].unsqueeze(0)
            ref = torch.cat([rp[..., :2] * ref_boxes[..., 2:] + ref_boxes[..., :2],
                             rp[..., 2:].exp() * ref_boxes[..., 2:]], -1)
            hs, ref_out = n.transformer.decoder(tgt, memory, memory_key_padding_mask=None, pos=None,
                                                refpoints_unsigmoid=ref, level_start_index=self.lsi,
                                                spatial_shapes=self.ss, spatial_shapes_hw=[(hw, hw)],
                                                valid_ratios=None)[:2]
            delta = n.bbox_embed(hs)
            boxes = torch.cat([delta[..., :2] * ref_out[..., 2:] + ref_out[..., :2],
                               delta[..., 2:].exp() * ref_out[..., 2:]], -1)
            logits = n.class_embed(hs)
            sh = n.segmentation_head
            qf = sh.query_features_proj(sh.query_features_block(hs))
            return {"pred_boxes": boxes, "pred_logits": logits, "query_features": qf}

    return GraphB()


def _graph_c(net, res: int, hw: int):
    """Graph C: (memory, the host's selected query features) → mask logits for those rows only."""
    import torch
    from torch import nn

    d = int(net.transformer.d_model)

    class GraphC(nn.Module):
        def __init__(self):
            super().__init__()
            self.sh = net.segmentation_head

        def forward(self, memory, query_features):
            sh = self.sh
            src = memory.transpose(1, 2).reshape(1, d, hw, hw)
            t = res // sh.downsample_ratio
            sf = torch.nn.functional.interpolate(src, size=(t, t), mode="bilinear", align_corners=False)
            for blk in sh.blocks:
                sf = blk(sf)
            sf = sh.spatial_features_proj(sf)
            k = query_features.shape[1]
            masks = torch.matmul(query_features, sf.flatten(2)).reshape(1, k, t, t)
            return {"pred_masks": masks + sh.bias}

    return GraphC()


def example_inputs(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Example inputs (torch) for each graph by input name, in the shapes the exported files take."""
    import torch

    r, d, t, q, k = meta["resolution"], meta["hidden_dim"], meta["tokens"], meta["num_queries"], meta["mask_slots"]
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(1, q, 4, generator=g) * 0.5 + 0.25
    boxes[..., 2:] = 0.05
    return {"graph_a": {"image": torch.zeros(1, r, r, 3)},
            "graph_b": {"memory": torch.randn(1, t, d, generator=g), "ref_boxes": boxes},
            "graph_c": {"memory": torch.randn(1, t, d, generator=g), "query_features": torch.randn(1, k, d, generator=g)}}


def torch_runner(graphs):
    """``run_graph(name, feeds)`` over the PyTorch graphs (numpy in, numpy out) for ``gpu_chain.run_chain``."""
    import torch

    by_name = dict(zip(GRAPH_NAMES, graphs))

    def run_graph(name: str, feeds):
        with torch.no_grad(), gpu_patches():
            out = by_name[name](**{k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                                   for k, v in feeds.items()})
        return {k: v.numpy() for k, v in out.items()}

    return run_graph
