"""The GPU target: checks that need no phone, and the two-graph split for LiteRT's GPU delegate.

Checks usable on any ``.tflite``:

* ``delegate_verdict(path, enforce_f32=False)`` compiles the file with LiteRT's **own** GPU accelerator (the WebGPU
  accelerator shipped in ai-edge-litert 2.3, ``libLiteRtWebGpuAccelerator.so``) — GPU alone, no CPU fallback — under
  SwiftShader's Vulkan driver (a CPU implementation of Vulkan, from Debian's ``chromium`` package), and runs it.
  It reports what the delegate itself logs: the adapter, ops on the GPU / total, each refused op with the delegate's
  reason, ``is_fully_accelerated()``, and the GPU run's outputs. It runs in a child process
  (``nailkit.core.subproc.run_python``: killed with its process group at the timeout) whose environment holds
  ``VK_ICD_FILENAMES`` and a private ``XDG_RUNTIME_DIR``, so the driver settings never leak into the caller.
* ``op_check(path)`` reads the flatbuffer: no TOPK/GATHER/GATHER_ND/CAST-to-int (and no sort), no tensor above 4-D;
  it lists every op type that remains.
* ``activation_maxima(module, inputs)`` records, in PyTorch, the largest |activation| that feeds each LayerNorm and
  softmax, and for LayerNorm the largest per-row sum of squared deviations in the domain where the reduction happens
  (fp16's largest finite value is 65504; a Mali/Adreno delegate reduces in fp16 whatever the file's dtype).

The GPU export target itself (the graph split, its conversion and the chain's parity) is ``nailkit.gpu.graphs``;
its runtime (numpy + ai-edge-litert, shipped in the bundle) is ``nailkit.portable.gpu_chain``.

Nothing here imports tensorflow. The child process imports ai_edge_litert and numpy only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.core import subproc
from nailkit.tflite.flatbuffer import read_model, schema
from nailkit.tflite.passes import risky_constant_binary_ops

# ----------------------------------------------------------------------------------------------------------------
# SwiftShader (Vulkan on the CPU) for the WebGPU accelerator
# ----------------------------------------------------------------------------------------------------------------

SWIFTSHADER_ICDS = (
    "/usr/lib/chromium/vk_swiftshader_icd.json",  # Debian/Ubuntu `chromium`
    "/usr/lib/chromium-browser/vk_swiftshader_icd.json",
    "/usr/share/vulkan/icd.d/vk_swiftshader_icd.json",
)
VULKAN_LOADER = "libvulkan.so.1"
FP16_MAX = 65504.0


def swiftshader_icd() -> Optional[Path]:
    """The SwiftShader ICD file (``$NAILKIT_VK_ICD`` first), or None."""
    cands = [os.environ.get("NAILKIT_VK_ICD", "")] + list(SWIFTSHADER_ICDS)
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def _has_vulkan_loader() -> bool:
    import ctypes

    try:
        ctypes.CDLL(VULKAN_LOADER)
        return True
    except OSError:
        return False


def gpu_unavailable_reason() -> Optional[str]:
    """One line saying why the GPU check cannot run here, or None when it can."""
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        return "ai-edge-litert is not installed"
    lib = Path(__import__("ai_edge_litert").__file__).parent / "libLiteRtWebGpuAccelerator.so"
    if not lib.exists():
        return f"ai-edge-litert has no WebGPU accelerator ({lib.name} missing)"
    icd = swiftshader_icd()
    if icd is None:
        return ("SwiftShader Vulkan driver not found (no vk_swiftshader_icd.json; `apt-get install -y chromium "
                "libvulkan1` installs it)")
    try:
        spec = json.loads(icd.read_text())
        lib_path = Path(spec["ICD"]["library_path"])
        if not lib_path.is_absolute():
            lib_path = icd.parent / lib_path
        if not lib_path.exists():
            return f"{icd} points at {lib_path}, which does not exist"
    except Exception as exc:  # noqa: BLE001
        return f"{icd}: unreadable ICD file ({exc})"
    if not _has_vulkan_loader():
        return f"Vulkan loader {VULKAN_LOADER} not found (`apt-get install -y libvulkan1`)"
    return None


def gpu_env(base: Optional[dict] = None, runtime_dir: Optional[str] = None) -> dict[str, str]:
    """An environment for a child process: SwiftShader as the only Vulkan ICD and a private XDG_RUNTIME_DIR."""
    env = dict(os.environ if base is None else base)
    icd = swiftshader_icd()
    if icd is not None:
        env["VK_ICD_FILENAMES"] = str(icd)
        env["VK_DRIVER_FILES"] = str(icd)
    if runtime_dir is None:
        runtime_dir = tempfile.mkdtemp(prefix="nailkit-xdg-")
    os.chmod(runtime_dir, 0o700)
    env["XDG_RUNTIME_DIR"] = runtime_dir
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    return env


# ----------------------------------------------------------------------------------------------------------------
# the delegate's own verdict
# ----------------------------------------------------------------------------------------------------------------

_RE_ADAPTER = re.compile(r"Selected adapter:\s*(.+)")
_RE_SPLIT = re.compile(r"(\d+) operations? will run on the GPU, "
                       r"and the remaining (\d+) operations? will run on the CPU")
_RE_REFUSED_HDR = "Following operations are not supported by GPU delegate:"
_RE_REFUSAL = re.compile(r"^([A-Z][A-Z0-9_]+):\s*(.*)$")


@dataclass
class DelegateVerdict:
    """What LiteRT's GPU accelerator said about one file (see ``delegate_verdict``)."""

    path: str
    accelerators: str  # "gpu" (GPU alone) or "gpu+cpu"
    enforce_f32: bool
    available: bool  # False: the driver is missing here (``reason`` says why); nothing else is meaningful
    reason: str = ""
    adapter: str = ""
    compiled: bool = False
    fully_accelerated: Optional[bool] = None
    ops_total: int = 0
    ops_on_gpu: Optional[int] = None
    ops_on_cpu: Optional[int] = None
    refusals: list[dict[str, str]] = field(default_factory=list)  # [{"op", "reason", "where"}] as logged
    error: str = ""
    run_ms: Optional[float] = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # signature output name → array (GPU run)
    output_order: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        """Compiled with the GPU alone, fully accelerated, every op on the GPU, and ran."""
        return bool(self.available and self.compiled and self.fully_accelerated and not self.refusals
                    and self.ops_on_gpu == self.ops_total and self.outputs)

    def refusal_summary(self) -> dict[str, dict[str, int]]:
        """{op: {reason: count}} with locations dropped."""
        out: dict[str, dict[str, int]] = {}
        for r in self.refusals:
            d = out.setdefault(r["op"], {})
            d[r["reason"]] = d.get(r["reason"], 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("outputs")
        d.pop("log_tail")
        d["refusals"] = self.refusal_summary()
        d["ok"] = self.ok
        d["output_shapes"] = {k: list(v.shape) for k, v in self.outputs.items()}
        return d

    def line(self) -> str:
        if not self.available:
            return f"GPU check skipped: {self.reason}"
        mode = "GPU alone" if self.accelerators == "gpu" else "GPU+CPU"
        prec = "enforce_f32" if self.enforce_f32 else "default precision"
        gpu = "?" if self.ops_on_gpu is None else self.ops_on_gpu
        s = (f"{Path(self.path).name}: {gpu}/{self.ops_total} ops on GPU ({mode}, {prec}); "
             f"compiled={self.compiled} fully_accelerated={self.fully_accelerated}")
        if self.refusals:
            s += "; refused: " + ", ".join(f"{op}×{sum(r.values())}" for op, r in self.refusal_summary().items())
        if self.error:
            s += f"; error: {self.error.splitlines()[-1][:160]}"
        return s


def _split_where(text: str) -> tuple[str, str]:
    """'Tensor dimensions must be less than 5. __main__.M;16' → (reason, location)."""
    text = text.strip()
    m = re.match(r"^(.*\.)\s+(\S+)$", text)
    if m and not m.group(2).endswith("."):
        return m.group(1), m.group(2)
    return text, ""


def parse_delegate_log(log: str) -> dict[str, Any]:
    """The GPU delegate's statements in a LiteRT log: adapter, GPU/CPU op split, refused ops with reasons."""
    out: dict[str, Any] = {"adapter": "", "ops_on_gpu": None, "ops_on_cpu": None, "refusals": []}
    lines = log.splitlines()
    in_block = False
    for ln in lines:
        m = _RE_ADAPTER.search(ln)
        if m:
            out["adapter"] = m.group(1).strip()
        m = _RE_SPLIT.search(ln)
        if m:
            out["ops_on_gpu"], out["ops_on_cpu"] = int(m.group(1)), int(m.group(2))
            in_block = False
            continue
        if _RE_REFUSED_HDR in ln:
            in_block = True
            continue
        if in_block:
            m = _RE_REFUSAL.match(ln.strip())
            if m:
                reason, where = _split_where(m.group(2))
                out["refusals"].append({"op": m.group(1), "reason": reason, "where": where})
            elif ln.strip():
                in_block = False
    return out


def _child_verdict(model: str, accel: str, enforce_f32: str, in_npz: str, out_npz: str, runs: str) -> None:
    """Runs in the child process (``python -m nailkit.gpu.delegate _verdict ...``): compile, run, and report the
    result line (``subproc.emit``); the delegate's own log goes to stdout/stderr, where the parent reads it."""
    import time

    res: dict[str, Any] = {"compiled": False, "fully_accelerated": None, "error": "", "run_ms": None,
                           "inputs": {}, "outputs": []}
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator as HA
        from ai_edge_litert.options import GpuOptions, Options

        hw = HA.GPU if accel == "gpu" else (HA.GPU | HA.CPU)
        opts = Options(hardware_accelerators=hw, gpu_options=GpuOptions(enforce_f32=enforce_f32 == "1"))
        cm = CompiledModel.from_file(model, options=opts)
        res["compiled"] = True
        res["fully_accelerated"] = bool(cm.is_fully_accelerated())
        sigs = cm.get_signature_list()
        sig = list(sigs)[0]
        in_det = cm.get_input_tensor_details(sig)
        out_det = cm.get_output_tensor_details(sig)
        feeds = dict(np.load(in_npz)) if in_npz else {}
        ins = cm.create_input_buffers(0)
        outs = cm.create_output_buffers(0)
        rng = np.random.default_rng(0)
        for i, name in enumerate(sigs[sig]["inputs"]):
            d = in_det[name]
            arr = feeds.get(name, feeds.get(f"arg{i}"))
            if arr is None:
                arr = (rng.standard_normal(d["shape"]) * 0.5)
            arr = np.ascontiguousarray(np.asarray(arr, dtype=d["dtype"]).reshape(d["shape"]))
            res["inputs"][name] = list(d["shape"])
            ins[i].write(arr)
        times = []
        for _ in range(max(1, int(runs))):
            t0 = time.perf_counter()
            cm.run_by_index(0, ins, outs)
            times.append((time.perf_counter() - t0) * 1e3)
        res["run_ms"] = float(np.median(times))
        arrays = {}
        for i, name in enumerate(sigs[sig]["outputs"]):
            d = out_det[name]
            n = int(np.prod(d["shape"]))
            arrays[name] = np.asarray(outs[i].read(n, np.dtype(d["dtype"]))).reshape(d["shape"])
            res["outputs"].append(name)
        np.savez(out_npz, **arrays)
    except Exception as exc:  # noqa: BLE001 - the verdict reports it
        res["error"] = f"{type(exc).__name__}: {exc}"
    subproc.emit(res)


def _child_log(log_path: Path) -> str:
    """The child's merged stdout/stderr as ``run_python`` logged it, without its command line and result line."""
    if not log_path.exists():
        return ""
    lines = log_path.read_text(errors="replace").splitlines()
    return "\n".join(ln for i, ln in enumerate(lines)
                     if not (i == 0 and ln.startswith("$ ")) and not ln.startswith(subproc.RESULT_PREFIX))


def delegate_verdict(path: str | os.PathLike[str], enforce_f32: bool = False, *,
                     inputs: Optional[dict[str, np.ndarray] | Sequence[np.ndarray]] = None,
                     allow_cpu: bool = False, runs: int = 1, timeout: float = 900) -> DelegateVerdict:
    """Compile ``path`` with LiteRT's GPU accelerator (alone unless ``allow_cpu``) under SwiftShader, and run it.

    ``inputs``: by signature input name, or a sequence in signature order; missing inputs get N(0, 0.5²) noise
    (seed 0). Returns the delegate's verdict with the GPU run's outputs (by signature output name).
    """
    path = str(Path(path).resolve())
    v = DelegateVerdict(path=path, accelerators="gpu+cpu" if allow_cpu else "gpu", enforce_f32=bool(enforce_f32),
                        available=False)
    v.ops_total = op_check(path).n_ops
    why = gpu_unavailable_reason()
    if why:
        v.reason = why
        return v
    v.available = True
    with tempfile.TemporaryDirectory(prefix="nailkit-gpu-") as tmp:
        in_npz = ""
        if inputs is not None:
            if not isinstance(inputs, dict):
                inputs = {f"arg{i}": a for i, a in enumerate(inputs)}
            in_npz = os.path.join(tmp, "in.npz")
            np.savez(in_npz, **{k: np.asarray(a) for k, a in inputs.items()})
        out_npz = os.path.join(tmp, "out.npz")
        xdg = os.path.join(tmp, "xdg")
        os.mkdir(xdg, 0o700)
        args = ["-m", "nailkit.gpu.delegate", "_verdict", path, v.accelerators, "1" if enforce_f32 else "0",
                in_npz, out_npz, str(int(runs))]
        # the verdict is read from the delegate's log: keep LiteRT's INFO lines (child_env would quiet them)
        env = gpu_env(subproc.child_env({"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")}),
                      runtime_dir=xdg)
        log_path = Path(tmp) / "child.log"
        res: Optional[dict[str, Any]] = None
        failure = None
        try:
            res = subproc.run_python(args, desc=f"GPU delegate verdict {Path(path).name}", timeout=timeout,
                                     log_path=log_path, progress=False, env=env)
        except subproc.WorkerError as exc:
            failure, res = exc, exc.result  # a child that reported and then crashed on exit still has a verdict
        log = _child_log(log_path)
        parsed = parse_delegate_log(log)
        v.adapter = parsed["adapter"]
        v.refusals = parsed["refusals"]
        v.ops_on_gpu, v.ops_on_cpu = parsed["ops_on_gpu"], parsed["ops_on_cpu"]
        v.log_tail = "\n".join(ln for ln in log.splitlines() if ln.strip())[-6000:]
        if failure is not None and failure.timed_out:
            v.error = f"GPU run timed out after {timeout:.0f} s"
            return v
        if res is None:
            rc = failure.returncode if failure is not None else "?"
            v.error = f"GPU child process died (rc {rc}): " + (log.strip().splitlines() or ["?"])[-1]
            return v
        v.compiled, v.fully_accelerated, v.error, v.run_ms = (res["compiled"], res["fully_accelerated"],
                                                              res["error"], res["run_ms"])
        if v.compiled and v.ops_on_gpu is None and v.fully_accelerated and not v.refusals:
            # the delegate prints the split only when it leaves ops behind; fully accelerated = every op
            v.ops_on_gpu, v.ops_on_cpu = v.ops_total, 0
        if res["outputs"] and os.path.exists(out_npz):
            with np.load(out_npz) as z:
                v.outputs = {k: z[k] for k in res["outputs"]}
            v.output_order = list(res["outputs"])
    return v


