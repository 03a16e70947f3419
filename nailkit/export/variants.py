"""The earlier attempt's other options, made real: lower resolution, detection-only, TorchScript (and ExecuTorch).

* ``pos_embed_check``: proves that the export-mode module at resolution R froze the DINOv2 position embeddings to
  exactly rfdetr's interpolation (bicubic, antialias, ``align_corners=False``) of the checkpoint's table, by
  recomputing that interpolation independently and by comparing the export-mode outputs with the eager (non-export)
  network run at R, which interpolates on the fly.
* ``resolution_drift``: PyTorch at R vs PyTorch at the reference resolution, both post-processed to the *original*
  image size and matched by IoU (``nailkit.verify.parity.detection_parity``).
* ``detection_only_module``: the export-mode module with the segmentation head removed (``segmentation_head=None``,
  so rfdetr's ``forward_export`` never computes masks) — outputs (pred_boxes, pred_logits) only.
  ``nailkit.model.build.export_module(segmentation=False)`` only trims the outputs; in eager PyTorch it still runs the head.
* ``ensure_torchscript``: the ``.pt`` rfdetr's ``inference(compile=True)`` builds (``torch.jit.trace`` of the
  export-mode network at the model's resolution, batch 1), saved with ``torch.jit.save``; ``check_torchscript``
  loads it in a fresh process and compares with eager. PyTorch Mobile (the lite interpreter) is deprecated and
  superseded by ExecuTorch.
* ``executorch_status``: whether rfdetr's ExecuTorch exporter can run here (it needs the ``executorch`` package).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.core import artifacts, subproc
from nailkit.data.samples import sample_images
from nailkit.model.build import DETECTION_OUTPUT_NAMES, export_module, forward_raw, INPUT_NAME, validate_resolution
from nailkit.model.checkpoint import Checkpoint, checkpoint_content
from nailkit.portable.preprocess import preprocess
from nailkit.verify.drift import drift_summary
from nailkit.verify.parity import raw_from_outputs

# ----------------------------------------------------------------------------------------------------------------
# resolution: position embeddings and drift
# ----------------------------------------------------------------------------------------------------------------


def _dinov2(module):
    from rfdetr.models.backbone.dinov2 import DinoV2

    for m in module.modules():
        if isinstance(m, DinoV2):
            return m
    raise ValueError("no DINOv2 backbone found in the module")


def interpolate_pos_embed(table, grid: int, *, antialias: bool = True):
    """rfdetr's interpolation of a [1, 1+g*g, D] position table (cls first) to a ``grid``×``grid`` patch grid."""
    import torch
    import torch.nn.functional as F

    n = table.shape[1] - 1
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position table has {n} patch entries, not a square grid")
    cls_tok, patch = table[:, :1], table[:, 1:]
    d = table.shape[-1]
    patch = patch.reshape(1, g, g, d).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([cls_tok, patch.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)


def pos_embed_check(rf, resolution: int, image: Any = None) -> dict[str, Any]:
    """Check the frozen position embeddings of ``export_module(rf, R)`` and the export-mode outputs vs eager.

    Returns max-abs of (frozen table − independent bicubic-antialias interpolation), the same against the
    *non-antialiased* interpolation (how much antialias matters at this R), and the max-abs difference of
    export-mode vs eager outputs at R on ``image`` (default: a data/ photo).
    """
    import torch

    mod = export_module(rf, resolution)
    res = mod.resolution
    orig = _dinov2(rf.model.model).encoder.embeddings.position_embeddings.detach()
    frozen = _dinov2(mod).encoder.embeddings.position_embeddings.detach()
    patch = int(rf.model_config.patch_size)
    with torch.no_grad():
        expect = interpolate_pos_embed(orig, res // patch, antialias=True)
        no_aa = interpolate_pos_embed(orig, res // patch, antialias=False)
    if frozen.shape != expect.shape:
        raise RuntimeError(f"frozen position table {tuple(frozen.shape)} != expected {tuple(expect.shape)} at {res}")
    if image is None:
        image = sample_images("photos")[0]
    x, _ = preprocess(image, res)
    with torch.no_grad():
        exp_out = [o.numpy() for o in mod(torch.from_numpy(x))]
    eager = forward_raw(rf, x)
    out_diff = {n: float(np.abs(eager[n] - e).max()) for n, e in zip(mod.output_names, exp_out)}
    return {"resolution": res, "grid": res // patch, "native_grid": int(round((orig.shape[1] - 1) ** 0.5)),
            "table_shape": list(frozen.shape),
            "frozen_vs_bicubic_antialias_max_abs": float((frozen - expect).abs().max()),
            "frozen_vs_bicubic_no_antialias_max_abs": float((frozen - no_aa).abs().max()),
            "export_vs_eager_max_abs": out_diff}


def torch_raw(module, images: Sequence[Any], resolution: int):
    """Run an export-mode module on images; returns ([RawOutputs], [(w, h)])."""
    import torch

    raws, sizes = [], []
    for im in images:
        x, size = preprocess(im, resolution)
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        raws.append(raw_from_outputs([o.numpy() for o in out]))
        sizes.append(size)
    return raws, sizes


def resolution_drift(rf, resolutions: Sequence[int], images: Sequence[Any], *,
                     reference: Optional[int] = None) -> dict[int, dict[str, Any]]:
    """PyTorch at each R vs PyTorch at ``reference`` (default: the model's resolution): detection-level drift with
    both runs post-processed to the original image size (``nailkit.verify.drift.drift_summary``). The reference resolution
    itself is left out: a run compared with itself measures nothing."""
    resolutions = [validate_resolution(rf, r) for r in resolutions]  # refuse bad sizes before any work
    ref_res = validate_resolution(rf, reference)
    ref_raws, sizes = torch_raw(export_module(rf, ref_res), images, ref_res)
    out: dict[int, dict[str, Any]] = {}
    for r in resolutions:
        if r == ref_res:
            continue
        raws, _ = torch_raw(export_module(rf, r), images, r)
        out[int(r)] = drift_summary(ref_raws, raws, sizes)
    return out


# ----------------------------------------------------------------------------------------------------------------
# detection-only
# ----------------------------------------------------------------------------------------------------------------


def detection_only_module(rf, resolution: Optional[int] = None):
    """Export-mode module without the segmentation head: forward -> (pred_boxes, pred_logits)."""
    mod = export_module(rf, resolution, segmentation=False)
    if getattr(mod.inner, "segmentation_head", None) is None:
        raise ValueError("the model has no segmentation head to remove")
    mod.inner.segmentation_head = None
    return mod


def detection_only_parity(rf, images: Sequence[Any], resolution: Optional[int] = None) -> dict[str, Any]:
    """Detection-only vs the full model on ``images``: boxes and logits max-abs (same queries: the head does not
    feed back), and the parameter count/size removed."""
    full = export_module(rf, resolution)
    det = detection_only_module(rf, full.resolution)
    a, _ = torch_raw(full, images, full.resolution)
    b, _ = torch_raw(det, images, full.resolution)
    head = rf.model.model.segmentation_head
    n_head = sum(p.numel() for p in head.parameters())
    n_all = sum(p.numel() for p in rf.model.model.parameters())
    return {"resolution": full.resolution, "images": len(images),
            "boxes_max_abs": max(float(np.abs(x.boxes - y.boxes).max()) for x, y in zip(a, b)),
            "logits_max_abs": max(float(np.abs(x.logits - y.logits).max()) for x, y in zip(a, b)),
            "seg_head_params": int(n_head), "all_params": int(n_all),
            "seg_head_fp32_mb": n_head * 4 / 2 ** 20}


def export_detection_only_onnx(rf, checkpoint: Checkpoint, out_dir: str | os.PathLike[str],
                               resolution: Optional[int] = None, opset: int = 17) -> Path:
    """ONNX of ``detection_only_module`` (outputs pred_boxes, pred_logits), cached by ``nailkit.core.artifacts``
    (``checkpoint``'s content — the file ``rf`` was loaded from — + resolution + opset)."""
    import torch

    mod = detection_only_module(rf, resolution)
    res = mod.resolution
    h, key = artifacts.artifact_key("detection_only_onnx", checkpoint_content(checkpoint),
                                    {"resolution": res, "opset": opset}, ("torch", "onnx", "rfdetr"))
    path = Path(out_dir) / f"detonly_{h}_{res}.onnx"
    if artifacts.cached(path, key):
        return path
    x = torch.zeros(1, 3, res, res)
    with artifacts.staging(path) as work, torch.no_grad():
        staged = work / path.name
        torch.onnx.export(mod, (x,), str(staged), input_names=[INPUT_NAME], output_names=list(DETECTION_OUTPUT_NAMES),
                          opset_version=opset, dynamo=False, do_constant_folding=True)
        artifacts.publish(staged, path, {"key": key, "checkpoint_sha256": checkpoint.sha256(),
                                         "resolution": res, "segmentation": False, "opset": opset, "route": "ort",
                                         "precision": "fp32", "kind": "detection-only"})
    return path


# ----------------------------------------------------------------------------------------------------------------
# TorchScript (.pt) — what rfdetr's inference(compile=True) makes
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def plain_depthwise_conv():
    """Inside this block, rfdetr's segmentation head runs its depthwise conv as a plain ``nn.Conv2d`` call.

    rfdetr 1.11 wraps that conv in a custom ``torch.autograd.Function`` (``_DepthwiseConvWithoutCuDNN``, which only
    exists to keep cuDNN out of the *backward* pass on some GPUs). ``torch.jit.trace`` records it as a Python op, and
    ``torch.jit.save`` then refuses the module ("Could not export Python function call
    '_DepthwiseConvWithoutCuDNN'"). The forward is the same convolution, so on CPU the outputs are identical.
    """
    from rfdetr.models.heads import segmentation as seg

    original = seg.DepthwiseConvBlock._depthwise_conv
    seg.DepthwiseConvBlock._depthwise_conv = lambda self, x: self.dwconv(x)
    try:
        yield
    finally:
        seg.DepthwiseConvBlock._depthwise_conv = original


def _trace_with_rfdetr(rf):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rf.inference(compile=True, batch_size=1)
    return rf.model.inference_model


def ensure_torchscript(rf, checkpoint: Checkpoint, out_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Save the TorchScript module of ``rf.inference(compile=True)`` (torch.jit.trace, batch 1, the model's
    resolution) as ``torchscript_<key>_<R>.pt``, cached by ``nailkit.core.artifacts`` (``checkpoint``: the file ``rf``
    was loaded from). Returns an Artifact
    (``path, meta = ...``).

    rfdetr's traced module as is cannot be saved for segmentation models (see ``plain_depthwise_conv``); that
    failure is recorded in the meta (``as_is_error``) and the trace is redone inside ``plain_depthwise_conv``.
    ``rf`` is left un-optimized.
    """
    import torch

    res = int(rf.model.resolution)
    h, key = artifacts.artifact_key("torchscript", checkpoint_content(checkpoint),
                                    {"resolution": res}, ("torch", "rfdetr"))
    path = Path(out_dir) / f"torchscript_{h}_{res}.pt"
    meta = artifacts.cached(path, key)
    if meta:
        return path, meta
    t0 = time.time()
    as_is_error = None
    with artifacts.staging(path) as work:
        staged = work / path.name
        try:
            traced = _trace_with_rfdetr(rf)
            torch.jit.save(traced, str(staged))
        except RuntimeError as exc:
            as_is_error = " ".join(str(exc).strip().split("\n")[0:2]).strip()
            rf.remove_optimized_model()
            with plain_depthwise_conv():
                traced = _trace_with_rfdetr(rf)
            if not isinstance(traced, torch.jit.ScriptModule):
                raise RuntimeError(f"rfdetr inference(compile=True) gave {type(traced).__name__}, not TorchScript")
            torch.jit.save(traced, str(staged))
        finally:
            rf.remove_optimized_model()
        meta = {"key": key, "checkpoint_sha256": checkpoint.sha256(), "resolution": res,
                "made_by": "rfdetr RFDETR.inference(compile=True) (torch.jit.trace, batch 1)",
                "as_is_error": as_is_error,
                "workaround": ("traced inside nailkit.export.variants.plain_depthwise_conv (seg-head depthwise conv as a "
                               "plain nn.Conv2d call)") if as_is_error else None,
                "torch": torch.__version__, "seconds": time.time() - t0, "route": "torchscript", "precision": "fp32"}
        return artifacts.publish(staged, path, meta)


_TS_CHILD = r"""
import json, sys, numpy as np, torch
m = torch.jit.load(sys.argv[1], map_location="cpu").eval()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    out = m(x)
if isinstance(out, dict):
    out = [out[k] for k in ("pred_boxes", "pred_logits", "pred_masks") if k in out]
np.savez(sys.argv[3], *[o.numpy() for o in out])
mods = sorted(k for k in sys.modules if k.split(".")[0] in ("rfdetr", "nailkit"))
print(sys.argv[4] + json.dumps({"modules": mods}), flush=True)
"""


def check_torchscript(rf, pt_path: str | os.PathLike[str], image: Any = None, timeout: float = 600) -> dict[str, Any]:
    """Load the ``.pt`` in a fresh ``python`` process (torch only: no rfdetr, no nailkit imported there), run it on a
    data/ photo and compare every output with the eager export-mode module. Returns per-output max-abs."""
    import tempfile

    import torch

    if image is None:
        image = sample_images("photos")[0]
    mod = export_module(rf)
    x, _ = preprocess(image, mod.resolution)
    with torch.no_grad():
        ref = [o.numpy() for o in mod(torch.from_numpy(x))]
    with tempfile.TemporaryDirectory() as td:
        np.save(Path(td) / "x.npy", x)
        try:
            res = subproc.run_python(["-I", "-c", _TS_CHILD, str(pt_path), str(Path(td) / "x.npy"),
                                      str(Path(td) / "out.npz"), subproc.RESULT_PREFIX], desc="TorchScript child",
                                     timeout=timeout, progress=False)
        except subproc.WorkerError as exc:
            raise RuntimeError(f"{pt_path}: loading/running the TorchScript file in a fresh process failed: "
                               f"{exc}") from None
        wall = res["wall_s"]
        got = np.load(Path(td) / "out.npz")
        outs = [got[f"arr_{i}"] for i in range(len(got.files))]
    names = list(mod.output_names)
    if len(outs) < len(names):
        raise RuntimeError(f"{pt_path}: TorchScript module returned {len(outs)} outputs, expected {names}")
    diffs = {n: float(np.abs(o - r).max()) for n, o, r in zip(names, outs, ref)}
    return {"path": str(pt_path), "size_mb": Path(pt_path).stat().st_size / 2 ** 20, "max_abs": diffs,
            "fresh_process_s": wall, "fresh_process_imported": f"modules: {res['modules']}"}


# ----------------------------------------------------------------------------------------------------------------
# ExecuTorch
# ----------------------------------------------------------------------------------------------------------------


def executorch_status() -> dict[str, Any]:
    """Can rfdetr's ExecuTorch (.pte) exporter run here? It needs the ``executorch`` package (not a nailkit
    dependency); reports what is missing instead of trying."""
    import importlib.util

    have_exporter = importlib.util.find_spec("rfdetr.export._executorch") is not None
    have_et = importlib.util.find_spec("executorch") is not None
    why = ("the executorch package is not installed in nailkit's environment; rfdetr's exporter "
           "(rfdetr.export._executorch) imports it, so a .pte cannot be produced offline here") if not have_et else \
        "executorch is installed; exporting a .pte is not wired into nailkit yet"
    status = {"rfdetr_has_executorch_exporter": have_exporter, "executorch_installed": have_et, "attempted": False,
              "why": why}
    status["note"] = ("PyTorch Mobile (the TorchScript lite interpreter) is deprecated; ExecuTorch is its successor "
                      "for on-device PyTorch")
    return status
