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
from typing import Any, Sequence

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
    # PTL's Timer restores the training time already spent from the resumed state; ``minutes`` is this run's budget
    already = _timer_elapsed_s(resume_path) if resume_path else 0.0
    torch.manual_seed(seed)
    rf = build_rfdetr("RFDETRSegPreview", num_classes=2, device=device)

    import rfdetr.training as rt

    original = rt.build_trainer

    def build_trainer(*a: Any, **kw: Any):
        kw.setdefault("max_time", _dt.timedelta(minutes=minutes, seconds=already))
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
    history.append({"started": _dt.datetime.fromtimestamp(t0).isoformat(timespec="seconds"), "wall_s": round(wall),
                    "device": device, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "resumed_from": str(resume_path) if resume_path else None, "global_step": _global_step(work),
                    "dataset": str(ds), "dataset_info": _dataset_info(ds)})
    history_file.write_text(json.dumps(history, indent=2))
    settings = {"dataset": str(ds), "dataset_info": _dataset_info(ds), "seed": seed,
                "batches_per_epoch": batches_per_epoch, "batch_size": batch_size, "grad_accum_steps": grad_accum_steps,
                "lr": lr, "lr_encoder": lr_encoder, "multi_scale": multi_scale}
    (work / "settings.json").write_text(json.dumps(settings, indent=2))
    return package_checkpoint(work, out)


def package_checkpoint(work_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the best weights of a training folder as one rfdetr-format fp32 ``.pth`` with plain-typed ``args`` and
    the ``nailkit_training`` record (``train-demo --package-only``: also after a run that was stopped mid-way)."""
    import torch

    from nailkit.checkpoint import atomic_write

    work = Path(work_dir)
    best = next((work / n for n in ("checkpoint_best_total.pth", "checkpoint_best_ema.pth",
                                    "checkpoint_best_regular.pth") if (work / n).exists()), None)
    if best is None:
        raise FileNotFoundError(f"{work}: no checkpoint_best_*.pth (did training finish an epoch with validation?)")
    ckpt = torch.load(best, map_location="cpu", weights_only=False)  # rfdetr's own file, in our cache
    state = ckpt.get("model", ckpt)
    history = json.loads((work / "history.json").read_text()) if (work / "history.json").exists() else []
    settings = json.loads((work / "settings.json").read_text()) if (work / "settings.json").exists() else {}
    losses, val, epochs_done = _metrics_csv(work / "metrics.csv")
    record = {**settings, "weights_from": best.name, "epochs_done": epochs_done, "final_losses": losses,
              "best_validation": val, "optimizer_steps": _global_step(work),
              "wall_s_total": sum(h.get("wall_s", 0) for h in history), "sessions": history,
              "rfdetr": _version("rfdetr"), "torch": str(torch.__version__)}
    from nailkit.model import build_rfdetr

    rf = build_rfdetr("RFDETRSegPreview", num_classes=2)
    payload = {"model": {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
               "args": checkpoint_args(ckpt.get("args"), rf), "epoch": ckpt.get("epoch"),
               "nailkit_training": _plain(record)}
    atomic_write(Path(out), lambda tmp: torch.save(payload, tmp))
    return record


def _plain(value: Any) -> Any:
    """JSON-able plain types only, so the checkpoint loads with ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(value, default=str))


def checkpoint_args(train_args: Any, rf) -> Any:
    """The seed's ``args``: an ``argparse.Namespace`` holding rfdetr's training *and* model configuration (plain
    types), so ``nailkit inspect`` can cross-check the architecture against the shapes, as for the seed."""
    import argparse

    merged = dict(vars(train_args) if hasattr(train_args, "__dict__") else (train_args or {}))
    for k, v in rf.model_config.model_dump().items():
        merged.setdefault(k, v)
    merged["model_name"] = type(rf).__name__
    return argparse.Namespace(**_plain(merged))


def _timer_elapsed_s(ckpt_path: Path) -> float:
    """Training seconds PyTorch Lightning's Timer had counted when ``ckpt_path`` was saved (0 when absent)."""
    import torch

    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own training state, in our cache
    elapsed = (state.get("callbacks") or {}).get("Timer", {}).get("time_elapsed", {})
    return float(elapsed.get("train", 0.0))


def _global_step(work: Path) -> int | None:
    last = _latest_ckpt(work)
    if last is None:
        return None
    import torch

    try:
        return int(torch.load(last, map_location="cpu", weights_only=False).get("global_step", 0))
    except Exception:  # noqa: BLE001 - informational only
        return None


