"""On the GPU machine: make the dataset, train the demo model on cuda with train-demo, package and evaluate it, and
split it into chunks for the return trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nailkit.accuracy.evaluate import evaluate
from nailkit.data.synthetic_dataset import make_dataset
from nailkit.train.demo import train_demo
from nailkit.train.gpu.chunks import CHUNK_SIZE, split_file


def machine_train(state_dir: str | os.PathLike[str], *, minutes: float, batch_size: int, seed: int = 0,
                  eval_seed: int | None = 7, init_from: str | None = None, lr: float = 2e-4,
                  batches_per_epoch: int | None = None, warmup_resolution: int | None = None,
                  warmup_resolution_steps: int = 0, chunk_size: int = CHUNK_SIZE) -> dict[str, Any]:
    """make-dataset (seed ``seed``, and ``eval_seed`` for the unseen-seed split), train-demo on cuda with rfdetr's
    trainer (no layer/component decay), package the fp32 ``.pth``, evaluate it on both test splits, split it into
    chunks with a sha256 manifest under ``state_dir/chunks``. Returns the manifest."""
    import torch

    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    ds = state / f"nails-seed{seed}"
    if not (ds / "dataset.json").exists():
        make_dataset(ds, seed=seed)
    n_train = len(json.loads((ds / "train" / "_annotations.coco.json").read_text())["images"])
    bpe = batches_per_epoch or max(1, -(-n_train // batch_size))  # one pass over train per epoch by default
    out = state / "nails_seg_preview_gpu.pth"
    rec = train_demo(ds, out, minutes=minutes, device="cuda", batch_size=batch_size, lr=lr, lr_encoder=lr,
                     work_dir=state / "work", seed=seed, batches_per_epoch=bpe, epochs=10_000,
                     init_from=init_from, warmup_resolution=warmup_resolution,
                     warmup_resolution_steps=warmup_resolution_steps, num_workers=min(8, os.cpu_count() or 1),
                     eval_backend="faster_coco_eval",
                     note=f"lent GPU ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else '?'}), "
                          f"tools/gpu_train.sh, {minutes} min, batch {batch_size}")
    evals: dict[str, Any] = {}
    splits = [(f"seed{seed}", ds)]
    if eval_seed is not None:
        ds7 = state / f"nails-seed{eval_seed}"
        if not (ds7 / "dataset.json").exists():
            make_dataset(ds7, seed=eval_seed)
        splits.append((f"seed{eval_seed}", ds7))
    for name, d in splits:
        try:
            evals[name] = evaluate(out, d, split="test").metrics
        except Exception as exc:  # noqa: BLE001 - the weights still come back; evaluate again here
            evals[name] = {"error": f"{type(exc).__name__}: {exc}"}
    (state / "eval.json").write_text(json.dumps(evals, indent=2, default=str))
    summary = {"optimizer_steps": rec.get("optimizer_steps"), "best_validation": rec.get("best_validation"),
               "evaluation": evals}
    return split_file(out, state / "chunks", chunk_size=chunk_size, extra={"training": summary})

