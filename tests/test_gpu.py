"""nailkit.gpu's checks: the flatbuffer op check (op_check), the GPU delegate's own verdict under SwiftShader
(delegate, swiftshader), fp16 safety (fp16), and the GPU-clean replacements (patches: tent-matmul sampler, ≤4-D
windowing and deformable attention, sine embed; SafeLayerNorm).

The delegate tests need SwiftShader's Vulkan driver (`apt-get install -y chromium libvulkan1`, done by the Makefile);
without it they skip with the reason. Everything else runs anywhere in seconds (hand-written probe flatbuffers, no
converter).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from _probes import write_probe_model
from nailkit.gpu import delegate, fp16, patches, swiftshader
from nailkit.gpu.op_check import op_check

GPU_REASON = swiftshader.gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"GPU delegate check: {GPU_REASON}")

LOG = """\
I0000 environment.cc:532] Selected adapter: SwiftShader Device (Subzero), arch=swiftshader, vendor=google, \
backend=Vulkan, adapterType=CPU / Software
ERROR: Following operations are not supported by GPU delegate:
GATHER_ND: Operation is not supported.
MUL: Tensor dimensions must be less than 5. __main__.M;16
SUB: Max version supported: 2. Requested version 3.
9 operations will run on the GPU, and the remaining 5 operations will run on the CPU.
I0000 delegate_kernel.cc:984] Initializing WebGPU-based API from graph.
"""


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    d = tmp_path_factory.mktemp("probes")
    return {k: write_probe_model(d / f"{k}.tflite", k) for k in ("clean", "blocked", "rank2_const")}


def test_parse_delegate_log():
    p = delegate.parse_delegate_log(LOG)
    assert p["adapter"].startswith("SwiftShader Device")
    assert (p["ops_on_gpu"], p["ops_on_cpu"]) == (9, 5)
    assert [r["op"] for r in p["refusals"]] == ["GATHER_ND", "MUL", "SUB"]
    assert p["refusals"][1] == {"op": "MUL", "reason": "Tensor dimensions must be less than 5.",
                                "where": "__main__.M;16"}
    assert p["refusals"][2]["reason"] == "Max version supported: 2. Requested version 3."


def test_op_check_clean_and_blocked(probes):
    clean = op_check(probes["clean"])
    assert clean.ok and clean.n_ops == 2 and clean.histogram == {"ADD": 1, "MUL": 1} and not clean.over_4d
    blocked = op_check(probes["blocked"])
    assert not blocked.ok
    assert blocked.banned == {"GATHER": 1, "CAST→INT32": 1}  # the CAST back to float is not banned
    assert [t[1] for t in blocked.over_4d] == [[1, 2, 4, 8, 4]]
    assert blocked.histogram["RESHAPE"] == 2 and blocked.int_tensors == 1
    assert "BLOCKERS" in blocked.line() and "GPU-clean" in clean.line()


def test_op_check_rejects_non_tflite(tmp_path):
    p = tmp_path / "x.tflite"
    p.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="TFL3"):
        op_check(p)


def test_unavailable_reason_is_one_line(monkeypatch, probes):
    monkeypatch.setattr(swiftshader, "swiftshader_icd", lambda: None)
    why = swiftshader.gpu_unavailable_reason()
    assert why and "\n" not in why and "chromium" in why
    v = delegate.delegate_verdict(probes["clean"])
    assert not v.available and not v.ok and v.line().startswith("GPU check skipped:")


def test_delegate_child_goes_through_run_python(monkeypatch, probes):
    """The verdict's child runs under ``subproc.run_python`` (killed with its process group at the timeout); a child
    that dies says so with its exit status and last line, one that times out says that, and a verdict reported
    before a crash on exit is kept."""
    calls = []

    def fake(args, *, desc, timeout, log_path, progress, env, outcome):
        calls.append((args, env))
        log_path.write_text("$ python -m ...\nI0000 environment.cc:532] Selected adapter: SwiftShader Device\n"
                            "Fatal Python error: Segmentation fault\n")
        if outcome == "timeout":
            raise delegate.subproc.WorkerError("timed out", timed_out=True)
        result = {"compiled": True, "fully_accelerated": True, "error": "", "run_ms": 1.0, "outputs": []}
        raise delegate.subproc.WorkerError("failed", returncode=-11, result=result if outcome == "crash" else None)

    monkeypatch.setattr(delegate, "gpu_unavailable_reason", lambda: None)
    for outcome in ("died", "timeout", "crash"):
        monkeypatch.setattr(delegate.subproc, "run_python", lambda *a, o=outcome, **k: fake(*a, outcome=o, **k))
        v = delegate.delegate_verdict(probes["clean"], timeout=7)
        assert v.adapter == "SwiftShader Device" and "$ python" not in v.log_tail
        if outcome == "died":
            assert v.error == "GPU child process died (rc -11): Fatal Python error: Segmentation fault"
        elif outcome == "timeout":
            assert v.error == "GPU run timed out after 7 s" and not v.compiled
        else:
            assert v.compiled and v.fully_accelerated and not v.error and v.ops_on_gpu == v.ops_total == 2
    args, env = calls[0]
    assert args[:3] == ["-m", "nailkit.gpu.delegate", "_verdict"] and env["XDG_RUNTIME_DIR"].endswith("xdg")
    assert env["NAILKIT_OFFLINE"] in ("0", "1") and env.get("TF_CPP_MIN_LOG_LEVEL") == os.environ.get(
        "TF_CPP_MIN_LOG_LEVEL", "0")  # the delegate's INFO lines are the verdict


@needs_gpu
@pytest.mark.parametrize("enforce_f32", [False, True])
def test_delegate_clean_model_fully_on_gpu(probes, enforce_f32, cpu_run):
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    v = delegate.delegate_verdict(probes["clean"], enforce_f32=enforce_f32, inputs={"input": x})
    assert "SwiftShader" in v.adapter, v.log_tail[-2000:]
    assert v.compiled and v.fully_accelerated and v.ok, v.line()
    assert (v.ops_on_gpu, v.ops_total) == (2, 2)
    ref = cpu_run(probes["clean"], x)
    np.testing.assert_allclose(v.outputs["output"], ref, rtol=2e-3, atol=2e-3)  # fp16 by default


@needs_gpu
def test_delegate_refuses_blocked_model_alone_and_reports_why(probes):
    v = delegate.delegate_verdict(probes["blocked"])
    assert not v.compiled and not v.ok
    assert "not accelerated" in v.error
    ops = v.refusal_summary()
    assert ops["RESHAPE"] == {"Tensor dimensions must be less than 5.": 1}
    assert (v.ops_on_gpu, v.ops_on_cpu) == (3, 2)


@needs_gpu
def test_delegate_mixed_run_is_not_ok_even_when_litert_says_fully_accelerated(probes, cpu_run):
    """Measured: with GPU|CPU, is_fully_accelerated() returned True although the delegate left 2 of 5 ops on the
    CPU; the verdict's ``ok`` also requires every op on the GPU, so it stays False."""
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    v = delegate.delegate_verdict(probes["blocked"], inputs={"input": x}, allow_cpu=True)
    assert v.compiled and v.ops_on_gpu == 3 and v.ops_total == 5
    assert not v.ok
    np.testing.assert_allclose(v.outputs["output"], cpu_run(probes["blocked"], x), atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------
# fp16 safety
# ---------------------------------------------------------------------------------------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(256, 256)
        self.norm = torch.nn.LayerNorm(256)

    def forward(self, x):
        y = self.norm(self.lin(x) * 400.0)
        return torch.softmax(y, -1)


def test_activation_maxima_flags_fp16_overflow_and_safe_layernorm_fixes_it():
    torch.manual_seed(0)
    m = _Tiny().eval()
    x = torch.randn(1, 10, 256)
    before = fp16.activation_maxima(m, (x,))
    assert before["layer_norm_sites"] == 1 and before["softmax_sites"] == 1
    assert before["layer_norm_max_abs_in"] > 100
    assert before["layer_norm_max_sumsq"] > fp16.FP16_MAX and before["fp16_overflow_sites"] == ["layer_norm@norm"]
    with torch.no_grad():
        ref = m(x)
    assert fp16.replace_layernorms(m) == 1
    after = fp16.activation_maxima(m, (x,))
    assert after["layer_norm_max_abs_in"] == pytest.approx(before["layer_norm_max_abs_in"], rel=1e-6)
    assert after["layer_norm_max_abs_reduced"] <= 8.0 + 1e-4  # S = max|x|/8 per row
    assert after["layer_norm_max_sumsq"] < fp16.FP16_MAX and after["fp16_overflow_sites"] == []
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)