# ----------------------------------------------------------------------------------------------------------------
# op check over the flatbuffer
# ----------------------------------------------------------------------------------------------------------------

# Never on a mobile GPU delegate: the selection ops, and index math.
BANNED_OPS = frozenset({"TOPK_V2", "GATHER", "GATHER_ND", "STABLEHLO_SORT", "STABLEHLO_GATHER", "SCATTER_ND",
                        "STABLEHLO_SCATTER"})
INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"})
# Not banned, but listed: ops the litert-samples recipe avoids for the Mali/Adreno delegates.
ADVISORY_OPS = frozenset({"SELECT", "SELECT_V2", "WHERE", "BROADCAST_TO", "POW", "GELU", "ERF", "CUMSUM",
                          "EMBEDDING_LOOKUP", "FLOOR_DIV", "FLOOR_MOD", "CUSTOM", "ARG_MAX", "ARG_MIN"})


@dataclass
class OpCheck:
    path: str
    n_ops: int  # operators of the main subgraph (what the delegate counts)
    histogram: dict[str, int]  # op type → count (all subgraphs)
    banned: dict[str, int]  # TOPK/GATHER/... and "CAST→INT32" style entries
    over_4d: list[tuple[str, list[int]]]  # tensors above 4-D (name, shape)
    advisory: dict[str, int]
    int_tensors: int  # non-constant integer/bool activation tensors
    n_subgraphs: int = 1
    #: binary ops of a rank-2 runtime tensor and a non-broadcast constant: the WebGPU delegate computes them wrong
    #: (``nailkit.tflite.passes``; ``lift_constant_binary_ops`` rewrites them)
    risky_constant_ops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.banned and not self.over_4d and not self.risky_constant_ops

    def line(self) -> str:
        s = f"{Path(self.path).name}: {self.n_ops} ops, {'GPU-clean' if self.ok else 'BLOCKERS'}"
        if self.banned:
            s += "; banned " + ", ".join(f"{k}×{v}" for k, v in self.banned.items())
        if self.over_4d:
            s += f"; {len(self.over_4d)} tensors above 4-D (max rank {max(len(t[1]) for t in self.over_4d)})"
        if self.risky_constant_ops:
            s += f"; {len(self.risky_constant_ops)} rank-2 × constant binary ops (wrong on WebGPU)"
        return s

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["over_4d_count"] = len(self.over_4d)
        d["over_4d"] = [list(t) for t in self.over_4d[:20]]
        d["ok"] = self.ok
        return d


