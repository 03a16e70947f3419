"""The model card's parts that need no trained model: the training history across runs (a run started from a
committed file keeps that file's runs), the rendered card (one row per run, the bar's numbers on both splits, how to
go on, taken from the record), and the overlay picture (notebook 05's view) drawn from a runner's predictions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nailkit.data import synthetic_dataset as D
from nailkit.portable.postprocess import Prediction
from nailkit.train.card import home_relative, next_version, render_card
from nailkit.train.card_overlays import card_image_rows, write_card_overlays
from nailkit.train.lineage import training_runs

PARENT = {"optimizer_steps": 720, "lr": 2e-4, "batch_size": 2,  # recorded before runs kept their recipe
          "sessions": [{"global_step": 240, "wall_s": 2280, "device": "cpu", "cpu": "Xeon", "threads": 2,
                        "dataset": "/c/nails-seed0", "dataset_info": {"version": 1}},
                       {"global_step": 720, "wall_s": 3480, "device": "cpu", "cpu": "Xeon", "threads": 2,
                        "dataset": "/c/nails-seed0-v2", "dataset_info": {"version": 2}, "note": "stopped by hand"}]}
RECIPE = {"batch_size": 1, "lr": 1e-4, "layer_decay": 1.0, "component_decay": 1.0, "lr_warmup_steps": 40,
          "init_from": "data/models/nails_seg_preview.pth"}
MINE = [{"global_step": 100, "wall_s": 600, "device": "cpu", "cpu": "EPYC", "threads": 2, "recipe": RECIPE,
         "dataset": "/c/nails-seed0-v2", "dataset_info": {"version": 2}},
        {"global_step": 250, "wall_s": 900, "device": "cuda", "gpu": "NVIDIA H200", "threads": 16, "recipe": RECIPE,
         "dataset": "/c/nails-seed0-v2", "dataset_info": {"version": 2}}]


def test_training_runs_keep_the_parents_runs_and_count_steps_per_run():
    runs, total = training_runs({"init_from": "p.pth", "record": PARENT}, MINE, 250, {"lr": 1e-4})
    assert total == 970
    assert [r["steps"] for r in runs] == [240, 480, 100, 150]
    assert [r["total_steps"] for r in runs] == [240, 720, 820, 970]
    assert runs[0]["recipe"] == {"lr": 2e-4, "batch_size": 2, "layer_decay": 0.8, "component_decay": 0.7}
    assert runs[3]["recipe"]["lr"] == 1e-4 and runs[3]["recipe"]["layer_decay"] == 1.0
    # the result as the parent of a next run: its numbers are kept, not counted again
    child, total2 = training_runs({"record": {"optimizer_steps": total, "sessions": runs}},
                                  [{"global_step": 30, "recipe": RECIPE}], 30, {})
    assert total2 == 1000 and [r["total_steps"] for r in child] == [240, 720, 820, 970, 1000]
    assert [r["steps"] for r in child] == [240, 480, 100, 150, 30]
    # no parent: the folder's own runs
    alone, t3 = training_runs(None, MINE, 250, {})
    assert t3 == 250 and [r["total_steps"] for r in alone] == [100, 250]


def _metrics(mask50, recall, images=60):
    return {"mask_map50_95": mask50 / 2, "mask_map50": mask50, "box_map50_95": 0.4, "box_map50": 0.8,
            "recall": recall, "fp_per_image": 0.1, "threshold": 0.5, "images": images, "instances": 3 * images,
            "max_score_on_nail_free_photos": 0.2, "resolution": 432}


def _card(failures, unseen_failures):
    runs, total = training_runs({"record": PARENT}, MINE, 250, {})
    timeline = [{"step": 80, "mask_map50": 0.05}, {"step": 160, "mask_map50": 0.31}, {"step": 240, "mask_map50": 0.28}]
    return {"checkpoint": "m.pth", "sha256": "0" * 64, "architecture": "RFDETRSegPreview",
            "training": {"sessions": runs, "optimizer_steps": total, "wall_s_total": 7260, "batches_per_epoch": 80,
                         "dataset_info": {"seed": 0, "train": {"images": 400}}, "validation_timeline": timeline},
            "evaluation": {"split": "test", "seed": 0, "resolution": 432}, "metrics": _metrics(0.62, 0.7),
            "unseen": {"split": "test", "seed": 7, "metrics": _metrics(0.58, 0.66, images=30),
                       "failures": unseen_failures},
            "overlays": {"file": "m.overlays.png", "threshold": 0.5,
                         "panels": [{"image": "test/a.png", "detections": 3, "scores": [0.9, 0.8, 0.7]}]},
            "quality_bar": {"min_mask_map50": 0.85, "min_recall": 0.9, "max_fp_per_image": 0.3,
                            "max_score_on_nail_free_photos": 0.5}, "quality_bar_failures": failures}


def test_card_renders_every_run_both_splits_and_how_to_go_on():
    md = render_card(_card(["mask mAP50 0.620 < 0.85"], ["mask mAP50 0.580 < 0.85"]))
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and rows[3].startswith("| 4 |") and "| 150 | 970 |" in rows[3]
    assert "NVIDIA H200" in rows[3] and "lr 0.0001, decays 1.0/1.0" in rows[3] and "lr 0.0002, decays 0.8/0.7" in rows[0]
    assert "**970 optimizer steps** over 4 run(s)" in md
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert "seed 0 test (60 images" in header and "unseen seed 7 test (30 images" in header
    assert "| mask mAP50 | 0.620 | 0.580 | ≥ 0.85 |" in md
    assert "![detections at score > 0.5](m.overlays.png)" in md and "test/a.png 3" in md
    assert "**Falls short of the quality bar**" in md
    # how to go on: the last run's recipe and its measured effect, from the record
    assert "0.050 (step 80) → best 0.310 (step 160) → 0.280 (step 240" in md
    assert md.count("--lr 0.0001 ") == 2 and md.count("--layer-decay 1.0 --component-decay 1.0") == 2
    assert "--batch-size 1 --batches-per-epoch 80" in md
    assert "--resume WORK_DIR --work-dir WORK_DIR" in md  # no folder recorded: a placeholder
    named = render_card({**_card(["x"], ["y"]), "work_dir": "/runs/s6"})
    assert "--resume /runs/s6 --work-dir /runs/s6 --minutes 600" in named and "WORK_DIR" not in named
    home = os.path.expanduser("~")
    at_home = render_card({**_card(["x"], ["y"]), "work_dir": os.path.join(home, ".cache", "nailkit", "s7")})
    assert "--resume ~/.cache/nailkit/s7 --work-dir ~/.cache/nailkit/s7 " in at_home and home + os.sep not in at_home
    assert home_relative(home + "x/run") == home + "x/run"  # a sibling folder whose name starts like home's is not home
    # the next version is a new file; a resumed run with an lr drop keeps it (its schedule is rebuilt from the flags)
    assert "--out m_v2.pth --resume" in md and "--out m_v2.pth --init-from data/models/m.pth" in md
    assert "--lr-drop" not in md
    dropped = _card(["x"], ["y"])
    dropped["training"]["sessions"][-1]["recipe"] = {**dropped["training"]["sessions"][-1]["recipe"], "lr_drop": 19}
    dmd = render_card(dropped)
    assert dmd.count("--lr-drop 19") == 1 and "--checkpoint-interval 1000 --lr-drop 19   # the run's folder" in dmd
    assert "divided its lr by 10 after epoch 19" in dmd
    assert next_version("nails_seg_preview_v3.pth") == "nails_seg_preview_v4.pth"
    assert next_version("nails_seg_preview_v9.pth") == "nails_seg_preview_v10.pth"
    assert "by score threshold" not in md  # a card written before the operating curve: no table
    curve = _card(["x"], ["y"])
    curve["metrics"]["operating_points"] = [{"threshold": 0.3, "recall": 0.91, "fp_per_image": 0.25},
                                            {"threshold": 0.5, "recall": 0.0, "fp_per_image": 0.0}]
    cmd = render_card(curve)
    assert "| score ≥ | 0.3 | 0.5 |" in cmd and "| seed 0 test | 0.91 / 0.25 | 0.00 / 0.00 |" in cmd
    assert "unseen seed 7 test |" not in cmd.split("by score threshold")[1]  # that split has no curve here
    ok = render_card(_card([], []))
    assert "**Meets the quality bar** on both splits." in ok and "train-demo" not in ok.split("## Metrics")[1]


class _FakeRunner:
    """Finds one nail on synthetic images and nothing on the photos."""

    def __init__(self):
        self.calls = []

    def predict(self, image, threshold=0.5):
        self.calls.append((Path(image).name, threshold))
        if Path(image).name.startswith("photo_"):
            return Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                              np.zeros(0, np.int64), None, np.zeros(0, object))
        from PIL import Image

        w, h = Image.open(image).size
        mask = np.zeros((1, h, w), bool)
        mask[0, 10:40, 20:50] = True
        return Prediction(np.array([[20, 10, 50, 40]], np.float32), np.array([0.93], np.float32),
                          np.array([1], np.int64), np.array([5], np.int64), mask, np.array(["Nail"], object))


def test_card_overlays_draw_test_images_synthetic_images_and_photos(tmp_path):
    ds = tmp_path / "nails"
    D.make_dataset(ds, seed=3, sizes={"train": 1, "valid": 1, "test": 4})
    rows = card_image_rows(ds)
    assert [t for t, _ in rows] == ["nails / test", "data/ synthetic", "data/ photos (no nail)"]
    assert len(rows[0][1]) == 3 and all(p.exists() for _, imgs in rows for p in imgs)
    coco = json.loads((ds / "test" / "_annotations.coco.json").read_text())
    with_nails = {coco_im["file_name"] for coco_im in coco["images"]
                  if any(a["image_id"] == coco_im["id"] for a in coco["annotations"])}
    assert {p.name for p in rows[0][1]} <= with_nails  # only images that hold nails
    runner = _FakeRunner()
    panels = write_card_overlays(runner, rows, tmp_path / "o.png", threshold=0.5)
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(panels) == 9 and {t for _, t in runner.calls} == {0.5}
    assert [p["detections"] for p in panels] == [1] * 6 + [0] * 3
    assert panels[0]["scores"] == [pytest.approx(0.93)]


def test_model_card_work_dir_must_hold_the_resume_state(tmp_path, capsys):
    from nailkit.cli import main

    ds = tmp_path / "nails"
    from nailkit.data import synthetic_dataset as D
    D.make_dataset(ds, seed=1, sizes={"train": 1, "valid": 1, "test": 1})
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"PK")
    rc = main(["model-card", str(ckpt), "--dataset", str(ds), "--work-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 2 and "--work-dir" in err and "last.ckpt" in err, err
    assert not (tmp_path / "m.card.json").exists()