def test_safe_layernorm_equals_layernorm_small_and_large_and_channels_first():
    from rfdetr.models.backbone.projector import LayerNorm as ChannelsFirstLN

    torch.manual_seed(0)
    cls = fp16.safe_layernorm_class()
    ln = torch.nn.LayerNorm(64, eps=1e-6)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    for scale in (0.01, 1.0, 1000.0):
        x = torch.randn(3, 7, 64) * scale
        torch.testing.assert_close(cls(ln)(x), ln(x), rtol=1e-4, atol=1e-4)
    cf = ChannelsFirstLN(32)
    torch.nn.init.normal_(cf.weight)
    x = torch.randn(1, 32, 5, 6) * 500
    torch.testing.assert_close(cls(cf, channels_first=True)(x), cf(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# GPU-clean replacements equal rfdetr's ops
# ---------------------------------------------------------------------------------------------------------------

def test_window_partition_and_reverse_match_rfdetr_order():
    b, nh, nw, c, nwin = 1, 6, 6, 5, 2
    x = torch.arange(b * nh * nw * c, dtype=torch.float32).reshape(b, nh, nw, c)
    wh, ww = nh // nwin, nw // nwin
    ref = x.reshape(b * nwin, wh, nwin, ww, c).permute(0, 2, 1, 3, 4).reshape(b * nwin * nwin, wh * ww, c)
    got = x.reshape(b * nwin, wh, nwin, ww * c).permute(0, 2, 1, 3).reshape(b * nwin * nwin, wh * ww, c)
    torch.testing.assert_close(got, ref)  # the partition used in _windowed_embeddings_forward
    torch.testing.assert_close(patches._window_reverse(ref, b, nh, nw, nwin), x)


def test_sine_embed_equals_rfdetr():
    from rfdetr.models.transformer import gen_sineembed_for_position

    pos = torch.rand(1, 50, 4)
    torch.testing.assert_close(patches._sine_embed_gpu(pos, 128), gen_sineembed_for_position(pos, 128),
                               rtol=1e-5, atol=1e-5)


def test_msda_gpu_forward_equals_rfdetr():
    from rfdetr.models.ops.modules.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    m = MSDeformAttn(d_model=64, n_levels=1, n_heads=4, n_points=2).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    h = w = 9
    q, mem = torch.randn(1, 30, 64), torch.randn(1, h * w, 64)
    ref_pts = torch.rand(1, 30, 1, 4) * 0.6 + 0.2
    ss, lsi = torch.tensor([[h, w]]), torch.tensor([0])
    with torch.no_grad():
        ref = m(q, ref_pts, mem, ss, lsi, None, input_spatial_shapes_hw=[(h, w)])
        m._nailkit_hw = (h, w)
        got = patches._msda_forward_gpu(m, q, ref_pts, mem, ss, lsi, None, input_spatial_shapes_hw=[(h, w)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_tanh_gelu_close_to_gelu():
    x = torch.linspace(-6, 6, 1001)
    assert (patches.tanh_gelu(x) - torch.nn.functional.gelu(x)).abs().max() < 1e-3


def test_op_check_flags_rank2_constant_binary_op(probes):
    oc = op_check(probes["rank2_const"])
    assert not oc.ok and not oc.banned and not oc.over_4d
    assert oc.risky_constant_ops == [{"index": 0, "op": "ADD", "runtime_shape": [24, 32], "constant_shape": [24, 32]}]
    assert "wrong on WebGPU" in oc.line()


@needs_gpu
def test_delegate_computes_rank2_constant_add_wrong_and_the_lift_fixes_it(probes, tmp_path, cpu_run):
    """The defect behind nailkit.tflite.passes, on the real delegate: compiled, 'fully accelerated', and wrong."""
    from nailkit.tflite.passes import lift_constant_binary_ops

    x = np.random.default_rng(0).standard_normal((24, 32)).astype(np.float32)
    want = x + np.linspace(-3, 3, 24 * 32, dtype=np.float32).reshape(24, 32)
    np.testing.assert_array_equal(cpu_run(probes["rank2_const"], x), want)
    bad = delegate.delegate_verdict(probes["rank2_const"], inputs={"input": x})
    assert bad.compiled and bad.fully_accelerated and bad.ops_on_gpu == 1
    assert np.abs(bad.outputs["output"] - want).max() > 1.0  # measured 5.76
    fixed = tmp_path / "lifted.tflite"
    assert lift_constant_binary_ops(probes["rank2_const"], fixed) == 1
    good = delegate.delegate_verdict(fixed, inputs={"input": x})
    assert good.ok and good.ops_on_gpu == good.ops_total == 3  # RESHAPE, ADD, RESHAPE
    np.testing.assert_allclose(good.outputs["output"], want, atol=1e-6)