def _enum_names(cls) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def op_check(path: str | os.PathLike[str]) -> OpCheck:
    """Op histogram, banned ops (incl. CAST to an integer type), tensors above 4-D and rank-2 × constant binary ops
    (``tflite_passes``), from the flatbuffer alone."""
    s = schema()
    model, _ = read_model(path)
    op_names = _enum_names(s.BuiltinOperator)
    type_names = _enum_names(s.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = op_names.get(code, f"OP_{code}")
        if name == "CUSTOM" and oc.CustomCode():
            name = "CUSTOM:" + oc.CustomCode().decode()
        codes.append(name)
    hist: dict[str, int] = {}
    banned: dict[str, int] = {}
    over: list[tuple[str, list[int]]] = []
    n_main = 0
    int_tensors = 0
    for g in range(model.SubgraphsLength()):
        sg = model.Subgraphs(g)
        const = set()
        for t in range(sg.TensorsLength()):
            ten = sg.Tensors(t)
            if ten.Buffer() > 0 and model.Buffers(ten.Buffer()) is not None and \
                    (model.Buffers(ten.Buffer()).DataLength() > 0 or model.Buffers(ten.Buffer()).Size() > 0):
                const.add(t)
            shape = [int(x) for x in ten.ShapeAsNumpy()] if ten.ShapeLength() else []
            if len(shape) > 4:
                over.append(((ten.Name() or b"").decode(errors="replace"), shape))
            if t not in const and type_names.get(ten.Type(), "") in INT_TYPES:
                int_tensors += 1
        if g == 0:
            n_main = sg.OperatorsLength()
        for o in range(sg.OperatorsLength()):
            op = sg.Operators(o)
            name = codes[op.OpcodeIndex()]
            hist[name] = hist.get(name, 0) + 1
            if name in BANNED_OPS:
                banned[name] = banned.get(name, 0) + 1
            if name == "CAST" and op.OutputsLength():
                out_t = type_names.get(sg.Tensors(op.Outputs(0)).Type(), "?")
                if out_t in INT_TYPES:
                    key = f"CAST→{out_t}"
                    banned[key] = banned.get(key, 0) + 1
    advisory = {k: v for k, v in hist.items() if k in ADVISORY_OPS or k.startswith(("CUSTOM", "STABLEHLO_"))}

    return OpCheck(path=str(path), n_ops=n_main, histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])),
                   banned=banned, over_4d=over, advisory=advisory, int_tensors=int_tensors,
                   n_subgraphs=model.SubgraphsLength(), risky_constant_ops=risky_constant_binary_ops(path))


