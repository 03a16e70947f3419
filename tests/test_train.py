"""train-demo: rfdetr's own trainer, offline on CPU, time-boxed and resumable, writing a checkpoint that nailkit
inspects exactly like the seed's (one tiny run: a batch per epoch, two epochs over two calls)."""

from __future__ import annotations

import json

import pytest
import torch

from nailkit import dataset as D
from nailkit.checkpoint import inspect, load_checkpoint
from nailkit.train import _latest_ckpt, train_demo


@pytest.mark.slow
def test_train_writes_a_seed_like_checkpoint_and_resumes(tmp_path):
    ds = tmp_path / "nails"
    D.make_dataset(ds, seed=1, sizes={"train": 2, "valid": 1, "test": 1})
    work, out = tmp_path / "work", tmp_path / "model.pth"
    rec = train_demo(ds, out, minutes=5, epochs=1, batch_size=1, batches_per_epoch=1, work_dir=work)
    assert rec["epochs_done"] == 1 and rec["final_losses"]["loss"] > 0
    ckpt = load_checkpoint(out)  # weights_only=True: no pickled objects beyond plain types + Namespace
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())  # fp32 kept
    rep = inspect(ckpt)
    assert (rep.rfdetr_class, rep.encoder, rep.patch_size, rep.resolution, rep.hidden_dim) == (
        "RFDETRSegPreview", "dinov2_windowed_small", 12, 432, 256)
    assert (rep.num_queries, rep.group_detr, rep.dec_layers, rep.num_classes, rep.segmentation_head) == (
        200, 13, 4, 2, True)
    assert rep.class_names == ["Nail"]
    first = _latest_ckpt(work)
    assert first is not None
    rec2 = train_demo(ds, out, minutes=5, epochs=2, batch_size=1, batches_per_epoch=1, work_dir=work, resume=work)
    assert rec2["epochs_done"] == 2 and len(rec2["sessions"]) == 2
    assert rec2["sessions"][1]["resumed_from"] == str(first)
    assert json.loads((work / "history.json").read_text())[1]["global_step"] == 2


def test_resume_without_state_is_a_clear_error(tmp_path):
    ds = tmp_path / "nails"
    D.make_dataset(ds, seed=1, sizes={"train": 1, "valid": 1, "test": 1})
    with pytest.raises(FileNotFoundError, match="no resumable training state"):
        train_demo(ds, tmp_path / "m.pth", resume=tmp_path / "empty", work_dir=tmp_path / "w")
    assert not (tmp_path / "m.pth").exists()
