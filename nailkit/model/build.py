"""Build and load the rfdetr model offline, and make its export-mode form.

* ``build_rfdetr`` constructs an rfdetr class with random weights and never downloads (``pretrain_weights=None``).
* ``load_model`` inspects a checkpoint, builds the matching class with the checkpoint's shapes and loads the weights.
  An empty path means the built-in demo checkpoint, built on demand under ``outputs/``.
* ``export_module`` returns the export-mode network at a fixed resolution: DINOv2 position embeddings frozen at that
  shape (rfdetr's own ``prepare_export_graph``), ``forward_export`` switched on, outputs as a plain tuple
  ``(pred_boxes [1,Q,4] cxcywh, pred_logits [1,Q,C], pred_masks [1,Q,R/4,R/4])``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
from pathlib import Path
from typing import Any

from nailkit.core.artifacts import atomic_write
from nailkit.model.checkpoint import Checkpoint, DEMO_CLASS_NAMES, DEMO_SEED
from nailkit.model.checkpoint_loading import CheckpointError, load_checkpoint, state_dict_of
from nailkit.model.checkpoint_report import class_labels

INPUT_NAME = "input"
OUTPUT_NAMES = ("pred_boxes", "pred_logits", "pred_masks")
DETECTION_OUTPUT_NAMES = OUTPUT_NAMES[:2]
from nailkit.core.paths import OUTPUT_DIR as DEFAULT_OUTPUT_DIR, SHIPPED_MODELS

# Architecture fields passed from the inspection report to the rfdetr constructor.
_ARCH_FIELDS = ("resolution", "num_queries", "dec_layers", "hidden_dim", "patch_size", "group_detr", "num_windows")


def _registry_names() -> set[str]:
    """File names in rfdetr's download registry (passing one to rfdetr triggers a download)."""
    try:
        from rfdetr.assets.model_weights import ModelWeights

        return {m.value.filename for m in ModelWeights}
    except Exception:  # noqa: BLE001 - advisory; also refuse anything that looks like a registry name
        return set()


