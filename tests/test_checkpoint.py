"""Checkpoint inspection, the demo checkpoint, offline loading and every bad-input case."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nailkit.core.artifacts import file_sha256
from nailkit.model.build import make_demo_checkpoint
from nailkit.model.checkpoint import checkpoint_content
from nailkit.model.checkpoint_loading import CheckpointError, load_checkpoint
from nailkit.model.checkpoint_report import inspect_checkpoint
from nailkit.model.build import load_model, resolve_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_payload(demo_ckpt):
    return torch.load(demo_ckpt, map_location="cpu", weights_only=False)


def _save(tmp_path, name, payload) -> Path:
    p = tmp_path / name
    torch.save(payload, p)
    return p


def test_demo_checkpoint_is_deterministic(tmp_path, demo_payload):
    a = make_demo_checkpoint(tmp_path / "a.pth", seed=0)
    sd_a = torch.load(a, weights_only=False)["model"]
    sd_demo = demo_payload["model"]
    assert sd_a.keys() == sd_demo.keys()
    assert all(torch.equal(sd_a[k], sd_demo[k]) for k in sd_a)
    b = make_demo_checkpoint(tmp_path / "b.pth", seed=1)
    sd_b = torch.load(b, weights_only=False)["model"]
    assert not torch.equal(sd_a["query_feat.weight"], sd_b["query_feat.weight"])


def test_inspect_demo_reports_the_seed_architecture(demo_ckpt):
    r = inspect_checkpoint(demo_ckpt)
    assert (r.encoder, r.patch_size, r.resolution, r.hidden_dim) == ("dinov2_windowed_small", 12, 432, 256)
    assert (r.num_queries, r.group_detr, r.total_queries, r.dec_layers) == (200, 13, 2600, 4)
    assert (r.num_classes, r.num_logits, r.segmentation_head, r.num_windows) == (2, 3, True, 2)
    assert r.class_names == ["background", "Nail"] and r.rfdetr_class == "RFDETRSegPreview"
    assert r.key_tensors["position_embeddings"] == [1, 1297, 384]
    assert r.key_tensors["patch_embeddings"] == [384, 3, 12, 12]
    assert r.key_tensors["refpoint_embed.weight"] == [2600, 4]
    assert r.sources["resolution"] == "shape" and r.sources["group_detr"] == "args"
    assert r.disagreements == []
    assert 33.5e6 < sum(r.num_params.values()) < 34.2e6
    text = r.render()
    assert "Encoder dinov2_windowed_small · Num queries 200 (actual 2600 with group_detr=13) · Patch size 12" in text
    assert "Num classes 2 (background + Nail)" in text and "Decoder layers 4" in text


def test_cli_inspect_json(demo_ckpt):
    out = subprocess.run([sys.executable, "-m", "nailkit", "inspect", str(demo_ckpt), "--json"],
                         capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    for key in ["encoder", "patch_size", "resolution", "hidden_dim", "num_queries", "group_detr", "dec_layers",
                "num_classes", "class_names", "segmentation_head", "rfdetr_class", "num_params", "key_tensors"]:
        assert key in d
    assert d["segmentation_head"] is True and d["key_tensors"]["position_embeddings"] == [1, 1297, 384]


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    out = subprocess.run([sys.executable, "-m", "nailkit", "inspect", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "not a PyTorch checkpoint" in out.stderr


def test_shapes_win_over_args_and_disagreements_are_flagged(tmp_path, demo_payload):
    args = argparse.Namespace(**vars(demo_payload["args"]))
    args.hidden_dim, args.resolution = 384, 560
    r = inspect_checkpoint(_save(tmp_path, "x.pth", {"model": demo_payload["model"], "args": args}))
    assert r.hidden_dim == 256 and r.resolution == 432
    assert any("hidden_dim" in d for d in r.disagreements) and any("resolution" in d for d in r.disagreements)


def test_bare_state_dict_and_dict_args_and_training_checkpoint(tmp_path, demo_payload):
    bare = inspect_checkpoint(_save(tmp_path, "bare.pth", demo_payload["model"]))
    assert bare.format == "bare state_dict" and bare.resolution == 432 and bare.group_detr == 13
    assert bare.sources["group_detr"] == "default" and bare.class_names is None
    as_dict = dict(vars(demo_payload["args"]))
    as_dict.pop("model_name")
    training = {"model": demo_payload["model"], "args": as_dict, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 3}, "ema_model": demo_payload["model"], "epoch": 3}
    p = _save(tmp_path, "checkpoint_best_total.pth", training)
    r = inspect_checkpoint(p)
    assert r.class_names == ["background", "Nail"] and r.rfdetr_class == "RFDETRSegPreview"
    assert {"optimizer", "lr_scheduler", "ema_model", "epoch"} <= set(r.extra_keys)
    rf = load_model(p)  # no model_name stored: nailkit infers the class from shapes
    assert type(rf).__name__ == "RFDETRSegPreview" and rf.class_names == ["background", "Nail"]


def test_load_model_loads_exact_weights(demo_ckpt, demo_payload):
    rf = load_model(demo_ckpt)
    sd = rf.model.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in demo_payload["model"].items())


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such file"):
        load_checkpoint(tmp_path / "nope.pth")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: file is empty"):
        inspect_checkpoint(p)


def test_truncated_file(tmp_path, demo_ckpt):
    p = tmp_path / "trunc.pth"
    p.write_bytes(demo_ckpt.path.read_bytes()[: 5_000_000])
    with pytest.raises(CheckpointError, match=r"trunc\.pth: truncated or corrupt"):
        inspect_checkpoint(p)


@pytest.mark.parametrize("content,kind", [
    (b'{"model": "x"}', "JSON"),
    (b"just some notes\n", "text"),
    (b"\x08\x07\x12\x07pytorch\x1a\x052.14", "ONNX"),
    (b"notes on the onnx export\n", "text"),  # "onnx" in a text file does not make it an ONNX model
])
def test_non_checkpoint_files(tmp_path, content, kind):
    p = tmp_path / "model.pth"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"model\.pth: this is .*{kind}.*, not a PyTorch checkpoint"):
        inspect_checkpoint(p)


def test_real_onnx_file_is_refused(tmp_path):
    import onnx
    from onnx import helper, TensorProto

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, producer_name="pytorch"), p)
    with pytest.raises(CheckpointError, match="ONNX"):
        inspect_checkpoint(p)


def test_non_rfdetr_state_dict(tmp_path):
    p = _save(tmp_path, "resnet.pth", {"conv1.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="not an RF-DETR"):
        inspect_checkpoint(p)


class Custom:  # a pickled object weights_only loading refuses
    pass


def test_untrusted_pickle_needs_trusted_flag(tmp_path, demo_payload):
    p = _save(tmp_path, "pickled.pth", {"model": demo_payload["model"], "args": demo_payload["args"],
                                         "extra": Custom()})
    with pytest.raises(CheckpointError, match="trusted=True"):
        inspect_checkpoint(p)
    assert inspect_checkpoint(p, trusted=True).resolution == 432


def test_detection_only_checkpoint(tmp_path, demo_payload):
    sd = {k: v for k, v in demo_payload["model"].items() if not k.startswith("segmentation_head.")}
    args = argparse.Namespace(**vars(demo_payload["args"]))
    args.segmentation_head = False
    p = _save(tmp_path, "det.pth", {"model": sd, "args": args})
    r = inspect_checkpoint(p)
    assert r.segmentation_head is False and r.disagreements == []
    with pytest.raises(CheckpointError, match="detection-only checkpoint"):
        load_model(p)


def test_weights_that_do_not_fit_are_refused(tmp_path, demo_payload):
    sd = dict(demo_payload["model"])
    sd["class_embed.weight"] = torch.zeros(3, 128)
    p = _save(tmp_path, "bad_shapes.pth", {"model": sd, "args": demo_payload["args"]})
    with pytest.raises(CheckpointError, match=r"bad_shapes\.pth: weights do not fit .*class_embed\.weight"):
        load_model(p)


def test_registry_name_is_refused_not_downloaded():
    with pytest.raises(CheckpointError, match="never downloads"):
        resolve_checkpoint("rf-detr-seg-preview.pt")


def test_empty_path_means_the_trained_demo_model():
    from nailkit.model.build import TRAINED_DEMO

    assert resolve_checkpoint("").path == TRAINED_DEMO
    rep = inspect_checkpoint(TRAINED_DEMO)  # the committed model is the seed's architecture, trained: classes ['Nail']
    assert (rep.rfdetr_class, rep.num_queries, rep.group_detr, rep.dec_layers, rep.num_classes) == (
        "RFDETRSegPreview", 200, 13, 4, 2)
    assert rep.class_names == ["Nail"]


def test_checkpoint_content_ignores_the_file_name(tmp_path):
    import torch

    payload = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "args": {"class_names": ["Nail"]}}
    a, b = tmp_path / "a.pth", tmp_path / "checkpoint_best_total.pth"
    torch.save(payload, a)
    torch.save(payload, b)
    assert file_sha256(a) != file_sha256(b)  # torch.save records the name
    assert checkpoint_content(a) == checkpoint_content(b)
    payload["model"]["w"] = payload["model"]["w"] + 1e-3
    torch.save(payload, b)
    assert checkpoint_content(a) != checkpoint_content(b)  # other weights
    payload["model"]["w"] = payload["model"]["w"] - 1e-3
    payload["args"]["class_names"] = ["Nail", "Cuticle"]
    torch.save(payload, a)
    assert checkpoint_content(a) != checkpoint_content(b)  # other config


# ----------------------------------------------------------------------------------------------------------------
# nailkit.core.subproc
# ----------------------------------------------------------------------------------------------------------------


def test_checkpoint_object_is_resolved_once_and_loaded_once(demo_ckpt, monkeypatch):
    """An entry point resolves a Checkpoint; every layer below gets the same object back, and its content hash,
    report and args come from one load of the file (a second load_model fills nothing again)."""
    import os

    from nailkit.model import checkpoint as C
    from nailkit.model.checkpoint import Checkpoint

    ckpt = resolve_checkpoint(str(demo_ckpt))
    assert isinstance(ckpt, Checkpoint) and resolve_checkpoint(ckpt) is ckpt
    assert os.fspath(ckpt) == str(demo_ckpt) and Path(ckpt) == demo_ckpt.path and ckpt.name == demo_ckpt.path.name
    loads = []
    real = C.load_checkpoint
    monkeypatch.setattr(C, "load_checkpoint", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert ckpt.content == checkpoint_content(demo_ckpt.path, length=64)  # the object's hash = the path's
    n = len(loads)
    assert ckpt.report.rfdetr_class == "RFDETRSegPreview" and ckpt.args["class_names"] == ["background", "Nail"]
    assert checkpoint_content(ckpt) == ckpt.content[:16] and len(loads) == n  # nothing loaded again
    assert ckpt.sha256(64) == file_sha256(demo_ckpt.path, 64) and ckpt.sha256() == ckpt.sha256(64)[:12]
    rf = load_model(ckpt)
    assert not hasattr(rf, "nailkit_checkpoint") and not hasattr(rf, "nailkit_report")  # nothing patched on rf


def test_saved_checkpoint_is_deflated_fp32_exact_and_loads_weights_only(tmp_path):
    """nailkit's packaged .pth: torch.save's zip with deflated members — smaller, and the same tensors to
    torch.load(weights_only=True) and nailkit's loader."""
    import zipfile

    from nailkit.model.checkpoint_saving import save_checkpoint

    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(256, 1024, generator=g) * 0.02, "b": torch.zeros(1024), "n": torch.arange(5)}
    payload = {"model": state, "args": argparse.Namespace(lr=1e-4, class_names=["Nail"])}
    plain = tmp_path / "plain.pth"
    torch.save(payload, plain)
    out = save_checkpoint(payload, tmp_path / "sub" / "m.pth")
    with zipfile.ZipFile(out) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
        names = [i.filename for i in z.infolist()]
        assert {n.split("/", 1)[0] for n in names} == {"m"}  # named after the file, not its temporary
        with zipfile.ZipFile(plain) as zp:
            assert [n.split("/", 1)[1] for n in names] == [i.filename.split("/", 1)[1] for i in zp.infolist()]
            assert [z.read(n) for n in names] == [zp.read(i) for i in zp.infolist()]
    assert out.stat().st_size < 0.97 * plain.stat().st_size  # the exponent bytes of fp32 weights deflate
    loaded = load_checkpoint(out)
    for k, v in state.items():
        assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v), k
    assert loaded["args"].class_names == ["Nail"]
    assert [p.name for p in out.parent.iterdir()] == ["m.pth"]  # no temporary left beside it


def test_save_checkpoint_leaves_no_file_when_the_payload_cannot_be_saved(tmp_path):
    from nailkit.model.checkpoint_saving import save_checkpoint

    with pytest.raises(Exception):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "f": lambda: 0}, tmp_path / "m.pth")
    assert list(tmp_path.iterdir()) == []