# ----------------------------------------------------------------------------------------------------------------
# fp16 safety: activations feeding LayerNorm / softmax, and a scale-invariant LayerNorm
# ----------------------------------------------------------------------------------------------------------------

def _ln_stats(x, dim: int, domain_scale=None) -> dict[str, float]:
    """max|x| and the largest per-row Σ(x−μ)² in the reduction domain (x/S when ``domain_scale`` is given)."""
    x = x.detach().float()
    xr = x / domain_scale if domain_scale is not None else x
    d = xr - xr.mean(dim, keepdim=True)
    return {"max_abs_in": float(x.abs().max()), "max_abs_reduced": float(xr.abs().max()),
            "max_sumsq": float((d * d).sum(dim).max()), "max_sum_sq_raw": float((xr * xr).sum(dim).max()),
            "channels": int(x.shape[dim])}


class _Recorder:
    active: Optional["_Recorder"] = None

    def __init__(self) -> None:
        self.sites: dict[str, dict[str, Any]] = {}
        self.stack: list[str] = []

    def add(self, kind: str, stats: dict[str, float]) -> None:
        where = self.stack[-1] if self.stack else "<top>"
        key = f"{kind}@{where}"
        cur = self.sites.get(key)
        if cur is None:
            self.sites[key] = dict(stats, kind=kind, module=where, calls=1)
        else:
            cur["calls"] += 1
            for k, v in stats.items():
                if isinstance(v, float):
                    cur[k] = max(cur[k], v)


