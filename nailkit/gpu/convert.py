"""The GPU target's three graphs, cached like every other artifact (``nailkit.core.artifacts``): published together
after their gate.

``ensure_gpu_graphs`` converts them in a child process (``nailkit.gpu.export``) only when the cache misses, gates
them (op check per graph; the chain on the CPU interpreter against the one-graph PyTorch model, ``nailkit.gpu.parity``)
and publishes the three files; ``cli_convert_gpu`` is ``python -m nailkit convert CKPT --target gpu``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from nailkit.core import artifacts, subproc
from nailkit.data.samples import sample_images
from nailkit.gpu.parity import _nhwc, _reference, chain_parity, chain_raw
from nailkit.gpu.split import DEFAULT_MASK_SLOTS
from nailkit.model.build import DEFAULT_OUTPUT_DIR, load_model, resolve_checkpoint, validate_resolution
from nailkit.model.checkpoint import checkpoint_content
from nailkit.portable.gpu_chain import GRAPH_NAMES, SplitModel
from nailkit.tflite.launch import ConversionError
from nailkit.verify import gates

#: bump when the graphs' construction changes (``nailkit.gpu.split``, ``nailkit.gpu.patches``, ``nailkit.gpu.export``),
#: so cached files are rebuilt
GPU_TARGET_VERSION = 6
GPU_PACKAGES = ("torch", "rfdetr", "litert-torch", "ai-edge-litert")


def ensure_gpu_graphs(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                      resolution: Optional[int] = None, *, mask_slots: int = DEFAULT_MASK_SLOTS,
                      images: Optional[Sequence[Any]] = None, force: bool = False) -> dict[str, Any]:
    """The GPU target's three graphs for ``checkpoint`` under ``output_dir/gpu/…/`` (``{"dir", "paths", "meta"}``),
    converted only when the cache misses (key: checkpoint content + resolution + slots + GPU_TARGET_VERSION +
    versions). Gate before publishing: every graph passes ``nailkit.gpu.op_check`` (no TopK/GATHER/CAST-to-int,
    ≤ 4-D) and the chain on the CPU interpreter matches the one-graph PyTorch model (stage ``gpu_target``). Raises
    ``ConversionError`` with the log path and publishes nothing when either fails."""
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint; expected an rfdetr .pth")
    rf = load_model(ckpt, output_dir=out_dir)
    res = validate_resolution(rf, resolution)
    h, key = artifacts.artifact_key("gpu_graphs", checkpoint_content(ckpt),
                                    {"resolution": res, "mask_slots": int(mask_slots), "version": GPU_TARGET_VERSION},
                                    GPU_PACKAGES)
    gdir = out_dir / "gpu" / f"{Path(ckpt).stem}_{res}_{h[:12]}"
    paths = {g: gdir / f"{g}.tflite" for g in GRAPH_NAMES}
    metas = {g: artifacts.cached(p, key) for g, p in paths.items()} if not force else {}
    if metas and all(metas.values()):
        return {"dir": gdir, "paths": paths, "meta": metas["graph_a"], "cached": True}
    log_path = out_dir / "logs" / f"convert_gpu_{res}_{h[:12]}.log"
    images = list(images) if images is not None else sample_images("all")
    with artifacts.staging(paths["graph_a"]) as wp:
        result = subproc.run_python(["-m", "nailkit.gpu.export", "export", str(ckpt), str(wp), str(res),
                                     str(int(mask_slots))], desc=f"litert-torch GPU graphs {res}", timeout=1800,
                                    log_path=log_path)
        summary = result["summary"]
        fails = [f"{g}: op check failed (banned {oc['banned']}, {oc['over_4d_count']} tensors above 4-D, "
                 f"{len(oc['risky_constant_ops'])} rank-2 x constant binary ops)"
                 for g, oc in ((g, v["op_check"]) for g, v in summary["graphs"].items()) if not oc["ok"]]
        split = SplitModel(wp, "cpu")
        raws = [chain_raw(split.run(x, threshold=-1.0)) for x in _nhwc(images, res)]
        ref, sizes, rerun = _reference(rf, images, res)
        parity = chain_parity(ref, raws, sizes, rerun=rerun)
        fails += gates.check("gpu_target", parity)
        if fails:
            raise ConversionError(f"{gdir}: the GPU graphs FAILED their gate and were not published: "
                                  + "; ".join(fails[:4]) + f" (log: {log_path})")
        meta = {"key": key, "target": "gpu", "checkpoint": str(ckpt), "resolution": res,
                "mask_slots": int(mask_slots), "class_names": list(rf.class_names), "log": str(log_path),
                "conversion_wall_s": result["wall_s"], "graphs": summary["graphs"], "graph_meta": summary["meta"],
                "cpu_parity": parity, "parity_images": [Path(str(i)).name for i in images]}
        gdir.mkdir(parents=True, exist_ok=True)
        for g in GRAPH_NAMES[1:]:
            artifacts.publish(wp / f"{g}.tflite", paths[g], {**meta, "graph": g})
        artifacts.publish(wp / "graph_a.tflite", paths["graph_a"], {**meta, "graph": "graph_a"})
    return {"dir": gdir, "paths": paths, "meta": {**meta, "graph": "graph_a"}, "cached": False}



def cli_convert_gpu(args) -> int:
    """``python -m nailkit convert CKPT --out DIR --target gpu``: the three graphs, cached, gated, op-checked."""
    art = ensure_gpu_graphs(args.checkpoint, args.out, args.resolution, force=bool(getattr(args, "force", False)))
    meta = art["meta"]
    for g, v in meta["graphs"].items():
        oc = v["op_check"]
        print(f"{g}: {art['paths'][g]} — {oc['n_ops']} ops, banned {oc['banned'] or 'none'}, "
              f"{oc['over_4d_count']} tensors above 4-D, {v.get('lifted_constant_ops', 0)} constant ops lifted")
    par = meta["cpu_parity"]
    print(f"chain on the CPU interpreter vs the one-graph PyTorch model: {par['matched_top10']} top-10 matched, "
          f"min mask IoU {par['min_mask_iou']:.4f}, max score difference {par['max_score_diff']:.2g}"
          f"{' (cached)' if art['cached'] else ''}")
    print("GPU delegate check: python -m nailkit bundle CKPT --out DIR --target gpu --gpu-check (or notebook 04)")
    return 0
