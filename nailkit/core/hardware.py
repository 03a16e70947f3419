"""Name the hardware behind a number: CPU model and the ISA flags that decide int8 speed; and a process's peak RSS.

int8 speed is a property of the CPU's int8 dot-product instructions (x86: AVX-512 VNNI / AVX-VNNI / AMX-INT8; ARM:
dotprod / i8mm), so every benchmark row should carry ``cpu_info()`` (and be read against the XNNPACK GEMM ceilings
of ``nailkit.bench.ceilings``).

* ``cpu_info(text=None)`` parses ``/proc/cpuinfo`` (x86 or ARM) into the model name, vendor, logical CPUs, the raw
  flag set and a small ``isa`` dict (avx2, avx512f, avx512_vnni, avx_vnni, amx_int8, dotprod, i8mm, sve, …).
* ``peak_rss_mb(children=False)``: the one peak-memory measure (the benchmark's fresh processes, the conversion
  workers).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

#: ISA features worth naming in a benchmark row; key → flag spellings in /proc/cpuinfo (x86 ``flags`` / ARM
#: ``Features``).
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "sse4_2": ("sse4_2",),
    "avx": ("avx",),
    "fma": ("fma",),
    "avx2": ("avx2",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512vl": ("avx512vl",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_fp16": ("avx512_fp16",),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "avx_vnni_int8": ("avx_vnni_int8",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "neon": ("asimd", "neon"),
    "dotprod": ("asimddp",),
    "i8mm": ("i8mm",),
    "fp16_arith": ("asimdhp",),
    "bf16": ("bf16",),
    "sve": ("sve",),
    "sve2": ("sve2",),
    "sme": ("sme",),
}

#: Which of the above give int8 dot products (the ones that make int8 faster than fp32).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "dotprod", "i8mm")

#: x86 extensions with native bf16 dot products, which PyTorch's CPU GEMMs (oneDNN) use for bf16 autocast. Without
#: them bf16 is emulated and slower than fp32 (rfdetr keeps CPU training in fp32 for that reason).
BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")

_ARM_IMPLEMENTERS = {"0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu", "0x48": "HiSilicon",
                     "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x53": "Samsung", "0x61": "Apple", "0xc0": "Ampere"}


@dataclass
class CpuInfo:
    model_name: str
    vendor: str
    arch: str
    logical_cpus: int
    flags: list[str] = field(default_factory=list)
    isa: dict[str, bool] = field(default_factory=dict)

    @property
    def int8_dot(self) -> list[str]:
        """The int8 dot-product extensions present (empty: int8 GEMM has no instruction-level edge over fp32)."""
        return [k for k in INT8_DOT_FLAGS if self.isa.get(k)]

    @property
    def bf16_dot(self) -> list[str]:
        """The native bf16 dot-product extensions present (``BF16_DOT_FLAGS``; empty: bf16 is emulated)."""
        return [k for k in BF16_DOT_FLAGS if self.isa.get(k)]

    def summary(self) -> str:
        """One line for a benchmark table, e.g. ``Intel Xeon … (2 CPUs; AVX2, AVX-512, VNNI: avx512_vnni+avx_vnni)``."""
        parts = []
        if self.isa.get("avx2"):
            parts.append("AVX2")
        if self.isa.get("avx512f"):
            parts.append("AVX-512")
        if self.isa.get("neon"):
            parts.append("NEON")
        if self.isa.get("sve"):
            parts.append("SVE")
        dot = self.int8_dot
        parts.append("int8 dot: " + ("+".join(dot) if dot else "none"))
        return f"{self.model_name} ({self.logical_cpus} CPUs; {', '.join(parts)})"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["int8_dot"] = self.int8_dot
        d["summary"] = self.summary()
        d.pop("flags")
        return d


def _blocks(text: str) -> list[dict[str, str]]:
    out, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
                cur = {}
            continue
        if ":" in line:
            k, v = line.split(":", 1)
            cur.setdefault(k.strip().lower(), v.strip())
    if cur:
        out.append(cur)
    return out


def parse_cpuinfo(text: str, arch: str | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` text (x86 or ARM/aarch64)."""
    blocks = _blocks(text)
    procs = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    first = procs[0] if procs else (blocks[0] if blocks else {})
    flag_text = first.get("flags") or first.get("features") or ""
    if not flag_text:
        for b in blocks:
            flag_text = b.get("flags") or b.get("features") or ""
            if flag_text:
                break
    flags = sorted(set(flag_text.split()))
    fs = set(flags)
    isa = {k: any(s in fs for s in spellings) for k, spellings in ISA_FLAGS.items()}
    if arch is None:
        arch = "aarch64" if ("asimd" in fs or "CPU implementer".lower() in first) else \
            ("x86_64" if ("sse2" in fs or "lm" in fs) else platform.machine())
    model = first.get("model name") or ""
    vendor = first.get("vendor_id") or ""
    if not vendor and "cpu implementer" in first:
        vendor = _ARM_IMPLEMENTERS.get(first["cpu implementer"].lower(), first["cpu implementer"])
    if not model:
        hw = next((b.get("hardware") for b in blocks if b.get("hardware")), None)
        part = first.get("cpu part")
        model = hw or (f"{vendor} part {part}" if part else "") or platform.processor() or "unknown CPU"
    n = len(procs) or (os.cpu_count() or 1)
    return CpuInfo(model_name=" ".join(model.split()), vendor=vendor, arch=arch, logical_cpus=n, flags=flags,
                   isa=isa)


def cpu_info(text: str | None = None) -> CpuInfo:
    """This machine's CPU (or the given ``/proc/cpuinfo`` text)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        info = parse_cpuinfo(text, arch=platform.machine())
        if hasattr(os, "sched_getaffinity"):
            info.logical_cpus = len(os.sched_getaffinity(0))
        return info
    return parse_cpuinfo(text)


# ----------------------------------------------------------------------------------------------------------------
# peak memory of this process
# ----------------------------------------------------------------------------------------------------------------

def _proc_status_mb(field: str) -> Optional[float]:
    """A memory line of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MB, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process image, MB; ``children=True``: the larger of that and the peak of the
    largest child process this one has waited for.

    Why ``VmHWM`` (``/proc/self/status``) and not ``getrusage().ru_maxrss``: ``VmHWM`` belongs to the address space,
    so ``exec`` starts it afresh, whereas Linux carries ``ru_maxrss`` across fork + exec — a fresh ``python`` started
    by a 5 GB notebook kernel would report 5 GB before importing anything. ``ru_maxrss`` (KiB on Linux) is only the
    fallback where there is no ``/proc``. The children's figure can only be ``ru_maxrss`` (``RUSAGE_CHILDREN``: the
    largest waited-for descendant); it carries what this process held when it forked them, which is at most this
    process's own peak, so the maximum of the two stays right.
    """
    import resource

    own = _proc_status_mb("VmHWM")
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if not children:
        return own
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0)