_SAFE_LN_CLASS = None


def _make_safe_ln_class():
    import torch
    from torch import nn

    class SafeLayerNorm(nn.Module):
        """LayerNorm over the last dim that reduces in a down-scaled domain: exact (LayerNorm is scale invariant).

        S = max(1, max|x| / 8) per row (the litert-samples' adaptive scale): a row of C values then has
        Σ(x/S)² ≤ 64·C (16384 for C=256), below fp16's 65504, and rows with small values are untouched (S = 1).
        """

        def __init__(self, ln: nn.Module, channels_first: bool = False) -> None:
            super().__init__()
            self.weight = ln.weight
            self.bias = ln.bias
            self.eps = float(ln.eps)
            self.channels_first = channels_first
            self.normalized_shape = tuple(ln.normalized_shape)

        def forward(self, x):
            dim = 1 if self.channels_first else -1
            amax = x.abs().amax(dim, keepdim=True)
            s = (amax * 0.125).clamp(min=1.0)
            xs = x / s
            if _Recorder.active is not None:
                _Recorder.active.add("layer_norm", _ln_stats(x, dim, s))
            mu = xs.mean(dim, keepdim=True)
            d = xs - mu
            var = (d * d).mean(dim, keepdim=True)
            y = d * torch.rsqrt(var + self.eps / (s * s))  # (x-μ)/S / sqrt(var/S² + eps/S²) == LayerNorm(x)
            if self.weight is not None:
                if self.channels_first:
                    y = y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)
                else:
                    y = y * self.weight + self.bias
            return y

    return SafeLayerNorm


