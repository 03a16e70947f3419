"""train-demo: rfdetr's own trainer, offline on CPU, time-boxed and resumable, writing a checkpoint that nailkit
inspects exactly like the seed's (one tiny run: a batch per epoch, two epochs over two calls). Also: no training
file is unpickled without the user's word (payload pickles for --resume and --package-only), and the recipe levers
reach rfdetr's TrainConfig / trainer (checked on the arguments, without training)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import types
from pathlib import Path

import pytest
import torch

from nailkit.data import synthetic_dataset as D
from nailkit.model.checkpoint_loading import CheckpointError, load_checkpoint
from nailkit.model.checkpoint_report import inspect_checkpoint
from nailkit.train.callbacks import make_callbacks
from nailkit.train.card import write_recipe_study
from nailkit.train.demo import steps_per_epoch, train_demo
from nailkit.train.study import plot_recipe_study, recipe_study, recipe_table_markdown
from nailkit.train.training_files import TRAINING_FILE_GLOBALS, _latest_ckpt, load_training_file


@pytest.mark.slow
def test_train_writes_a_seed_like_checkpoint_and_resumes(tmp_path):
    ds = tmp_path / "nails"
    D.make_dataset(ds, seed=1, sizes={"train": 2, "valid": 1, "test": 1})
    work, out = tmp_path / "work", tmp_path / "model.pth"
    rec = train_demo(ds, out, minutes=5, epochs=1, batch_size=1, batches_per_epoch=1, work_dir=work)
    assert rec["epochs_done"] == 1 and rec["final_losses"]["loss"] > 0
    ckpt = load_checkpoint(out)  # weights_only=True: no pickled objects beyond plain types + Namespace
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())  # fp32 kept
    rep = inspect_checkpoint(ckpt)
    assert (rep.rfdetr_class, rep.encoder, rep.patch_size, rep.resolution, rep.hidden_dim) == (
        "RFDETRSegPreview", "dinov2_windowed_small", 12, 432, 256)
    assert (rep.num_queries, rep.group_detr, rep.dec_layers, rep.num_classes, rep.segmentation_head) == (
        200, 13, 4, 2, True)
    assert rep.class_names == ["Nail"]
    first = _latest_ckpt(work)
    assert first is not None and first.name == "last.ckpt"
    # the allow-list is what nailkit's own runs write: measured again on the real files
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in TRAINING_FILE_GLOBALS}
    for f in (first, work / "checkpoint_best_total.pth", out):
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) <= allowed, f
    assert rec["validation_timeline"] and rec["validation_timeline"][0]["step"] == 1
    rec2 = train_demo(ds, out, minutes=5, epochs=2, batch_size=1, batches_per_epoch=1, work_dir=work, resume=work)
    assert rec2["epochs_done"] == 2 and len(rec2["sessions"]) == 2
    assert rec2["sessions"][1]["resumed_from"] == str(first)
    assert json.loads((work / "history.json").read_text())[1]["global_step"] == 2
    timeline = rec2["validation_timeline"]
    assert [r["step"] for r in timeline] == [1, 2] and timeline[1]["cpu_min"] >= timeline[0]["cpu_min"]


def test_resume_without_state_is_a_clear_error(tmp_path):
    ds = tmp_path / "nails"
    D.make_dataset(ds, seed=1, sizes={"train": 1, "valid": 1, "test": 1})
    with pytest.raises(FileNotFoundError, match="no resumable training state"):
        train_demo(ds, tmp_path / "m.pth", resume=tmp_path / "empty", work_dir=tmp_path / "w")
    assert not (tmp_path / "m.pth").exists()


# --------------------------------------------------------------------------------------------------------------------
# No unpickling without the user's word
# --------------------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Harmless:
    """A class outside the allow-list that does nothing when unpickled."""

    def __init__(self):
        self.value = 1


def _payload_files(tmp_path, marker):
    """The payload as a raw pickle and inside a torch.save zip archive."""
    raw = tmp_path / "raw.ckpt"
    with open(raw, "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    zipped = tmp_path / "zipped.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, zipped)
    assert not marker.exists()
    return raw, zipped


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory):
    ds = tmp_path_factory.mktemp("ds") / "nails"
    D.make_dataset(ds, seed=1, sizes={"train": 1, "valid": 1, "test": 1})
    return ds


def test_resume_refuses_a_payload_pickle(tmp_path, tiny_ds, capsys):
    from nailkit.cli import main

    marker = tmp_path / "PWNED"
    for f in _payload_files(tmp_path, marker):
        rc = main(["train-demo", "--dataset", str(tiny_ds), "--out", str(tmp_path / "m.pth"), "--resume", str(f),
                   "--work-dir", str(tmp_path / "w")])
        err = capsys.readouterr().err
        assert rc == 2 and not marker.exists(), err
        assert str(f) in err and "refused" in err and "--trusted" in err, err
        assert f.name == "raw.ckpt" or "posix.system" in err, err  # names the global where torch can tell
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pth").exists()


def test_package_only_refuses_a_payload_pickle(tmp_path, capsys):
    from nailkit.cli import main

    marker = tmp_path / "PWNED"
    raw, zipped = _payload_files(tmp_path, marker)
    work = tmp_path / "work"
    work.mkdir()
    for f in (raw, zipped):  # the best weights file itself
        (work / "checkpoint_best_total.pth").write_bytes(f.read_bytes())
        rc = main(["train-demo", "--package-only", "--work-dir", str(work), "--out", str(tmp_path / "m.pth")])
        err = capsys.readouterr().err
        assert rc == 2 and not marker.exists(), err
        assert "checkpoint_best_total.pth" in err and "refused" in err and "--trusted" in err, err
    # a clean best file, but a payload as the resume state that --package-only reads for the step count
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1.0)}, work / "checkpoint_best_total.pth")
    (work / "last.ckpt").write_bytes(zipped.read_bytes())
    rc = main(["train-demo", "--package-only", "--work-dir", str(work), "--out", str(tmp_path / "m.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists() and "last.ckpt" in err and "refused" in err, err
    assert not (tmp_path / "m.pth").exists()


def test_training_file_loader(tmp_path):
    ok = tmp_path / "ok.ckpt"
    torch.save({"global_step": 3, "args": argparse.Namespace(a=1), "state_dict": {"w": torch.ones(1)}}, ok)
    assert load_training_file(ok)["global_step"] == 3  # the allow-list: Namespace
    other = tmp_path / "other.ckpt"
    torch.save({"x": Harmless()}, other)
    with pytest.raises(CheckpointError, match=r"refused: holds the Python global .*Harmless.*--trusted"):
        load_training_file(other)
    assert isinstance(load_training_file(other, trusted=True)["x"], Harmless)  # the user's word
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ok.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a loadable training state") as exc:
        load_training_file(corrupt)
    assert "trusted" not in str(exc.value)  # a corrupt file is not reported as untrusted
    with pytest.raises(CheckpointError, match="no such file"):
        load_training_file(tmp_path / "absent.ckpt")


# --------------------------------------------------------------------------------------------------------------------
# Recipe levers: argument plumbing into rfdetr's TrainConfig and trainer (no training)
# --------------------------------------------------------------------------------------------------------------------
class _FakeTrainer:
    def __init__(self):
        self.callbacks = ["rfdetr's own"]
        self.fit_kwargs = None

    def fit(self, *a, **kw):
        self.fit_kwargs = kw


def _fake_rfdetr(monkeypatch):
    """build_rfdetr → a stand-in whose train() records its kwargs and builds the trainer through the (wrapped)
    rfdetr.training.build_trainer, whose original is replaced by one returning a _FakeTrainer."""
    import rfdetr.training as rt

    seen: dict = {}

    def fake_original(*a, **kw):
        seen["trainer_kwargs"] = kw
        seen["trainer"] = _FakeTrainer()
        return seen["trainer"]

    class FakeRF:
        model_config = types.SimpleNamespace(patch_size=12, num_windows=2)

        def train(self, **kw):
            seen["train_kwargs"] = kw
            rt.build_trainer(None, None).fit("module", "data", ckpt_path=kw.get("resume"))

    monkeypatch.setattr(rt, "build_trainer", fake_original)
    monkeypatch.setattr("nailkit.train.demo.build_rfdetr", lambda *a, **k: FakeRF())  # train-demo's binding
    return seen


def test_recipe_levers_reach_rfdetr_train_config(tmp_path, tiny_ds, monkeypatch):
    from rfdetr.config import TrainConfig

    seen = _fake_rfdetr(monkeypatch)
    rec = train_demo(tiny_ds, None, minutes=3, batch_size=1, batches_per_epoch=20, work_dir=tmp_path / "w",
                     layer_decay=0.8, component_decay=0.7, lr_warmup_steps=10, warmup_resolution=288,
                     warmup_resolution_steps=5, package=False)
    kw = seen["train_kwargs"]
    assert set(kw) - {"device"} <= set(TrainConfig.model_fields)  # every kwarg is a TrainConfig field
    assert kw["lr_vit_layer_decay"] == 0.8 and kw["lr_component_decay"] == 0.7
    spe = steps_per_epoch(1, 1, 1, 20)  # 1 training image → 1 batch per epoch
    assert spe == 1 and kw["warmup_epochs"] == pytest.approx(10 / spe)
    assert kw["checkpoint_interval"] == 10 and kw["resume"] is None
    tk = seen["trainer_kwargs"]
    assert tk["max_time"].total_seconds() == 180 and tk["limit_train_batches"] == 20
    names = [type(c).__name__ for c in seen["trainer"].callbacks[1:]]
    assert seen["trainer"].callbacks[0] == "rfdetr's own" and names == ["LowResWarmup", "Progress"]
    assert seen["trainer"].fit_kwargs == {"ckpt_path": None}  # weights-only resume stays PTL's default
    assert rec["layer_decay"] == 0.8 and rec["warmup_resolution"] == 288 and rec["sessions"][0]["recipe"][
        "warmup_resolution_steps"] == 5


def test_lr_drop_reaches_rfdetrs_step_schedule(tmp_path, tiny_ds, monkeypatch):
    """--lr-drop N: rfdetr's own managed step schedule drops the lr 10x after N (short) epochs; without it rfdetr's
    default (100 epochs) stands, and the recipe text says nothing."""
    from rfdetr.config import TrainConfig
    from rfdetr.training.module_model import _build_managed_scheduler
    from nailkit.train.card import _recipe_text
    from nailkit.train.demo import _check_arguments

    seen = _fake_rfdetr(monkeypatch)
    rec = train_demo(tiny_ds, None, minutes=1, batch_size=1, batches_per_epoch=20, work_dir=tmp_path / "w",
                     lr_drop=3, package=False)
    kw = seen["train_kwargs"]
    assert kw["lr_scheduler"] == "step" and kw["lr_scheduler_kwargs"] == {"lr_drop": 3}
    assert rec["lr_drop"] == 3 and "lr ÷10 after epoch 3" in _recipe_text(rec["sessions"][-1]["recipe"])
    tc = TrainConfig(dataset_dir=str(tiny_ds), output_dir=str(tmp_path / "o"),
                     **{k: v for k, v in kw.items() if k in ("lr_scheduler", "lr_scheduler_kwargs", "epochs")})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _build_managed_scheduler(opt, tc, total_steps=200 * 5, steps_per_epoch=5, warmup_steps=0)
    assert [sched.lr_lambdas[0](s) for s in (0, 14, 15, 100)] == [1.0, 1.0, 0.1, 0.1]  # drop after 3 × 5 steps

    train_demo(tiny_ds, None, minutes=1, work_dir=tmp_path / "w2", package=False)
    assert "lr_scheduler_kwargs" not in seen["train_kwargs"]
    with pytest.raises(ValueError, match="--lr-drop is a number of epochs >= 1"):
        _check_arguments(resume=None, init_from=None, layer_decay=1.0, component_decay=1.0, lr_warmup_steps=None,
                         warmup_resolution_steps=0, checkpoint_interval=1, lr_drop=0)


def test_random_init_defaults_and_init_from(tmp_path, tiny_ds, monkeypatch):
    seen = _fake_rfdetr(monkeypatch)
    init = tmp_path / "init.pth"
    parent = {"optimizer_steps": 720, "lr": 2e-4, "sessions": [{"global_step": 720, "wall_s": 60}]}
    torch.save({"model": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, "args": argparse.Namespace(),
                "nailkit_training": parent}, init)
    train_demo(tiny_ds, None, work_dir=tmp_path / "w", init_from=init, package=False)
    lineage = json.loads((tmp_path / "w" / "lineage.json").read_text())  # the parent's runs stay in the history
    assert lineage["record"] == parent and lineage["init_from"] == str(init) and len(lineage["sha256"]) == 64
    kw = seen["train_kwargs"]
    assert kw["lr_vit_layer_decay"] == 1.0 and kw["lr_component_decay"] == 1.0  # no decay from random init
    assert kw["warmup_epochs"] == pytest.approx(40 / steps_per_epoch(1, 2, 1, 60))  # fresh optimizer: warm-up
    cbs = seen["trainer"].callbacks[1:]
    assert [type(c).__name__ for c in cbs] == ["InitWeights", "Progress"]
    module = types.SimpleNamespace(model=torch.nn.Linear(2, 2))
    cbs[0].setup(None, module, "fit")
    assert torch.equal(module.model.weight, torch.ones(2, 2))
    with pytest.raises(ValueError, match="do not fit"):
        cbs[0].setup(None, types.SimpleNamespace(model=torch.nn.Linear(3, 2)), "fit")
    with pytest.raises(ValueError, match="Give one of them"):
        train_demo(tiny_ds, None, work_dir=tmp_path / "w", init_from=init, resume=tmp_path, package=False)
    with pytest.raises(ValueError, match="multiple of 24"):
        train_demo(tiny_ds, None, work_dir=tmp_path / "w", warmup_resolution=300, warmup_resolution_steps=3,
                   package=False)
    with pytest.raises(ValueError, match="--layer-decay"):
        train_demo(tiny_ds, None, work_dir=tmp_path / "w", layer_decay=0.0, package=False)
    train_demo(tiny_ds, None, work_dir=tmp_path / "w", package=False)  # from random init: no parent any more
    assert not (tmp_path / "w" / "lineage.json").exists()


def test_a_stopped_run_records_its_session(tmp_path, tiny_ds, monkeypatch):
    """kill -TERM / Ctrl-C mid-run: the session still lands in history.json (with why it stopped), then the stop goes
    on to the caller."""
    seen = _fake_rfdetr(monkeypatch)

    def stopped_fit(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(_FakeTrainer, "fit", stopped_fit)
    with pytest.raises(KeyboardInterrupt):
        train_demo(tiny_ds, None, minutes=1, work_dir=tmp_path / "w", package=False)
    assert "trainer" in seen
    (entry,) = json.loads((tmp_path / "w" / "history.json").read_text())
    assert entry["note"].startswith("stopped (KeyboardInterrupt)") and "--package-only" in entry["note"]
    assert entry["recipe"]["lr"] == 2e-4 and entry["wall_s"] >= 0


def test_trusted_resume_lets_lightning_unpickle(tmp_path, tiny_ds, monkeypatch):
    seen = _fake_rfdetr(monkeypatch)
    state = tmp_path / "last.ckpt"
    torch.save({"global_step": 4, "x": Harmless(), "callbacks": {"Timer": {"time_elapsed": {"train": 30.0}}}}, state)
    with pytest.raises(CheckpointError, match="refused"):
        train_demo(tiny_ds, None, work_dir=tmp_path / "w", resume=state, package=False)
    train_demo(tiny_ds, None, minutes=1, work_dir=tmp_path / "w", resume=state, trusted=True, package=False)
    assert seen["trainer"].fit_kwargs == {"ckpt_path": str(state), "weights_only": False}
    assert seen["trainer_kwargs"]["max_time"].total_seconds() == 90  # Timer's 30 s already spent + this run's 60


def test_low_res_warmup_resizes_only_the_first_steps(tmp_path):
    (warm,) = make_callbacks(warmup_resolution=288, warmup_resolution_steps=2)
    for step, size in ((0, 288), (1, 288), (2, 432)):
        samples = types.SimpleNamespace(tensors=torch.zeros(2, 3, 432, 432), mask=torch.zeros(2, 432, 432, dtype=bool))
        warm.on_train_batch_start(types.SimpleNamespace(global_step=step), None, (samples, []), 0)
        assert samples.tensors.shape[-2:] == (size, size) and samples.mask.shape[-2:] == (size, size)
        assert samples.mask.dtype == torch.bool


def test_cli_train_demo_flags(monkeypatch):
    from nailkit.train import demo as train
    from nailkit.cli import build_parser

    got = {}
    monkeypatch.setattr(train, "train_demo", lambda *a, **kw: got.update(kw) or {})
    args = build_parser().parse_args(["train-demo", "--dataset", "d", "--out", "o.pth", "--layer-decay", "0.8",
                                      "--component-decay", "0.7", "--warmup-resolution", "288", "--warmup-steps",
                                      "50", "--lr-warmup-steps", "20", "--init-from", "m.pth", "--trusted",
                                      "--checkpoint-interval", "5", "--precision", "fp32"])
    assert train.cli_train_demo(args) == 0
    assert (got["layer_decay"], got["component_decay"], got["warmup_resolution"], got["warmup_resolution_steps"],
            got["lr_warmup_steps"], got["init_from"], got["trusted"], got["checkpoint_interval"]) == (
        0.8, 0.7, 288, 50, 20, "m.pth", True, 5)
    assert got["precision"] == "fp32"
    args = build_parser().parse_args(["train-demo", "--dataset", "d", "--out", "o.pth"])
    train.cli_train_demo(args)
    assert (got["layer_decay"], got["component_decay"], got["init_from"], got["trusted"], got["precision"]) == (
        1.0, 1.0, None, False, "auto")


def test_recipe_study_table_and_plot(tmp_path):
    runs = {}
    for name, decay in (("rfdetr defaults", 0.8), ("decay off", 1.0)):
        wd = tmp_path / name.replace(" ", "_")
        wd.mkdir()
        (wd / "settings.json").write_text(json.dumps({"layer_decay": decay, "component_decay": decay}))
        rows = [{"step": s, "epoch": s // 10, "wall_s": 60.0 * s, "cpu_s": 100.0 * s, "metrics": {
            "val/ema_segm_mAP_50": decay * s / 100, "val/ema_mAP_50": s / 50, "train/loss": 40 - s}} for s in (10, 20)]
        (wd / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = wd
    study = recipe_study(runs)
    tl = study["decay off"]["timeline"]
    assert [r["step"] for r in tl] == [10, 20] and tl[1]["mask_map50"] == pytest.approx(0.2)
    assert tl[1]["cpu_min"] == pytest.approx(2000 / 60, abs=0.01) and study["rfdetr defaults"]["recipe"][
        "layer_decay"] == 0.8
    table = recipe_table_markdown(study)
    assert "| decay off | 20 |" in table and "0.200" in table
    png = plot_recipe_study(study, tmp_path / "study.png")
    assert png.stat().st_size > 1000
    # into a model card: .card.json gets recipe_study, the .md its section (rendered from the JSON)
    shipped = Path(__file__).resolve().parents[1] / "data" / "models" / "nails_seg_preview_v5.card.json"
    card_json = tmp_path / "m.card.json"
    card_json.write_text(shipped.read_text())
    card = write_recipe_study(card_json, study, setup="two runs", conclusion="too short to tell", plot=str(png))
    assert card["recipe_study"]["runs"]["decay off"]["timeline"][1]["step"] == 20
    md = (tmp_path / "m.md").read_text()
    assert "## Recipe study" in md and "| decay off | 20 |" in md and "too short to tell" in md
    assert md.index("## Recipe study") > md.index("## Metrics")


def test_recipe_plot_three_panels_and_one_table_row_per_validation(tmp_path):
    """A study as recipe_study returns it (two runs, one validation without a logged loss): the plot (mAP50 against
    steps and CPU minutes, loss against steps) is written, and the table has a row for every validation."""
    def row(step, mask, box, loss):
        return {"step": step, "cpu_min": step / 10, "wall_min": step / 20, "mask_map50": mask, "box_map50": box,
                "loss": loss}

    study = {"rfdetr defaults": {"timeline": [row(10, 0.01, 0.02, 30.5), row(20, 0.05, 0.08, None),
                                              row(30, 0.09, 0.12, 24.0)]},
             "decay off": {"timeline": [row(10, None, 0.03, 29.0), row(20, 0.11, 0.15, 22.5)]}}
    png = plot_recipe_study(study, tmp_path / "plots" / "study.png")
    assert png == tmp_path / "plots" / "study.png" and png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = recipe_table_markdown(study).splitlines()
    assert len(table) == 2 + 5  # header, separator, one row per validation
    assert table[3].startswith("| rfdetr defaults | 20 |") and table[3].endswith("| – |")  # no loss: a dash


def test_package_takes_the_newest_best_weights_file(tmp_path):
    """rfdetr copies the winner to checkpoint_best_total.pth only when a fit ends; a resumed run's improvements land
    in checkpoint_best_ema.pth, which is then newer."""
    from nailkit.train.package import best_weights_file

    work = tmp_path / "work"
    work.mkdir()
    assert best_weights_file(work) is None
    for i, name in enumerate(("checkpoint_best_ema.pth", "checkpoint_best_total.pth")):
        (work / name).write_bytes(b"x")
        os.utime(work / name, ns=(10**18 + i * 10**9,) * 2)
    assert best_weights_file(work).name == "checkpoint_best_total.pth"  # a fit ended after the last improvement
    os.utime(work / "checkpoint_best_ema.pth", ns=(10**18 + 5 * 10**9,) * 2)
    assert best_weights_file(work).name == "checkpoint_best_ema.pth"  # improved after that (resumed)
    os.utime(work / "checkpoint_best_total.pth", ns=(10**18 + 5 * 10**9,) * 2)
    assert best_weights_file(work).name == "checkpoint_best_total.pth"  # same time: total first


def test_precision_bf16_only_where_the_cpu_has_native_bf16(tmp_path, tiny_ds, monkeypatch):
    from nailkit.core.hardware import parse_cpuinfo
    from nailkit.train.card import _recipe_text
    from nailkit.train.demo import resolve_precision

    zen4 = parse_cpuinfo("model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n", "x86_64")
    skylake = parse_cpuinfo("model name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni\n", "x86_64")
    assert zen4.bf16_dot == ["avx512_bf16"] and skylake.bf16_dot == []
    assert resolve_precision("auto", "cpu", zen4) == "bf16-mixed"
    assert resolve_precision("auto", "cpu", skylake) is None  # emulated bf16: fp32, as rfdetr does on the CPU
    assert resolve_precision("auto", "cuda", zen4) is None  # a GPU: rfdetr's own choice
    assert resolve_precision("fp32", "cpu", zen4) == "32-true" and resolve_precision("bf16", "cpu", skylake) == \
        "bf16-mixed"
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu", zen4)

    seen = _fake_rfdetr(monkeypatch)
    rec = train_demo(tiny_ds, None, minutes=1, work_dir=tmp_path / "w", precision="bf16", package=False)
    assert seen["trainer_kwargs"]["precision"] == "bf16-mixed"  # overrides rfdetr's fp32-on-CPU choice
    assert rec["precision"] == rec["sessions"][-1]["recipe"]["precision"] == "bf16-mixed"
    assert "bf16-mixed" in _recipe_text(rec["sessions"][-1]["recipe"])
    monkeypatch.setattr("nailkit.train.demo.cpu_info", lambda: skylake)
    rec = train_demo(tiny_ds, None, minutes=1, work_dir=tmp_path / "w2", package=False)
    assert "precision" not in seen["trainer_kwargs"] and rec["precision"] == "rfdetr's choice"
    assert "bf16" not in _recipe_text(rec["sessions"][-1]["recipe"])