def build_rfdetr(class_name: str = "RFDETRSegPreview", **overrides: Any):
    """Construct an rfdetr model class with random weights, offline."""
    import warnings

    import rfdetr

    cls = getattr(rfdetr, class_name, None)
    if cls is None:
        raise ValueError(f"rfdetr {rfdetr.__version__} has no class {class_name!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(pretrain_weights=None, **overrides)


def demo_checkpoint_path(output_dir: str | os.PathLike[str] | None = None, seed: int = DEMO_SEED) -> Path:
    """Path of the demo checkpoint, building it on first use."""
    out = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    path = out / "demo" / f"demo_seg_preview_seed{seed}.pth"
    if not path.exists():
        make_demo_checkpoint(path, seed=seed)
    return path


def make_demo_checkpoint(path: str | os.PathLike[str], seed: int = DEMO_SEED) -> Path:
    """Write a random-weight RFDETRSegPreview (2 classes) checkpoint in rfdetr's own format.

    The same seed gives identical tensors. Never downloads anything (``pretrain_weights=None``).
    """
    import torch

    torch.manual_seed(seed)
    rf = build_rfdetr("RFDETRSegPreview", num_classes=len(DEMO_CLASS_NAMES))
    args = argparse.Namespace(**dict(vars(rf.model.args)))
    args.class_names = list(DEMO_CLASS_NAMES)
    args.model_name = "RFDETRSegPreview"
    args.seed = seed
    args.nailkit_demo = True
    payload = {"model": rf.model.model.state_dict(), "args": args, "epoch": 0}
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


#: The trained demo nail model (fp32, deflated zip members) and the default of every notebook and CLI example.
#: Earlier versions live in git history (see README: the demo model).
TRAINED_DEMO = SHIPPED_MODELS / "nails_seg_preview_v5.pth"


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | Checkpoint | None,
                       output_dir: str | os.PathLike[str] | None = None, *, trusted: bool = False) -> Checkpoint:
    """The ``Checkpoint`` an entry point passes down. Empty → the trained demo model in data/models/ (the
    random-weight demo is ``demo_checkpoint_path()``, for tests that need any model of this architecture). A
    ``Checkpoint`` is returned as it is: nothing is resolved or hashed twice."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if checkpoint in (None, ""):
        if not TRAINED_DEMO.is_file():
            raise CheckpointError(f"{TRAINED_DEMO}: the trained demo model is missing from this checkout; pass a "
                                  f".pth, or build the random-weight demo with `python -m nailkit demo-checkpoint`")
        return Checkpoint(TRAINED_DEMO, trusted=trusted)
    path = Path(checkpoint)
    if not path.exists() and (path.name in _registry_names() or str(checkpoint).startswith("rf-detr-")):
        raise CheckpointError(
            f"{checkpoint}: is a weights name from rfdetr's download registry, and nailkit never downloads "
            f"(no model hub is reachable). Pass the path of a local .pth file instead.")
    return Checkpoint(path, trusted=trusted)


def load_model(checkpoint: str | os.PathLike[str] | Checkpoint | None = None, *, trusted: bool = False,
               require_segmentation: bool = True, output_dir: str | os.PathLike[str] | None = None):
    """Load a checkpoint into the matching rfdetr class, offline. Returns the rfdetr ``RFDETR`` object (nothing is
    attached to it: the ``Checkpoint`` from ``resolve_checkpoint`` carries the report and the hashes; this one load
    fills both when the caller passes the object)."""
    resolved = resolve_checkpoint(checkpoint, output_dir, trusted=trusted)
    path = resolved.path
    ckpt = load_checkpoint(path, trusted=resolved.trusted or trusted)
    resolved._fill(ckpt)
    report = resolved.report
    if require_segmentation and not report.segmentation_head:
        raise CheckpointError(f"{path}: detection-only checkpoint (no segmentation_head.* tensors); nailkit's "
                              f"segmentation pipeline needs an RFDETRSeg* checkpoint. Inspection still works: "
                              f"`python -m nailkit inspect {path}`.")
    class_name = report.rfdetr_class
    if class_name is None:
        if report.segmentation_head:
            class_name = "RFDETRSegPreview"
        else:
            raise CheckpointError(f"{path}: cannot tell which rfdetr detection class this is; "
                                  f"nailkit targets the segmentation models.")
    overrides = {k: getattr(report, k) for k in _ARCH_FIELDS if getattr(report, k) is not None}
    overrides["num_classes"] = report.num_classes
    if report.resolution and report.patch_size:
        overrides["positional_encoding_size"] = report.resolution // report.patch_size
    if not report.segmentation_head:
        overrides["segmentation_head"] = False
    try:
        rf = build_rfdetr(class_name, **overrides)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: rfdetr could not build {class_name} with {overrides}: {exc}") from None
    sd = state_dict_of(ckpt)
    target = rf.model.model
    expected = target.state_dict()
    mismatched = [f"{k}: checkpoint {list(v.shape)} vs model {list(expected[k].shape)}"
                  for k, v in sd.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise CheckpointError(f"{path}: weights do not fit {class_name} built from the inspected shapes: "
                              + "; ".join(parts))
    target.load_state_dict(sd, strict=True)
    target.eval()
    # every class id gets a label: the stored names, else unnamed_<id> (not rfdetr's fallback, COCO's 80 names)
    rf.model.class_names = class_labels(report)[0]
    return rf


def block_size(rf) -> int:
    """Resolutions must be multiples of patch_size × num_windows (24 for SegPreview)."""
    cfg = rf.model_config
    return int(cfg.patch_size) * int(getattr(cfg, "num_windows", 1))


def validate_resolution(rf, resolution: int | None) -> int:
    """Return a valid export resolution (default: the model's), or raise a clear ValueError."""
    res = int(resolution or rf.model.resolution)
    b = block_size(rf)
    if res <= 0 or res % b:
        lo, hi = (res // b) * b, (res // b + 1) * b
        near = ", ".join(str(r) for r in (lo, hi) if r > 0)
        raise ValueError(f"resolution {res} is not a multiple of patch_size×num_windows = {b} for this model "
                         f"(patch {rf.model_config.patch_size} × {rf.model_config.num_windows} windows). "
                         f"Nearest valid: {near}.")
    return res



def export_module(rf, resolution: int | None = None, *, segmentation: bool = True, mask_queries: int | None = None,
                  sampling: str | None = None, return_query_indices: bool = False):
    """Export-mode copy of the network at a fixed square resolution (rfdetr's own export preparation).

    Returns an ``nn.Module`` whose forward takes a normalized NCHW float32 batch and returns a tuple
    ``(pred_boxes, pred_logits[, pred_masks])``. The rfdetr model itself is not modified.

    Options (defaults reproduce the plain rfdetr export graph):

    * ``mask_queries=N``: keep only the N highest-scoring queries (score = max class logit, i.e. the max sigmoid
      score; ties by ascending query index, like ``postprocess.select_topk``) and compute masks for those N only.
      Outputs become ``pred_boxes [B,N,4]``, ``pred_logits [B,N,C]``, ``pred_masks [B,N,h,w]``, rows in descending
      score order, so the app's post-processing is unchanged (it just sees N queries instead of 200). The N rows are
      exactly the full model's rows for those queries. The selection is TopK- and Gather-free (pairwise ranks and a
      one-hot matmul, see ``select_queries``), so the graph keeps exactly one TopK (the two-stage selection) and
      nailkit's selection-aware parity applies unchanged. Every (query, class) pair among the full model's top N
      pairs belongs to one of the N kept queries, so the first N detections are the same.
    * ``return_query_indices=True`` (only with ``mask_queries``): a 4th output ``query_indices [B,N]`` int32, the
      kept queries' indices in the full model's 200 (diagnostic; off by default because nailkit identifies outputs by
      rank/dtype and an integer rank-2 output already means ``topk_indices``).
    * ``sampling``: ``None`` / ``"grid"`` keeps rfdetr's ``grid_sample`` deformable sampling; ``"tent"`` swaps in the
      gather-free matmul sampler of ``nailkit.model.sampling`` (``SAMPLING_CHOICES``); ``"xnn"`` is ``"tent"`` plus
      ``nailkit.model.xnnpack_friendly``: the two-stage query selection (constant proposals, one-hot-matmul gathers) and the
      decoder's sine embedding (constant ``dim_t``, no slicing) rewritten so that only TopK (and the cast of its
      indices) stays off XNNPACK — the same numbers.
    """
    import torch
    from rfdetr.export._backend import _switch_to_export_mode
    from rfdetr.export.prepare import prepare_export_graph

    res = validate_resolution(rf, resolution)
    has_seg = bool(getattr(rf.model_config, "segmentation_head", False))
    if segmentation and not has_seg:
        raise ValueError("segmentation outputs requested but this checkpoint has no segmentation head "
                         "(detection-only); pass segmentation=False")
    num_queries = int(rf.model.model.num_queries)
    if mask_queries is not None:
        mask_queries = int(mask_queries)
        if not segmentation:
            raise ValueError("mask_queries needs the segmentation outputs (segmentation=True)")
        if not 1 <= mask_queries <= num_queries:
            raise ValueError(f"mask_queries must be between 1 and the model's {num_queries} queries, "
                             f"got {mask_queries}")
    if return_query_indices and mask_queries is None:
        raise ValueError("return_query_indices needs mask_queries")
    net = copy.deepcopy(rf.model.model).cpu().eval()
    graph = prepare_export_graph(net, rf.model_config, shape=(res, res), device="cpu")
    _switch_to_export_mode(graph.model)
    if normalize_sampling(sampling) != "grid":
        from nailkit.model.sampling import swap_deformable_sampling  # lazy: torch + rfdetr at import

        swap_deformable_sampling(graph.model, "tent")
    if normalize_sampling(sampling) == "xnn":
        from nailkit.model.xnnpack_friendly import make_xnnpack_friendly  # lazy: torch + rfdetr at import

        make_xnnpack_friendly(graph.model, res)

    class ExportModule(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, n_out: int) -> None:
            super().__init__()
            self.inner = inner
            self.n_out = n_out

        def forward(self, x: torch.Tensor):
            out = self.inner(x)
            return tuple(out[: self.n_out])

    if mask_queries is None:
        mod = ExportModule(graph.model, 3 if segmentation else 2).eval()
        mod.output_names = OUTPUT_NAMES if segmentation else DETECTION_OUTPUT_NAMES
    else:
        mod = _mask_query_module_class()(graph.model, mask_queries, return_query_indices).eval()
        mod.output_names = OUTPUT_NAMES + (("query_indices",) if return_query_indices else ())
    mod.resolution = res
    mod.mask_queries = mask_queries
    mod.sampling = sampling
    return mod


#: the deformable-sampling choices of the export options: rfdetr's ``grid_sample`` ("grid", the default), the
#: gather-free tent matmul of ``nailkit.model.sampling`` ("tent"), and tent + the XNNPACK-friendly query selection and sine
#: embedding of ``nailkit.model.xnnpack_friendly`` ("xnn")
SAMPLING_CHOICES = ("grid", "tent", "xnn")


def normalize_sampling(sampling: str | None) -> str:
    """``None`` / ``"grid"`` / ``"grid_sample"`` → ``"grid"``; ``"tent"``, ``"xnn"`` as is; anything else: ValueError."""
    if sampling in (None, "", "grid", "grid_sample"):
        return "grid"
    if sampling in ("tent", "xnn"):
        return sampling
    raise ValueError(f"unknown deformable sampling {sampling!r}; expected one of {SAMPLING_CHOICES}")


def export_options(sampling: str | None = None, mask_queries: int | None = None) -> dict[str, Any]:
    """The export options that change the graph, normalised, **only where they differ from the default** — what the
    cache keys and file names of every stage (ONNX, both TFLite routes) add, so a default file keeps its key and a
    tent / top-N file can never be served for a default request (or the other way round)."""
    opts: dict[str, Any] = {}
    if normalize_sampling(sampling) != "grid":
        opts["sampling"] = normalize_sampling(sampling)
    if mask_queries is not None:
        n = int(mask_queries)
        if n < 1:
            raise ValueError(f"mask_queries must be a positive number of queries, got {mask_queries}")
        opts["mask_queries"] = n
    return opts


def export_suffix(sampling: str | None = None, mask_queries: int | None = None) -> str:
    """File-name tag of the export options: "" (default), "_tent", "_xnn", "_mq20", "_tent_mq20"."""
    opts = export_options(sampling, mask_queries)
    return (f"_{opts['sampling']}" if "sampling" in opts else "") + (f"_mq{opts['mask_queries']}"
                                                                   if "mask_queries" in opts else "")


def select_queries(scores, n: int):
    """One-hot selection matrix [B, n, Q] (float32) of the ``n`` highest ``scores`` [B, Q], descending, ties by
    ascending index (the order of a stable descending argsort).

    TopK- and Gather-free: query j outranks query i when ``s_j > s_i``, or ``s_j == s_i`` and ``j < i``; the rank of
    i is the number of queries that outrank it (a strict total order, so ranks are 0..Q-1 without repeats) and row r
    of the result is the one-hot of the query with rank r. ``sel @ t`` then picks rows of ``t`` exactly (one term is
    x·1, all others are 0·y).
    """
    import torch

    q = scores.shape[-1]
    s_i = scores.unsqueeze(-1)  # [B, Q(i), 1]
    s_j = scores.unsqueeze(-2)  # [B, 1, Q(j)]
    earlier = torch.ones(q, q, dtype=torch.float32, device=scores.device).tril(-1)  # [i, j]: 1 where j < i
    # j outranks i: s_j > s_i, or a tie with j < i. In float arithmetic (0/1 values, exact), not a bool Where:
    # onnxruntime has no Where kernel for bool tensors.
    beats = (s_j > s_i).to(torch.float32) + earlier * (s_j == s_i).to(torch.float32)  # [B, i, j]
    rank = beats.sum(-1)  # [B, Q], exact small integers
    slots = torch.arange(n, dtype=torch.float32, device=scores.device)
    return (rank.unsqueeze(-2) == slots[:, None]).to(torch.float32)  # [B, n, Q]


@functools.lru_cache(maxsize=None)
def _mask_query_module_class():
    import torch

    class MaskQueryExportModule(torch.nn.Module):
        """rfdetr's ``LWDETR.forward_export`` (segmentation path) with the top-N query selection before the mask head.

        Same modules and the same math as ``forward_export`` up to the decoder and the box/class heads; then the N
        best queries are selected (``select_queries``) and only their decoder features go through the mask head.
        """

        def __init__(self, inner: torch.nn.Module, mask_queries: int, return_query_indices: bool = False) -> None:
            super().__init__()
            if getattr(inner, "segmentation_head", None) is None or getattr(inner, "use_grouppose_keypoints", False):
                raise ValueError("mask_queries needs a segmentation model without keypoints")
            if getattr(inner, "transformer", None) is None or not getattr(inner.transformer, "decoder", None):
                raise ValueError("mask_queries needs a model with a decoder")
            self.inner = inner
            self.n = int(mask_queries)
            self.return_query_indices = bool(return_query_indices)

        def forward(self, x: torch.Tensor):
            m = self.inner
            srcs, _, poss, cross_attn_srcs = m.backbone(x)
            hs, ref_unsigmoid = m.transformer(srcs, None, poss, m.refpoint_embed.weight[: m.num_queries],
                                              m.query_feat.weight[: m.num_queries],
                                              cross_attn_srcs=cross_attn_srcs)[:2]
            if m.bbox_reparam:
                delta = m.bbox_embed(hs)
                cxcy = delta[..., :2] * ref_unsigmoid[..., 2:] + ref_unsigmoid[..., :2]
                wh = delta[..., 2:].exp() * ref_unsigmoid[..., 2:]
                boxes = torch.concat([cxcy, wh], dim=-1)
            else:
                boxes = (m.bbox_embed(hs) + ref_unsigmoid).sigmoid()
            logits = m.class_embed(hs)
            sel = select_queries(logits.max(-1)[0], self.n)  # [B, N, Q]
            boxes_n = torch.matmul(sel, boxes)
            logits_n = torch.matmul(sel, logits)
            hs_n = torch.matmul(sel, hs)
            masks = m.segmentation_head(srcs[0], [hs_n], x.shape[-2:])[0]
            if self.return_query_indices:
                q = hs.shape[1]
                idx = torch.matmul(sel, torch.arange(q, dtype=torch.float32, device=x.device)).to(torch.int32)
                return boxes_n, logits_n, masks, idx
            return boxes_n, logits_n, masks

    return MaskQueryExportModule


def __getattr__(name: str):  # lazy: torch is imported only when the class is used
    if name == "MaskQueryExportModule":
        return _mask_query_module_class()
    raise AttributeError(name)


def forward_raw(rf, x) -> dict[str, Any]:
    """One forward pass of the loaded (non-export) rfdetr network on a preprocessed NCHW batch.

    Returns the final-layer outputs as numpy: ``pred_logits`` [B,Q,C], ``pred_boxes`` [B,Q,4] (cxcywh, normalised),
    ``pred_masks`` [B,Q,H/4,W/4] (mask logits) when the model has a segmentation head.
    """
    import numpy as np
    import torch

    net = rf.model.model.eval()
    with torch.no_grad():
        out = net(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    return {k: out[k].detach().cpu().numpy() for k in OUTPUT_NAMES if k in out and hasattr(out[k], "detach")}