def _metrics_csv(path: Path) -> tuple[dict[str, float], dict[str, float], int | None]:
    """(last logged training losses, best validation mAPs, epochs logged) from rfdetr's metrics.csv."""
    import csv

    if not path.exists():
        return {}, {}, None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [r for r in rows if r.get("train/loss")]
    losses = {k.split("/", 1)[1]: round(float(v), 4) for k, v in (train[-1] if train else {}).items()
              if k.startswith("train/loss") and v and not k.endswith("_aux")}
    val = {}
    for key in ("val/ema_segm_mAP_50_95", "val/ema_segm_mAP_50", "val/segm_mAP_50_95", "val/segm_mAP_50"):
        vals = [float(r[key]) for r in rows if r.get(key)]
        if vals:
            val[key.split("/", 1)[1]] = round(max(vals), 4)
    epochs = {int(r["epoch"]) for r in rows if r.get("epoch", "").isdigit()}
    return losses, val, (max(epochs) + 1) if epochs else None


def _dataset_info(ds: Path) -> dict[str, Any]:
    p = ds / "dataset.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def cli_train_demo(args) -> int:
    if args.package_only:
        rec = package_checkpoint(args.work_dir or DEFAULT_WORK_DIR, args.out)
        print(json.dumps({k: v for k, v in rec.items() if k != "sessions"}, indent=2, default=str))
        print(f"wrote {args.out}")
        return 0
    if not args.dataset:
        raise ValueError("train-demo: --dataset DIR is required (a Roboflow-layout COCO folder), unless --package-only")
    rec = train_demo(args.dataset, args.out, minutes=args.minutes, device=args.device, resume=args.resume,
                     epochs=args.epochs, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
                     lr=args.lr, lr_encoder=args.lr, work_dir=args.work_dir, seed=args.seed,
                     batches_per_epoch=args.batches_per_epoch or None)
    print(json.dumps({k: v for k, v in rec.items() if k != "sessions"}, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------
def model_card(checkpoint: str | os.PathLike[str], dataset: str | os.PathLike[str], *, split: str = "test",
               negatives: Sequence[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Score ``checkpoint`` (PyTorch fp32 at its resolution) on ``dataset/<split>`` and on nail-free photos, check the
    quality bar (``nailkit.gates``, stage ``quality_bar``), and write ``<stem>.card.json`` + ``<stem>.md`` beside it."""
    from nailkit import gates
    from nailkit.data import sample_images
    from nailkit.evaluate import evaluate, negatives_max_score
    from nailkit.runtime import make_runner

    ckpt = Path(checkpoint)
    from nailkit.checkpoint import load_checkpoint

    record = load_checkpoint(ckpt).get("nailkit_training", {})  # weights_only, rfdetr's Namespace allowed
    runner = make_runner(ckpt)
    try:
        metrics = evaluate(ckpt, dataset, split=split, runner=runner).metrics
        neg = negatives_max_score(ckpt, list(negatives) if negatives is not None else sample_images("photos"),
                                  runner=runner)
    finally:
        runner.close()
    metrics["max_score_on_nail_free_photos"] = max(neg.values()) if neg else 0.0
    failures = gates.check("quality_bar", metrics)
    card = {"checkpoint": ckpt.name, "sha256": _sha256(ckpt), "architecture": "RFDETRSegPreview "
            "(dinov2_windowed_small, patch 12, 432x432, hidden 256, 200 queries x group_detr 13, 4 decoder layers, "
            "seg head), 2 classes (background + Nail)", "training": record,
            "evaluation": {"dataset": str(dataset), "split": split, "backend": "torch fp32", "resolution":
                           metrics["resolution"]},
            "metrics": {k: metrics[k] for k in ("mask_map50_95", "mask_map50", "box_map50_95", "box_map50", "recall",
                                                "fp_per_image", "threshold", "images", "instances",
                                                "max_score_on_nail_free_photos")},
            "nail_free_photos": neg, "quality_bar": gates.gate("quality_bar"), "quality_bar_failures": failures}
    card_json = ckpt.with_suffix(".card.json")
    card_json.write_text(json.dumps(card, indent=2) + "\n")
    ckpt.with_suffix(".md").write_text(render_card(card))
    return card


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def render_card(card: dict[str, Any]) -> str:
    m, t = card["metrics"], card["training"]
    sessions = t.get("sessions", [])
    hw = sorted({f"{s.get('cpu')} ({s.get('device')}, {s.get('threads')} threads)" for s in sessions})
    bar = card["quality_bar"] or {}
    lines = [f"# Model card: {card['checkpoint']}", "",
             f"sha256 `{card['sha256']}`", "",
             f"**Architecture**: {card['architecture']}. fp32 weights, rfdetr checkpoint format "
             f"(`model` + `args`), loads with `torch.load(weights_only=True)`.", "",
             "## Training", "",
             f"- Data: nailkit's synthetic nail dataset, `python -m nailkit make-dataset DIR --seed "
             f"{t.get('dataset_info', {}).get('seed', t.get('seed'))}` "
             f"(train {t.get('dataset_info', {}).get('train', {}).get('images')} images / "
             f"{t.get('dataset_info', {}).get('train', {}).get('instances')} nails; validation "
             f"{t.get('dataset_info', {}).get('valid', {}).get('images')} images).",
             f"- Trainer: rfdetr {t.get('rfdetr')} `RFDETRSegPreview(pretrain_weights=None).train(...)` from random "
             f"init (no pretrained backbone: nothing is downloaded), batch {t.get('batch_size')}, grad accumulation "
             f"{t.get('grad_accum_steps')}, lr {t.get('lr')} (encoder {t.get('lr_encoder')}), multi-scale "
             f"{t.get('multi_scale')}, seed {t.get('seed')}, EMA; best checkpoint by validation mAP.",
             f"- Optimizer steps: {t.get('optimizer_steps')}; epochs (of {t.get('batches_per_epoch', 'all')} batches) "
             f"done: {t.get('epochs_done')}; wall time {t.get('wall_s_total', 0) / 60:.0f} min over "
             f"{len(sessions)} run(s); hardware: {'; '.join(hw)}.",
             f"- Final training losses (last logged): {t.get('final_losses')}.",
             *[f"- Run {i}: {h.get('started')}, {h.get('wall_s', 0) / 60:.0f} min, data {h.get('dataset')} "
               f"(generator v{h.get('dataset_info', {}).get('version', '?')}), up to optimizer step "
               f"{h.get('global_step')}" + (f"; {h['note']}" if h.get("note") else "") + "."
               for i, h in enumerate(sessions, start=1)],
             "", "## Metrics", "",
             f"On the synthetic **{card['evaluation']['split']}** split ({m['images']} images, {m['instances']} nails, "
             f"never seen in training), PyTorch fp32 at {card['evaluation']['resolution']}, pycocotools:", "",
             "| metric | value | quality bar |", "|---|---|---|",
             f"| mask mAP50-95 | {m['mask_map50_95']:.3f} | |",
             f"| mask mAP50 | {m['mask_map50']:.3f} | ≥ {bar.get('min_mask_map50', '–')} |",
             f"| box mAP50-95 | {m['box_map50_95']:.3f} | |",
             f"| box mAP50 | {m['box_map50']:.3f} | |",
             f"| recall at score ≥ {m['threshold']} (mask IoU > 0.5) | {m['recall']:.3f} | ≥ {bar.get('min_recall', '–')} |",
             f"| false positives / image at score ≥ {m['threshold']} | {m['fp_per_image']:.2f} | "
             f"≤ {bar.get('max_fp_per_image', '–')} |",
             f"| highest score on the 3 nail-free photos in data/ | {m['max_score_on_nail_free_photos']:.3f} | "
             f"< {bar.get('max_score_on_nail_free_photos', '–')} |", ""]
    if card["quality_bar_failures"]:
        lines += ["**Falls short of the quality bar**: " + "; ".join(card["quality_bar_failures"]) + ".", "",
                  "Training more closes the gap; resume it (same machine: the full state is in "
                  "`~/.cache/nailkit/train-demo/`):", "",
                  "```bash", "python -m nailkit make-dataset ~/.cache/nailkit/nails-seed0-v2 --seed 0   # if absent",
                  "python -m nailkit train-demo --dataset ~/.cache/nailkit/nails-seed0-v2 --out nails_seg_preview.pth \\",
                  "    --resume ~/.cache/nailkit/train-demo --minutes 120", "```", ""]
    else:
        lines += ["Meets the quality bar.", ""]
    lines += ["Regenerate this card: `python -m nailkit model-card data/models/nails_seg_preview.pth --dataset DIR`.",
              ""]
    return "\n".join(lines)


def cli_model_card(args) -> int:
    card = model_card(args.checkpoint, args.dataset, split=args.split)
    print(json.dumps(card["metrics"], indent=2))
    for f in card["quality_bar_failures"]:
        print("below the quality bar:", f)
    print("wrote", Path(args.checkpoint).with_suffix(".card.json"), "and", Path(args.checkpoint).with_suffix(".md"))
    return 0
