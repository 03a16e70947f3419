"""``train-demo``: train the seed's exact architecture on the synthetic nail dataset with rfdetr's own trainer.

rfdetr's ``RFDETRSegPreview(...).train(...)`` (PyTorch Lightning, its own criterion, EMA, best-model selection and
checkpoint format) runs offline on CPU from random init (``pretrain_weights=None``: no hub). nailkit adds:

* a time box: PTL's ``max_time`` reaches rfdetr's ``build_trainer`` (it forwards extra Trainer kwargs), so a run stops
  cleanly after ``minutes`` and still writes its checkpoints;
* resumable runs: the full PTL state (``last.ckpt``: weights, optimizer, scheduler, EMA, epoch) lives in a work
  folder outside the repo (default ``~/.cache/nailkit/train-demo``), and ``--resume`` continues from it;
* the result as one rfdetr-format ``.pth`` (``checkpoint_best_total.pth``'s layout: ``model`` + ``args``) at ``out``,
  fp32, with ``args.class_names`` and a ``nailkit_training`` record (data, seed, iterations, wall time, hardware).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

DEFAULT_WORK_DIR = Path(os.environ.get("NAILKIT_CACHE", Path.home() / ".cache" / "nailkit")) / "train-demo"
#: Learning rates for training from random init (rfdetr's defaults, 1e-4 / 1.5e-4, assume a pretrained backbone).
DEFAULT_LR = 2e-4
DEFAULT_LR_ENCODER = 2e-4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _latest_ckpt(work: Path) -> Path | None:
    """The newest full PTL state in ``work``: last.ckpt, else the highest checkpoint_<epoch>.ckpt."""
    last = work / "last.ckpt"
    if last.exists():
        return last
    numbered = sorted(work.glob("checkpoint_*.ckpt"), key=lambda p: int(p.stem.split("_")[1])
                      if p.stem.split("_")[1].isdigit() else -1)
    return numbered[-1] if numbered else None


def train_demo(dataset: str | os.PathLike[str], out: str | os.PathLike[str], *, minutes: float = 60.0,
               device: str = "cpu", resume: str | os.PathLike[str] | None = None, epochs: int = 200,
               batch_size: int = 2, grad_accum_steps: int = 1, lr: float = DEFAULT_LR,
               lr_encoder: float = DEFAULT_LR_ENCODER, work_dir: str | os.PathLike[str] | None = None,
               seed: int = 0, multi_scale: bool = False, num_workers: int = 0,
               batches_per_epoch: int | None = 60) -> dict[str, Any]:
    """Train (or resume) and write the best checkpoint to ``out``. Returns the training record."""
    import torch

    from nailkit.checkpoint import atomic_write
    from nailkit.dataset import load_split
    from nailkit.model import build_rfdetr

    ds = Path(dataset)
    for split in ("train", "valid"):
        load_split(ds, split)  # clear error now rather than deep inside Lightning
    work = Path(work_dir) if work_dir else DEFAULT_WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    resume_path = None
    if resume:
        resume_path = Path(resume)
        if resume_path.is_dir():
            resume_path = _latest_ckpt(resume_path)
        if resume_path is None or not resume_path.exists():
            raise FileNotFoundError(f"{resume}: no resumable training state (expected last.ckpt from an earlier "
                                    f"train-demo run, e.g. {work / 'last.ckpt'})")
    torch.manual_seed(seed)
    rf = build_rfdetr("RFDETRSegPreview", num_classes=2, device=device)

    import rfdetr.training as rt

    original = rt.build_trainer

    def build_trainer(*a: Any, **kw: Any):
        kw.setdefault("max_time", _dt.timedelta(minutes=minutes))
        if batches_per_epoch:  # short epochs: a checkpoint + validation every few minutes, so a time box loses little
            kw.setdefault("limit_train_batches", batches_per_epoch)
        return original(*a, **kw)

    history_file = work / "history.json"
    history = json.loads(history_file.read_text()) if (resume_path and history_file.exists()) else []
    t0 = time.time()
    rt.build_trainer = build_trainer
    try:
        rf.train(dataset_dir=str(ds), output_dir=str(work), epochs=epochs, batch_size=batch_size,
                 grad_accum_steps=grad_accum_steps, lr=lr, lr_encoder=lr_encoder, device=device,
                 num_workers=num_workers, multi_scale=multi_scale, progress_bar="tqdm", tensorboard=False,
                 resume=str(resume_path) if resume_path else None, checkpoint_interval=1, seed=seed)
    finally:
        rt.build_trainer = original
    wall = time.time() - t0
    best = work / "checkpoint_best_total.pth"
    if not best.exists():
        raise RuntimeError(f"{work}: rfdetr wrote no checkpoint_best_total.pth (did training run a full epoch?)")
    ckpt = torch.load(best, map_location="cpu", weights_only=False)  # written by rfdetr just now, in our cache
    state = ckpt.get("model", ckpt)
    steps = _global_step(work)
    history.append({"started": _dt.datetime.fromtimestamp(t0).isoformat(timespec="seconds"), "wall_s": round(wall),
                    "device": device, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "resumed_from": str(resume_path) if resume_path else None, "global_step": steps})
    history_file.write_text(json.dumps(history, indent=2))
    record = {"dataset": str(ds), "dataset_info": _dataset_info(ds), "seed": seed, "epochs_done": ckpt.get("epoch"),
              "optimizer_steps": steps, "batch_size": batch_size, "grad_accum_steps": grad_accum_steps,
              "lr": lr, "lr_encoder": lr_encoder, "multi_scale": multi_scale,
              "wall_s_total": sum(h["wall_s"] for h in history), "sessions": history,
              "rfdetr": _version("rfdetr"), "torch": torch.__version__}
    args = ckpt.get("args")
    payload = {"model": {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
               "args": args, "epoch": ckpt.get("epoch"), "nailkit_training": record}
    atomic_write(Path(out), lambda tmp: torch.save(payload, tmp))
    return record


def _global_step(work: Path) -> int | None:
    last = _latest_ckpt(work)
    if last is None:
        return None
    import torch

    try:
        return int(torch.load(last, map_location="cpu", weights_only=False).get("global_step", 0))
    except Exception:  # noqa: BLE001 - informational only
        return None


def _dataset_info(ds: Path) -> dict[str, Any]:
    p = ds / "dataset.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def cli_train_demo(args) -> int:
    rec = train_demo(args.dataset, args.out, minutes=args.minutes, device=args.device, resume=args.resume,
                     epochs=args.epochs, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
                     lr=args.lr, lr_encoder=args.lr, work_dir=args.work_dir, seed=args.seed,
                     batches_per_epoch=args.batches_per_epoch or None)
    print(json.dumps({k: v for k, v in rec.items() if k != "sessions"}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0
