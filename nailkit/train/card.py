"""A trained checkpoint's model card: scored on a dataset split and on nail-free photos, checked against the quality
bar, written as ``<stem>.card.json`` (the record) and ``<stem>.md`` (rendered from it), optionally with a recipe
study section (``nailkit.train.study``); ``python -m nailkit model-card``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from nailkit.accuracy.evaluate import evaluate, negatives_max_score
from nailkit.data.samples import sample_images
from nailkit.model.checkpoint_loading import load_checkpoint
from nailkit.runtime.runners import make_runner
from nailkit.train.card_overlays import card_image_rows, write_card_overlays
from nailkit.train.study import recipe_table_markdown
from nailkit.verify import gates


def model_card(checkpoint: str | os.PathLike[str], dataset: str | os.PathLike[str], *, split: str = "test",
               negatives: Sequence[str | os.PathLike[str]] | None = None,
               unseen: str | os.PathLike[str] | None = None, overlays: bool = True,
               work_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Score ``checkpoint`` (PyTorch fp32 at its resolution) on ``dataset/<split>``, on ``unseen/<split>`` (a dataset
    made from a seed training never saw, e.g. ``make-dataset --seed 7``) and on nail-free photos, check the quality
    bar on both splits (``nailkit.verify.gates``, stage ``quality_bar``), draw notebook 05's overlays at the bar's
    threshold (``<stem>.overlays.png``) and write ``<stem>.card.json`` + ``<stem>.md`` beside it. ``work_dir``: the
    train-demo folder the weights came from, which the card's resume command names."""
    ckpt = Path(checkpoint)

    record = load_checkpoint(ckpt).get("nailkit_training", {})  # weights_only, rfdetr's Namespace allowed
    runner = make_runner(ckpt)
    try:
        metrics = evaluate(ckpt, dataset, split=split, runner=runner).metrics
        neg = negatives_max_score(ckpt, list(negatives) if negatives is not None else sample_images("photos"),
                                  runner=runner)
        metrics["max_score_on_nail_free_photos"] = max(neg.values()) if neg else 0.0
        unseen_card = None
        if unseen is not None:
            um = evaluate(ckpt, unseen, split=split, runner=runner).metrics
            um["max_score_on_nail_free_photos"] = metrics["max_score_on_nail_free_photos"]
            unseen_card = {"dataset": str(unseen), "split": split, "seed": _dataset_seed(unseen),
                           "metrics": {k: um[k] for k in METRIC_KEYS if k in um},
                           "failures": gates.check("quality_bar", um)}
        pictures = None
        if overlays:
            png = ckpt.with_suffix(".overlays.png")
            panels = write_card_overlays(runner, card_image_rows(dataset, split=split), png,
                                         threshold=float(metrics["threshold"]))
            pictures = {"file": png.name, "threshold": metrics["threshold"], "panels": panels}
    finally:
        runner.close()
    failures = gates.check("quality_bar", metrics)
    if unseen_card:
        failures += [f"unseen seed {unseen_card['seed']}: {f}" for f in unseen_card["failures"]]
    card = {"checkpoint": ckpt.name, "sha256": _sha256(ckpt), "architecture": "RFDETRSegPreview "
            "(dinov2_windowed_small, patch 12, 432x432, hidden 256, 200 queries x group_detr 13, 4 decoder layers, "
            "seg head), 2 classes (background + Nail)", "training": record,
            "evaluation": {"dataset": str(dataset), "split": split, "seed": _dataset_seed(dataset),
                           "backend": "torch fp32", "resolution": metrics["resolution"]},
            "metrics": {k: metrics[k] for k in METRIC_KEYS if k in metrics}, "unseen": unseen_card, "overlays": pictures,
            "nail_free_photos": neg, "quality_bar": gates.gate("quality_bar"), "quality_bar_failures": failures,
            "work_dir": str(work_dir) if work_dir else None}
    card_json = ckpt.with_suffix(".card.json")
    if card_json.exists():  # the recipe study is about the recipe, not these weights: it stays
        try:
            previous = json.loads(card_json.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("recipe_study"):
            card["recipe_study"] = previous["recipe_study"]
    card_json.write_text(json.dumps(card, indent=2) + "\n")
    ckpt.with_suffix(".md").write_text(render_card(card))
    return card


METRIC_KEYS = ("mask_map50_95", "mask_map50", "box_map50_95", "box_map50", "recall", "fp_per_image", "threshold",
               "images", "instances", "max_score_on_nail_free_photos", "operating_points")


def _dataset_seed(dataset: str | os.PathLike[str]) -> Any:
    """The generator seed a ``make-dataset`` folder records (``dataset.json``), or None."""
    p = Path(dataset) / "dataset.json"
    try:
        return json.loads(p.read_text()).get("seed")
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def render_card(card: dict[str, Any]) -> str:
    t = card["training"]
    lines = [f"# Model card: {card['checkpoint']}", "",
             f"sha256 `{card['sha256']}`", "",
             f"**Architecture**: {card['architecture']}. fp32 weights, rfdetr checkpoint format "
             f"(`model` + `args`), loads with `torch.load(weights_only=True)`.", "",
             *render_training(t), *render_metrics(card)]
    if card.get("overlays"):
        o = card["overlays"]
        lines += [f"![detections at score > {o['threshold']}]({o['file']})", "",
                  f"`{o['file']}`: notebook 05's view at score > {o['threshold']} (PyTorch fp32): three test images "
                  f"of the scored split, the three synthetic images and the three nail-free photos in `data/`; "
                  f"detections per panel: " + ", ".join(f"{p['image']} {p['detections']}" for p in o["panels"])
                  + ".", ""]
    if card["quality_bar_failures"]:
        lines += ["**Falls short of the quality bar**: " + "; ".join(card["quality_bar_failures"]) + ".", "",
                  *render_continuation(t, card.get("work_dir"), card["checkpoint"])]
    else:
        lines += ["**Meets the quality bar** on both splits.", ""]
    if card.get("recipe_study"):
        lines += render_recipe_study(card["recipe_study"])
    lines += [f"Regenerate this card: `python -m nailkit model-card data/models/{card['checkpoint']} --dataset DIR "
              "--unseen-dataset DIR7 --force` (`DIR`: `make-dataset --seed 0`, `DIR7`: `make-dataset --seed 7`; "
              "`--force`: it replaces the shipped card).",
              ""]
    return "\n".join(lines)


def _recipe_text(r: dict[str, Any]) -> str:
    decays = (f"decays {r.get('layer_decay')}/{r.get('component_decay')}"
              if r.get("layer_decay") is not None else "decays ?")
    warm = f", {r['lr_warmup_steps']}-step lr warm-up" if r.get("lr_warmup_steps") else ""
    res = (f", first {r['warmup_resolution_steps']} steps at {r['warmup_resolution']} px"
           if r.get("warmup_resolution") else "")
    start = f", from {Path(r['init_from']).name}" if r.get("init_from") else ""
    prec = f", {r['precision']}" if str(r.get("precision", "")).startswith("bf16") else ""
    drop = f", lr ÷10 after epoch {r['lr_drop']}" if r.get("lr_drop") else ""
    return f"batch {r.get('batch_size')}, lr {r.get('lr')}, {decays}{warm}{drop}{res}{prec}{start}"


def render_training(t: dict[str, Any]) -> list[str]:
    """The card's training section: data, trainer, totals and one table row per run (oldest first)."""
    runs = t.get("sessions", [])
    info = t.get("dataset_info", {})
    fmt = lambda v: "–" if v is None else str(v)  # noqa: E731
    lines = ["## Training", "",
             f"- Data: nailkit's synthetic nail dataset, `python -m nailkit make-dataset DIR --seed "
             f"{info.get('seed', t.get('seed'))}` (train {info.get('train', {}).get('images')} images / "
             f"{info.get('train', {}).get('instances')} nails; validation {info.get('valid', {}).get('images')} "
             f"images).",
             f"- Trainer: rfdetr {t.get('rfdetr')} `RFDETRSegPreview(pretrain_weights=None).train(...)` from random "
             f"init (no pretrained backbone: nothing is downloaded), multi-scale {t.get('multi_scale')}, seed "
             f"{t.get('seed')}, EMA; best checkpoint by validation mAP (these weights: {t.get('weights_from')}, "
             f"best validation {t.get('best_validation')}).",
             f"- In all: **{t.get('optimizer_steps')} optimizer steps** over {len(runs)} run(s), "
             f"{t.get('wall_s_total', 0) / 60:.0f} min wall.",
             f"- Final training losses (last logged): {t.get('final_losses')}.", "",
             "| run | started | hardware | wall min | steps | steps in all | recipe | data | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, h in enumerate(runs, start=1):
        hw = h.get("gpu") or f"{h.get('cpu')} ({h.get('device')}, {h.get('threads')} threads)"
        data = f"{Path(str(h.get('dataset'))).name} (generator v{h.get('dataset_info', {}).get('version', '?')})"
        lines.append(f"| {i} | {h.get('started')} | {hw} | {h.get('wall_s', 0) / 60:.0f} | {fmt(h.get('steps'))} | "
                     f"{fmt(h.get('total_steps', h.get('global_step')))} | {_recipe_text(h.get('recipe') or {})} | "
                     f"{data} | {h.get('note') or ''} |")
    return lines + [""]


def render_metrics(card: dict[str, Any]) -> list[str]:
    """The quality bar's numbers on the scored split and, when given, on the unseen seed's split."""
    bar = card["quality_bar"] or {}
    ev, m, u = card["evaluation"], card["metrics"], card.get("unseen")
    cols = [(f"seed {ev.get('seed', '?')} {ev['split']} ({m['images']} images, {m['instances']} nails)", m)]
    if u:
        um = u["metrics"]
        cols.append((f"unseen seed {u.get('seed', '?')} {u['split']} ({um['images']} images, {um['instances']} "
                     f"nails)", um))
    th = m["threshold"]
    rows = [("mask mAP50-95", "mask_map50_95", ".3f", ""),
            ("mask mAP50", "mask_map50", ".3f", f"≥ {bar.get('min_mask_map50', '–')}"),
            ("box mAP50-95", "box_map50_95", ".3f", ""), ("box mAP50", "box_map50", ".3f", ""),
            (f"recall at score ≥ {th} (mask IoU > 0.5)", "recall", ".3f", f"≥ {bar.get('min_recall', '–')}"),
            (f"false positives / image at score ≥ {th}", "fp_per_image", ".2f",
             f"≤ {bar.get('max_fp_per_image', '–')}"),
            ("highest score on the 3 nail-free photos in data/", "max_score_on_nail_free_photos", ".3f",
             f"< {bar.get('max_score_on_nail_free_photos', '–')}")]
    lines = ["## Metrics", "",
             f"PyTorch fp32 at {ev['resolution']}, pycocotools, on synthetic splits never seen in training:", "",
             "| metric | " + " | ".join(c for c, _ in cols) + " | quality bar |",
             "|---|" + "---|" * len(cols) + "---|"]
    for label, key, f, b in rows:
        lines.append(f"| {label} | " + " | ".join(format(mm[key], f) for _, mm in cols) + f" | {b} |")
    return lines + [""] + render_operating_points(cols)


def render_operating_points(cols: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Recall / false positives per image at each score threshold (``evaluate``'s ``operating_points``), per split:
    what notebook 05's slider finds where, when the bar's threshold finds nothing yet."""
    cols = [(c.split(" (")[0], mm["operating_points"]) for c, mm in cols if mm.get("operating_points")]
    if not cols:
        return []
    ts = [p["threshold"] for p in cols[0][1]]
    lines = ["Recall / false positives per image by score threshold (mask IoU > 0.5, one-to-one):", "",
             "| score ≥ | " + " | ".join(f"{t:g}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for name, pts in cols:
        lines.append(f"| {name} | " + " | ".join(f"{p['recall']:.2f} / {p['fp_per_image']:.2f}" for p in pts) + " |")
    return lines + [""]


def home_relative(path: str | os.PathLike[str]) -> str:
    """``path`` with the user's home folder written as ``~``, so a card's commands read the same on every machine."""
    path, home = str(path), os.path.expanduser("~")
    return "~" + path[len(home):] if path == home or path.startswith(home.rstrip(os.sep) + os.sep) else path


def next_version(name: str) -> str:
    """The file name a next trained version gets: ``m_v3.pth`` → ``m_v4.pth``, ``m.pth`` → ``m_v2.pth`` (a new
    version is a new file, so replacing it never puts two blobs of ~126 MB into one submission's diffs)."""
    p = Path(name)
    m = re.fullmatch(r"(.*)_v(\d+)", p.stem)
    stem = f"{m.group(1)}_v{int(m.group(2)) + 1}" if m else f"{p.stem}_v2"
    return str(p.with_name(stem + p.suffix))


def render_continuation(t: dict[str, Any], work_dir: str | None = None,
                        name: str = "nails_seg_preview.pth") -> list[str]:
    """How to train these weights further: the last run's recipe, resumed where its state is (``work_dir``, else a
    placeholder), else started afresh from the committed file; its measured effect from the validation timeline."""
    last = (t.get("sessions") or [{}])[-1].get("recipe") or {}
    work_dir = home_relative(work_dir) if work_dir else None
    tl = [r for r in t.get("validation_timeline", []) if r.get("mask_map50") is not None]
    flags = (f"--layer-decay {last.get('layer_decay', 1.0)} --component-decay {last.get('component_decay', 1.0)} "
             f"--batch-size {last.get('batch_size', t.get('batch_size'))} --batches-per-epoch "
             f"{t.get('batches_per_epoch')} --lr {last.get('lr', t.get('lr'))} --checkpoint-interval 1000")
    # a resumed run rebuilds its lr schedule from the flags: the same --lr-drop, or the lr jumps back up
    resume_flags = flags + (f" --lr-drop {last['lr_drop']}" if last.get("lr_drop") else "")
    out = next_version(name)
    lines = ["Training more closes the gap."]
    if tl:
        best = max(tl, key=lambda r: r["mask_map50"])
        lines[0] += (f" The last run's validation mask mAP50 went {tl[0]['mask_map50']:.3f} (step {tl[0]['step']}) "
                     f"→ best {best['mask_map50']:.3f} (step {best['step']}) → {tl[-1]['mask_map50']:.3f} (step "
                     f"{tl[-1]['step']}, its last validation).")
    lines[0] += (" Go on with the same recipe: resume the work folder while its full state is on the machine, else "
                 "start from these weights (fresh optimizer, short warm-up); on a lent GPU run `tools/gpu_train.sh`.")
    if last.get("lr_drop"):
        lines[0] += (f" The last run divided its lr by 10 after epoch {last['lr_drop']} of its time box (`--lr-drop`): "
                     "give a fresh run's time box its own.")
    return lines + ["", "```bash",
                    "python -m nailkit make-dataset ~/.cache/nailkit/nails-seed0-v2 --seed 0   # if absent",
                    "nice -n 19 python -m nailkit train-demo --dataset ~/.cache/nailkit/nails-seed0-v2 \\",
                    f"    --out {out} --resume {work_dir or 'WORK_DIR'} "
                    f"--work-dir {work_dir or 'WORK_DIR'} --minutes 600 \\",
                    f"    {resume_flags}   # the run's folder is still here",
                    "nice -n 19 python -m nailkit train-demo --dataset ~/.cache/nailkit/nails-seed0-v2 \\",
                    f"    --out {out} --init-from data/models/{name} \\",
                    "    --work-dir ~/.cache/nailkit/train-demo-next --minutes 600 \\",
                    f"    {flags}   # a fresh machine",
                    "```", ""]


def render_recipe_study(rs: dict[str, Any]) -> list[str]:
    """The card's recipe-study section: setup, the table (every validation of every run), the plot, the verdict."""
    lines = ["## Recipe study: training from random init", ""]
    if rs.get("setup"):
        lines += [rs["setup"], ""]
    lines += [recipe_table_markdown(rs.get("runs", {})), ""]
    if rs.get("plot"):
        lines += [f"![recipe study]({rs['plot']})", "",
                  f"Plot: `{rs['plot']}` (mask mAP50 solid, box mAP50 dashed, against optimizer steps and CPU minutes; "
                  f"training loss against optimizer steps; regenerate with "
                  f"`nailkit.train.study.plot_recipe_study(card['recipe_study']['runs'], path)` from this card's "
                  f"`.card.json`).", ""]
    if rs.get("conclusion"):
        lines += [f"**Verdict**: {rs['conclusion']}", ""]
    return lines


def write_recipe_study(card_json: str | os.PathLike[str], study: dict[str, Any], *, setup: str, conclusion: str,
                       plot: str | None = None) -> dict[str, Any]:
    """Put a recipe study into a model card (``recipe_study`` in the ``.card.json``) and re-render the ``.md``."""
    path = Path(card_json)
    card = json.loads(path.read_text())
    card["recipe_study"] = {"setup": setup, "runs": study, "plot": plot, "conclusion": conclusion}
    path.write_text(json.dumps(card, indent=2) + "\n")
    path.with_name(path.name.replace(".card.json", ".md")).write_text(render_card(card))
    return card


def cli_model_card(args) -> int:
    card = model_card(args.checkpoint, args.dataset, split=args.split, unseen=getattr(args, "unseen_dataset", None),
                      work_dir=getattr(args, "work_dir", None))
    print(json.dumps({"metrics": card["metrics"], "unseen": (card["unseen"] or {}).get("metrics")}, indent=2))
    for f in card["quality_bar_failures"]:
        print("below the quality bar:", f)
    print("wrote", Path(args.checkpoint).with_suffix(".card.json"), "and", Path(args.checkpoint).with_suffix(".md"),
          "(and .overlays.png)")
    return 0
