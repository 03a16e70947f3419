"""The Lightning callbacks train-demo adds to rfdetr's own trainer (init weights, a low-resolution warm-up, the
validation timeline) and the reader of that timeline (``progress.jsonl`` in the work folder).

pytorch_lightning is heavy: the callback classes are defined inside ``make_callbacks``, which imports it when called.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.jsonl"


def make_callbacks(*, init_state: dict[str, Any] | None = None, warmup_resolution: int | None = None,
                   warmup_resolution_steps: int = 0, progress_file: Path | None = None,
                   cpu_before_s: float = 0.0, wall_before_s: float = 0.0) -> list[Any]:
    """The callbacks train-demo appends to rfdetr's own trainer (built by rfdetr.training.build_trainer):

    * ``InitWeights``: loads ``init_state`` (a ``model`` state_dict) into the LightningModule's model at ``setup``,
      before rfdetr's EMA callback copies the weights (``on_fit_start``) and before the optimizer exists;
    * ``LowResWarmup``: for the first ``warmup_resolution_steps`` optimizer steps, resizes each training batch to
      ``warmup_resolution``, exactly as rfdetr's per-batch multi-scale does (``RFDETRModelModule.on_train_batch_start``:
      bilinear images, nearest padding mask; targets are normalised, so they stay valid);
    * ``Progress``: after each epoch's validation, appends optimizer step, wall and process-CPU seconds (cumulative
      over resumed sessions) and the logged validation metrics to ``progress_file``.
    """
    import torch
    import torch.nn.functional as F
    from pytorch_lightning import Callback

    callbacks: list[Any] = []

    if init_state is not None:
        class InitWeights(Callback):
            def setup(self, trainer, pl_module, stage):  # noqa: D401 - Lightning hook
                if stage != "fit":
                    return
                try:
                    missing, unexpected = pl_module.model.load_state_dict(init_state, strict=False)
                except RuntimeError as exc:  # shape mismatches
                    raise ValueError(f"init_from: weights do not fit the model "
                                     f"({str(exc).strip().splitlines()[-1].strip()})") from None
                if missing or unexpected:
                    raise ValueError(f"init_from: weights do not fit the model ({len(missing)} missing, "
                                     f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:3]})")

        callbacks.append(InitWeights())

    if warmup_resolution and warmup_resolution_steps > 0:
        res, n = int(warmup_resolution), int(warmup_resolution_steps)

        class LowResWarmup(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step >= n:
                    return
                samples = batch[0]
                with torch.no_grad():
                    samples.tensors = F.interpolate(samples.tensors, size=res, mode="bilinear", align_corners=False)
                    samples.mask = F.interpolate(samples.mask.unsqueeze(1).float(), size=res,
                                                 mode="nearest").squeeze(1).bool()

        callbacks.append(LowResWarmup())

    if progress_file is not None:
        t0, c0 = time.time(), time.process_time()

        class Progress(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                metrics = {}
                for k, v in trainer.callback_metrics.items():
                    if k.startswith("val/") or k.startswith("train/loss"):
                        try:
                            metrics[k] = round(float(v), 5)
                        except (TypeError, ValueError):
                            continue
                row = {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                       "wall_s": round(wall_before_s + time.time() - t0, 1),
                       "cpu_s": round(cpu_before_s + time.process_time() - c0, 1),
                       "low_res": bool(warmup_resolution and trainer.global_step <= warmup_resolution_steps),
                       "metrics": metrics}
                with open(progress_file, "a") as fh:
                    fh.write(json.dumps(row) + "\n")

        callbacks.append(Progress())
    return callbacks


def read_progress(work_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The validation timeline a train-demo work folder recorded (``progress.jsonl``), oldest first."""
    p = Path(work_dir) / PROGRESS_FILE
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
