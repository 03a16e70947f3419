"""Build and load the rfdetr model offline, and make its export-mode form.

* ``build_rfdetr`` constructs an rfdetr class with random weights and never downloads (``pretrain_weights=None``).
* ``load_model`` inspects a checkpoint, builds the matching class with the checkpoint's shapes and loads the weights.
  An empty path means the built-in demo checkpoint, built on demand under ``outputs/``.
* ``export_module`` returns the export-mode network at a fixed resolution: DINOv2 position embeddings frozen at that
  shape (rfdetr's own ``prepare_export_graph``), ``forward_export`` switched on, outputs as a plain tuple
  ``(pred_boxes [1,Q,4] cxcywh, pred_logits [1,Q,C], pred_masks [1,Q,R/4,R/4])``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from nailkit.checkpoint import (
    DEMO_SEED,
    CheckpointError,
    CheckpointReport,
    args_of,
    inspect,
    load_checkpoint,
    make_demo_checkpoint,
    state_dict_of,
)

INPUT_NAME = "input"
OUTPUT_NAMES = ("pred_boxes", "pred_logits", "pred_masks")
DETECTION_OUTPUT_NAMES = OUTPUT_NAMES[:2]
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "outputs"

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


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None
                       ) -> Path:
    """Map the notebooks' ``checkpoint`` parameter to a file: empty → the demo checkpoint."""
    if checkpoint in (None, ""):
        return demo_checkpoint_path(output_dir)
    path = Path(checkpoint)
    if not path.exists() and (path.name in _registry_names() or str(checkpoint).startswith("rf-detr-")):
        raise CheckpointError(
            f"{checkpoint}: is a weights name from rfdetr's download registry, and nailkit never downloads "
            f"(no model hub is reachable). Pass the path of a local .pth file instead.")
    return path


def load_model(checkpoint: str | os.PathLike[str] | None = None, *, trusted: bool = False,
               require_segmentation: bool = True, output_dir: str | os.PathLike[str] | None = None):
    """Load a checkpoint into the matching rfdetr class, offline. Returns the rfdetr ``RFDETR`` object.

    The report of the inspection is attached as ``model.nailkit_report``.
    """
    path = resolve_checkpoint(checkpoint, output_dir)
    ckpt = load_checkpoint(path, trusted=trusted)
    report = inspect(ckpt)
    report.path = str(path)
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
    names = report.class_names or args_of(ckpt).get("class_names")
    if names:
        rf.model.class_names = list(names)
    rf.nailkit_report = report
    rf.nailkit_checkpoint = path
    return rf


def model_report(rf) -> CheckpointReport:
    return rf.nailkit_report


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



def export_module(rf, resolution: int | None = None, *, segmentation: bool = True):
    """Export-mode copy of the network at a fixed square resolution (rfdetr's own export preparation).

    Returns an ``nn.Module`` whose forward takes a normalized NCHW float32 batch and returns a tuple
    ``(pred_boxes, pred_logits[, pred_masks])``. The rfdetr model itself is not modified.
    """
    import torch
    from rfdetr.export._backend import _switch_to_export_mode
    from rfdetr.export.prepare import prepare_export_graph

    res = validate_resolution(rf, resolution)
    has_seg = bool(getattr(rf.model_config, "segmentation_head", False))
    if segmentation and not has_seg:
        raise ValueError("segmentation outputs requested but this checkpoint has no segmentation head "
                         "(detection-only); pass segmentation=False")
    net = copy.deepcopy(rf.model.model).cpu().eval()
    graph = prepare_export_graph(net, rf.model_config, shape=(res, res), device="cpu")
    _switch_to_export_mode(graph.model)

    class ExportModule(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, n_out: int) -> None:
            super().__init__()
            self.inner = inner
            self.n_out = n_out

        def forward(self, x: torch.Tensor):
            out = self.inner(x)
            return tuple(out[: self.n_out])

    mod = ExportModule(graph.model, 3 if segmentation else 2).eval()
    mod.resolution = res
    mod.output_names = OUTPUT_NAMES if segmentation else DETECTION_OUTPUT_NAMES
    return mod


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
