"""core/hardware.py: /proc/cpuinfo parsing on fixture text, and the one peak-RSS measure. (The XNNPACK GEMM probe:
tests/test_ceilings.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nailkit.core.hardware import cpu_info, parse_cpuinfo, peak_rss_mb

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


def _vm_mb(field: str) -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_peak_rss_is_this_process_image_not_the_parents():
    """``peak_rss_mb`` is VmHWM: at least the current RSS, and a fresh child started by a big process reports its own
    peak, not the parent's (``ru_maxrss``, which Linux carries across fork + exec, would)."""
    block = np.ones(256 * 2 ** 20 // 8)  # 256 MB, touched
    assert peak_rss_mb() >= _vm_mb("VmRSS") - 1 and peak_rss_mb() >= 256
    assert peak_rss_mb(children=True) >= peak_rss_mb()
    code = "from nailkit.core.hardware import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 timeout=120).stdout)
    assert 0 < child < peak_rss_mb() - 200, (child, peak_rss_mb())
    assert peak_rss_mb(children=True) >= peak_rss_mb()  # the child's figure never lowers it
    del block
