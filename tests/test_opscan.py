"""nailkit.export.opscan (grouping, inventory), exporters (symbolic registry), bisection (input capture, bisection;
toy model + the real raw rfdetr model from repros.raw_module)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nailkit.export import bisection, exporters, opscan, repros


def test_classify_path_groups_rfdetr_modules():
    c = opscan.classify_path
    assert c("model.backbone.0.encoder.encoder.embeddings") == "backbone"
    assert c("model.backbone.0.projector.stages.0") == "projector"
    assert c("model.backbone.1") == "position_encoding"
    assert c("model.transformer.decoder.layers.0.self_attn") == "decoder"
    assert c("model.transformer.decoder.layers.0.cross_attn") == "deformable_attention"
    assert c("transformer.decoder.layers.1", ["LWDETR", "Transformer", "TransformerDecoder", "ModuleList",
                                              "TransformerDecoderLayer", "MSDeformAttn"]) == "deformable_attention"
    assert c("transformer.enc_output.3") == "transformer_encoder"
    assert c("model.class_embed") == "heads" and c("bbox_embed.layers.0") == "heads"
    assert c("model.segmentation_head.blocks.0") == "segmentation_head"
    assert c("") == "top_level"
    # both TorchScript scope formats
    assert opscan._scope_path("__module.m/__module.m.backbone/__module.m.backbone.0") == "m.backbone.0"
    assert opscan._scope_path("a.W::/a.LWDETR::model/a.Joiner::backbone/a.Backbone::backbone.0") == \
        "model.backbone.0"


def test_legacy_symbolic_registry():
    assert exporters.legacy_symbolic("aten::grid_sampler", 16)["supported"]
    gs15 = exporters.legacy_symbolic("aten::grid_sampler", 15)
    assert not gs15["supported"] and gs15["min_opset"] == 16
    assert not exporters.legacy_symbolic("aten::_upsample_bicubic2d_aa", 17)["supported"]
    assert exporters.legacy_symbolic("aten::silu_", 17)["supported"]  # in-place variant looked up without "_"


class _Bad(torch.nn.Module):
    def forward(self, x):
        return F.interpolate(x, size=(6, 6), mode="bicubic", antialias=True)


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.bad = _Bad()

    def forward(self, x):
        return self.lin(self.bad(x))


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.segmentation_head = _Head()

    def forward(self, x):
        y = self.backbone(x)
        return self.segmentation_head.forward(y).sum(-1)  # a direct .forward call, like rfdetr's seg head


def test_capture_inputs_sees_direct_forward_calls():
    toy = _Toy().eval()
    cap = bisection.capture_inputs(toy, (torch.randn(1, 3, 8, 8),))
    assert {"", "backbone", "segmentation_head", "segmentation_head.bad", "segmentation_head.lin"} <= set(cap)
    assert cap["segmentation_head"][0][0].shape == (1, 4, 8, 8)
    assert "forward" not in toy.segmentation_head.__dict__  # wrappers removed


def test_bisect_toy_model_finds_smallest_failing_submodule():
    rep = bisection.bisect_export(_Toy().eval(), (torch.randn(1, 3, 8, 8),), exporter="legacy", opset=17)
    assert not rep.root_ok
    assert [c.path for c in rep.culprits] == ["segmentation_head.bad"]
    c = rep.culprits[0]
    assert c.unsupported_op == "aten::_upsample_bicubic2d_aa" and c.error_type == "UnsupportedOperatorError"
    assert c.source.endswith(": forward") and "test_opscan.py" in c.source
    assert "antialias=True" in c.source_line
    ok = {a.path: a.ok for a in rep.attempts}
    assert ok["backbone"] and ok["segmentation_head.lin"] and not ok["segmentation_head"]


def test_inventory_toy_model_flags_unsupported_op_and_maps_onnx_ops():
    inv = opscan.op_inventory(_Toy().eval(), (torch.randn(1, 3, 8, 8),), opset=17)
    bad = inv.unsupported
    assert [(r["group"], r["op"]) for r in bad] == [("segmentation_head", "aten::_upsample_bicubic2d_aa")]
    conv = [r for r in inv.rows if r["op"] == "aten::_convolution"][0]
    assert conv["group"] == "backbone" and conv["onnx_ops"] == "Conv" and conv["legacy_supported"]
    assert inv.by_group()["segmentation_head"]["unsupported"] == 1
    assert "aten::_upsample_bicubic2d_aa" in inv.markdown(only_unsupported=True)
    assert inv.export_ops is not None and any(t.op == "aten::_upsample_bicubic2d_aa" for t in inv.export_ops)


@pytest.mark.slow
def test_bisect_raw_rfdetr_points_at_position_embedding_interpolation(demo_model):
    x = torch.randn(1, 3, 432, 432, generator=torch.Generator().manual_seed(0))
    rep = bisection.bisect_export(repros.raw_module(demo_model), (x,), exporter="legacy", opset=17)
    assert not rep.root_ok and len(rep.culprits) == 1
    c = rep.culprits[0]
    assert c.path.endswith("backbone.0.encoder.encoder.embeddings"), c.path
    assert c.unsupported_op == "aten::_upsample_bicubic2d_aa"
    assert c.function == "interpolate_pos_encoding" and "dinov2_with_windowed_attn.py" in c.source
    assert "interpolate(" in c.source_line
    # the transformer, heads and the projector export fine on their own
    ok = {a.path: a.ok for a in rep.attempts}
    assert ok["model.transformer"] and ok["model.backbone.0.projector"] and ok["model.segmentation_head"]