def safe_layernorm_class():
    """The SafeLayerNorm nn.Module class (built on first use, so this module imports without torch)."""
    global _SAFE_LN_CLASS
    if _SAFE_LN_CLASS is None:
        _SAFE_LN_CLASS = _make_safe_ln_class()
    return _SAFE_LN_CLASS


def replace_layernorms(module) -> int:
    """Swap every nn.LayerNorm (and rfdetr's channels-first projector LayerNorm) for SafeLayerNorm, in place."""
    from torch import nn

    cls = safe_layernorm_class()
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, cls):
                continue
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, cls(child, channels_first=False))
                n += 1
            elif type(child).__name__ == "LayerNorm" and type(child).__module__.endswith("projector"):
                setattr(parent, name, cls(child, channels_first=True))
                n += 1
    return n


def activation_maxima(module, inputs: Sequence[Any]) -> dict[str, Any]:
    """Run ``module(*inputs)`` and record, per LayerNorm/softmax site, the largest activation feeding it.

    Returns {"sites": {site: stats}, "layer_norm_max_abs_in", "layer_norm_max_abs_reduced", "layer_norm_max_sumsq",
    "softmax_max_abs_in", "fp16_overflow_sites"}: for a plain LayerNorm the reduction domain is x itself; for
    SafeLayerNorm it is x/S. A site overflows fp16 when its Σ(x−μ)² (or Σx²) exceeds 65504.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    rec = _Recorder()

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.layer_norm:
                shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
                x = args[0]
                dims = tuple(range(x.dim() - len(shape), x.dim()))
                xx = x.detach().float().flatten(dims[0]) if len(dims) > 1 else x
                rec.add("layer_norm", _ln_stats(xx, -1))
            elif func in (torch.softmax, F.softmax, torch.Tensor.softmax):
                x = args[0]
                rec.add("softmax", {"max_abs_in": float(x.detach().abs().max())})
            return func(*args, **kwargs)

    def pre(mod, _inp):
        rec.stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod, _inp, _out):
        rec.stack.pop()

    names = {id(m): n for n, m in module.named_modules()}
    hooks = []
    for m in module.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    _Recorder.active = rec
    try:
        with torch.no_grad(), Mode():
            module(*inputs)
    finally:
        _Recorder.active = None
        for h in hooks:
            h.remove()
    ln = [v for v in rec.sites.values() if v["kind"] == "layer_norm"]
    sm = [v for v in rec.sites.values() if v["kind"] == "softmax"]
    over = sorted(k for k, v in rec.sites.items() if v["kind"] == "layer_norm" and
                  max(v["max_sumsq"], v["max_sum_sq_raw"]) > FP16_MAX)
    return {"sites": rec.sites,
            "layer_norm_sites": len(ln),
            "layer_norm_max_abs_in": max((v["max_abs_in"] for v in ln), default=0.0),
            "layer_norm_max_abs_reduced": max((v["max_abs_reduced"] for v in ln), default=0.0),
            "layer_norm_max_sumsq": max((max(v["max_sumsq"], v["max_sum_sq_raw"]) for v in ln), default=0.0),
            "softmax_sites": len(sm),
            "softmax_max_abs_in": max((v["max_abs_in"] for v in sm), default=0.0),
            "fp16_overflow_sites": over}


def _main(argv: list[str]) -> None:
    if argv and argv[0] == "_verdict":
        _child_verdict(*argv[1:])
        return
    if argv and argv[0] in ("verdict", "check"):
        for p in argv[1:]:
            print(op_check(p).line())
            if argv[0] == "verdict":
                for f32 in (False, True):
                    print("  " + delegate_verdict(p, enforce_f32=f32).line())
        return
    raise SystemExit("usage: python -m nailkit.gpu.delegate verdict|check FILE.tflite ...")


if __name__ == "__main__":
    _main(sys.argv[1:])
