"""The GPU target's evidence, measured here: the chain under LiteRT's real GPU accelerator and fp16 safety.

* ``run_on_gpu(folder, images)``: the three graphs' chain under the GPU accelerator alone (SwiftShader here, a real GPU
  where there is one: ``nailkit.gpu.swiftshader``), in a child process (``python -m nailkit.gpu.verify _gpu_run ...``).
* ``verify_gpu_graphs``: op check per graph, the delegate's verdict per graph and the chain's parity against the
  one-graph PyTorch model (``nailkit.gpu.parity``), on the CPU interpreter and under the GPU accelerator.
* ``fp16_safety``: the largest activations feeding LayerNorm / softmax in graphs A and B, before and after
  SafeLayerNorm (``nailkit.gpu.fp16``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.core import subproc
from nailkit.data.samples import sample_images
from nailkit.gpu.convert import ensure_gpu_graphs
from nailkit.gpu.fp16 import activation_maxima
from nailkit.gpu.parity import _nhwc, _reference, chain_parity, chain_raw
from nailkit.gpu.patches import gpu_patches
from nailkit.gpu.split import build_gpu_graphs
from nailkit.gpu.swiftshader import gpu_env, gpu_unavailable_reason
from nailkit.model.build import load_model, validate_resolution
from nailkit.portable.gpu_chain import GRAPH_NAMES, SplitModel
from nailkit.portable.postprocess import RawOutputs, select_proposals
from nailkit.verify import gates

def _child_gpu_run(folder: str, enforce_f32: str, in_npz: str, out_npz: str, runs: str) -> None:
    """Child side: compile the three graphs for the GPU alone, run the chain on every image, save raws."""
    res: dict[str, Any] = {"compiled": False, "error": ""}
    try:
        m = SplitModel(folder, "gpu", enforce_f32=enforce_f32 == "1")
        res.update(compiled=True, fully_accelerated=m.fully_accelerated,
                   compile_s={g: round(v.compile_s, 2) for g, v in m.graphs.items()})
        arrays = {}
        with np.load(in_npz) as z:
            xs = [z[k] for k in sorted(z.files, key=lambda s: int(s[1:]))]
        for i, x in enumerate(xs):
            for _ in range(max(1, int(runs))):
                raw = chain_raw(m.run(x, threshold=-1.0))
            arrays[f"boxes{i}"], arrays[f"logits{i}"] = raw.boxes, raw.logits
            arrays[f"masks{i}"], arrays[f"q{i}"] = raw.masks, raw.mask_queries
            arrays[f"sel{i}"], arrays[f"enc{i}"] = raw.extra["topk_indices"], raw.extra["enc_scores"]
        np.savez(out_npz, **arrays)
        res["run_ms"] = {g: float(np.median(v)) for g, v in m.timings_ms.items()}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        res["error"] = f"{type(exc).__name__}: {exc}"
    subproc.emit(res)


def run_on_gpu(folder: str | os.PathLike[str], images_nhwc: Sequence[np.ndarray], *, enforce_f32: bool = False,
               runs: int = 1, timeout: float = 1200) -> dict[str, Any]:
    """The chain under LiteRT's GPU accelerator alone (``nailkit.gpu.swiftshader.gpu_env``: SwiftShader's Vulkan
    driver, a private XDG_RUNTIME_DIR) in a child process. Returns the child's record (compiled, fully_accelerated per graph,
    compile_s, median run_ms per graph, error) with ``raws`` (``RawOutputs`` per image, the chain's host selection in
    ``extra``: ``parity.chain_raw``) or ``reason`` when the driver is missing here."""
    import tempfile

    why = gpu_unavailable_reason()
    if why:
        return {"available": False, "reason": why}
    with tempfile.TemporaryDirectory(prefix="nailkit-gpu-") as tmp:
        in_npz, out_npz = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(in_npz, **{f"x{i}": x for i, x in enumerate(images_nhwc)})
        xdg = os.path.join(tmp, "xdg")
        os.mkdir(xdg, 0o700)
        try:
            rec = subproc.run_python(["-m", "nailkit.gpu.verify", "_gpu_run", str(folder), "1" if enforce_f32 else "0",
                                      in_npz, out_npz, str(int(runs))], desc="GPU delegate (SwiftShader) "
                                     + ("enforce_f32" if enforce_f32 else "default precision"), timeout=timeout,
                                     env=gpu_env(subproc.child_env(), runtime_dir=xdg), progress=False)
        except subproc.WorkerError as exc:
            return {"available": True, "compiled": False, "error": str(exc)}
        rec["available"] = True
        if rec.get("compiled") and not rec.get("error"):
            with np.load(out_npz) as z:
                rec["raws"] = [RawOutputs(boxes=z[f"boxes{i}"], logits=z[f"logits{i}"], masks=z[f"masks{i}"],
                                          mask_queries=z[f"q{i}"],
                                          extra={"topk_indices": z[f"sel{i}"], "enc_scores": z[f"enc{i}"]})
                               for i in range(len(images_nhwc))]
    return rec


def verify_gpu_graphs(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                      resolution: Optional[int] = None, *, images: Optional[Sequence[Any]] = None,
                      modes: Sequence[str] = ("gpu", "gpu_f32"), gpu_images: int = 2) -> dict[str, Any]:
    """The GPU target's evidence, measured here: op check per graph, the GPU delegate's own verdict per graph (GPU
    alone, ``is_fully_accelerated()``) and the chain's parity against the one-graph PyTorch model, on the CPU
    interpreter and under the GPU accelerator in each of ``modes`` ("gpu": the delegate's default precision,
    "gpu_f32": ``enforce_f32``). ``failures`` lists every gate (``gates.check("gpu_target")``) that failed;
    ``skipped`` says in one line why the GPU part could not run (driver missing), never silently. The GPU runs
    use the first ``gpu_images`` images (SwiftShader runs graph A in tens of seconds on 2 cores); the CPU chain all."""
    art = ensure_gpu_graphs(checkpoint, output_dir, resolution, images=images)
    meta = art["meta"]
    res = int(meta["resolution"])
    images = list(images) if images is not None else sample_images("all")
    rf = load_model(meta["checkpoint"], output_dir=output_dir)
    ref, sizes, rerun = _reference(rf, images, res)
    xs = _nhwc(images, res)
    out: dict[str, Any] = {"dir": str(art["dir"]), "images": len(images), "resolution": res,
                           "op_check": {g: {k: s["op_check"][k] for k in ("n_ops", "ok", "banned", "over_4d_count",
                                                                          "advisory", "histogram")}
                                        for g, s in meta["graphs"].items()},
                           "cpu": {"parity": meta["cpu_parity"]}, "failures": [], "skipped": None}
    for mode in modes:
        rec = run_on_gpu(art["dir"], xs[:gpu_images], enforce_f32=mode == "gpu_f32")
        if not rec["available"]:
            out["skipped"] = f"GPU check skipped: {rec['reason']}"
            break
        row: dict[str, Any] = {k: rec.get(k) for k in ("compiled", "fully_accelerated", "compile_s", "run_ms",
                                                        "error")}
        n_ops = {g: out["op_check"][g]["n_ops"] for g in GRAPH_NAMES}
        fa = rec.get("fully_accelerated") or {}
        row["ops_on_gpu"] = {g: f"{n_ops[g] if fa.get(g) else '?'}/{n_ops[g]}" for g in GRAPH_NAMES}
        if not rec.get("compiled") or rec.get("error"):
            out["failures"].append(f"{mode}: the graphs did not compile/run on the GPU alone: {rec.get('error')}")
        else:
            if not all(fa.get(g) for g in GRAPH_NAMES):
                out["failures"].append(f"{mode}: not fully accelerated: {fa}")
            row["parity"] = chain_parity(ref[:gpu_images], rec["raws"], sizes[:gpu_images], rerun=rerun)
            out["failures"] += [f"{mode}: {f}" for f in gates.check("gpu_target", row["parity"])]
        out[mode] = row
    return out


def fp16_safety(checkpoint: str | os.PathLike[str] | None, images: Optional[Sequence[Any]] = None,
                resolution: Optional[int] = None) -> dict[str, Any]:
    """The largest |activation| feeding a LayerNorm or softmax in graphs A and B, with rfdetr's LayerNorm
    ("before") and with SafeLayerNorm ("after"), maxima over ``images`` (default: every image in data/), from
    ``nailkit.gpu.fp16.activation_maxima``. A LayerNorm site overflows fp16 when its per-row Σ(x−μ)² in the domain
    where the delegate reduces exceeds 65504."""
    import torch

    rf = load_model(checkpoint)
    res = validate_resolution(rf, resolution)
    images = list(images) if images is not None else sample_images("all")
    xs = [torch.from_numpy(x) for x in _nhwc(images, res)]
    keys = ("layer_norm_max_abs_in", "layer_norm_max_abs_reduced", "layer_norm_max_sumsq", "softmax_max_abs_in",
            "layer_norm_sites", "softmax_sites")
    out: dict[str, Any] = {"images": len(images)}
    for label, safe in (("before", False), ("after", True)):
        a, b, _ = build_gpu_graphs(rf, res, safe_layernorm=safe)
        q = a.nailkit_meta["num_queries"]
        agg: dict[str, dict[str, Any]] = {}
        with gpu_patches():
            for x in xs:
                with torch.no_grad():
                    ao = a(x)
                ref, _ = select_proposals(ao["enc_logits"].numpy()[0], ao["enc_boxes"].numpy()[0], q)
                for g, m in (("graph_a", activation_maxima(a, (x,))),
                             ("graph_b", activation_maxima(b, (ao["memory"], torch.from_numpy(ref[None]))))):
                    d = agg.setdefault(g, {k: 0.0 for k in keys} | {"fp16_overflow_sites": []})
                    for k in keys:
                        d[k] = max(d[k], float(m[k]))
                    d["fp16_overflow_sites"] = sorted(set(d["fp16_overflow_sites"]) | set(m["fp16_overflow_sites"]))
        out[label] = agg
    return out



def _main(argv: list[str]) -> None:
    if argv and argv[0] == "_gpu_run":
        _child_gpu_run(*argv[1:])
        return
    raise SystemExit("usage: python -m nailkit.gpu.verify _gpu_run FOLDER ENFORCE_F32 IN_NPZ OUT_NPZ RUNS")


if __name__ == "__main__":
    _main(sys.argv[1:])
