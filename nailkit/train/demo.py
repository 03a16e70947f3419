"""``train-demo``: train the seed's exact architecture on the synthetic nail dataset with rfdetr's own trainer.

rfdetr's ``RFDETRSegPreview(...).train(...)`` (PyTorch Lightning, its own criterion, EMA, best-model selection and
checkpoint format) runs offline on CPU from random init (``pretrain_weights=None``: no hub). nailkit adds:

* a time box: PTL's ``max_time`` reaches rfdetr's ``build_trainer`` (it forwards extra Trainer kwargs), so a run stops
  cleanly after ``minutes`` and still writes its checkpoints;
* resumable runs: the full PTL state (``last.ckpt``: weights, optimizer, scheduler, EMA, epoch; rewritten every short
  epoch) lives in a work folder outside the repo (default ``~/.cache/nailkit/train-demo``), and ``--resume``
  continues from it;
* no unpickling without the user's word: every training file nailkit reads (``--resume``'s state, the work folder's
  best weights) is loaded with ``torch.load(weights_only=True)`` and an explicit allow-list
  (``nailkit.train.training_files``); anything else is refused with a one-line error unless ``trusted=True``
  (``--trusted``);
* recipe levers for random init, all passed to rfdetr's own ``TrainConfig`` or applied by small Lightning callbacks
  (``nailkit.train.callbacks``) on rfdetr's trainer: ViT layer decay and decoder component decay
  (``lr_vit_layer_decay`` / ``lr_component_decay``, rfdetr's 0.8 / 0.7 assume a pretrained DINOv2; train-demo's
  default is 1.0 / 1.0), rfdetr's linear lr warm-up (``warmup_epochs``, given here in optimizer steps), a
  lower-resolution warm-up (the first N steps' batches are resized as rfdetr's own per-batch multi-scale does), and
  ``init_from`` (start from a committed model's weights with a fresh optimizer and a short warm-up);
* bf16 mixed precision on a CPU with native bf16 dot products (``precision="auto"``; ``resolve_precision``). rfdetr
  trains in bf16-mixed on GPUs that have it but always in fp32 on the CPU, where bf16 is only emulated on many chips;
  on an AMD EPYC with AVX512-BF16 the model's forward + backward ran 2.0x faster and a whole optimizer step
  (matcher, losses, AdamW, EMA included) ~1.5x (the tqdm rate, 0.11 → 0.16 it/s). The weights stay fp32 (autocast
  only lowers the GEMMs' inputs), so the result is an fp32 checkpoint like any other;
* a validation timeline (``progress.jsonl``: optimizer step, wall and process-CPU seconds, validation mAPs), which the
  recipe study (``nailkit.train.study``) reads;
* the result as one rfdetr-format ``.pth`` (``checkpoint_best_total.pth``'s layout: ``model`` + ``args``) at ``out``,
  fp32, with ``args.class_names`` and a ``nailkit_training`` record (data, seed, iterations, wall time, hardware):
  ``nailkit.train.package``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from nailkit.core.hardware import cpu_info
from nailkit.data.coco_export import load_split
from nailkit.model.build import build_rfdetr
from nailkit.model.checkpoint_loading import load_checkpoint
from nailkit.train.callbacks import PROGRESS_FILE, make_callbacks, read_progress
from nailkit.train.lineage import LINEAGE_FILE, write_lineage
from nailkit.train.package import package_checkpoint
from nailkit.train.training_files import (TRAINING_FILE_GLOBALS, _global_step, _latest_ckpt, _load_training_file,
                                          _timer_elapsed_s)

DEFAULT_WORK_DIR = Path(os.environ.get("NAILKIT_CACHE", Path.home() / ".cache" / "nailkit")) / "train-demo"
#: Learning rates for training from random init (rfdetr's defaults, 1e-4 / 1.5e-4, assume a pretrained backbone).
DEFAULT_LR = 2e-4
DEFAULT_LR_ENCODER = 2e-4
#: rfdetr 1.11's TrainConfig defaults, tuned for a pretrained DINOv2: ViT block i trains at 0.8^(13-i) of lr_encoder,
#: the decoder at 0.7 of lr (rfdetr/training/param_groups.py).
RFDETR_LAYER_DECAY = 0.8
RFDETR_COMPONENT_DECAY = 0.7
#: train-demo's defaults for random init: no decay (the layers with the most to learn are not starved).
DEFAULT_LAYER_DECAY = 1.0
DEFAULT_COMPONENT_DECAY = 1.0
#: ``init_from``: rfdetr's linear lr warm-up over this many optimizer steps for the fresh optimizer.
DEFAULT_INIT_WARMUP_STEPS = 40
#: rfdetr writes the full PTL state as ``last.ckpt`` every epoch when ``checkpoint_interval != 1`` and keeps an archive
#: ``checkpoint_<epoch>.ckpt`` (about 540 MB each) every ``checkpoint_interval`` epochs.
DEFAULT_CHECKPOINT_INTERVAL = 10


def steps_per_epoch(n_train: int, batch_size: int, grad_accum_steps: int = 1,
                    batches_per_epoch: int | None = None) -> int:
    """Optimizer steps per (possibly shortened) epoch, as rfdetr sizes its scheduler (``total_steps // epochs``)."""
    batches = min(batches_per_epoch, math.ceil(n_train / batch_size)) if batches_per_epoch else \
        math.ceil(n_train / batch_size)
    return max(1, batches // max(1, grad_accum_steps))


# --------------------------------------------------------------------------------------------------------------------
# train-demo
# --------------------------------------------------------------------------------------------------------------------
def train_demo(dataset: str | os.PathLike[str], out: str | os.PathLike[str] | None, *, minutes: float = 60.0,
               device: str = "cpu", resume: str | os.PathLike[str] | None = None, epochs: int = 200,
               batch_size: int = 2, grad_accum_steps: int = 1, lr: float = DEFAULT_LR,
               lr_encoder: float = DEFAULT_LR_ENCODER, work_dir: str | os.PathLike[str] | None = None,
               seed: int = 0, multi_scale: bool = False, num_workers: int = 0,
               batches_per_epoch: int | None = 60, layer_decay: float = DEFAULT_LAYER_DECAY,
               component_decay: float = DEFAULT_COMPONENT_DECAY, lr_warmup_steps: int | None = None,
               warmup_resolution: int | None = None, warmup_resolution_steps: int = 0,
               init_from: str | os.PathLike[str] | None = None, trusted: bool = False,
               checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL, package: bool = True,
               note: str | None = None, eval_backend: str | None = None, precision: str = "auto",
               lr_drop: int | None = None) -> dict[str, Any]:
    """Train (or resume) with rfdetr's trainer and write the best checkpoint to ``out``. Returns the training record.

    Recipe levers (see the module docstring): ``layer_decay`` / ``component_decay`` (rfdetr's ``lr_vit_layer_decay`` /
    ``lr_component_decay``), ``lr_warmup_steps`` (rfdetr's ``warmup_epochs``, converted; default 0, or
    ``DEFAULT_INIT_WARMUP_STEPS`` with ``init_from``), ``warmup_resolution`` for the first ``warmup_resolution_steps``
    optimizer steps, and ``init_from`` (a ``.pth`` whose ``model`` weights start a fresh run; loaded weights-only).
    ``resume`` (a ``.ckpt`` or its folder) continues a run with its optimizer, scheduler and EMA; files outside the
    allow-list are refused unless ``trusted``. ``package=False`` skips writing ``out`` (the work folder keeps all).
    ``eval_backend`` picks rfdetr's validation COCO evaluator (default: rfdetr's, vernier; the GPU path uses
    faster_coco_eval, which needs no pyarrow wheel). ``precision``: "auto", "fp32" or "bf16" (``resolve_precision``).
    ``lr_drop``: rfdetr's step schedule, lr ÷ 10 after this many (short) epochs of this run's schedule (rfdetr's
    ``lr_scheduler_kwargs["lr_drop"]``; default rfdetr's 100, which a time-boxed run never reaches): a time-boxed run
    sets it to end on a low lr, where the last few hundred steps sharpen the scores.
    """
    import torch

    ds = Path(dataset)
    splits = {s: load_split(ds, s) for s in ("train", "valid")}  # clear error now rather than deep inside Lightning
    _check_arguments(resume=resume, init_from=init_from, layer_decay=layer_decay, component_decay=component_decay,
                     lr_warmup_steps=lr_warmup_steps, warmup_resolution_steps=warmup_resolution_steps,
                     checkpoint_interval=checkpoint_interval, lr_drop=lr_drop)
    lightning_precision = resolve_precision(precision, device)
    work = Path(work_dir) if work_dir else DEFAULT_WORK_DIR
    resume_path, resume_needs_trust, already = _resume_point(resume, work, trusted=trusted)
    init_state = None
    if init_from:
        init_state = {k: v for k, v in load_checkpoint(init_from, trusted=trusted)["model"].items()}
    if lr_warmup_steps is None:
        lr_warmup_steps = DEFAULT_INIT_WARMUP_STEPS if init_from else 0
    spe = steps_per_epoch(len(splits["train"].coco["images"]), batch_size, grad_accum_steps, batches_per_epoch)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rf = build_rfdetr("RFDETRSegPreview", num_classes=2, device=device)
    if warmup_resolution:
        _check_warmup_resolution(rf.model_config, warmup_resolution)

    history_file = work / "history.json"
    history = json.loads(history_file.read_text()) if (resume_path and history_file.exists()) else []
    extra = _session_callbacks(work, resumed=bool(resume_path), init_state=init_state,
                               warmup_resolution=warmup_resolution, warmup_resolution_steps=warmup_resolution_steps)
    recipe = {"layer_decay": layer_decay, "component_decay": component_decay, "lr_warmup_steps": lr_warmup_steps,
              "warmup_resolution": warmup_resolution, "warmup_resolution_steps": warmup_resolution_steps,
              "init_from": str(init_from) if init_from else None, "batch_size": batch_size,
              "grad_accum_steps": grad_accum_steps, "lr": lr, "lr_encoder": lr_encoder,
              "precision": lightning_precision or "rfdetr's choice", "lr_drop": lr_drop}
    settings = {"dataset": str(ds), "dataset_info": _dataset_info(ds), "seed": seed,
                "batches_per_epoch": batches_per_epoch, "batch_size": batch_size, "grad_accum_steps": grad_accum_steps,
                "lr": lr, "lr_encoder": lr_encoder, "multi_scale": multi_scale, "layer_decay": layer_decay,
                "component_decay": component_decay, "lr_warmup_steps": lr_warmup_steps,
                "warmup_resolution": warmup_resolution, "warmup_resolution_steps": warmup_resolution_steps,
                "init_from": str(init_from) if init_from else None, "checkpoint_interval": checkpoint_interval,
                "precision": recipe["precision"], "lr_drop": lr_drop}
    (work / "settings.json").write_text(json.dumps(settings, indent=2))
    if init_from:  # the parent's runs stay part of the result's history (nailkit.train.lineage)
        write_lineage(work, init_from, trusted=trusted)
    elif not resume_path and (work / LINEAGE_FILE).exists():
        (work / LINEAGE_FILE).unlink()  # a new run from random init in this folder has no parent
    record_session = functools.partial(_record_session, history, history_file, work=work, t0=time.time(),
                                       device=device, resume_path=resume_path, ds=ds, recipe=recipe, note=note)
    _train_with_rfdetr(rf, dict(
        dataset_dir=str(ds), output_dir=str(work), epochs=epochs, batch_size=batch_size,
        grad_accum_steps=grad_accum_steps, lr=lr, lr_encoder=lr_encoder, device=device, num_workers=num_workers,
        multi_scale=multi_scale, progress_bar="tqdm", tensorboard=False,
        resume=str(resume_path) if resume_path else None, checkpoint_interval=checkpoint_interval, seed=seed,
        lr_vit_layer_decay=layer_decay, lr_component_decay=component_decay, warmup_epochs=lr_warmup_steps / spe,
        **({"eval_backend": eval_backend} if eval_backend else {}),
        **({"lr_scheduler": "step", "lr_scheduler_kwargs": {"lr_drop": int(lr_drop)}} if lr_drop else {})),
        max_time=_dt.timedelta(minutes=minutes, seconds=already), batches_per_epoch=batches_per_epoch, extra=extra,
        unpickle_resume=resume_needs_trust, record_session=record_session, work=work, precision=lightning_precision)
    record_session()
    if not package or out is None:
        return {**settings, "sessions": history, "progress": read_progress(work)}
    return package_checkpoint(work, out)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str, cpu: Any = None) -> str | None:
    """The Lightning precision train-demo asks rfdetr's trainer for, or None to leave rfdetr's own choice.

    "fp32" → "32-true"; "bf16" → "bf16-mixed"; "auto" → "bf16-mixed" on a CPU with native bf16 dot products
    (``nailkit.core.hardware.BF16_DOT_FLAGS``; ``cpu``: a ``CpuInfo``, default this machine's), else None: fp32 on
    other CPUs (as rfdetr does) and rfdetr's own choice on a GPU (bf16-mixed where the GPU has bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train-demo: --precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return "32-true"
    if precision == "bf16":
        return "bf16-mixed"
    if str(device).startswith("cpu") and (cpu or cpu_info()).bf16_dot:
        return "bf16-mixed"
    return None


def _check_arguments(*, resume: Any, init_from: Any, layer_decay: float, component_decay: float,
                     lr_warmup_steps: int | None, warmup_resolution_steps: int, checkpoint_interval: int,
                     lr_drop: int | None = None) -> None:
    """train-demo's argument checks that need no file: one clear error before anything loads."""
    if resume and init_from:
        raise ValueError("train-demo: --resume continues a run with its optimizer; --init-from starts a new one from "
                         "weights. Give one of them.")
    for name, v in (("layer_decay", layer_decay), ("component_decay", component_decay)):
        if not (0.0 < float(v) <= 1.0):
            raise ValueError(f"train-demo: --{name.replace('_', '-')} must be in (0, 1], got {v}")
    if warmup_resolution_steps < 0 or (lr_warmup_steps is not None and lr_warmup_steps < 0):
        raise ValueError("train-demo: warm-up steps must be >= 0")
    if checkpoint_interval < 1:
        raise ValueError(f"train-demo: --checkpoint-interval must be >= 1, got {checkpoint_interval}")
    if lr_drop is not None and int(lr_drop) < 1:
        raise ValueError(f"train-demo: --lr-drop is a number of epochs >= 1 (lr / 10 after it), got {lr_drop}")


def _resume_point(resume: str | os.PathLike[str] | None, work: Path, *,
                  trusted: bool) -> tuple[Path | None, bool, float]:
    """``(state file, needs the user's word, training seconds already spent)`` for ``resume`` (a ``.ckpt`` or its
    folder); ``(None, False, 0.0)`` without one. The file is refused here, before anything else reads it (PTL loads it
    again, weights-only, inside fit)."""
    if not resume:
        return None, False, 0.0
    resume_path = Path(resume)
    if resume_path.is_dir():
        resume_path = _latest_ckpt(resume_path)
    if resume_path is None or not resume_path.exists():
        raise FileNotFoundError(f"{resume}: no resumable training state (expected last.ckpt from an earlier "
                                f"train-demo run, e.g. {work / 'last.ckpt'})")
    state, needs_trust = _load_training_file(resume_path, trusted=trusted)
    # PTL's Timer restores the training time already spent from the resumed state; ``minutes`` is this run's
    return resume_path, needs_trust, _timer_elapsed_s(state)


def _check_warmup_resolution(mc: Any, warmup_resolution: int) -> None:
    """The warm-up resolution must tile into the backbone's windows of patches (``mc``: rfdetr's model config)."""
    block = int(mc.patch_size) * int(mc.num_windows)
    if warmup_resolution <= 0 or warmup_resolution % block:
        raise ValueError(f"train-demo: --warmup-resolution must be a positive multiple of {block} (patch "
                         f"{mc.patch_size} x {mc.num_windows} windows), got {warmup_resolution}")


def _session_callbacks(work: Path, *, resumed: bool, init_state: dict[str, Any] | None,
                       warmup_resolution: int | None, warmup_resolution_steps: int) -> list[Any]:
    """This session's callbacks: a resumed run goes on with the work folder's validation timeline (its wall and CPU
    seconds keep counting); a new run in the folder starts a new one."""
    progress = read_progress(work) if resumed else []
    if not resumed and (work / PROGRESS_FILE).exists():
        (work / PROGRESS_FILE).unlink()  # a new run in this folder starts a new timeline
    return make_callbacks(init_state=init_state, warmup_resolution=warmup_resolution,
                          warmup_resolution_steps=warmup_resolution_steps, progress_file=work / PROGRESS_FILE,
                          cpu_before_s=progress[-1]["cpu_s"] if progress else 0.0,
                          wall_before_s=progress[-1]["wall_s"] if progress else 0.0)


def _record_session(history: list[dict[str, Any]], history_file: Path, *, work: Path, t0: float, device: str,
                    resume_path: Path | None, ds: Path, recipe: dict[str, Any], note: str | None,
                    stopped: str | None = None) -> None:
    """Append this session (start, wall seconds, hardware, optimizer step reached, data, recipe, notes) to the work
    folder's ``history.json``."""
    import torch

    try:
        step = _global_step(work)
    except Exception:  # noqa: BLE001 - informational; never hides why the run stopped
        step = None
    entry = {"started": _dt.datetime.fromtimestamp(t0).isoformat(timespec="seconds"),
             "wall_s": round(time.time() - t0), "device": device, "cpu": cpu_info().model_name,
             "threads": torch.get_num_threads(), "resumed_from": str(resume_path) if resume_path else None,
             "global_step": step, "dataset": str(ds), "dataset_info": _dataset_info(ds), "recipe": recipe}
    if device.startswith("cuda") and torch.cuda.is_available():
        entry["gpu"] = torch.cuda.get_device_name(0)
    notes = [n for n in (note, stopped) if n]
    if notes:
        entry["note"] = "; ".join(notes)
    history.append(entry)
    history_file.write_text(json.dumps(history, indent=2))


def _train_with_rfdetr(rf: Any, train_kwargs: dict[str, Any], *, max_time: _dt.timedelta,
                       batches_per_epoch: int | None, extra: list[Any], unpickle_resume: bool,
                       record_session: Callable[..., None], work: Path, precision: str | None = None) -> None:
    """``rf.train(**train_kwargs)`` on rfdetr's own trainer, its ``build_trainer`` wrapped for the time box, short
    epochs, this session's callbacks, the Lightning ``precision`` when given (rfdetr's ``build_trainer`` lets extra
    Trainer kwargs override its own choice) and (with the user's word) PTL unpickling the resume state. A stopped run
    records its session before the exception goes on."""
    import rfdetr.training as rt
    import torch

    original = rt.build_trainer

    def build_trainer(*a: Any, **kw: Any):
        kw.setdefault("max_time", max_time)
        if batches_per_epoch:  # short epochs: a checkpoint + validation every few minutes, so a time box loses little
            kw.setdefault("limit_train_batches", batches_per_epoch)
        if precision:
            kw.setdefault("precision", precision)
        trainer = original(*a, **kw)
        trainer.callbacks.extend(extra)
        if unpickle_resume:  # the user's word (--trusted) for a file outside the allow-list: PTL may unpickle it
            trainer.fit = functools.partial(trainer.fit, weights_only=False)
        return trainer

    rt.build_trainer = build_trainer
    try:
        with torch.serialization.safe_globals(list(TRAINING_FILE_GLOBALS)):
            rf.train(**train_kwargs)
    except BaseException as exc:  # stopped (kill -TERM: PTL stops at the next batch) or failed: the session counts
        if not isinstance(exc, Exception) or "SIGTERM" in type(exc).__name__:
            record_session(stopped=f"stopped ({type(exc).__name__}); the last finished epoch's state and best "
                                   f"weights are in {work} (train-demo --package-only / --resume)")
        raise
    finally:
        rt.build_trainer = original


def _dataset_info(ds: Path) -> dict[str, Any]:
    p = ds / "dataset.json"
    return json.loads(p.read_text()) if p.exists() else {}


def cli_train_demo(args) -> int:
    trusted = bool(getattr(args, "trusted", False))
    if args.package_only:
        rec = package_checkpoint(args.work_dir or DEFAULT_WORK_DIR, args.out, trusted=trusted)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("sessions", "validation_timeline")}, indent=2,
                         default=str))
        print(f"wrote {args.out}")
        return 0
    if not args.dataset:
        raise ValueError("train-demo: --dataset DIR is required (a Roboflow-layout COCO folder), unless --package-only")
    rec = train_demo(args.dataset, args.out, minutes=args.minutes, device=args.device, resume=args.resume,
                     epochs=args.epochs, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
                     lr=args.lr, lr_encoder=args.lr, work_dir=args.work_dir, seed=args.seed,
                     batches_per_epoch=args.batches_per_epoch or None,
                     layer_decay=getattr(args, "layer_decay", DEFAULT_LAYER_DECAY),
                     component_decay=getattr(args, "component_decay", DEFAULT_COMPONENT_DECAY),
                     lr_warmup_steps=getattr(args, "lr_warmup_steps", None),
                     warmup_resolution=getattr(args, "warmup_resolution", None),
                     warmup_resolution_steps=getattr(args, "warmup_steps", 0) or 0,
                     init_from=getattr(args, "init_from", None), trusted=trusted,
                     checkpoint_interval=getattr(args, "checkpoint_interval", DEFAULT_CHECKPOINT_INTERVAL),
                     precision=getattr(args, "precision", "auto"), lr_drop=getattr(args, "lr_drop", None))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("sessions", "validation_timeline")}, indent=2,
                     default=str))
    print(f"wrote {args.out}")
    return 0

