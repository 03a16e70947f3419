"""Packaging a train-demo work folder's best weights as one rfdetr-format fp32 ``.pth`` (``checkpoint_best_total.pth``'s
layout: ``model`` + ``args``, with ``args.class_names``) carrying a ``nailkit_training`` record (data, seed, steps,
losses, best validation, wall time, every run since random init (``nailkit.train.lineage``), validation timeline);
``train-demo --package-only``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from nailkit.model.build import build_rfdetr
from nailkit.model.checkpoint_saving import save_checkpoint
from nailkit.train.callbacks import read_progress
from nailkit.train.lineage import read_lineage, training_runs
from nailkit.train.study import _timeline_row
from nailkit.train.training_files import _global_step, load_training_file


def package_checkpoint(work_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       trusted: bool = False) -> dict[str, Any]:
    """Write the best weights of a training folder as one rfdetr-format fp32 ``.pth`` with plain-typed ``args`` and
    the ``nailkit_training`` record (``train-demo --package-only``: also after a run that was stopped mid-way).
    Every file read is loaded weights-only with the allow-list; others are refused unless ``trusted``."""
    import torch

    work = Path(work_dir)
    best = best_weights_file(work)
    if best is None:
        raise FileNotFoundError(f"{work}: no checkpoint_best_*.pth (did training finish an epoch with validation?)")
    ckpt = load_training_file(best, trusted=trusted, what="weights file")
    state = ckpt.get("model", ckpt)
    steps = _global_step(work, trusted=trusted)
    history = json.loads((work / "history.json").read_text()) if (work / "history.json").exists() else []
    settings = json.loads((work / "settings.json").read_text()) if (work / "settings.json").exists() else {}
    losses, val, epochs_done = _metrics_csv(work / "metrics.csv")
    lineage = read_lineage(work)
    runs, total_steps = training_runs(lineage, history, steps, settings)
    record = {**settings, "weights_from": best.name, "epochs_done": epochs_done, "final_losses": losses,
              "best_validation": val, "optimizer_steps": total_steps, "optimizer_steps_this_folder": steps,
              "wall_s_total": sum(h.get("wall_s", 0) for h in runs), "sessions": runs,
              "parent": {k: lineage.get(k) for k in ("init_from", "sha256")} if lineage else None,
              "validation_timeline": [_timeline_row(r) for r in read_progress(work)],
              "rfdetr": _version("rfdetr"), "torch": str(torch.__version__)}

    rf = build_rfdetr("RFDETRSegPreview", num_classes=2)
    payload = {"model": {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
               "args": checkpoint_args(ckpt.get("args"), rf), "epoch": ckpt.get("epoch"),
               "nailkit_training": _plain(record)}
    save_checkpoint(payload, out)  # deflated members: fp32-exact, ~7.5% smaller (nailkit.model.checkpoint_saving)
    return record


#: rfdetr's best-weights files, in the order that breaks a tie in modification time.
BEST_WEIGHTS_FILES = ("checkpoint_best_total.pth", "checkpoint_best_ema.pth", "checkpoint_best_regular.pth")


def best_weights_file(work: Path) -> Path | None:
    """The work folder's current best weights: the newest of rfdetr's ``checkpoint_best_*.pth``.

    rfdetr writes ``checkpoint_best_ema/regular.pth`` whenever validation improves, and copies the winner to
    ``checkpoint_best_total.pth`` only when a fit *ends*; a resumed (or still running) run's later improvements are
    therefore newer than ``total``. None when the folder holds none."""
    found = [(work / n) for n in BEST_WEIGHTS_FILES if (work / n).exists()]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, -BEST_WEIGHTS_FILES.index(p.name)))


def _plain(value: Any) -> Any:
    """JSON-able plain types only, so the checkpoint loads with ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(value, default=str))


def checkpoint_args(train_args: Any, rf) -> Any:
    """The seed's ``args``: an ``argparse.Namespace`` holding rfdetr's training *and* model configuration (plain
    types), so ``nailkit inspect`` can cross-check the architecture against the shapes, as for the seed."""
    merged = dict(vars(train_args) if hasattr(train_args, "__dict__") else (train_args or {}))
    for k, v in rf.model_config.model_dump().items():
        merged.setdefault(k, v)
    merged["model_name"] = type(rf).__name__
    return argparse.Namespace(**_plain(merged))


def _metrics_csv(path: Path) -> tuple[dict[str, float], dict[str, float], int | None]:
    """(last logged training losses, best validation mAPs, epochs logged) from rfdetr's metrics.csv."""
    if not path.exists():
        return {}, {}, None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [r for r in rows if r.get("train/loss")]
    losses = {k.split("/", 1)[1]: round(float(v), 4) for k, v in (train[-1] if train else {}).items()
              if k.startswith("train/loss") and v and not k.endswith("_aux")}
    val = {}
    for key in ("val/ema_segm_mAP_50_95", "val/ema_segm_mAP_50", "val/segm_mAP_50_95", "val/segm_mAP_50",
                "val/ema_mAP_50", "val/mAP_50"):
        vals = [float(r[key]) for r in rows if r.get(key)]
        if vals:
            val[key.split("/", 1)[1]] = round(max(vals), 4)
    epochs = {int(r["epoch"]) for r in rows if r.get("epoch", "").isdigit()}
    return losses, val, (max(epochs) + 1) if epochs else None


def _version(name: str) -> str:
    return metadata.version(name)

