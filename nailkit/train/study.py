"""The recipe study: validation mAP and training loss against optimizer steps and CPU minutes, read from train-demo
work folders (their ``settings.json``, ``history.json`` and ``progress.jsonl``), as data, a markdown table and a plot.
A model card carries it (``nailkit.train.card.write_recipe_study``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from nailkit.train.callbacks import read_progress

MASK_MAP50_KEYS = ("val/ema_segm_mAP_50", "val/segm_mAP_50")
BOX_MAP50_KEYS = ("val/ema_mAP_50", "val/mAP_50")


def _first(metrics: dict[str, Any], keys: Sequence[str]) -> float | None:
    return next((float(metrics[k]) for k in keys if metrics.get(k) is not None), None)


def _timeline_row(row: dict[str, Any]) -> dict[str, Any]:
    m = row.get("metrics", {})
    return {"step": row["step"], "cpu_min": round(row["cpu_s"] / 60, 2), "wall_min": round(row["wall_s"] / 60, 2),
            "mask_map50": _first(m, MASK_MAP50_KEYS), "box_map50": _first(m, BOX_MAP50_KEYS),
            "loss": m.get("train/loss")}


def recipe_study(runs: dict[str, str | os.PathLike[str]]) -> dict[str, Any]:
    """Data for the recipe comparison: per run (name → train-demo work folder), its recipe and its validation
    timeline (optimizer step, CPU minutes of the training process, wall minutes, mask/box mAP50 of the EMA model,
    training loss)."""
    out: dict[str, Any] = {}
    for name, wd in runs.items():
        wd = Path(wd)
        settings = json.loads((wd / "settings.json").read_text()) if (wd / "settings.json").exists() else {}
        history = json.loads((wd / "history.json").read_text()) if (wd / "history.json").exists() else []
        out[name] = {"work_dir": str(wd), "recipe": {k: settings.get(k) for k in (
            "layer_decay", "component_decay", "lr_warmup_steps", "warmup_resolution", "warmup_resolution_steps",
            "batch_size", "lr", "lr_encoder", "batches_per_epoch", "init_from")},
            "threads": history[-1].get("threads") if history else None,
            "cpu": history[-1].get("cpu") if history else None,
            "timeline": [_timeline_row(r) for r in read_progress(wd)]}
    return out


def recipe_table_markdown(study: dict[str, Any]) -> str:
    """One row per run and validation: step, CPU minutes, mask mAP50, box mAP50, training loss."""
    lines = ["| recipe | optimizer step | CPU min | wall min | mask mAP50 | box mAP50 | train loss |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for name, run in study.items():
        for r in run["timeline"]:
            lines.append(f"| {name} | {r['step']} | {fmt(r['cpu_min'], '.1f')} | {fmt(r['wall_min'], '.1f')} | "
                         f"{fmt(r['mask_map50'], '.3f')} | {fmt(r['box_map50'], '.3f')} | {fmt(r['loss'], '.2f')} |")
    return "\n".join(lines)


def plot_recipe_study(study: dict[str, Any], out_png: str | os.PathLike[str]) -> Path:
    """Three panels: validation mask mAP50 (solid) and box mAP50 (dashed) against optimizer steps, the same against
    CPU minutes, and the training loss against optimizer steps (validations without a logged loss are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    axes[1].sharey(axes[0])
    for i, (name, run) in enumerate(study.items()):
        tl = run["timeline"]
        colour = f"C{i}"
        for ax, x in ((axes[0], "step"), (axes[1], "cpu_min")):
            xs = [r[x] for r in tl]
            ax.plot(xs, [r["mask_map50"] or 0.0 for r in tl], "-o", color=colour, label=f"{name} mask")
            ax.plot(xs, [r["box_map50"] or 0.0 for r in tl], "--", color=colour, alpha=0.6, label=f"{name} box")
        losses = [(r["step"], r["loss"]) for r in tl if r.get("loss") is not None]
        if losses:
            axes[2].plot([s for s, _ in losses], [v for _, v in losses], "-o", color=colour, label=name)
    axes[0].set_xlabel("optimizer steps")
    axes[1].set_xlabel("CPU minutes (training process, incl. validation)")
    axes[2].set_xlabel("optimizer steps")
    axes[0].set_ylabel("validation mAP50 (EMA model)")
    axes[2].set_ylabel("training loss (last logged at each validation)")
    axes[0].legend(fontsize=7)
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("RFDETRSegPreview from random init: recipe study (make-dataset --seed 0, valid split)")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
