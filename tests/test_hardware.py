"""hardware.py: /proc/cpuinfo parsing on fixture text, and the XNNPACK GEMM probe (no timing thresholds)."""

from __future__ import annotations

import numpy as np
import pytest

from nailkit.hardware import (
    PRECISIONS,
    cpu_info,
    fully_connected_tflite,
    gemm_probe,
    parse_cpuinfo,
    probe_weights,
)

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8
"""

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq

processor\t: 2
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq
"""

ARM_A76 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

Hardware\t: Raspberry Pi 5 Model B
"""


def test_parse_intel_with_vnni_and_amx():
    info = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.vendor == "GenuineIntel" and info.arch == "x86_64" and info.logical_cpus == 2
    assert info.isa["avx2"] and info.isa["avx512f"] and info.isa["avx512_vnni"] and info.isa["avx_vnni"]
    assert info.isa["amx_int8"] and not info.isa["dotprod"]
    assert info.int8_dot == ["avx512_vnni", "avx_vnni", "amx_int8"]
    assert "AVX-512" in info.summary() and "avx512_vnni" in info.summary()


def test_parse_zen3_has_no_int8_dot_product():
    info = parse_cpuinfo(ZEN3)
    assert info.model_name == "AMD EPYC 7B13" and info.vendor == "AuthenticAMD" and info.logical_cpus == 3
    assert info.isa["avx2"] and not info.isa["avx512f"] and not info.isa["avx512_vnni"] and not info.isa["avx_vnni"]
    assert info.int8_dot == []
    assert info.summary().endswith("int8 dot: none)")


def test_parse_arm_features_dotprod():
    info = parse_cpuinfo(ARM_A76)
    assert info.arch == "aarch64" and info.vendor == "ARM" and info.logical_cpus == 2
    assert info.model_name == "Raspberry Pi 5 Model B"
    assert info.isa["neon"] and info.isa["dotprod"] and info.isa["fp16_arith"] and not info.isa["i8mm"]
    assert info.int8_dot == ["dotprod"]
    js = info.to_json()
    assert js["int8_dot"] == ["dotprod"] and "flags" not in js


def test_this_machine_cpu_info():
    info = cpu_info()
    assert info.model_name and info.logical_cpus >= 1
    assert set(info.isa) >= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "dotprod"}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_probe_model_computes_the_layer(precision):
    from ai_edge_litert.interpreter import Interpreter

    m, k, n = 8, 64, 32
    interp = Interpreter(model_content=fully_connected_tflite(m, k, n, precision))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert tuple(inp["shape"]) == (m, k) and tuple(out["shape"]) == (m, n)
    w, b = probe_weights(k, n)
    rng = np.random.default_rng(0)
    if precision == "int8":
        scale, _ = inp["quantization"]
        xq = rng.integers(-100, 100, size=(m, k), dtype=np.int8)
        interp.set_tensor(inp["index"], xq)
        interp.invoke()
        oscale, ozp = out["quantization"]
        y = (interp.get_tensor(out["index"]).astype(np.float32) - ozp) * oscale
        ref = (xq.astype(np.float32) * scale) @ w.T + b
        assert np.abs(y - np.clip(ref, -128 * oscale, 127 * oscale)).max() <= 2 * oscale + 0.05
    else:
        x = rng.standard_normal((m, k)).astype(np.float32)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        tol = 1e-4 if precision == "fp32" else 0.05
        assert np.abs(y - (x @ w.T + b)).max() <= tol


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_probe_runs_on_xnnpack(precision, threads):
    p = gemm_probe(precision, threads, m=128, k=128, n=128, seconds=0.05, min_runs=2)
    assert p.xnnpack
    assert p.runs >= 2 and p.best_gflops > 0 and p.median_gflops > 0
    assert p.best_gflops >= p.median_gflops
    assert p.to_json()["precision"] == precision


def test_probe_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        fully_connected_tflite(4, 4, 4, "int4")
